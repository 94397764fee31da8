"""AffectNet in its own layout.

  affectnet ROOT  ROOT/training.csv (train) and ROOT/validation.csv (the official validation
                  set, our test), images under ROOT/Manually_Annotated_Images; box from
                  face_x/y/width/height, 68 landmarks ("x;y;...") reduced to 5; expression 0-7
                  (classes=8) or 0-6 (classes=7: contempt excluded), 8-10 always excluded.

They list `Item`s like the generic readers (no pixels read, except FERPlus's, which live in
its CSV), with the dataset's own train/val/test partition, its labels mapped to the
canonical vocabulary (the original kept for the manifest), its class order, and its boxes
and five landmarks where it ships them. Rows a reader cannot use become skipped items with
the reason, so the manifest's counts reconcile with the dataset's files.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from data_prep import vocabulary
from data_prep.items import Item, Point, make_item, sha256_file
from data_prep.readers import csvfile
from ssfer_jax.errors import DatasetError


def _five_from_68(xy: np.ndarray) -> tuple[Point, ...]:
  """iBUG 68 points -> the 5 of the alignment template: eye centres (36-41, 42-47: the
  image's left eye first), nose tip (30), mouth corners (48, 54)."""
  pts = [xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]]
  return tuple((float(x), float(y)) for x, y in pts)


@dataclasses.dataclass(frozen=True)
class AffectNetSource:
  name: str
  path: str
  train_csv: str = "training.csv"
  test_csv: str = "validation.csv"
  images: str = "Manually_Annotated_Images"
  classes: int = 8

  kind = "affectnet"
  has_boxes = True
  COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
             "facial_landmarks", "expression")
  ALL_COLUMNS = COLUMNS + ("valence", "arousal")

  @property
  def class_order(self) -> tuple[str, ...]:
    return tuple(vocabulary.AFFECTNET[i] for i in range(self.classes))

  @property
  def paper_counts(self) -> dict:
    return {7: {"train": 283901, "test": 3500}, 8: {"train": 287651, "test": 4000}}[self.classes]

  def spec(self) -> dict:
    return {"kind": self.kind, "path": self.path, "train_csv": self.train_csv,
            "test_csv": self.test_csv, "images": self.images, "classes": self.classes,
            "train_csv_sha256": sha256_file(os.path.join(self.path, self.train_csv)),
            "test_csv_sha256": sha256_file(os.path.join(self.path, self.test_csv)),
            "paper_counts": self.paper_counts}

  def items(self, aliases: dict[str, str]) -> list[Item]:
    del aliases
    if int(self.classes) not in (7, 8):
      raise DatasetError(f"--source affectnet {self.path}: classes={self.classes}; say 7 or 8.")
    out = []
    for name, partition in ((self.train_csv, "train"), (self.test_csv, "test")):
      path = os.path.join(self.path, name)
      if not os.path.isfile(path):
        raise DatasetError(f"--source affectnet {self.path}: {path} not found; give AffectNet's "
                           "folder (training.csv, validation.csv, Manually_Annotated_Images/) or "
                           "name the CSVs with train_csv=... test_csv=...")
      out.extend(self._one(row, f"{path} line {line}", partition)
                 for line, row in self._rows(path))
    return out

  def _rows(self, path: str):
    """(line, row dict) of one CSV. Releases differ: some ship validation.csv without the
    header row, so a first row that is not the header is data in the standard column order."""
    rows = csvfile.read_rows(path)
    if not rows:
      raise DatasetError(f"{path}: empty; is this AffectNet's training/validation CSV?")
    header = rows[0][1]
    if header and header[0].strip() != self.COLUMNS[0]:
      if len(header) < len(self.COLUMNS):
        raise DatasetError(f"{path}: no header row and {len(header)} columns in the first row; "
                           f"AffectNet's CSVs hold {', '.join(self.ALL_COLUMNS)}.")
      header = list(self.ALL_COLUMNS)
      rows = [(0, header)] + rows
    missing = [c for c in self.COLUMNS if c not in header]
    if missing:
      raise DatasetError(f"{path}: column(s) {missing} not found (it has {header}); is this "
                         "AffectNet's training/validation CSV?")
    return [(n, dict(zip(header, row))) for n, row in rows[1:]]

  def _one(self, row: dict, where: str, partition: str) -> Item:
    rel = (row.get("subDirectory_filePath") or "").strip().lstrip("/")
    path = os.path.join(self.path, self.images, rel)
    kw = dict(path=path, label=None, partition=partition)
    if not rel:
      return make_item(self.name, f"{partition}/{where.rsplit(' ', 1)[-1]}", **kw,
                   skip=f"empty subDirectory_filePath ({where})")
    try:
      expression = int(row.get("expression"))
      kw["original_label"] = vocabulary.AFFECTNET_ORIGINAL[expression]
    except (TypeError, ValueError, KeyError):
      return make_item(self.name, rel, **kw,
                   skip=f"bad expression {row.get('expression')!r}: want 0..10 ({where})")
    if expression >= self.classes:
      what = ("AffectNet-7 leaves out contempt" if expression == 7
              else "not an expression")
      return make_item(self.name, rel, **kw, skip=f"excluded expression {expression} "
                   f"({kw['original_label']}): {what}")
    kw["label"] = vocabulary.AFFECTNET[expression]
    try:
      x, y, w, h = (float(row.get(c)) for c in ("face_x", "face_y", "face_width",
                                                 "face_height"))
    except (TypeError, ValueError):
      return make_item(self.name, rel, **kw, skip=f"malformed box ({where})")
    if w <= 0 or h <= 0:
      return make_item(self.name, rel, **kw, skip=f"bad box: width {w}, height {h} ({where})")
    kw["box"] = (x, y, x + w, y + h)
    try:   # only --crop align needs them; it skips the image when they are missing
      xy = np.asarray([float(v) for v in row.get("facial_landmarks").split(";")]).reshape(68, 2)
      kw["landmarks"] = _five_from_68(xy)
    except (AttributeError, TypeError, ValueError):
      pass
    if not os.path.lexists(path):
      return make_item(self.name, rel, **kw, skip=f"missing file: {path} does not exist ({where})")
    return make_item(self.name, rel, **kw)
