"""Does it work? Stage 2 ablations on real faces: {random init, MAE init} x {no mixing, Mixup,
FaceMix}, paired seeds, one shared MAE pretraining; test-list metrics as mean +- std.

The dataset is a `data_prep` build with a split (the protocol: the shared
facial_expressions set, 25% of each class labeled, identity-grouped). Every cell is one
stage-2 run of the CPU science recipe (`configs/finetune.py:small`, from
`pretrain.py:small`) selected on val (never on test), then evaluated once on test; the
classical floor (`ssfer_jax/analysis/classical.py`) and the majority class stand under the
table. Cells are appended to OUT/cells.jsonl as they finish, so an interrupted grid resumes where it stopped.

  python -m experiments.ablations --data /work/builds/fe96_m1.6 --out runs/ablations \
      [--seeds 0,1,2] [--mae-epochs N] [--ft-epochs N] [--extra balanced] [--stage3]

Seeds are paired across arms: seed s fixes the classifier's initialisation, the batch order
and the augmentation of every arm, so arms differ only in what the row names.

`--stage3` adds the semi-supervised grid (`STAGE3_ARMS`): each arm starts from the same
seed's MAE + FaceMix stage-2 run and trains `--ss-epochs` passes over train_unlabeled with
that seed; the stage-2 run itself is the "stage 2 alone" row. `--stage3-from PATTERN` runs
that grid alone, from stage-2 runs made elsewhere (e.g. each seed's job, which pairs each
seed's stage 1 with its stage 2):

  python -m experiments.ablations --data /work/builds/fe96 --out runs/stage3_grid \
      --stage3-from 'runs/small_s{seed}/finetune'

The stage-3 table adds the last epoch's pseudo-label accuracy (masked rows whose true label
the build has) and mask rate, and for the LEAF and negative-learning arms how often the true
label was in the positive set and how often a class pushed down as "not this" was in fact the
true label.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import logging
import os
import sys
import time

import jax
import numpy as np

from benchmarks import machine
from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from configs import semisup as semisup_config
from ssfer_jax import evaluate, results
from ssfer_jax.analysis import classical
from ssfer_jax.input import records
from ssfer_jax.runtime import logs, sharding, writers
from ssfer_jax.trainers import finetune, loop, pretrain, semisup

MIXINGS = ("none", "mixup", "facemix")
# name -> (teacher, threshold policy, config options): EMA teacher with each policy, and
# FixMatch (the student labels itself) at the same fixed tau, as the paper's Table 12
# compares them. Then LEAF with the policy family of its public code (DTM-like per-class
# thresholds) and with the policy that was best on val in the rows above (FlexMatch, tied
# with FreeMatch), and negative learning with that policy and with the fixed tau, under
# which the threshold rejects rows for it to learn from.
STAGE3_ARMS = {"ema_fixed": ("ema", "fixed", ()), "ema_dtm": ("ema", "dtm", ()),
               "ema_flexmatch": ("ema", "flexmatch", ()),
               "ema_freematch": ("ema", "freematch", ()),
               "fixmatch_fixed": ("student", "fixed", ()),
               "ema_dtm_leaf": ("ema", "dtm", ("leaf",)),
               "ema_flexmatch_leaf": ("ema", "flexmatch", ("leaf",)),
               "ema_flexmatch_negative": ("ema", "flexmatch", ("negative",)),
               "ema_fixed_negative": ("ema", "fixed", ("negative",))}
# Last-epoch diagnostics a stage-3 cell keeps (absent where they do not apply).
STAGE3_DIAGNOSTICS = ("pseudo_label_accuracy", "mask_rate", "teacher_accuracy_unlabeled",
                      "positive_set_accuracy", "negative_rows", "negative_label_error")
INITS = ("random", "mae")
MIN_TEST_SUPPORT = 15   # mean-class accuracy over classes with at least this many test images
TABLE_METRICS = ("accuracy", "macro_f1", "mean_class_accuracy_frequent", "mean_class_accuracy")


def pretrain_once(args) -> str:
  run = os.path.join(args.out, "mae")
  c = pretrain_config.get_config("small").unlock()
  c.data.dir, c.data.split = args.data, args.split
  c.num_epochs = args.mae_epochs or c.num_epochs
  c.mesh.shape = (1, 1)
  c.log_every = 50
  c.checkpoint_every = 10_000
  c.viz_every = 100_000
  loop.train(c, run, pretrain.make_stage)
  return run


def cell_config(args, init: str, mix: str, seed: int, mae_run: str, extra: str | None):
  c = finetune_config.get_config("small").unlock()
  c.data.dir, c.data.split = args.data, args.split
  c.seed = seed
  c.num_epochs = c.few_labels_epochs = args.ft_epochs or c.num_epochs
  c.eval.every_epochs = 1
  c.mesh.shape = (1, 1)
  c.mix.kind = mix
  c.init_from = mae_run if init == "mae" else ""
  c.checkpoint_every = 10_000
  c.log_every = 50
  if extra:
    c.loss.class_weighting = extra
  return c


def read_cells(path: str) -> list[dict]:
  """The cells a grid finished so far (an interrupted grid resumes after them)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def append_cell(path: str, cell: dict) -> dict:
  with open(path, "a") as f:
    f.write(json.dumps(cell) + "\n")
  return cell


