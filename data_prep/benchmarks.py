"""Readers for the paper's benchmark datasets, each in its own on-disk format.

They list `Item`s like the generic sources (no pixels read, except FERPlus's, which live in
its CSV), with the dataset's own train/val/test partition, its labels mapped to the
canonical vocabulary (the original kept for the manifest), its class order, and its boxes
and five landmarks where it ships them. Rows a reader cannot use become skipped items with
the reason, so the manifest's counts reconcile with the dataset's files.

  rafdb ROOT      RAF-DB basic: ROOT/EmoLabel/list_patition_label.txt ("train_00001.jpg 5",
                  labels 1-7), images in ROOT/Image/aligned (NAME_aligned.jpg, 100 px, already
                  aligned: use --crop none) or ROOT/Image/original with
                  ROOT/Annotation/boxes/NAME_boundingbox.txt ("x0 y0 x1 y1") and
                  ROOT/Annotation/manual/NAME_manu_attri.txt (5 landmark lines "x<TAB>y", then
                  gender, race, age). Partition from the name: train_* / test_*.
  ferplus DIR     DIR/fer2013.csv (emotion, pixels, Usage) + DIR/fer2013new.csv (Usage, Image
                  name, 10 vote columns), row by row. FERPlus's majority rule; Usage Training /
                  PublicTest / PrivateTest -> train / val / test.
  affectnet ROOT  ROOT/training.csv (train) and ROOT/validation.csv (the official validation
                  set, our test), images under ROOT/Manually_Annotated_Images; box from
                  face_x/y/width/height, 68 landmarks ("x;y;...") reduced to 5; expression 0-7
                  (classes=8) or 0-6 (classes=7: contempt excluded), 8-10 always excluded.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np

from data_prep import vocabulary
from data_prep.sources import _item, Item, Point, sha256_file
from ssfer_jax.errors import DatasetError

FER_SIDE = 48


def _five_from_68(xy: np.ndarray) -> tuple[Point, ...]:
  """iBUG 68 points -> the 5 of the alignment template: eye centres (36-41, 42-47: the
  image's left eye first), nose tip (30), mouth corners (48, 54)."""
  pts = [xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]]
  return tuple((float(x), float(y)) for x, y in pts)


