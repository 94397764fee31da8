"""The generic readers: a CSV of paths and labels (`csv`), a folder tree (`folder`) and a
TensorFlow Datasets dataset (`tfds`)."""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import posixpath

from data_prep.items import Box, Item, make_item, normalise_label, sha256_file
from ssfer_jax.errors import DatasetError


@dataclasses.dataclass(frozen=True)
class CsvSource:
  """A CSV of image path + label (+ optional box columns); paths relative to `root`."""
  name: str
  path: str
  root: str | None = None      # default: the CSV's folder
  image_col: str = "image"
  label_col: str = "emotion"
  box_cols: tuple[str, str, str, str] | None = None

  kind = "csv"

  @property
  def has_boxes(self) -> bool:
    return bool(self.box_cols)

  @property
  def image_root(self) -> str:
    return self.root if self.root is not None else os.path.dirname(os.path.abspath(self.path))

  def spec(self) -> dict:
    return {"kind": self.kind, "path": self.path, "root": self.image_root,
            "image_col": self.image_col, "label_col": self.label_col,
            "box_cols": list(self.box_cols) if self.box_cols else None,
            "csv_sha256": sha256_file(self.path)}

  def items(self, aliases: dict[str, str]) -> list[Item]:
    rows = self._rows()
    by_image = collections.defaultdict(list)
    if not rows:
      raise DatasetError(f"{self.path}: no data rows under the header; a CSV source needs at "
                         "least one image.")
    for line, row in rows:
      cell = (row[self.image_col] or "").strip().replace("\\", "/")
      # An absolute path stays absolute (its id drops the leading "/"); an empty cell stays
      # empty and is skipped with its line below.
      rel = posixpath.normpath(cell).lstrip("/") if cell else ""
      label = normalise_label(row[self.label_col] or "", aliases)
      by_image[(rel, posixpath.isabs(cell))].append((line, label, self._box(row)))
    out = [self._one(rel, entries, absolute)
           for (rel, absolute), entries in by_image.items()]
    if out and all(it.skip and it.skip.startswith("missing file") for it in out):
      raise DatasetError(
          f"{self.path}: none of the {len(out)} images named in column {self.image_col!r} exists "
          f"under root {self.image_root!r}; give the images folder with root=PATH in --source.")
    return out

  def _rows(self) -> list[tuple[int, dict]]:
    with open(self.path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      wanted = [("image_col", self.image_col), ("label_col", self.label_col)] + [
          ("box_cols", c) for c in self.box_cols or ()]
      for option, col in wanted:
        if col not in columns:
          raise DatasetError(
              f"{self.path}: column {col!r} not found (the CSV has columns {columns}); name the "
              f"right column with {option}=... in --source csv {self.path} ...")
      return [(reader.line_num, row) for row in reader]

  def _box(self, row: dict) -> Box | str | None:
    """The row's box, None without box columns, or a string saying what is wrong."""
    if not self.box_cols:
      return None
    try:
      box = tuple(float(row[c]) for c in self.box_cols)
    except (TypeError, ValueError):
      return f"bad box: non-numeric value in columns {list(self.box_cols)}"
    if not (box[2] > box[0] and box[3] > box[1]):
      return f"bad box: {box} is not x0 < x1, y0 < y1 (pixel corners of the original image)"
    return box

  def _one(self, rel: str, entries: list[tuple[int, str, Box | str | None]],
           absolute: bool = False) -> Item:
    lines = ", ".join(str(line) for line, _, _ in entries)
    labels = sorted({label for _, label, _ in entries})
    boxes = {box for _, _, box in entries}
    path = "/" + rel if absolute else os.path.join(self.image_root, rel)
    kw = dict(path=path, rows=len(entries), label=labels[0], box=next(iter(boxes)))
    if not rel:
      kw["skip"] = f"empty image cell in column {self.image_col!r} (CSV line {lines})"
    elif len(labels) > 1:
      lines_of = {label: ", ".join(str(n) for n, lab, _ in entries if lab == label)
                  for label in labels}
      detail = "; ".join(f"{label!r} (CSV line {lines_of[label]})" for label in labels)
      kw["skip"] = f"conflicting labels: {detail}"
    elif not labels[0]:
      kw["skip"] = f"empty label in column {self.label_col!r} (CSV line {lines})"
    elif len(boxes) > 1:
      kw["skip"] = f"conflicting boxes for one image (CSV lines {lines})"
    elif isinstance(kw["box"], str):
      kw["skip"] = f"{kw['box']} (CSV line {lines})"
    elif not os.path.lexists(kw["path"]):
      kw["skip"] = f"missing file: {kw['path']} (named on CSV line {lines}) does not exist"
    if isinstance(kw["box"], str):
      kw["box"] = None
    return make_item(self.name, rel, **kw)


@dataclasses.dataclass(frozen=True)
class FolderSource:
  """A tree of images: `labels="subdirs"` takes the class from the first folder level,
  `labels="none"` makes every file unlabeled, `labels="identity"` too, with the first folder
  level as the person (a face-recognition collection such as CASIA-WebFace: one folder per
  identity), kept in the record for grouped splits. Hidden files and folders are ignored."""
  name: str
  path: str
  labels: str

  kind = "folder"

  def spec(self) -> dict:
    return {"kind": self.kind, "path": self.path, "labels": self.labels}

  def items(self, aliases: dict[str, str]) -> list[Item]:
    if self.labels not in ("subdirs", "none", "identity"):
      raise DatasetError(f"--source folder {self.path}: labels={self.labels!r}; say labels=subdirs "
                         "(class sub-folders), labels=none (unlabeled tree) or labels=identity "
                         "(unlabeled, one sub-folder per person).")
    if not os.path.isdir(self.path):
      raise DatasetError(f"--source folder {self.path}: not a directory; give the images folder.")
    out = []
    for dirpath, dirnames, filenames in os.walk(self.path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for fn in sorted(f for f in filenames if not f.startswith(".")):
        full = os.path.join(dirpath, fn)
        rel = os.path.relpath(full, self.path).replace(os.sep, "/")
        parts = rel.split("/")
        if self.labels == "none":
          out.append(make_item(self.name, rel, path=full, label=None))
        elif len(parts) == 1:
          what = "a class" if self.labels == "subdirs" else "an identity"
          out.append(make_item(self.name, rel, path=full, label=None,
                           skip=f"not in {what} sub-folder (labels={self.labels} reads it from "
                           "the first folder level)"))
        elif self.labels == "identity":
          out.append(make_item(self.name, rel, path=full, label=None, identity=parts[0]))
        else:
          out.append(make_item(self.name, rel, path=full, label=normalise_label(parts[0], aliases)))
    return out


@dataclasses.dataclass(frozen=True)
class TfdsSource:
  """A TFDS dataset already prepared in array_record format, read without TensorFlow
  through `tfds.data_source`; unlabeled. Ids are "{name}/{split}/{index:09d}"."""
  name: str
  dataset: str
  split: str = "train"
  data_dir: str | None = None
  image_key: str = "image"

  kind = "tfds"

  def spec(self) -> dict:
    return {"kind": self.kind, "dataset": self.dataset, "split": self.split,
            "data_dir": self.data_dir, "image_key": self.image_key}

  def open(self):
    import tensorflow_datasets as tfds  # here, not at the top: a slow import few builds need
    try:
      return tfds.data_source(self.dataset, split=self.split, data_dir=self.data_dir)
    except Exception as e:  # tfds raises many types for "not prepared"/"not array_record"
      raise DatasetError(
          f"--source tfds {self.dataset}: cannot open split {self.split!r} under data_dir "
          f"{self.data_dir!r} ({type(e).__name__}: {e}); prepare it first with "
          "file_format='array_record', and give data_dir=... .") from e

  def items(self, aliases: dict[str, str]) -> list[Item]:
    del aliases
    n = len(self.open())
    return [make_item(self.name, f"{self.split}/{i:09d}", path=f"{self.dataset}/{self.split}/{i}",
                  label=None, tfds_index=i) for i in range(n)]