def eta(t0: float, i: int, total: int) -> float:
  """Seconds left after cell i (0-based) of `total`, at the mean pace so far."""
  return (time.perf_counter() - t0) / (i + 1) * (total - i - 1)


def stage3_config(args, arm: str, seed: int, stage2_run: str):
  teacher, threshold, options = STAGE3_ARMS[arm]
  c = semisup_config.get_config(",".join(("small",) + options)).unlock()
  c.data.dir, c.data.split = args.data, args.split
  c.init_from = stage2_run
  c.seed = seed
  c.num_epochs = args.ss_epochs or c.num_epochs
  c.mesh.shape = (1, 1)
  c.teacher, c.threshold.policy = teacher, threshold
  c.checkpoint_every = 10_000
  c.log_every = 50
  return c


def stage3_grid(args, mesh, starts: dict[int, str]) -> str:
  """The semi-supervised arms from each seed's MAE + FaceMix stage-2 run (`starts`: seed ->
  run); the table, with those runs, the majority class and the classical floor under it."""
  path = os.path.join(args.out, "stage3_cells.jsonl")
  done = read_cells(path)
  finished = {(c["arm"], c["seed"]) for c in done}
  # Arm by arm over the seeds: an interrupted grid leaves whole arms to compare.
  todo = [(arm, seed) for arm in STAGE3_ARMS for seed in starts if (arm, seed) not in finished]
  # LEAF's levels take one pooled feature: a stage-2 model with a flattened head has none.
  leaf = [a for a in STAGE3_ARMS if "leaf" in STAGE3_ARMS[a][2]]
  pool = finetune_config.get_config("small").model.pool
  if pool == "flatten" and any(arm in leaf for arm, _ in todo):
    print(f"skipping {leaf}: the small recipe's classifier reads every token (pool "
          "'flatten'), and LEAF needs one pooled feature (pool 'cls' or 'gap').", flush=True)
    todo = [(arm, seed) for arm, seed in todo if arm not in leaf]
  start_val = {seed: results.read_result(run)["val"]["accuracy"] for seed, run in starts.items()}
  t0 = time.perf_counter()
  for i, (arm, seed) in enumerate(todo):
    stage2 = starts[seed]
    run = os.path.join(args.out, "runs", f"stage3_{arm}_s{seed}")
    t = time.perf_counter()
    loop.train(stage3_config(args, arm, seed, stage2), run, semisup.make_stage)
    result = results.read_result(run)
    last = [r for r in writers.read_metrics(run) if r["split"] == "epoch"][-1]
    cell = {"arm": arm, "seed": seed, "weights": result["weights"], "step": result["step"],
            "val_select": result["val"]["accuracy"], "test": summarise(test_report(run, args, mesh)),
            **{k: last.get(k) for k in STAGE3_DIAGNOSTICS}, "seconds": time.perf_counter() - t}
    done.append(append_cell(path, cell))
    left = eta(t0, i, len(todo))
    share = lambda k: "-" if cell[k] is None else f"{cell[k]:.3f}"
    print(f"[stage 3 {i + 1}/{len(todo)}] {arm} seed {seed}: val acc {cell['val_select']:.3f} "
          f"(stage 2 {start_val[seed]:.3f}), test acc "
          f"{cell['test']['accuracy']:.3f}, mask rate {share('mask_rate')}, pseudo-label acc "
          f"{share('pseudo_label_accuracy')} ({cell['seconds']:.0f}s; ETA {left / 60:.0f} min)",
          flush=True)
  print(provenance(args))
  start = [{"val_select": start_val[seed], "test": summarise(test_report(run, args, mesh))}
           for seed, run in starts.items()]
  return print_stage3_table(done, start, evaluate.majority_report(args.data, args.split),
                            classical.floor_reports(args.data, args.split),
                            f"`{args.stage3_from}`" if args.stage3_from else "MAE + FaceMix")


