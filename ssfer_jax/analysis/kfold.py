"""K-fold cross-validation of a fine-tuning recipe (SSFER's Table 5 protocol).

Trains one stage-2 run per fold of a `data_prep split --folds K` split set, each selected on
its own val list, evaluates each on its fold's test list, and prints mean +- std over folds.

  python -m data_prep split --data DATA --name cv --folds 5 --group-by '^(.*)_\\d+\\.\\w+$'
  python -m ssfer_jax.analysis.kfold --config configs/finetune.py:cpu --workdir runs/cv \
      --folds cv --config.data.dir=DATA [--config.init_from=STAGE1_RUN ...]

Fold k trains in WORKDIR/fold{k}; finished folds are reused, so an interrupted driver
resumes. The summary goes to WORKDIR/kfold.json.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from data_prep import split as split_lib
from ssfer_jax import errors, evaluate, results
from ssfer_jax.runtime import logs, sharding
from ssfer_jax.trainers import finetune, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/finetune.py:VARIANT")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-directory per fold goes here.")
_FOLDS = flags.DEFINE_string("folds", None, "The NAME given to `data_prep split --folds`.")
flags.mark_flags_as_required(["config", "workdir", "folds"])

METRICS = ("accuracy", "mean_class_accuracy", "macro_f1")


def run_folds(config, workdir: str, folds_name: str) -> dict:
  names = split_lib.fold_names(config.data.dir, folds_name)
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  per_fold = []
  for k, split_name in enumerate(names):
    fold_config = config.copy_and_resolve_references().unlock()
    fold_config.data.split = split_name
    run = os.path.join(workdir, f"fold{k}")
    logging.info("== fold %d/%d: split %s -> %s", k + 1, len(names), split_name, run)
    if not os.path.exists(os.path.join(run, results.RESULT_FILE)):
      loop.train(fold_config, run, finetune.make_stage)
    report = evaluate.evaluate_result(
        run, data_dir=config.data.dir, split=split_name, lists=("test",), mesh=mesh,
        batch_size=config.eval.batch_size, num_threads=config.data.num_threads)
    per_fold.append({"fold": k, "split": split_name, "step": report["step"],
                     "weights": report["weights"],
                     **{m: report[m] for m in METRICS}, "count": report["count"]})
  summary = {m: {"mean": float(np.mean([f[m] for f in per_fold])),
                 "std": float(np.std([f[m] for f in per_fold], ddof=1)) if len(per_fold) > 1
                 else 0.0} for m in METRICS}
  return {"folds": per_fold, "summary": summary, "data": os.path.abspath(config.data.dir),
          "split_set": folds_name}


def format_summary(result: dict) -> str:
  lines = [f"{'fold':<6}{'test':>6}{'accuracy':>10}{'mean-class':>12}{'macro F1':>10}"]
  for f in result["folds"]:
    lines.append(f"{f['fold']:<6}{f['count']:>6}" + "".join(
        f"{100 * f[m]:>{w}.1f}" for m, w in zip(METRICS, (10, 12, 10))))
  s = result["summary"]
  lines.append(f"{'mean':<12}" + "".join(
      f"{100 * s[m]['mean']:>{w - 5}.1f} +- {100 * s[m]['std']:.1f}"
      for m, w in zip(METRICS, (10, 12, 10))))
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup(_WORKDIR.value)
  jax.config.update("jax_threefry_partitionable", True)
  config = _CONFIG.value
  if config.stage != finetune.STAGE:
    raise app.UsageError(f"k-fold runs the fine-tuning stage; {config.stage!r} given.")
  try:
    result = run_folds(config, _WORKDIR.value, _FOLDS.value)
  except errors.UserError as e:
    sys.exit(errors.report(e, log=True))
  with open(os.path.join(_WORKDIR.value, "kfold.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(format_summary(result))


if __name__ == "__main__":
  app.run(main)
