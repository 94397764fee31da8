"""Why does stage 2 learn (or not)? One factor at a time, on val only.

Each arm is a stage-2 run (`configs/finetune.py:BASE` plus the arm's overrides) on a build
and split; per arm it records the val accuracy selection saw (best over evaluations, raw or
EMA weights), the accuracy of those weights on train_labeled itself (un-augmented: can the
model fit its labels?), the training loss curve and the wall time. Test is never read here:
the recipe is chosen on val, and the test list is scored once, by the job, afterwards.

  python -m experiments.diagnose --data BUILD --out runs/diagnose [--base small] \
      --arm 'crop02:data.crop_scale=(0.2,1.0)' --arm 'crop06:data.crop_scale=(0.6,1.0)' ...

An arm is NAME:FIELD=VALUE;FIELD=VALUE... (values as Python literals, else strings; empty
after the colon = the base recipe). Finished arms are kept in OUT/arms.jsonl and skipped on
a rerun; `--plot` draws val and train accuracy per arm into OUT/diagnose.png and prints the
table with the classical floor (`ssfer_jax/analysis/classical.py`) and the majority class beside it.
`--probe STAGE1_RUN` fits a linear probe (logistic regression, C chosen on val) on the frozen
pooled features of that run's MAE encoder and of a random one: what pretraining carries.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import jax
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from configs import finetune as finetune_config
from ssfer_jax import evaluate, results
from ssfer_jax.analysis import classical
from ssfer_jax.runtime import logs, sharding
from ssfer_jax.trainers import finetune, loop


def parse_arm(text: str) -> tuple[str, dict]:
  name, _, rest = text.partition(":")
  overrides = {}
  for item in filter(None, (s.strip() for s in rest.split(";"))):
    field, _, value = item.partition("=")
    try:
      overrides[field.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      overrides[field.strip()] = value.strip()
  return name, overrides


def arm_config(args, overrides: dict):
  c = finetune_config.get_config(args.base).unlock()
  c.data.dir, c.data.split = args.data, args.split
  c.mesh.shape = (1, 1)
  c.checkpoint_every = 100_000
  c.tensorboard = False
  for field, value in overrides.items():
    node, *path = field.split(".")
    target = c
    for part in [node, *path][:-1]:
      target = target[part]
    target[[node, *path][-1]] = tuple(value) if isinstance(value, list) else value
  return c


def loss_curve(run: str) -> list[tuple[int, float]]:
  with open(os.path.join(run, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def run_arm(args, name: str, overrides: dict, mesh) -> dict:
  run = os.path.join(args.out, name)
  c = arm_config(args, overrides)
  t0 = time.perf_counter()
  loop.train(c, run, finetune.make_stage)
  seconds = time.perf_counter() - t0
  result = results.read_result(run)
  clf = results.load_classifier(run, mesh=mesh)
  fit = evaluate.Evaluator.for_classifier(clf, data_dir=args.data, split=args.split,
                                          lists=("train_labeled",), mesh=mesh,
                                          num_threads=2)(clf.params)
  val = result["val"]
  return {"arm": name, "overrides": overrides, "val_accuracy": val["accuracy"],
          "val_mean_class_frequent": evaluate.subset_mean_class_accuracy(val, 15),
          "train_accuracy": fit["accuracy"], "weights": clf.weights, "step": clf.step,
          "loss_curve": loss_curve(run), "seconds": seconds}


def linear_probe(args, name: str, init_from: str, overrides: dict, mesh) -> dict:
  """What a frozen encoder carries: logistic regression on its pooled features of
  train_labeled, C chosen on val (the same protocol as the classical floor)."""
  c = arm_config(args, overrides)
  c.init_from = init_from
  x_train, y_train = finetune.frozen_features(c, ("train_labeled",), mesh)
  x_val, y_val = finetune.frozen_features(c, ("val",), mesh)
  best = 0.0
  for C in (1e-3, 1e-2, 1e-1, 1.0):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    best = max(best, float(np.mean(model.fit(x_train, y_train).predict(x_val) == y_val)))
  return {"probe": name, "init_from": init_from, "val_accuracy": best}


def table(arms: list[dict], floors: list[dict], majority: dict) -> str:
  lines = ["| arm | overrides | val acc | val mean-class (>= 15) | train_labeled acc (fit) | "
           "selected step | minutes |", "|---|---|---|---|---|---|---|"]
  pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
  for a in arms:
    over = "; ".join(f"{k}={v}" for k, v in a["overrides"].items()) or "(base)"
    lines.append(f"| {a['arm']} | {over} | {pct(a['val_accuracy'])} | "
                 f"{pct(a['val_mean_class_frequent'])} | {pct(a['train_accuracy'])} | "
                 f"{a['step']} | {a['seconds'] / 60:.1f} |")
  for f in floors:
    lines.append(f"| {f['name']} | C={f['C']:g} | {pct(f['accuracy'])} | "
                 f"{pct(evaluate.subset_mean_class_accuracy(f, 15))} | - | - | - |")
  lines.append(f"| majority ({majority['majority_class']}) | - | {pct(majority['accuracy'])} | "
               f"{pct(evaluate.subset_mean_class_accuracy(majority, 15))} | - | - | - |")
  return "\n".join(lines)


def plot(arms: list[dict], floors: list[dict], majority: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(max(8, 0.8 * len(arms) + 6), 4.5))
  x = range(len(arms))
  ax.bar([i - 0.2 for i in x], [100 * a["val_accuracy"] for a in arms], 0.4, label="val")
  ax.bar([i + 0.2 for i in x], [100 * a["train_accuracy"] for a in arms], 0.4,
         label="train_labeled (fit)")
  for f, style in zip(floors, ("--", ":")):
    ax.axhline(100 * f["accuracy"], color="k", ls=style, lw=1, label=f"{f['name']} (val)")
  ax.axhline(100 * majority["accuracy"], color="r", lw=1, label="majority class (val)")
  ax.set_xticks(list(x), [a["arm"] for a in arms], rotation=45, ha="right")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(40, 100)
  ax.set_title("stage 2 per arm")
  ax.legend(fontsize=7)
  for a in arms:
    steps, losses = zip(*a["loss_curve"]) if a["loss_curve"] else ((), ())
    ax_loss.plot(steps, losses, label=a["arm"])
  ax_loss.set_xlabel("step")
  ax_loss.set_ylabel("training loss")
  ax_loss.set_title("training loss")
  ax_loss.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True, help="a `data_prep build` output")
  ap.add_argument("--split", default="default")
  ap.add_argument("--out", required=True)
  ap.add_argument("--base", default="small", help="configs/finetune.py variant (default small)")
  ap.add_argument("--arm", action="append", default=[], help="NAME:FIELD=VALUE;...")
  ap.add_argument("--plot", action="store_true", help="table + OUT/diagnose.png of every arm")
  ap.add_argument("--probe", metavar="STAGE1_RUN",
                  help="linear probes on the frozen encoder: this stage-1 run's and a random "
                       "one (the model of --probe-arm's overrides)")
  ap.add_argument("--probe-arm", default="probe:", help="NAME:FIELD=VALUE;... for --probe")
  args = ap.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  logs.setup(args.out, "log.txt")
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  path = os.path.join(args.out, "arms.jsonl")
  done = []
  if os.path.exists(path):
    with open(path) as f:
      done = [json.loads(line) for line in f if line.strip()]
  t0 = time.perf_counter()
  todo = [parse_arm(a) for a in args.arm if parse_arm(a)[0] not in {d["arm"] for d in done}]
  for i, (name, overrides) in enumerate(todo):
    print(f"== arm {i + 1}/{len(todo)} {name}: {overrides}", flush=True)
    arm = run_arm(args, name, overrides, mesh)
    with open(path, "a") as f:
      f.write(json.dumps(arm) + "\n")
    done.append(arm)
    left = (time.perf_counter() - t0) / (i + 1) * (len(todo) - i - 1)
    print(f"   val {100 * arm['val_accuracy']:.1f}  train {100 * arm['train_accuracy']:.1f}  "
          f"({arm['seconds'] / 60:.1f} min; about {left / 60:.0f} min left)", flush=True)
  if args.probe:
    name, overrides = parse_arm(args.probe_arm)
    for init in ("", args.probe):
      probe = linear_probe(args, f"{name} ({'MAE' if init else 'random'} encoder)", init,
                           overrides, mesh)
      print(f"linear probe, {probe['probe']}: val accuracy {100 * probe['val_accuracy']:.1f}")
      with open(os.path.join(args.out, "probes.jsonl"), "a") as f:
        f.write(json.dumps(probe) + "\n")
  if args.plot and done:
    floors = classical.floor_reports(args.data, args.split, ("val",))
    majority = evaluate.majority_report(args.data, args.split, ("val",))
    print(table(done, floors, majority))
    plot(done, floors, majority, os.path.join(args.out, "diagnose.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
