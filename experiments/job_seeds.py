"""The one-command job over paired seeds: each row of the jobs' test tables as mean +- std.

Each WORKDIR is one finished job (`python -m ssfer_jax.main --config configs/ssfer.py:VARIANT
--workdir WORKDIR --config.pretrain.seed=S --config.finetune.seed=S --config.semisup.seed=S`)
on the same build and split; this reads their `evaluation.json` (the test lists, read once by
each job) and prints, per row, the mean and standard deviation over the jobs of accuracy,
mean-class accuracy over the classes with at least 15 test faces, and macro F1, with each
seed's accuracy beside them. Rows must match across the jobs (same stages, same lists).

  python -m experiments.job_seeds runs/small_s0 runs/small_s1 runs/small_s2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from ssfer_jax import evaluate, job

MIN_SUPPORT = 15


def load(workdirs: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
  """Row names and, per metric, an array [rows, jobs] (percent)."""
  tables = []
  for w in workdirs:
    path = os.path.join(w, job.EVALUATION_FILE)
    if not os.path.exists(path):
      raise SystemExit(f"{path} not found: run the job in {w} to its end first.")
    with open(path) as f:
      tables.append(json.load(f))
  names = [r["name"] for r in tables[0]["rows"]]
  for w, t in zip(workdirs, tables):
    if [r["name"] for r in t["rows"]] != names or t["lists"] != tables[0]["lists"]:
      raise SystemExit(f"{w}: its evaluation has other rows or lists than {workdirs[0]}'s; "
                       "compare jobs of the same variant on the same build.")
  metric = {
      "accuracy": lambda r: r["accuracy"],
      f"mean-class (>= {MIN_SUPPORT})": lambda r: evaluate.subset_mean_class_accuracy(
          r, MIN_SUPPORT),
      "macro F1": lambda r: r["macro_f1"],
  }
  return names, {m: 100 * np.array([[fn(t["rows"][i]) for t in tables]
                                    for i in range(len(names))]) for m, fn in metric.items()}


def table(names: list[str], values: dict[str, np.ndarray]) -> str:
  jobs = next(iter(values.values())).shape[1]
  head = (f"{'':<36}" + "".join(f"{m:>24}" for m in values)
          + "".join(f"{'acc ' + str(j):>9}" for j in range(jobs)))
  lines = [head]
  for i, name in enumerate(names):
    cells = "".join(f"{v[i].mean():>16.1f} +- {v[i].std(ddof=1) if jobs > 1 else 0:>4.1f}"
                    for v in values.values())
    lines.append(f"{name:<36}{cells}" + "".join(f"{a:>9.1f}" for a in values["accuracy"][i]))
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("workdirs", nargs="+", help="finished job workdirs, one per seed")
  args = ap.parse_args(argv)
  names, values = load(args.workdirs)
  print(f"{len(args.workdirs)} jobs, test lists; mean +- std over them (std with n - 1):")
  print(table(names, values))
  return 0


if __name__ == "__main__":
  sys.exit(main())
