"""Pretraining must never see the val/test images of a dataset it is evaluated on.

Checked when a fine-tuning run starts from a stage-1 run: every image the MAE run drew from
(its `data.mix` sources, or its data.dir's train lists) against the val and test lists of
the fine-tuning split. Images are compared by the sha256 of the input file each record was
built from (the manifest's `inputs_sha256`), so the same photo in two builds (AffectNet in a
pretraining mix and in the benchmark build) counts too; a record without one is compared by
its build and id.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from ssfer_jax.input import records
from ssfer_jax.input.pipeline import MixSource, parse_mix

EVAL_LISTS = ("val", "test")


def pretraining_sources(data: dict) -> list[MixSource]:
  """What a run with config.json's `data` section drew its training images from."""
  mix = parse_mix(data.get("mix") or "")
  return mix or [MixSource(data["dir"], data["split"], 1.0)]


def _ids(data_dir: str, split: str | None, lists: Sequence[str]) -> list[str]:
  if split is None:
    return records.load_ids(data_dir)
  path = split if os.sep in split or split.endswith(".json") else os.path.join(
      data_dir, records.SPLITS_DIR, split + ".json")
  with open(path) as f:
    named = json.load(f)["lists"]
  return [rid for ln in lists for rid in named.get(ln, [])]


def _keys(data_dir: str, ids: Sequence[str]) -> dict[str, str]:
  """Image key (input sha256, else build + id) -> the record id, for these records."""
  digests = records.load_manifest(data_dir).get("inputs_sha256", {})
  where = os.path.realpath(data_dir)
  return {digests.get(rid) or f"{where}:{rid}": rid for rid in ids}


def check(pretrain_data: dict, data_dir: str, split: str, pretrain_run: str) -> None:
  """DatasetError when the pretraining run drew an image that is in `split`'s val or test."""
  held = _keys(data_dir, _ids(data_dir, split, EVAL_LISTS))
  train_lists = pretrain_data.get("train_lists", ("train_labeled", "train_unlabeled"))
  for source in pretraining_sources(pretrain_data):
    seen = _keys(source.data_dir, _ids(source.data_dir, source.split, train_lists))
    shared = sorted(set(seen) & set(held))
    if shared:
      examples = ", ".join(f"{held[k]!r}" for k in shared[:3])
      raise records.DatasetError(
          f"{pretrain_run} pretrained on {len(shared)} image(s) of the val/test lists of split "
          f"{split!r} of {data_dir} (e.g. {examples}; read from {source.data_dir}"
          f"{'@' + source.split if source.split else ' (every record)'}): its accuracy there "
          "would be inflated. Pretrain on a split's train lists (DIR@SPLIT in data.mix, or "
          "data.split) that keeps them out, or fine-tune on a split whose val/test the "
          "pretraining never saw.")
