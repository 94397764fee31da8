"""Input readers: each source lists its images as `Item`s, one per unique image.

Listing is cheap and deterministic (no pixels are read), so every machine of a
scaled-out build lists every source and agrees on the global input order. Problems that
are visible from the listing (conflicting labels, missing files, bad box values) become
the item's `skip` reason here; pixel problems are found later by the builder.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import os
import posixpath

from data_prep import vocabulary
from ssfer_jax.errors import DatasetError

Box = tuple[float, float, float, float]
Point = tuple[float, float]
BENCHMARK_KINDS = ("rafdb", "ferplus", "affectnet")   # readers in data_prep.benchmarks
KINDS = ("csv", "folder", "tfds") + BENCHMARK_KINDS
PARTITIONS = ("train", "val", "test")   # a dataset's own partition of its records


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


def _item(source: str, rel: str, **kw) -> Item:
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
    return _item(self.name, rel, **kw)


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
          out.append(_item(self.name, rel, path=full, label=None))
        elif len(parts) == 1:
          what = "a class" if self.labels == "subdirs" else "an identity"
          out.append(_item(self.name, rel, path=full, label=None,
                           skip=f"not in {what} sub-folder (labels={self.labels} reads it from "
                           "the first folder level)"))
        elif self.labels == "identity":
          out.append(_item(self.name, rel, path=full, label=None, identity=parts[0]))
        else:
          out.append(_item(self.name, rel, path=full, label=normalise_label(parts[0], aliases)))
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
    return [_item(self.name, f"{self.split}/{i:09d}", path=f"{self.dataset}/{self.split}/{i}",
                  label=None, tfds_index=i) for i in range(n)]


Source = CsvSource | FolderSource | TfdsSource  # and the benchmark readers of data_prep.benchmarks


def parse(tokens: list[str]) -> Source:
  """`KIND PATH [key=value ...]` from the command line -> a source.

  csv PATH [name= root= image_col= label_col= box_cols=x0,y0,x1,y1]
  folder PATH labels=subdirs|none [name=]
  tfds DATASET [name= split= data_dir= image_key=]
  """
  from data_prep import benchmarks  # pylint: disable=g-import-not-at-top  (it imports this)
  usage = (f"--source KIND PATH [key=value ...], KIND one of {', '.join(KINDS)}; "
           "see `python -m data_prep build --help`")
  if len(tokens) < 2 or tokens[0] not in KINDS:
    raise DatasetError(f"--source {' '.join(tokens)}: expected {usage}.")
  kind, path, opts = tokens[0], tokens[1], {}
  for tok in tokens[2:]:
    key, eq, value = tok.partition("=")
    if not eq:
      raise DatasetError(f"--source {' '.join(tokens)}: {tok!r} is not key=value; {usage}.")
    opts[key] = value
  name = opts.pop("name", None) or _default_name(kind, path)
  if not name or "/" in name:
    raise DatasetError(f"--source {' '.join(tokens)}: source name {name!r} must be non-empty "
                       "without '/'; set name=...")
  classes = {"csv": CsvSource, "folder": FolderSource, "tfds": TfdsSource,
             **benchmarks.READERS}
  fields = {f.name for f in dataclasses.fields(classes[kind])} - {"name", "path", "dataset"}
  unknown = sorted(set(opts) - fields)
  if unknown:
    raise DatasetError(f"--source {' '.join(tokens)}: unknown option(s) {unknown}; "
                       f"{kind} takes {sorted(fields | {'name'})}.")
  if kind == "csv":
    if "box_cols" in opts:
      cols = tuple(c.strip() for c in opts["box_cols"].split(","))
      if len(cols) != 4:
        raise DatasetError(f"--source {' '.join(tokens)}: box_cols needs 4 columns "
                           "x0,y0,x1,y1 (pixel corners), got {cols}.")
      opts["box_cols"] = cols
    return CsvSource(name=name, path=path, **opts)
  if kind == "folder":
    if "labels" not in opts:
      raise DatasetError(f"--source {' '.join(tokens)}: say labels=subdirs (class sub-folders), "
                         "labels=none (an unlabeled tree of images) or labels=identity (one "
                         "sub-folder per person, unlabeled).")
    return FolderSource(name=name, path=path, **opts)
  if kind in benchmarks.READERS:
    return benchmarks.parse(kind, name, path, opts, " ".join(tokens))
  return TfdsSource(name=name, dataset=path, **opts)


def _default_name(kind: str, path: str) -> str:
  if kind in BENCHMARK_KINDS:
    return kind
  if kind == "csv":
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  if kind == "folder":
    return os.path.basename(os.path.abspath(path))
  return path.split("/")[0].split(":")[0]