@dataclasses.dataclass(frozen=True)
class RafDbSource:
  name: str
  path: str                 # the "basic" folder
  images: str = "aligned"   # aligned (100 px, pre-aligned) or original (with boxes, landmarks)

  kind = "rafdb"
  class_order = tuple(vocabulary.RAFDB[i] for i in sorted(vocabulary.RAFDB))
  paper_counts = {"train": 12271, "test": 3068}

  @property
  def has_boxes(self) -> bool:
    return self.images == "original"

  @property
  def label_file(self) -> str:
    return os.path.join(self.path, "EmoLabel", "list_patition_label.txt")

  def spec(self) -> dict:
    return {"kind": self.kind, "path": self.path, "images": self.images,
            "labels_sha256": sha256_file(self.label_file), "paper_counts": self.paper_counts}

  def items(self, aliases: dict[str, str]) -> list[Item]:
    del aliases   # RAF-DB's labels are numbers; the mapping is fixed
    if self.images not in ("aligned", "original"):
      raise DatasetError(f"--source rafdb {self.path}: images={self.images!r}; say "
                         "images=aligned (Image/aligned) or images=original (Image/original).")
    if not os.path.isfile(self.label_file):
      raise DatasetError(f"--source rafdb {self.path}: {self.label_file} not found; give the "
                         "RAF-DB 'basic' folder (it holds EmoLabel/, Image/, Annotation/).")
    out = []
    with open(self.label_file, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          out.append(self._one(line_no, line.split()))
    return out

  def _one(self, line_no: int, fields: list[str]) -> Item:
    where = f"{self.label_file} line {line_no}"
    if len(fields) != 2:
      return _item(self.name, f"line{line_no:05d}", path=self.label_file, label=None,
                   skip=f"malformed row: want 'NAME.jpg LABEL' ({where})")
    fname, raw = fields
    stem = os.path.splitext(fname)[0]
    partition = "train" if stem.startswith("train_") else "test" if stem.startswith(
        "test_") else None
    kw = dict(partition=partition, original_label=raw)
    try:
      label = vocabulary.RAFDB[int(raw)]
      kw["original_label"] = vocabulary.RAFDB_ORIGINAL[int(raw)]
    except (ValueError, KeyError):
      return _item(self.name, fname, path=self.label_file, label=None, **kw,
                   skip=f"bad label {raw!r}: want 1..7 ({where})")
    if partition is None:
      return _item(self.name, fname, path=self.label_file, label=label, **kw,
                   skip=f"no partition: the name starts with neither train_ nor test_ ({where})")
    if self.images == "aligned":
      path = os.path.join(self.path, "Image", "aligned", f"{stem}_aligned.jpg")
    else:
      path = os.path.join(self.path, "Image", "original", fname)
      box, landmarks, skip = self._annotations(stem)
      kw.update(box=box, landmarks=landmarks, skip=skip)
    if not kw.get("skip") and not os.path.lexists(path):
      kw["skip"] = f"missing file: {path} does not exist (listed in {where})"
    return _item(self.name, fname, path=path, label=label, **kw)

  def _annotations(self, stem: str):
    """(box, 5 landmarks, skip reason) of an original image; a missing or malformed file is
    the image's skip reason."""
    box_file = os.path.join(self.path, "Annotation", "boxes", f"{stem}_boundingbox.txt")
    ldmk_file = os.path.join(self.path, "Annotation", "manual", f"{stem}_manu_attri.txt")
    try:
      with open(box_file, encoding="utf-8") as f:
        box = tuple(float(v) for v in f.read().split())
      with open(ldmk_file, encoding="utf-8") as f:
        rows = [line.split() for line in f.read().splitlines()[:5]]
      landmarks = tuple((float(r[0]), float(r[1])) for r in rows)
    except FileNotFoundError as e:
      return None, None, f"missing annotation: {e.filename} does not exist"
    except (ValueError, IndexError):
      return None, None, f"malformed annotation: {box_file} or {ldmk_file}"
    if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]) or len(landmarks) != 5:
      return None, None, (f"malformed annotation: want 'x0 y0 x1 y1' in {box_file} and 5 "
                          f"landmark lines in {ldmk_file}")
    return box, landmarks, None


