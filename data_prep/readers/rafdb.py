"""RAF-DB basic in its own layout.

  rafdb ROOT      ROOT/EmoLabel/list_patition_label.txt ("train_00001.jpg 5", labels 1-7),
                  images in ROOT/Image/aligned (NAME_aligned.jpg, 100 px, already aligned: use
                  --crop none) or ROOT/Image/original with
                  ROOT/Annotation/boxes/NAME_boundingbox.txt ("x0 y0 x1 y1") and
                  ROOT/Annotation/manual/NAME_manu_attri.txt (5 landmark lines "x<TAB>y", then
                  gender, race, age). Partition from the name: train_* / test_*.

They list `Item`s like the generic readers (no pixels read, except FERPlus's, which live in
its CSV), with the dataset's own train/val/test partition, its labels mapped to the
canonical vocabulary (the original kept for the manifest), its class order, and its boxes
and five landmarks where it ships them. Rows a reader cannot use become skipped items with
the reason, so the manifest's counts reconcile with the dataset's files.
"""

from __future__ import annotations

import dataclasses
import os

from data_prep import vocabulary
from data_prep.items import Item, make_item, sha256_file
from ssfer_jax.errors import DatasetError


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
      return make_item(self.name, f"line{line_no:05d}", path=self.label_file, label=None,
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
      return make_item(self.name, fname, path=self.label_file, label=None, **kw,
                   skip=f"bad label {raw!r}: want 1..7 ({where})")
    if partition is None:
      return make_item(self.name, fname, path=self.label_file, label=label, **kw,
                   skip=f"no partition: the name starts with neither train_ nor test_ ({where})")
    if self.images == "aligned":
      path = os.path.join(self.path, "Image", "aligned", f"{stem}_aligned.jpg")
    else:
      path = os.path.join(self.path, "Image", "original", fname)
      box, landmarks, skip = self._annotations(stem)
      kw.update(box=box, landmarks=landmarks, skip=skip)
    if not kw.get("skip") and not os.path.lexists(path):
      kw["skip"] = f"missing file: {path} does not exist (listed in {where})"
    return make_item(self.name, fname, path=path, label=label, **kw)

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
