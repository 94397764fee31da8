"""The on-disk record schema and dataset layout shared by `data_prep` (writer) and the input
pipeline (reader).

One record per image, msgpack-encoded (deterministic bytes: fixed key order, no timestamps):
  {"v": SCHEMA_VERSION, "image": JPEG bytes, "label": int (-1 = unlabeled),
   "box": [x0, y0, x1, y1] normalised to the stored image, "id": str (stable),
   "source": str, "face_found": bool, "identity": str ("" = unknown)}
Version 2 added "identity" (the person, from a face-recognition collection's folders) for
grouped splits; version-1 builds stay readable, their records decode with identity "".

A built dataset directory holds:
  manifest.json                      classes, counts, preprocessing, skipped inputs, checksums
  ids.txt                            one record id per line, in global record order
  records-SSSSS-of-NNNNN.array_record  shards; global index = concatenation in shard order
  splits/NAME.json                   record-id lists written by `python -m data_prep split`
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Sequence

import msgpack
import numpy as np
from array_record.python.array_record_data_source import ArrayRecordDataSource

from ssfer_jax import errors

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
UNLABELED = -1
MANIFEST = "manifest.json"
IDS_FILE = "ids.txt"
SPLITS_DIR = "splits"
SPLIT_NAMES = ("train_labeled", "train_unlabeled", "val", "test")


@dataclasses.dataclass(frozen=True)
class Record:
  image: bytes
  label: int
  box: tuple[float, float, float, float]
  id: str
  source: str
  face_found: bool
  identity: str = ""


def encode(rec: Record) -> bytes:
  return msgpack.packb(
      {
          "v": SCHEMA_VERSION,
          "image": rec.image,
          "label": int(rec.label),
          "box": [float(b) for b in rec.box],
          "id": rec.id,
          "source": rec.source,
          "face_found": bool(rec.face_found),
          "identity": rec.identity,
      },
      use_bin_type=True,
  )


def decode(raw: bytes) -> dict:
  """Returns the record as a dict (cheap: the JPEG stays encoded)."""
  d = msgpack.unpackb(raw, raw=False)
  if d.get("v") not in READABLE_VERSIONS:
    raise errors.DatasetError(
        f"record schema version {d.get('v')} is not one of {READABLE_VERSIONS}; rebuild the "
        "dataset with this version of `python -m data_prep build`.")
  d.setdefault("identity", "")
  return d


def shard_name(index: int, count: int) -> str:
  return f"records-{index:05d}-of-{count:05d}.array_record"


def shard_paths(data_dir: str, manifest: dict) -> list[str]:
  n = manifest["num_shards"]
  paths = [os.path.join(data_dir, shard_name(i, n)) for i in range(n)]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise errors.DatasetError(f"{data_dir}: shard files missing ({missing[:3]}...); "
                              "finish or rerun `python -m data_prep build`.")
  return paths


def read_error(data_dir: str, index: int, error: BaseException) -> errors.DatasetError:
  """A failed read of global record `index`, named by its shard file and place in it."""
  where = f"record {index}"
  try:
    offset = index
    for shard in load_manifest(data_dir)["shards"]:
      if offset < shard["num_records"]:
        where = (f"record {index} ({offset} of {os.path.join(data_dir, shard['file'])})")
        break
      offset -= shard["num_records"]
  except (OSError, KeyError, ValueError, errors.DatasetError):
    pass
  return errors.DatasetError(
      f"{data_dir}: {where} cannot be read ({type(error).__name__}: {error}). The shard is "
      f"damaged: `python -m data_prep verify {data_dir}` checks every shard's checksum; "
      "rebuild or restore the dataset.")


def open_error(data_dir: str, paths: list[str], error: BaseException) -> errors.DatasetError:
  """Opening the shards failed: name the ones that do not open on their own."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top
  bad = []
  for path in paths:
    try:
      ArrayRecordReader(path).close()
    except Exception:  # pylint: disable=broad-except
      bad.append(path)
  return errors.DatasetError(
      f"{data_dir}: shard(s) {bad or paths} cannot be opened ({type(error).__name__}: "
      f"{str(error)[:300]}). `python -m data_prep verify {data_dir}` checks every shard's "
      "checksum; rebuild or restore the dataset.")