@dataclasses.dataclass(frozen=True)
class FerPlusSource:
  name: str
  path: str                       # the folder holding both CSVs
  fer2013: str = "fer2013.csv"
  labels: str = "fer2013new.csv"

  kind = "ferplus"
  class_order = vocabulary.FERPLUS_CLASSES
  # As the paper's text gives them (section 4.1; its Table 1 merges val and test: 7,178).
  paper_counts = {"train": 28709, "val": 3589, "test": 3573}
  has_boxes = False
  USAGE = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}

  def _file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def spec(self) -> dict:
    return {"kind": self.kind, "path": self.path, "fer2013": self.fer2013, "labels": self.labels,
            "fer2013_sha256": sha256_file(self._file(self.fer2013)),
            "labels_sha256": sha256_file(self._file(self.labels)),
            "paper_counts": self.paper_counts,
            "rule": "FERPlus majority: single votes zeroed; kept if the top emotion holds more "
                    "than half of the remaining votes; unknown and not-a-face dropped"}

  def items(self, aliases: dict[str, str]) -> list[Item]:
    del aliases
    pixels_path, votes_path = self._file(self.fer2013), self._file(self.labels)
    for p in (pixels_path, votes_path):
      if not os.path.isfile(p):
        raise DatasetError(f"--source ferplus {self.path}: {p} not found; give the folder "
                           "holding fer2013.csv and FERPlus's fer2013new.csv (or name them with "
                           "fer2013=... labels=...).")
    with open(pixels_path, newline="", encoding="utf-8") as f:
      pixel_rows = list(csv.reader(f))
    with open(votes_path, newline="", encoding="utf-8") as f:
      vote_rows = list(csv.reader(f))
    if len(pixel_rows) != len(vote_rows):
      raise DatasetError(f"{votes_path} has {len(vote_rows) - 1} data rows but {pixels_path} has "
                         f"{len(pixel_rows) - 1}; FERPlus labels fer2013.csv row by row: use the "
                         "two files of one release.")
    return [self._one(n, p, v) for n, (p, v) in enumerate(zip(pixel_rows[1:], vote_rows[1:]), 2)]

  def _one(self, line: int, pixel_row: list[str], vote_row: list[str]) -> Item:
    where = f"line {line} of {self.fer2013} and {self.labels}"
    if len(vote_row) != 2 + len(vocabulary.FERPLUS_COLUMNS) or len(pixel_row) != 3:
      return _item(self.name, f"line{line:05d}", path=self._file(self.labels), label=None,
                   skip=f"malformed row: want 3 columns in {self.fer2013} and "
                   f"{2 + len(vocabulary.FERPLUS_COLUMNS)} in {self.labels} ({where})")
    usage, image_name = vote_row[0].strip(), vote_row[1].strip()
    rel = f"{usage}/{image_name}" if image_name else f"line{line:05d}"
    kw = dict(path=f"{self._file(self.fer2013)}:{line}", label=None,
              partition=self.USAGE.get(usage))
    if not image_name:
      return _item(self.name, rel, **kw, skip=f"no image name: FERPlus dropped it ({where})")
    if kw["partition"] is None or pixel_row[2].strip() != usage:
      return _item(self.name, rel, **kw, skip=f"bad Usage {usage!r} / {pixel_row[2]!r}: want "
                   f"one of {sorted(self.USAGE)}, the same in both files ({where})")
    try:
      votes = np.asarray([float(v) for v in vote_row[2:]])
    except ValueError:
      return _item(self.name, rel, **kw, skip=f"malformed votes {vote_row[2:]} ({where})")
    values = pixel_row[1].split()
    if len(values) != FER_SIDE * FER_SIDE:
      return _item(self.name, rel, **kw, skip=f"bad pixels: {len(values)} values, want "
                   f"{FER_SIDE * FER_SIDE} ({FER_SIDE}x{FER_SIDE}) ({where})")
    try:
      pixels = np.asarray([int(v) for v in values])
    except ValueError:
      return _item(self.name, rel, **kw, skip=f"bad pixels: not integers ({where})")
    if pixels.min() < 0 or pixels.max() > 255:
      return _item(self.name, rel, **kw, skip=f"bad pixels: values outside 0..255 ({where})")
    winner, skip = majority(votes)
    if winner is not None:
      kw["label"] = vocabulary.FERPLUS_COLUMNS[winner]
    # The manifest's label_map counts every voted row: the winner, or why there is none.
    kw["original_label"] = kw["label"] or ("no majority" if skip.startswith("no majority")
                                           else vocabulary.FERPLUS_COLUMNS[
                                               int(np.argmax(np.where(votes <= 1, 0, votes)))])
    return _item(self.name, rel, **kw, pixels=pixels.astype(np.uint8).tobytes(),
                 skip=skip and f"{skip} ({where})")


