"""The readers behind `data_prep build --source KIND PATH [key=value ...]`: the generic ones
(`generic`: csv, folder, tfds) and one module per paper dataset in its own on-disk format
(`rafdb`, `ferplus`, `affectnet`). `parse` turns one --source into a reader; every reader
lists `data_prep.items.Item`s.
"""

from __future__ import annotations

import dataclasses
import os

from data_prep.readers.affectnet import AffectNetSource
from data_prep.readers.ferplus import FerPlusSource
from data_prep.readers.generic import CsvSource, FolderSource, TfdsSource
from data_prep.readers.rafdb import RafDbSource
from ssfer_jax.errors import DatasetError

PAPER_READERS = {"rafdb": RafDbSource, "ferplus": FerPlusSource, "affectnet": AffectNetSource}
READERS = {"csv": CsvSource, "folder": FolderSource, "tfds": TfdsSource, **PAPER_READERS}
KINDS = tuple(READERS)
Source = CsvSource | FolderSource | TfdsSource | RafDbSource | FerPlusSource | AffectNetSource


def parse(tokens: list[str]) -> Source:
  """`KIND PATH [key=value ...]` from the command line -> a source.

  csv PATH [name= root= image_col= label_col= box_cols=x0,y0,x1,y1]
  folder PATH labels=subdirs|none [name=]
  tfds DATASET [name= split= data_dir= image_key=]
  """
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
  fields = {f.name for f in dataclasses.fields(READERS[kind])} - {"name", "path", "dataset"}
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
  if kind in PAPER_READERS:
    return _paper_reader(kind, name, path, opts, " ".join(tokens))
  return TfdsSource(name=name, dataset=path, **opts)


def _default_name(kind: str, path: str) -> str:
  if kind in PAPER_READERS:
    return kind
  if kind == "csv":
    return os.path.basename(os.path.dirname(os.path.abspath(path)))
  if kind == "folder":
    return os.path.basename(os.path.abspath(path))
  return path.split("/")[0].split(":")[0]


def _paper_reader(kind: str, name: str, path: str, opts: dict, text: str) -> Source:
  """A paper dataset's reader from `--source KIND PATH key=value ...` (options already checked)."""
  if kind == "affectnet" and "classes" in opts:
    try:
      opts["classes"] = int(opts["classes"])
    except ValueError:
      raise DatasetError(f"--source {text}: classes={opts['classes']!r}; say 7 or 8.") from None
  return PAPER_READERS[kind](name=name, path=path, **opts)