def provenance(args) -> str:
  """The line above a table: the data, the machine and the day."""
  return (f"\n{args.data} (split {args.split}); {machine.cpu_model()}, {os.cpu_count()} CPUs, "
          f"{datetime.date.today()}")


def mean_std(xs) -> str:
  """Percent mean +- sample standard deviation over seeds ("-" for none)."""
  if not len(xs):
    return "-"
  return f"{100 * np.mean(xs):.1f} +- {100 * np.std(xs, ddof=1) if len(xs) > 1 else 0:.1f}"


def print_stage3_table(cells: list[dict], start: list[dict], baseline: dict,
                       floors: list[dict], start_name: str = "MAE + FaceMix") -> str:
  """The stage-3 arms beside their starts (the stage-2 runs of the same seeds, `start_name`),
  the majority class and the floor."""
  cols = TABLE_METRICS
  fmt = mean_std
  lines = [f"| arm | seeds | accuracy | macro F1 | mean-class (>= {MIN_TEST_SUPPORT} test) | "
           "mean-class (all) | val acc | pseudo-label acc | mask rate | teacher acc (unlabeled) "
           "| true label in positive set | rows learning negatives | negative = true label "
           "| weights | minutes |", "|" + "|".join("---" for _ in range(15)) + "|"]
  lines.append(f"| stage 2 alone ({start_name}) | {len(start)} | "
               + " | ".join(fmt([c["test"][k] for c in start]) for k in cols)
               + f" | {fmt([c['val_select'] for c in start])} |" + " - |" * 8)
  for arm in STAGE3_ARMS:
    group = [c for c in cells if c["arm"] == arm]
    if not group:
      continue
    opt = lambda k: fmt([g[k] for g in group if g.get(k) is not None])
    weights = "/".join(sorted({g["weights"] for g in group}))
    lines.append(f"| {arm} | {len(group)} | "
                 + " | ".join(fmt([g["test"][k] for g in group]) for k in cols)
                 + f" | {fmt([g['val_select'] for g in group])} | "
                 + " | ".join(opt(k) for k in STAGE3_DIAGNOSTICS)
                 + f" | {weights} | {np.mean([g['seconds'] for g in group]) / 60:.1f} |")
  lines += baseline_rows(baseline, floors, lead=1, trailing=len(STAGE3_DIAGNOSTICS) + 2)
  table = "\n".join(lines)
  print(table)
  return table


def knn_probe(args, mae_run: str, mesh, k: int = 20) -> dict:
  """How much expression the frozen encoders carry: cosine k-NN (k = 20) from train_labeled
  to test, for a randomly initialised encoder and the MAE one. Says whether pretraining
  learned anything fine-tuning could use, independently of the fine-tuning recipe."""
  classes = records.load_manifest(args.data)["classes"]
  out = {}
  for init in INITS:
    c = cell_config(args, init, "none", 0, mae_run, None)
    xtr, ytr = finetune.frozen_features(c, ("train_labeled",), mesh)
    xte, yte = finetune.frozen_features(c, ("test",), mesh)
    xtr /= np.linalg.norm(xtr, axis=1, keepdims=True) + 1e-12
    xte /= np.linalg.norm(xte, axis=1, keepdims=True) + 1e-12
    nearest = np.argsort(-xte @ xtr.T, axis=1)[:, :k]
    votes = np.stack([np.bincount(row, minlength=len(classes)) for row in ytr[nearest]])
    cm = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(cm, (yte, votes.argmax(1)), 1)
    out[init] = summarise(evaluate.metrics_from_confusion(cm, classes))
  return out