def load_manifest(data_dir: str) -> dict:
  path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(path):
    what = (f"{data_dir} does not exist: the build itself is missing (no manifest, no records)"
            if not os.path.isdir(data_dir) else
            f"{path} not found: {data_dir} is not a complete build (a failed or unfinished build "
            "leaves no manifest)")
    raise errors.DatasetError(f"{what}; build it with `python -m data_prep build --out "
                              f"{data_dir} ...`.")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("schema_version") not in READABLE_VERSIONS:
    raise errors.DatasetError(f"{path}: schema_version {manifest.get('schema_version')} is not one of "
                              f"{READABLE_VERSIONS}; rebuild the dataset with this version.")
  return manifest


def load_ids(data_dir: str) -> list[str]:
  """One id per "\n"-ended line (UTF-8). Only "\n" ends a line: ids may hold any other
  character a file name can (U+2028, form feeds, ...), which `str.splitlines` would split."""
  with open(os.path.join(data_dir, IDS_FILE), encoding="utf-8", newline="") as f:
    return f.read().split("\n")[:-1]


def _index_of(data_dir: str) -> dict[str, int]:
  """Record id -> global index. Cached per ids.txt version: a run asks for several lists
  (planning, the train iterator, figures), and at 1.2M records each map costs seconds."""
  st = os.stat(os.path.join(data_dir, IDS_FILE))
  return _index_of_version(os.path.abspath(data_dir), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _index_of_version(data_dir: str, mtime_ns: int, size: int) -> dict[str, int]:
  del mtime_ns, size  # the cache key: a rebuilt dataset is read afresh
  return {rid: i for i, rid in enumerate(load_ids(data_dir))}


def load_split(data_dir: str, split_file: str, names: Sequence[str]) -> np.ndarray:
  """Global record indices (sorted, read-only) of the union of the named lists of a split file.

  `split_file` is a path, or a bare name looked up as `DATA_DIR/splits/NAME.json`.
  The split must have been made over this exact build (manifest checksum). Cached per
  version of the split, manifest and ids files: a run asks for the same lists many times
  (planning, the iterators, every evaluation), and a split of a 1.2M-record build is
  megabytes of JSON.
  """
  path, versions = _split_version(data_dir, split_file)
  return _load_split_version(os.path.abspath(data_dir), os.path.abspath(path), tuple(names),
                             versions)


def load_label_noise(data_dir: str, split_file: str) -> dict[int, int]:
  """Global record index -> the label a split with `--label-noise` gives it in place of the
  record's own ({} for other splits). Every reader of labels for training applies it."""
  path, versions = _split_version(data_dir, split_file)
  return _load_noise_version(os.path.abspath(data_dir), os.path.abspath(path), versions)


@functools.lru_cache(maxsize=4)
def _load_noise_version(data_dir: str, path: str, versions: tuple) -> dict[int, int]:
  del versions  # the cache key
  with open(path) as f:
    noisy = json.load(f).get("noisy_labels", {})
  index_of = _index_of(data_dir) if noisy else {}
  return {index_of[rid]: int(label) for rid, label in noisy.items()}


def split_file_name(data_dir: str, split_file: str) -> str:
  """A split's file, existing or not: `split_file` as a path, or a bare name as
  DATA_DIR/splits/NAME.json."""
  return split_file if os.sep in split_file or split_file.endswith(".json") else os.path.join(
      data_dir, SPLITS_DIR, split_file + ".json")


def split_path(data_dir: str, split_file: str) -> str:
  """`split_file_name`, or errors.DatasetError when it does not exist: saying how to build the
  dataset when the build is missing too (a deleted data folder), else how to write the split."""
  path = split_file_name(data_dir, split_file)
  if not os.path.exists(path):
    if not os.path.exists(os.path.join(data_dir, MANIFEST)):
      load_manifest(data_dir)  # raises the error that says how to build it
    raise errors.DatasetError(f"split file {path} not found; write it with "
                              f"`python -m data_prep split --data {data_dir} ...`.")
  return path


def _split_version(data_dir: str, split_file: str) -> tuple[str, tuple]:
  """The split file's path and the (inode, mtime, size) of it, the manifest and ids.txt."""
  path = split_path(data_dir, split_file)
  manifest_path = os.path.join(data_dir, MANIFEST)
  if not os.path.exists(manifest_path):
    load_manifest(data_dir)  # raises the error that says how to build it
  versions = tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in map(os.stat, (
      path, manifest_path, os.path.join(data_dir, IDS_FILE))))
  return path, versions


