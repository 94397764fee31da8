"""What a reader lists: one `Item` per unique image, with its label, box, landmarks and the
dataset's own partition; `make_item` gives it its stable id.

Listing is cheap and deterministic (no pixels are read), so every machine of a
scaled-out build lists every source and agrees on the global input order. Problems that
are visible from the listing (conflicting labels, missing files, bad box values) become
the item's `skip` reason there; pixel problems are found later by the builder.
"""

from __future__ import annotations

import dataclasses
import hashlib

from data_prep import vocabulary

Box = tuple[float, float, float, float]
Point = tuple[float, float]
PARTITIONS = ("train", "val", "test")   # a dataset's own partition of its records


class ListingWarning(UserWarning):
  """Something a reader changed while listing that the user should know (`python -m data_prep
  build` prints each as one "warning: ..." line)."""


@dataclasses.dataclass(frozen=True)
class Item:
  id: str                  # "{source}/{relative/path}", stable across rebuilds
  source: str
  path: str                # the file read (for tfds: "NAME/SPLIT/INDEX", informational)
  label: str | None        # normalised class name; None = unlabeled
  box: Box | None = None   # the dataset's own face box, pixels of the decoded image
  tfds_index: int | None = None
  rows: int = 1            # CSV rows collapsed into this item (exact duplicates)
  skip: str | None = None  # skip reason found while listing
  pixels: bytes | None = None    # raw 8-bit grey pixels (FERPlus), square; read, not `path`
  landmarks: tuple[Point, ...] | None = None   # 5 points (eyes, nose, mouth corners), pixels
  partition: str | None = None   # the dataset's own train / val / test
  original_label: str | None = None   # the label as the dataset writes it, when it differs
  identity: str = ""             # the person (face-recognition collections), "" = unknown


def normalise_label(raw: str, aliases: dict[str, str]) -> str:
  """Strip, lower-case, map to the canonical vocabulary (`happy` -> `happiness`), then
  through the user's aliases (keys canonical, so `--alias happiness=happy` names the class
  "happy" on purpose)."""
  label = raw.strip().lower()
  label = vocabulary.ALIASES.get(label, label)
  return aliases.get(label, label)


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def make_item(source: str, rel: str, **kw) -> Item:
  """An item whose id is "SOURCE/REL". Names the id cannot hold are skipped with the reason:
  "\n" and "\r" (ids.txt holds one id per "\n"-ended line; every other character
  round-trips) and bytes that are not UTF-8 (ids are UTF-8 strings in records and lists)."""
  rid = f"{source}/{rel}"
  try:
    rid.encode("utf-8")
  except UnicodeEncodeError:
    kw["skip"] = "bad file name: not valid UTF-8 (record ids are UTF-8); rename the file"
    rid = rid.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
  if "\n" in rid or "\r" in rid:
    kw["skip"] = "bad file name: contains a line break (record ids are one per line in ids.txt)"
    rid = rid.replace("\n", "\\n").replace("\r", "\\r")
  return Item(id=rid, source=source, **kw)
