"""Classifier evaluation: accuracy, mean per-class accuracy, macro F1, per-class precision and
recall, the confusion matrix; as JSON and matplotlib PNGs; on any `data_prep` build.

Classes are matched by name between the model and the dataset, never by index: dataset
classes the model does not know are reported and their records excluded; records with
label -1 (unlabeled) are skipped and counted. The pass is sharded over the mesh; every
process reads its own slice, padding rows carry `valid` False, so each record counts once
on any number of processes.

  python -m ssfer_jax.evaluate --run RUN_DIR --data DATA_DIR [--split NAME --lists test]
      [--all-records] [--weights best|raw|ema] [--step N] [--out DIR]

Without --step it evaluates the stage result (`RUN_DIR/result.json`: the best checkpoint on
val with its chosen weights); with --step, that checkpoint's raw or EMA weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ssfer_jax import errors, results
from ssfer_jax.input import device, pipeline, records
from ssfer_jax.runtime import figures, logs, sharding


class ClassMismatchError(errors.DatasetError):
  """The model and the dataset share no class name."""


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """Dataset label index -> model class index (-1: a class the model does not know)."""
  model_classes: tuple[str, ...]
  data_classes: tuple[str, ...]
  to_model: np.ndarray
  unknown: tuple[str, ...]   # dataset classes the model does not know (excluded)
  absent: tuple[str, ...]    # model classes the dataset does not have

  def model_labels(self, labels: np.ndarray) -> np.ndarray:
    """Dataset labels -> model class indices; -1 for unlabeled records and unknown classes."""
    return np.where(labels >= 0, self.to_model[np.clip(labels, 0, None)], -1)


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str],
                  where: str = "the dataset") -> ClassMap:
  index = {c: i for i, c in enumerate(model_classes)}
  to_model = np.array([index.get(c, -1) for c in data_classes], np.int64)
  if not (to_model >= 0).any():
    raise ClassMismatchError(
        f"{where} has classes {list(data_classes)}, none of which the model knows "
        f"({list(model_classes)}); evaluate on a dataset labeled with the model's classes, or "
        "rebuild it with `data_prep build --classes` / `--alias` to map names.")
  return ClassMap(tuple(model_classes), tuple(data_classes), to_model,
                  tuple(c for c in data_classes if c not in index),
                  tuple(c for c in model_classes if c not in set(data_classes)))


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
  """cm[true, predicted] counts -> every metric. Per-class figures of a class with no true
  records (recall) or no predictions (precision) are None; means run over the classes
  where they are defined."""
  cm = np.asarray(cm, np.int64)
  support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
  with np.errstate(invalid="ignore", divide="ignore"):
    recall = np.where(support > 0, hits / support, np.nan)
    precision = np.where(predicted > 0, hits / predicted, np.nan)
    f1 = np.where(support > 0, 2 * hits / (support + predicted), np.nan)
  present = support > 0
  total = int(cm.sum())
  opt = lambda v: None if np.isnan(v) else float(v)
  return {
      "count": total,
      "accuracy": float(hits.sum() / total) if total else None,
      "mean_class_accuracy": float(np.mean(recall[present])) if present.any() else None,
      "macro_f1": float(np.mean(f1[present])) if present.any() else None,
      "per_class": {c: {"support": int(support[i]), "precision": opt(precision[i]),
                        "recall": opt(recall[i]), "f1": opt(f1[i])}
                    for i, c in enumerate(classes)},
      "confusion_matrix": cm.tolist(),
      "classes": list(classes),
  }


def subset_mean_class_accuracy(report: dict, min_support: int) -> float | None:
  """Mean recall over the classes with at least `min_support` true records."""
  recalls = [v["recall"] for v in report["per_class"].values() if v["support"] >= min_support]
  return float(np.mean(recalls)) if recalls else None


def majority_report(data_dir: str, split: str, lists: Sequence[str] = ("test",)) -> dict:
  """The baseline: always predicting the most frequent class of train_labeled."""
  classes = records.load_manifest(data_dir)["classes"]
  train = records.read_labels(data_dir, records.load_split(data_dir, split, ["train_labeled"]),
                              split)
  test = records.read_labels(data_dir, records.load_split(data_dir, split, lists))
  majority = int(np.bincount(train).argmax())
  cm = np.zeros((len(classes), len(classes)), np.int64)
  np.add.at(cm, (test, np.full_like(test, majority)), 1)
  return metrics_from_confusion(cm, classes) | {"majority_class": classes[majority]}


ApplyFn = Callable[[Any, jax.Array], jax.Array]   # (params, normalised images) -> logits


class Evaluator:
  """One sharded pass of a classifier over a build's lists (or every record).

  `batch_size` is rounded down to a multiple of the mesh's batch shards (at least one row
  per shard): the eval batch size is a throughput knob, never a reason to fail.
  """

  def __init__(self, *, data_dir: str, split: str | None, lists: Sequence[str],
               model_classes: Sequence[str], image_size: int, mean, std, dtype,
               batch_size: int, mesh: jax.sharding.Mesh, apply_fn: ApplyFn,
               num_threads: int = pipeline.DEFAULT_THREADS, center_crop: float = 1.0):
    shards = sharding.num_batch_shards(mesh)
    batch_size = max(shards, batch_size // shards * shards)
    sharding.check_batch_size(batch_size, mesh, "eval batch size")
    manifest = records.load_manifest(data_dir)
    self.where = f"{data_dir}" + (f" (split {split!r}, lists {list(lists)})" if split else
                                  " (every record)")
    self.class_map = match_classes(model_classes, manifest["classes"], self.where)
    if self.class_map.unknown:
      logging.warning("%s: classes %s are unknown to the model; their records are excluded.",
                      self.where, list(self.class_map.unknown))
    self._args = dict(data_dir=data_dir, split=split, names=tuple(lists),
                      global_batch_size=batch_size, image_size=image_size,
                      num_threads=num_threads, center_crop=center_crop)
    self._mesh = mesh
    to_model = jnp.asarray(self.class_map.to_model)

    def predict(params, batch):
      x = device.normalize(batch["image"], mean, std, dtype)
      probs = jax.nn.softmax(apply_fn(params, x).astype(jnp.float32), axis=-1)
      label = batch["label"]
      target = jnp.where(label >= 0, to_model[jnp.clip(label, 0)], -2)  # -2: unlabeled
      return probs, target, batch["valid"]

    self._predict = jax.jit(predict, out_shardings=sharding.replicated(mesh))

  @classmethod
  def for_classifier(cls, clf, *, data_dir: str, split: str | None, lists: Sequence[str],
                     mesh: jax.sharding.Mesh, batch_size: int = 64,
                     num_threads: int = pipeline.DEFAULT_THREADS) -> "Evaluator":
    """For a `results.Classifier`: its classes, preprocessing and apply function."""
    pre = clf.preprocessing
    return cls(data_dir=data_dir, split=split, lists=lists, model_classes=clf.classes,
               image_size=pre["image_size"], mean=pre["mean"], std=pre["std"],
               dtype=jnp.float32, batch_size=batch_size, mesh=mesh, apply_fn=clf.apply,
               num_threads=num_threads, center_crop=pre.get("center_crop", 1.0))

  def _batches(self, weights: Mapping[str, Any]):
    """Per batch, over its valid rows: ({name: probabilities [b, C]} for each set of
    `weights`, target [b]); target is the model's class index, -1 for a class the model does
    not know, -2 for an unlabeled record. The data is read once for all the weights."""
    for local in pipeline.make_eval_iterator(**self._args):
      batch = pipeline.to_global({k: local[k] for k in ("image", "label", "valid")}, self._mesh)
      probs = {}
      for name, params in weights.items():
        p, target, valid = (np.asarray(a) for a in self._predict(params, batch))
        probs[name] = p[valid]
      yield probs, target[valid]

  def probabilities(self, params) -> tuple[np.ndarray, np.ndarray]:
    """The model's softmax over every record [N, C] and the targets [N] (as `_batches`), each
    record once: e.g. DTM's once-an-epoch pass of the teacher over train_labeled."""
    parts = list(self._batches({"": params}))
    return np.concatenate([p[""] for p, _ in parts]), np.concatenate([t for _, t in parts])

  def reports(self, weights: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A report for each named set of weights (e.g. raw and EMA), from one pass over the data."""
    t0 = time.perf_counter()
    n = len(self.class_map.model_classes)
    cms = {name: np.zeros((n, n), np.int64) for name in weights}
    seen = unlabeled = excluded = 0
    for probs, target in self._batches(weights):
      seen += len(target)
      unlabeled += int((target == -2).sum())
      excluded += int((target == -1).sum())
      keep = target >= 0
      for name, p in probs.items():
        np.add.at(cms[name], (target[keep], np.argmax(p, axis=-1)[keep]), 1)
    out = {}
    for name, cm in cms.items():
      out[name] = metrics_from_confusion(cm, self.class_map.model_classes)
      out[name].update(records_read=seen, skipped_unlabeled=unlabeled,
                       excluded_unknown_class=excluded,
                       unknown_classes=list(self.class_map.unknown),
                       classes_absent_from_data=list(self.class_map.absent), data=self.where,
                       seconds=time.perf_counter() - t0)
    return out

  def __call__(self, params) -> dict[str, Any]:
    return self.reports({"": params})[""]


def scalars(report: dict, prefix: str = "") -> dict[str, float]:
  """The headline numbers of a report, for metric writers."""
  keys = ("accuracy", "mean_class_accuracy", "macro_f1")
  return {prefix + k: report[k] for k in keys if report.get(k) is not None}


def write_report(report: dict, out_dir: str, name: str = "eval") -> list[str]:
  """NAME.json, NAME_confusion.png and NAME_per_class.png in out_dir; returns the paths."""
  plt = figures.pyplot()
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{name}{s}") for s in (".json", "_confusion.png",
                                                        "_per_class.png")]
  with open(paths[0], "w") as f:
    json.dump(report, f, indent=2)
  classes = report["classes"]
  cm = np.asarray(report["confusion_matrix"], np.float64)
  rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(classes), 0.6 + 0.7 * len(classes)))
  im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
  for i in range(len(classes)):
    for j in range(len(classes)):
      ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
              color="white" if rows[i, j] > 0.5 else "black")
  ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
  ax.set_yticks(range(len(classes)), classes)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true (row-normalised colour, counts)")
  ax.set_title(f"accuracy {_pct(report['accuracy'])}, mean-class "
               f"{_pct(report['mean_class_accuracy'])}, macro F1 {_pct(report['macro_f1'])}")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(classes), 3.6))
  x = np.arange(len(classes))
  per = report["per_class"]
  for off, key in ((-0.2, "precision"), (0.2, "recall")):
    ax.bar(x + off, [per[c][key] or 0.0 for c in classes], width=0.4, label=key)
  ax.set_xticks(x, [f"{c}\n(n={per[c]['support']})" for c in classes], fontsize=8)
  ax.set_ylim(0, 1)
  ax.legend()
  ax.set_title("per-class precision and recall")
  fig.tight_layout()
  fig.savefig(paths[2], dpi=120)
  plt.close(fig)
  return paths


def _pct(v) -> str:
  return "n/a" if v is None else f"{100 * v:.1f}%"


def format_report(report: dict) -> str:
  """A console table: headline numbers, then per-class rows."""
  lines = [f"{report['data']}: {report['count']} scored of {report['records_read']} read "
           f"({report['skipped_unlabeled']} unlabeled skipped, "
           f"{report['excluded_unknown_class']} of unknown classes {report['unknown_classes']} "
           "excluded)",
           f"accuracy {_pct(report['accuracy'])}  mean-class accuracy "
           f"{_pct(report['mean_class_accuracy'])}  macro F1 {_pct(report['macro_f1'])}",
           f"{'class':<12}{'support':>8}{'precision':>11}{'recall':>8}{'F1':>8}"]
  for c, v in report["per_class"].items():
    lines.append(f"{c:<12}{v['support']:>8}{_pct(v['precision']):>11}{_pct(v['recall']):>8}"
                 f"{_pct(v['f1']):>8}")
  return "\n".join(lines)


def evaluate_result(run_dir: str, *, data_dir: str, split: str, lists: Sequence[str],
                    mesh: jax.sharding.Mesh, batch_size: int = 64,
                    num_threads: int = pipeline.DEFAULT_THREADS) -> dict[str, Any]:
  """A classifier run's result weights on `lists`, written to RUN/eval/ as NAME.json + PNGs."""
  clf = results.load_classifier(run_dir, mesh=mesh)
  report = Evaluator.for_classifier(clf, data_dir=data_dir, split=split, lists=lists, mesh=mesh,
                                    batch_size=batch_size, num_threads=num_threads)(clf.params)
  report.update(run=os.path.abspath(run_dir), step=clf.step, weights=clf.weights)
  if jax.process_index() == 0:
    write_report(report, os.path.join(run_dir, "eval"), "_".join(lists))
  return report


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True,
                  help="a fine-tuning run: its workdir (with result.json) or RUN/checkpoints/STEP")
  ap.add_argument("--data", required=True, help="a `data_prep build` output")
  ap.add_argument("--split", default="default", help="split name or path (default: default)")
  ap.add_argument("--lists", default="test", help="comma-separated lists (default: test)")
  ap.add_argument("--all-records", action="store_true", help="every record of the build")
  ap.add_argument("--weights", choices=("best", "raw", "ema"), default="best",
                  help="best: the result's choice; raw/ema: those weights")
  ap.add_argument("--step", type=int, help="a checkpoint step (default: the result's)")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--out", help="where the report goes (default RUN/eval)")
  args = ap.parse_args(argv)
  out_dir = args.out or os.path.join(results.split_run_path(args.run)[0], "eval")
  logs.setup(out_dir)
  try:
    mesh = sharding.make_mesh((-1, 1))
    clf = results.load_classifier(results.classifier_run(args.run), step=args.step,
                                  weights=args.weights, mesh=mesh)
    evaluator = Evaluator.for_classifier(
        clf, data_dir=args.data, split=None if args.all_records else args.split,
        lists=args.lists.split(","), mesh=mesh, batch_size=args.batch_size)
    results.check_preprocessing(clf.preprocessing, args.data)
    report = evaluator(clf.params)
  except errors.UserError as e:
    return errors.report(e)
  report.update(run=os.path.abspath(args.run), step=clf.step, weights=clf.weights)
  name = "all" if args.all_records else "_".join(args.lists.split(","))
  paths = write_report(report, out_dir, name)
  print(format_report(report))
  print("\n".join(["written:"] + paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