def test_report(run: str, args, mesh) -> dict:
  clf = results.load_classifier(run, mesh=mesh)
  return evaluate.Evaluator.for_classifier(clf, data_dir=args.data, split=args.split,
                                           lists=("test",), mesh=mesh, num_threads=2)(clf.params)


def summarise(report: dict) -> dict:
  return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"],
          "mean_class_accuracy": report["mean_class_accuracy"],
          "mean_class_accuracy_frequent": evaluate.subset_mean_class_accuracy(
              report, MIN_TEST_SUPPORT)}


def baseline_rows(baseline: dict, floors: list[dict], lead: int, trailing: int) -> list[str]:
  """Table rows for the majority class and each classical floor: the name, `lead` dashes, the
  test metrics, the val accuracy, `trailing` dashes."""
  first, rest = " - |" * lead, " - |" * trailing
  b = summarise(baseline)
  rows = [f"| majority ({baseline['majority_class']}) |{first} "
          + " | ".join(f"{100 * b[k]:.1f}" for k in TABLE_METRICS) + " | - |" + rest]
  for floor in floors:
    f = summarise(floor)
    rows.append(f"| {floor['name']} (C {floor['C']:g}) |{first} "
                + " | ".join(f"{100 * f[k]:.1f}" for k in TABLE_METRICS)
                + f" | {100 * floor['val_accuracy']:.1f} |" + rest)
  return rows


def print_table(cells: list[dict], baseline: dict, floors: list[dict]) -> str:
  by_arm = collections.defaultdict(list)
  for c in cells:
    by_arm[(c["init"], c["mix"], c.get("extra") or "")].append(c)
  cols = TABLE_METRICS
  head = (f"| {'init':<6} | {'mixing':<8} | {'extra':<8} | seeds | accuracy | macro F1 | "
          f"mean-class (>= {MIN_TEST_SUPPORT} test) | mean-class (all) | val acc | minutes |")
  lines = [head, "|" + "|".join("---" for _ in range(10)) + "|"]
  fmt = mean_std
  for (init, mix, extra), group in sorted(by_arm.items(), key=lambda kv: (
      INITS.index(kv[0][0]), MIXINGS.index(kv[0][1]), kv[0][2])):
    vals = [fmt([g["test"][k] for g in group]) for k in cols]
    val = fmt([g["val_select"] for g in group])
    minutes = np.mean([g["seconds"] for g in group]) / 60
    lines.append(f"| {init:<6} | {mix:<8} | {extra:<8} | {len(group)} | " + " | ".join(vals) +
                 f" | {val} | {minutes:.1f} |")
  lines += baseline_rows(baseline, floors, lead=3, trailing=1)
  table = "\n".join(lines)
  print(table)
  return table


