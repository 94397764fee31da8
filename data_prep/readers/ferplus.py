"""FERPlus in its own layout.

  ferplus DIR     DIR/fer2013.csv (emotion, pixels, Usage) + DIR/fer2013new.csv (Usage, Image
                  name, 10 vote columns), row by row. FERPlus's majority rule; Usage Training /
                  PublicTest / PrivateTest -> train / val / test.

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
from data_prep.items import Item, make_item, sha256_file
from data_prep.readers import csvfile
from ssfer_jax.errors import DatasetError


FER_SIDE = 48


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
    pixel_rows = [row for _, row in csvfile.read_rows(pixels_path, encoding="utf-8")]
    vote_rows = [row for _, row in csvfile.read_rows(votes_path, encoding="utf-8")]
    if len(pixel_rows) != len(vote_rows):
      raise DatasetError(f"{votes_path} has {len(vote_rows) - 1} data rows but {pixels_path} has "
                         f"{len(pixel_rows) - 1}; FERPlus labels fer2013.csv row by row: use the "
                         "two files of one release.")
    return [self._one(n, p, v) for n, (p, v) in enumerate(zip(pixel_rows[1:], vote_rows[1:]), 2)]

  def _one(self, line: int, pixel_row: list[str], vote_row: list[str]) -> Item:
    where = f"line {line} of {self.fer2013} and {self.labels}"
    if len(vote_row) != 2 + len(vocabulary.FERPLUS_COLUMNS) or len(pixel_row) != 3:
      return make_item(self.name, f"line{line:05d}", path=self._file(self.labels), label=None,
                   skip=f"malformed row: want 3 columns in {self.fer2013} and "
                   f"{2 + len(vocabulary.FERPLUS_COLUMNS)} in {self.labels} ({where})")
    usage, image_name = vote_row[0].strip(), vote_row[1].strip()
    rel = f"{usage}/{image_name}" if image_name else f"line{line:05d}"
    kw = dict(path=f"{self._file(self.fer2013)}:{line}", label=None,
              partition=self.USAGE.get(usage))
    if not image_name:
      return make_item(self.name, rel, **kw, skip=f"no image name: FERPlus dropped it ({where})")
    if kw["partition"] is None or pixel_row[2].strip() != usage:
      return make_item(self.name, rel, **kw, skip=f"bad Usage {usage!r} / {pixel_row[2]!r}: want "
                   f"one of {sorted(self.USAGE)}, the same in both files ({where})")
    try:
      votes = np.asarray([float(v) for v in vote_row[2:]])
    except ValueError:
      return make_item(self.name, rel, **kw, skip=f"malformed votes {vote_row[2:]} ({where})")
    values = pixel_row[1].split()
    if len(values) != FER_SIDE * FER_SIDE:
      return make_item(self.name, rel, **kw, skip=f"bad pixels: {len(values)} values, want "
                   f"{FER_SIDE * FER_SIDE} ({FER_SIDE}x{FER_SIDE}) ({where})")
    try:
      pixels = np.asarray([int(v) for v in values])
    except ValueError:
      return make_item(self.name, rel, **kw, skip=f"bad pixels: not integers ({where})")
    if pixels.min() < 0 or pixels.max() > 255:
      return make_item(self.name, rel, **kw, skip=f"bad pixels: values outside 0..255 ({where})")
    winner, skip = majority(votes)
    if winner is not None:
      kw["label"] = vocabulary.FERPLUS_COLUMNS[winner]
    # The manifest's label_map counts every voted row: the winner, or why there is none.
    kw["original_label"] = kw["label"] or ("no majority" if skip.startswith("no majority")
                                           else vocabulary.FERPLUS_COLUMNS[
                                               int(np.argmax(np.where(votes <= 1, 0, votes)))])
    return make_item(self.name, rel, **kw, pixels=pixels.astype(np.uint8).tobytes(),
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