def majority(votes: np.ndarray) -> tuple[int | None, str | None]:
  """FERPlus's "majority" label of one image's 10 vote counts: (column, None) or (None, why).

  As its published processing code: votes of 1 are outliers and zeroed; the top column wins
  if it holds more than half of what remains; a winner in "unknown" or "NF" is no
  expression. Ties go to the first column (numpy's argmax, as that code)."""
  votes = np.where(votes <= 1.0, 0.0, votes)
  total = votes.sum()
  top = int(np.argmax(votes))
  if total <= 0 or votes[top] <= 0.5 * total:
    return None, "no majority: no emotion holds more than half of the votes (after single votes)"
  if vocabulary.FERPLUS_COLUMNS[top] == "unknown":
    return None, "majority 'unknown'"
  if vocabulary.FERPLUS_COLUMNS[top] == "NF":
    return None, "majority 'NF' (not a face)"
  return top, None


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
    with open(path, newline="", encoding="utf-8-sig") as f:
      rows = list(csv.reader(f))
    if not rows:
      raise DatasetError(f"{path}: empty; is this AffectNet's training/validation CSV?")
    header, first = rows[0], 2
    if header and header[0].strip() != self.COLUMNS[0]:
      if len(header) < len(self.COLUMNS):
        raise DatasetError(f"{path}: no header row and {len(header)} columns in the first row; "
                           f"AffectNet's CSVs hold {', '.join(self.ALL_COLUMNS)}.")
      header, first = list(self.ALL_COLUMNS), 1
      rows = [header] + rows
    missing = [c for c in self.COLUMNS if c not in header]
    if missing:
      raise DatasetError(f"{path}: column(s) {missing} not found (it has {header}); is this "
                         "AffectNet's training/validation CSV?")
    return [(n, dict(zip(header, row))) for n, row in enumerate(rows[1:], first)]

  def _one(self, row: dict, where: str, partition: str) -> Item:
    rel = (row.get("subDirectory_filePath") or "").strip().lstrip("/")
    path = os.path.join(self.path, self.images, rel)
    kw = dict(path=path, label=None, partition=partition)
    if not rel:
      return _item(self.name, f"{partition}/{where.rsplit(' ', 1)[-1]}", **kw,
                   skip=f"empty subDirectory_filePath ({where})")
    try:
      expression = int(row.get("expression"))
      kw["original_label"] = vocabulary.AFFECTNET_ORIGINAL[expression]
    except (TypeError, ValueError, KeyError):
      return _item(self.name, rel, **kw,
                   skip=f"bad expression {row.get('expression')!r}: want 0..10 ({where})")
    if expression >= self.classes:
      what = ("AffectNet-7 leaves out contempt" if expression == 7
              else "not an expression")
      return _item(self.name, rel, **kw, skip=f"excluded expression {expression} "
                   f"({kw['original_label']}): {what}")
    kw["label"] = vocabulary.AFFECTNET[expression]
    try:
      x, y, w, h = (float(row.get(c)) for c in ("face_x", "face_y", "face_width",
                                                 "face_height"))
    except (TypeError, ValueError):
      return _item(self.name, rel, **kw, skip=f"malformed box ({where})")
    if w <= 0 or h <= 0:
      return _item(self.name, rel, **kw, skip=f"bad box: width {w}, height {h} ({where})")
    kw["box"] = (x, y, x + w, y + h)
    try:   # only --crop align needs them; it skips the image when they are missing
      xy = np.asarray([float(v) for v in row.get("facial_landmarks").split(";")]).reshape(68, 2)
      kw["landmarks"] = _five_from_68(xy)
    except (AttributeError, TypeError, ValueError):
      pass
    if not os.path.lexists(path):
      return _item(self.name, rel, **kw, skip=f"missing file: {path} does not exist ({where})")
    return _item(self.name, rel, **kw)


READERS = {"rafdb": RafDbSource, "ferplus": FerPlusSource, "affectnet": AffectNetSource}


def parse(kind: str, name: str, path: str, opts: dict, text: str):
  """A benchmark reader from `--source KIND PATH key=value ...` (options already checked)."""
  if kind == "affectnet" and "classes" in opts:
    try:
      opts["classes"] = int(opts["classes"])
    except ValueError:
      raise DatasetError(f"--source {text}: classes={opts['classes']!r}; say 7 or 8.") from None
  return READERS[kind](name=name, path=path, **opts)
