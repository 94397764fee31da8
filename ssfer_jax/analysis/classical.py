"""The classical floor: linear models on a build's stored crops, beside every accuracy table.

Two baselines, each trained on train_labeled (every face and its mirror), its inverse
regularisation C chosen on val, then read once on the evaluation lists:
  pixels  the grey image resized to 32x32 (INTER_AREA), standardised, logistic regression;
  hog     the grey image at 64x64, histogram-equalised, OpenCV HOG (16x16 blocks, 8x8 cells,
          9 bins) of the face and of its mirror concatenated, standardised, logistic regression.
A model of this project that scores below them has learned less than a linear map of pixels.

  python -m ssfer_jax.analysis.classical --data BUILD [--split default] [--lists test]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import cv2
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssfer_jax import errors, evaluate
from ssfer_jax.input import records

# name -> the C values tried on val (the issue-21 measurements used 1e-3 and 1e-2).
C_GRID = {"pixels": (1e-4, 1e-3, 1e-2), "hog": (1e-3, 1e-2, 1e-1)}
_HOG = cv2.HOGDescriptor((64, 64), (16, 16), (8, 8), (8, 8), 9)


def load_grey(data_dir: str, indices: np.ndarray,
              noise: dict[int, int] | None = None) -> tuple[list[np.ndarray], np.ndarray]:
  """The stored crops of `indices` as grey uint8 images, and their labels (a split's
  `--label-noise` applied, as the training pipeline applies it)."""
  source = ArrayRecordDataSource(records.shard_paths(data_dir, records.load_manifest(data_dir)))
  noise = noise or {}
  images, labels = [], []
  for index, raw in zip(indices.tolist(), source.__getitems__(list(map(int, indices)))):
    rec = records.decode(raw)
    images.append(cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_GRAYSCALE))
    labels.append(noise.get(index, rec["label"]))
  return images, np.asarray(labels, np.int64)


def pixel_features(image: np.ndarray) -> np.ndarray:
  return cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).reshape(-1).astype(np.float32)


def hog_features(image: np.ndarray) -> np.ndarray:
  grey = cv2.equalizeHist(cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA))
  return np.concatenate([_HOG.compute(grey).ravel(), _HOG.compute(grey[:, ::-1].copy()).ravel()])


FEATURES = {"pixels": pixel_features, "hog": hog_features}


def _matrix(kind: str, images: Sequence[np.ndarray], mirror: bool = False) -> np.ndarray:
  fn = FEATURES[kind]
  return np.stack([fn(im[:, ::-1].copy() if mirror else im) for im in images])


def floor_reports(data_dir: str, split: str, lists: Sequence[str] = ("test",),
                  kinds: Sequence[str] = ("pixels", "hog"), log=print) -> list[dict]:
  """One evaluation report per baseline on `lists`, each with its name, the C chosen on val
  and the val accuracy that chose it."""
  classes = records.load_manifest(data_dir)["classes"]
  noise = records.load_label_noise(data_dir, split)
  load = lambda names: load_grey(data_dir, records.load_split(data_dir, split, names), noise)
  (train, y_train), (val, y_val), (test, y_test) = load(["train_labeled"]), load(["val"]), load(lists)
  if not len(y_val):
    raise errors.DatasetError(f"{data_dir}: split {split!r} has no val list to choose C on; "
                              "rewrite it with `data_prep split --val-fraction`.")
  reports = []
  for kind in kinds:
    t0 = time.perf_counter()
    x_train = np.concatenate([_matrix(kind, train), _matrix(kind, train, mirror=True)])
    y2 = np.concatenate([y_train, y_train])
    x_val, x_test = _matrix(kind, val), _matrix(kind, test)
    best = None
    for c in C_GRID[kind]:
      model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
      model.fit(x_train, y2)
      val_acc = float(np.mean(model.predict(x_val) == y_val))
      if best is None or val_acc > best[0]:
        best = (val_acc, c, model)
    val_acc, c, model = best
    # The model's columns are the classes seen in train_labeled; map back to the build's.
    predicted = model.classes_[np.argmax(model.predict_proba(x_test), axis=1)]
    cm = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(cm, (y_test, predicted), 1)
    report = evaluate.metrics_from_confusion(cm, classes) | {
        "name": f"floor: {kind} + logistic regression", "C": c, "val_accuracy": val_acc}
    log(f"{report['name']}: C={c:g} (val {100 * val_acc:.1f}%), {'+'.join(lists)} accuracy "
        f"{100 * report['accuracy']:.1f}%  ({time.perf_counter() - t0:.0f} s)")
    reports.append(report)
  return reports


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--data", required=True, help="a `data_prep build` output")
  ap.add_argument("--split", default="default", help="split name or path (default: default)")
  ap.add_argument("--lists", default="test", help="comma-separated lists (default: test)")
  args = ap.parse_args(argv)
  try:
    reports = floor_reports(args.data, args.split, args.lists.split(","))
  except errors.UserError as e:
    return errors.report(e)
  for r in reports:
    frequent = evaluate.subset_mean_class_accuracy(r, 15)
    print(f"{r['name']:<40} accuracy {100 * r['accuracy']:.1f}%  mean-class "
          f"{100 * r['mean_class_accuracy']:.1f}%  mean-class (>= 15) "
          f"{'n/a' if frequent is None else f'{100 * frequent:.1f}%'}  macro F1 "
          f"{100 * r['macro_f1']:.1f}%")
  return 0


if __name__ == "__main__":
  sys.exit(main())
