"""Training must never see the val/test images of the split a model is evaluated on.

Checked before compiling: a run with `data.blend` against its own split (stages 1 and 2), and
a fine-tuning run against every image its stage-1 `init_from` drew from (its `data.blend`
sources, or its data.dir's train lists). Stage 3 keeps stage 2's split, checked when
stage 2 started. An image is known by two keys, either of which matching is a leak: the
sha256 of the input file its record was built from (the manifest's `inputs_sha256`: the
same photo in two builds), and for the paper datasets' readers the dataset's own image name
(`rafdb:test_0001.jpg`: RAF-DB's aligned and original files of one face are different
files). A record with neither is known by its build and id.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from ssfer_jax import errors
from ssfer_jax.input import blend, records

EVAL_LISTS = ("val", "test")


def pretraining_sources(data: dict) -> list[blend.BlendSource]:
  """What a run with config.json's `data` section drew its training images from."""
  sources = blend.parse(data.get("blend") or "")
  return sources or [blend.BlendSource(data["dir"], data["split"], 1.0)]


def _ids(data_dir: str, split: str | None, lists: Sequence[str]) -> list[str]:
  if split is None:
    return records.load_ids(data_dir)
  with open(records.split_path(data_dir, split)) as f:
    named = json.load(f)["lists"]
  return [rid for ln in lists for rid in named.get(ln, [])]


DATASET_KINDS = ("rafdb", "ferplus", "affectnet")   # readers whose ids are the dataset's names


def _keys(data_dir: str, ids: Sequence[str]) -> dict[str, str]:
  """Image key -> the record id, for these records (see the module docstring)."""
  manifest = records.load_manifest(data_dir)
  digests = manifest.get("inputs_sha256", {})
  kinds = {name: spec.get("kind") for name, spec in manifest["sources"].items()}
  where = os.path.realpath(data_dir)
  out = {}
  for rid in ids:
    out[digests.get(rid) or f"{where}:{rid}"] = rid
    source, _, name = rid.partition("/")
    if kinds.get(source) in DATASET_KINDS:
      out[f"{kinds[source]}:{name}"] = rid
  return out


def check(train_data: dict, data_dir: str, split: str, run: str) -> None:
  """DatasetError when a run with config.json's `data` section `train_data` drew an image
  that is in `split`'s val or test lists."""
  held = _keys(data_dir, _ids(data_dir, split, EVAL_LISTS))
  train_lists = train_data.get("train_lists", ("train_labeled", "train_unlabeled"))
  for source in pretraining_sources(train_data):
    seen = _keys(source.data_dir, _ids(source.data_dir, source.split, train_lists))
    shared = sorted(set(seen) & set(held))
    if shared:
      examples = ", ".join(dict.fromkeys(f"{held[k]!r}" for k in shared[:6]))
      images = len({held[k] for k in shared})
      raise errors.DatasetError(
          f"{run} trains on {images} image(s) of the val/test lists of split {split!r} of "
          f"{data_dir} (e.g. {examples}; read from {source.data_dir}"
          f"{'@' + source.split if source.split else ' (every record)'}): its accuracy there "
          "would be inflated. Train on a split's train lists (DIR@SPLIT in data.blend, or "
          "data.split) that keeps them out, or evaluate on a split whose val/test it never "
          "saw.")
