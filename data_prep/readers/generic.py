"""The generic readers: a CSV of paths and labels (`csv`), a folder tree (`folder`) and a
TensorFlow Datasets dataset (`tfds`)."""

from __future__ import annotations

import collections
import dataclasses
import os
import posixpath
import warnings

from data_prep.items import (Box, Item, ListingWarning, make_item, normalise_label,
                             sha256_file)
from data_prep.readers import csvfile
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
    backslashed = 0
    for line, row in rows:
      cell = (row.get(self.image_col) or "").strip()
      if "\\" in cell:   # a Windows path: its folders are the tree's folders
        backslashed += 1
        cell = cell.replace("\\", "/")
      # An absolute path stays absolute (its id drops the leading "/"); an empty cell stays
      # empty and is skipped with its line below.
      rel = posixpath.normpath(cell).lstrip("/") if cell else ""
      label = normalise_label(row.get(self.label_col) or "", aliases)
      by_image[(rel, posixpath.isabs(cell))].append((line, label, self._box(row)))
    if backslashed:
      warnings.warn(f"{self.path}: {backslashed} row(s) name their image with '\\'; read as "
                    "'/' (a Windows path), so a file name that holds '\\' is not found",
                    ListingWarning, stacklevel=2)
    out = [self._one(rel, entries, absolute)
           for (rel, absolute), entries in by_image.items()]
    if out and all(it.skip and it.skip.startswith("missing file") for it in out):
      raise DatasetError(
          f"{self.path}: none of the {len(out)} images named in column {self.image_col!r} exists "
          f"under root {self.image_root!r}; give the images folder with root=PATH in --source.")
    return out

  def _rows(self) -> list[tuple[int, dict]]:
    """(line, column -> value) of every data row; blank lines skipped, a short row's missing
    columns absent (as the csv module's DictReader, whose fields are None there)."""
    rows = [(line, row) for line, row in csvfile.read_rows(self.path) if row]
    columns = rows[0][1] if rows else []
    wanted = [("image_col", self.image_col), ("label_col", self.label_col)] + [
        ("box_cols", c) for c in self.box_cols or ()]
    for option, col in wanted:
      if col not in columns:
        raise DatasetError(
            f"{self.path}: column {col!r} not found (the CSV has columns {columns}); name the "
            f"right column with {option}=... in --source csv {self.path} ...")
    return [(line, dict(zip(columns, row))) for line, row in rows[1:]]

  def _box(self, row: dict) -> Box | str | None:
    """The row's box, None without box columns, or a string saying what is wrong."""
    if not self.box_cols:
      return None
    try:
      box = tuple(float(row.get(c)) for c in self.box_cols)
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
      # Rows that conflict are no duplicates (the manifest's duplicate_rows): one skipped
      # input, whose reason lists every line.
      kw.update(skip=f"conflicting labels: {detail}", rows=1)
    elif not labels[0]:
      kw["skip"] = f"empty label in column {self.label_col!r} (CSV line {lines})"
    elif len(boxes) > 1:
      kw.update(skip=f"conflicting boxes for one image (CSV lines {lines})", rows=1)
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
    for rel, full, skip in self._files():
      parts = rel.split("/")
      if skip or self.labels == "none":
        out.append(make_item(self.name, rel, path=full, label=None, skip=skip))
      elif len(parts) == 1:
        what = "a class" if self.labels == "subdirs" else "an identity"
        out.append(make_item(self.name, rel, path=full, label=None,
                             skip=f"not in {what} sub-folder (labels={self.labels} reads it "
                             "from the first folder level)"))
      elif self.labels == "identity":
        out.append(make_item(self.name, rel, path=full, label=None, identity=parts[0]))
      else:
        out.append(make_item(self.name, rel, path=full, label=normalise_label(parts[0], aliases)))
    return out

  def _files(self):
    """(relative path, path, skip reason or None) of every file under the source, hidden ones
    excluded. Symbolic links are followed, to files and to folders (a linked class folder is
    a class), each real folder once: the real tree is listed first, then each linked folder
    as a tree of its own. A link back into a folder being listed (a loop) or to one already
    listed is not followed but listed as skipped with its reason, as are broken links and
    folders that cannot be read."""
    root = os.path.realpath(self.path)
    seen = {}                          # real path of every folder listed -> its relative path
    trees = collections.deque(["."])   # relative paths of the trees to walk: ".", then links
    while trees:
      top, links, unreadable = trees.popleft(), [], []
      for dirpath, dirnames, filenames in os.walk(os.path.join(self.path, top),
                                                  onerror=unreadable.append):
        here = os.path.relpath(dirpath, self.path).replace(os.sep, "/")
        seen.setdefault(os.path.realpath(dirpath), here)
        prefix = "" if here == "." else here + "/"
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        links += [(prefix + d, dirpath) for d in dirnames
                  if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))
                       and os.path.realpath(os.path.join(dirpath, d)) not in seen]
        for fn in sorted(f for f in filenames if not f.startswith(".")):
          full = os.path.join(dirpath, fn)
          skip = None
          if os.path.islink(full) and not os.path.exists(full):
            skip = f"broken link: points to {os.readlink(full)!r}, which does not exist"
          yield prefix + fn, full, skip
      for error in unreadable:
        rel = os.path.relpath(error.filename, self.path).replace(os.sep, "/")
        if rel == ".":
          raise DatasetError(f"--source folder {self.path}: cannot list it ({error.strerror}).")
        yield rel, error.filename, (f"unreadable folder: {error.strerror}; its images are not "
                                    "listed")
      # Decided after the tree is walked, so every real folder of it is listed as itself.
      for rel, parent in links:
        path, real = os.path.join(self.path, rel), os.path.realpath(os.path.join(self.path, rel))
        if any((os.path.realpath(p) + os.sep).startswith(real + os.sep) for p in (root, parent)):
          yield rel, path, (f"link loop: points to {real}, which holds this link; not "
                            "followed")
        elif real in seen:
          yield rel, path, (f"link to a folder already listed (as {seen[real]!r}); not followed, "
                            "so its images are not listed twice")
        else:
          seen[real] = rel   # claimed now: a second link to it is not followed
          trees.append(rel)


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