def stage2_grid(args, mesh, seeds: list[int]) -> str:
  """One shared MAE run, then {random, MAE} x MIXINGS (and `--extra` weightings) per seed; the
  table, with the majority class and the floor, also written to OUT/table.md."""
  cells_path = os.path.join(args.out, "cells.jsonl")
  done = read_cells(cells_path)
  key = lambda c: (c["init"], c["mix"], c["seed"], c.get("extra") or "")
  finished = {key(c) for c in done}

  t0 = time.perf_counter()
  mae_run = pretrain_once(args)
  print(f"MAE pretraining ready in {mae_run} ({time.perf_counter() - t0:.0f}s)", flush=True)
  grid = [(init, mix, seed, None) for seed in seeds for init in INITS for mix in MIXINGS]
  grid += [("mae", "facemix", seed, extra) for extra in args.extra for seed in seeds]
  todo = [g for g in grid if (g[0], g[1], g[2], g[3] or "") not in finished]
  for i, (init, mix, seed, extra) in enumerate(todo):
    run = os.path.join(args.out, "runs", f"{init}_{mix}{'_' + extra if extra else ''}_s{seed}")
    t = time.perf_counter()
    loop.train(cell_config(args, init, mix, seed, mae_run, extra), run, finetune.make_stage)
    result = results.read_result(run)
    test = test_report(run, args, mesh)
    cell = {"init": init, "mix": mix, "seed": seed, "extra": extra or "",
            "weights": result["weights"], "step": result["step"],
            "val_select": result["val"]["accuracy"], "test": summarise(test),
            "test_per_class": test["per_class"], "seconds": time.perf_counter() - t}
    done.append(append_cell(cells_path, cell))
    left = eta(t0, i, len(todo))
    print(f"[{i + 1}/{len(todo)}] {init} {mix} {extra or ''} seed {seed}: test acc "
          f"{cell['test']['accuracy']:.3f}, macro F1 {cell['test']['macro_f1']:.3f} "
          f"({cell['seconds']:.0f}s; ETA {left / 60:.0f} min)", flush=True)

  print(provenance(args))
  table = print_table(done, evaluate.majority_report(args.data, args.split),
                      classical.floor_reports(args.data, args.split))
  if args.probe:
    probe = knn_probe(args, mae_run, mesh)
    table += "\n\nfrozen encoders, cosine 20-NN from train_labeled to test:\n" + "\n".join(
        f"  {init}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in r.items())
        for init, r in probe.items())
    print(table.split("\n\n")[-1])
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(table + "\n")
  return table


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True)
  ap.add_argument("--split", default="default")
  ap.add_argument("--out", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--mae-epochs", type=int, help="default: pretrain.py:small's")
  ap.add_argument("--ft-epochs", type=int, help="default: finetune.py:small's")
  ap.add_argument("--probe", action="store_true",
                  help="also a frozen-feature k-NN probe of the random and MAE encoders")
  ap.add_argument("--extra", action="append", default=[],
                  help="also run MAE + FaceMix with this loss.class_weighting (balanced, sqrt)")
  ap.add_argument("--stage3", action="store_true",
                  help="also the semi-supervised grid from the MAE + FaceMix runs")
  ap.add_argument("--ss-epochs", type=int,
                  help="stage-3 epochs (passes over train_unlabeled; default semisup.py:small's)")
  ap.add_argument("--stage3-from", metavar="PATTERN",
                  help="only the stage-3 grid, from these stage-2 runs: one per seed, '{seed}' "
                       "in the path (e.g. 'runs/small_s{seed}/finetune', each seed's job)")
  args = ap.parse_args(argv)
  seeds = list(map(int, args.seeds.split(",")))
  if args.stage3_from:   # checked before anything is written or compiled
    if "{seed}" not in args.stage3_from and len(seeds) > 1:
      ap.error(f"--stage3-from {args.stage3_from}: put '{{seed}}' in the path, one stage-2 run "
               "per seed (seeds are paired: each arm starts from its own seed's run).")
    starts = {seed: args.stage3_from.format(seed=seed) for seed in seeds}
    missing = [run for run in starts.values()
               if not os.path.exists(os.path.join(run, "result.json"))]
    if missing:
      ap.error(f"--stage3-from: no finished stage-2 run (result.json) in {', '.join(missing)}; "
               "name one run per seed with '{seed}' in the path.")
  os.makedirs(args.out, exist_ok=True)
  logs.setup(args.out, "log.txt")
  jax.config.update("jax_threefry_partitionable", True)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  if not args.stage3_from:
    stage2_grid(args, mesh, seeds)
    starts = {seed: os.path.join(args.out, "runs", f"mae_facemix_s{seed}") for seed in seeds}
  if args.stage3 or args.stage3_from:
    table3 = stage3_grid(args, mesh, starts)
    with open(os.path.join(args.out, "stage3_table.md"), "w") as f:
      f.write(table3 + "\n")
  return 0


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  sys.exit(main())