@functools.lru_cache(maxsize=16)
def _load_split_version(data_dir: str, path: str, names: tuple[str, ...],
                        versions: tuple) -> np.ndarray:
  del versions  # the cache key: a rewritten split or rebuilt dataset is read afresh
  manifest = load_manifest(data_dir)
  with open(path) as f:
    split = json.load(f)
  if split.get("manifest_sha256") != manifest["manifest_sha256"]:
    raise errors.DatasetError(f"{path} was made for another build of {data_dir} (manifest checksum "
                              "differs); rerun `python -m data_prep split` over this build.")
  unknown = [n for n in names if n not in split["lists"]]
  if unknown:
    raise errors.DatasetError(f"{path}: no list named {unknown}; it has {sorted(split['lists'])}.")
  index_of = _index_of(data_dir)
  out = []
  for name in names:
    for rid in split["lists"][name]:
      if rid not in index_of:
        raise errors.DatasetError(f"{path}: record id {rid!r} in list {name!r} is not in "
                                  f"{os.path.join(data_dir, IDS_FILE)}; the split is stale.")
      out.append(index_of[rid])
  indices = np.asarray(sorted(out), dtype=np.int64)
  indices.flags.writeable = False   # shared by every caller of the cache
  return indices


def manifest_digest(manifest: dict) -> str:
  """The `manifest_sha256` of a manifest: sha256 of the canonical (sorted-key, compact) JSON
  of every field but itself, so split files can pin the exact build they were made for."""
  fields = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
  canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(canonical.encode()).hexdigest()


def read_labels(data_dir: str, indices: np.ndarray, split_file: str | None = None) -> np.ndarray:
  """The labels of the records at `indices` (reads each record once; the JPEGs stay encoded),
  with `split_file`'s label noise applied when given."""
  source = ArrayRecordDataSource(shard_paths(data_dir, load_manifest(data_dir)))
  noise = load_label_noise(data_dir, split_file) if split_file else {}
  raws = source.__getitems__(list(map(int, indices)))
  return np.asarray([noise.get(int(i), decode(raw)["label"]) for i, raw in zip(indices, raws)],
                    np.int64)


def face_framing(data_dir: str, sample: int = 2000) -> float | None:
  """The median of (image side / face box's longer side) over up to `sample` records spread
  over the build whose face was found: how much of the frame the face fills. Prediction frames
  a wild photo's face this way for a model trained on whole (pre-cropped) images."""
  manifest = load_manifest(data_dir)
  n = manifest["num_records"]
  indices = np.unique(np.linspace(0, n - 1, min(n, sample)).astype(np.int64))
  raws = ArrayRecordDataSource(shard_paths(data_dir, manifest)).__getitems__(list(map(int, indices)))
  sides = [max(b[2] - b[0], b[3] - b[1]) for b in
           (r["box"] for r in map(decode, raws) if r["face_found"])]
  return float(np.median(1.0 / np.maximum(sides, 1e-3))) if sides else None
