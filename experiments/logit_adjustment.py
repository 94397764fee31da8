"""What a trained classifier's scores can give the rare classes: post-hoc logit adjustment.

Each RUN is a finished stage-2 or stage-3 run on the build and split it trained on. Its
softmax on val and test is read once; then, for each tau, the prediction is
argmax(log p - tau log prior), the prior being train_labeled's class frequencies (add-one
smoothed, `classifier.class_prior`). tau = 0 is the model as trained; larger tau trades
accuracy on the frequent classes for recall on the rare ones (Menon et al. 2021). Per tau the
table gives accuracy and mean-class accuracy over the classes with >= 15 faces in the list,
mean over the runs, on val and on test; the plot draws mean-class against accuracy, with the
majority class and (`--floor`) the classical floor as points.

The operating point is chosen on val alone: per run, the largest tau whose val accuracy stays
within `--budget` points of tau = 0's. Its test figures are printed last, read once.

  python -m experiments.logit_adjustment --data BUILD runs/small_s0/finetune \
      runs/small_s1/finetune runs/small_s2/finetune --out runs/logit_adjustment --floor
"""

from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np

from ssfer_jax import evaluate, results
from ssfer_jax.analysis import classical
from ssfer_jax.input import records
from ssfer_jax.runtime import figures, sharding
from ssfer_jax.trainers import classifier

MIN_SUPPORT = 15
LISTS = ("val", "test")


def scores(run: str, data_dir: str, split: str, mesh) -> tuple[dict, np.ndarray, list]:
  """{list: (softmax [N, C], model-class targets [N])}, the log prior [C] and the classes, in
  the model's class order."""
  clf = results.load_classifier(run, mesh=mesh)
  out = {}
  for name in LISTS:
    ev = evaluate.Evaluator.for_classifier(clf, data_dir=data_dir, split=split, lists=[name],
                                           mesh=mesh)
    p, t = ev.probabilities(clf.params)
    out[name] = (p[t >= 0], t[t >= 0])
  labels = records.read_labels(data_dir, records.load_split(data_dir, split, ["train_labeled"]),
                               split)
  known = ev.class_map.model_labels(labels)
  log_prior = np.log(classifier.class_prior(known[known >= 0], len(clf.classes)))
  return out, log_prior, clf.classes


def mean_class(report: dict) -> float:
  """Mean-class accuracy over the classes with >= MIN_SUPPORT faces, percent (nan if none)."""
  value = evaluate.subset_mean_class_accuracy(report, MIN_SUPPORT)
  return float("nan") if value is None else 100 * value


def metrics(probs: np.ndarray, targets: np.ndarray, log_prior: np.ndarray, tau: float,
            classes: Sequence[str]) -> tuple[float, float]:
  """(accuracy, mean-class accuracy over classes with >= MIN_SUPPORT faces), in percent."""
  pred = np.argmax(np.log(np.maximum(probs, 1e-12)) - tau * log_prior, axis=-1)
  cm = np.zeros((len(classes), len(classes)), np.int64)
  np.add.at(cm, (targets, pred), 1)
  report = evaluate.metrics_from_confusion(cm, classes)
  return 100 * report["accuracy"], mean_class(report)


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("runs", nargs="+", help="finished stage-2 or stage-3 runs")
  ap.add_argument("--data", required=True, help="the `data_prep build` they trained on")
  ap.add_argument("--split", default="default")
  ap.add_argument("--taus", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                  help="comma-separated tau values (0 first)")
  ap.add_argument("--budget", type=float, default=1.0,
                  help="val accuracy points the chosen tau may lose against tau 0")
  ap.add_argument("--floor", action="store_true",
                  help="also fit the classical floor (pixels, HOG) on test: ~3 minutes")
  ap.add_argument("--out", help="where logit_adjustment.png goes")
  args = ap.parse_args(argv)
  taus = [float(t) for t in args.taus.split(",")]
  if taus[0] != 0 or taus != sorted(taus):
    raise SystemExit(f"--taus {args.taus}: give ascending values starting at 0.")
  mesh = sharding.single_device_mesh()
  # table[run, tau, list] = (accuracy, mean-class)
  table = np.zeros((len(args.runs), len(taus), len(LISTS), 2))
  for i, run in enumerate(args.runs):
    out, log_prior, classes = scores(run, args.data, args.split, mesh)
    for j, tau in enumerate(taus):
      for k, name in enumerate(LISTS):
        table[i, j, k] = metrics(*out[name], log_prior, tau, classes)
  mean = table.mean(axis=0)
  print(f"{len(args.runs)} run(s); mean over them; mean-class over the classes with >= "
        f"{MIN_SUPPORT} faces in the list")
  print(f"{'tau':>6}{'val acc':>10}{'val m-c':>10}{'test acc':>10}{'test m-c':>10}")
  for j, tau in enumerate(taus):
    print(f"{tau:>6.2f}" + "".join(f"{v:>10.1f}" for v in mean[j].reshape(-1)))
  majority = evaluate.majority_report(args.data, args.split, ["test"])
  baseline = {"majority class": (100 * majority["accuracy"], mean_class(majority))}
  if args.floor:
    for r in classical.floor_reports(args.data, args.split, ("test",)):
      baseline[r["name"]] = (100 * r["accuracy"], mean_class(r))
  for name, (acc, mc) in baseline.items():
    print(f"{name:<40} test accuracy {acc:.1f}, mean-class {mc:.1f}")
  chosen = []
  for i in range(len(args.runs)):
    ok = [j for j in range(len(taus)) if table[i, j, 0, 0] >= table[i, 0, 0, 0] - args.budget]
    chosen.append(max(ok))
  picked = np.array([table[i, j] for i, j in enumerate(chosen)])
  print(f"chosen on val (largest tau within {args.budget:g} val points of tau 0): tau "
        f"{', '.join(f'{taus[j]:g}' for j in chosen)}; test accuracy "
        f"{picked[:, 1, 0].mean():.1f} (tau 0: {table[:, 0, 1, 0].mean():.1f}), mean-class "
        f"{picked[:, 1, 1].mean():.1f} (tau 0: {table[:, 0, 1, 1].mean():.1f})")
  if args.out:
    series = {f"{name} (tau {taus[0]:g} to {taus[-1]:g})": (list(mean[:, k, 0]),
                                                           list(mean[:, k, 1]))
              for k, name in enumerate(LISTS)}
    series.update({f"{name} (test)": ([acc], [mc]) for name, (acc, mc) in baseline.items()})
    fig = figures.curves_figure(
        [figures.Panel(series, f"mean-class accuracy, classes >= {MIN_SUPPORT} faces (%)")],
        f"Post-hoc logit adjustment, mean of {len(args.runs)} run(s)", xlabel="accuracy (%)")
    print("wrote", figures.save(fig, os.path.join(args.out, "logit_adjustment.png")))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
