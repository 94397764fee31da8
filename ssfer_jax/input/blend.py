"""Several builds in one train stream (`data.blend`, stages 1 and 2): what a blend is, the rows
each build gives every batch, and how many records it can draw. The pipeline reads the
builds (`pipeline.make_train_iterator(blend=...)`); stage 3 reads one build, since its
per-record threshold state indexes that build's unlabeled list."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from ssfer_jax.input import records


@dataclasses.dataclass(frozen=True)
class BlendSource:
  """One build of a blended train stream: every record of `data_dir` (split None) or the train
  lists of its `split`, drawn at `weight` (weights are relative)."""
  data_dir: str
  split: str | None
  weight: float


def parse(text: str) -> list[BlendSource]:
  """`DIR[@SPLIT]=WEIGHT,...` (config `data.blend`) -> its sources; "" -> none. A DIR may hold
  "@" and "=" (the last of each splits), not ","."""
  out = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    where, eq, weight = part.rpartition("=")
    data_dir, at, split = where.rpartition("@") if "@" in where else (where, "", "")
    try:
      w = float(weight)
    except ValueError:
      w = -1.0
    if not eq or not data_dir or w <= 0:
      raise ValueError(f"data.blend entry {part!r}: want DIR=WEIGHT or DIR@SPLIT=WEIGHT with a "
                       "weight > 0, entries separated by commas (e.g. "
                       "'data/casia=0.7,data/affectnet@p10=0.3').")
    out.append(BlendSource(data_dir, split if at else None, w))
  return out


def row_counts(weights: Sequence[float], batch: int) -> list[int]:
  """Rows of each source in a batch of `batch`: round(w / sum(w) x batch), by largest
  remainders so they sum to `batch` exactly; every source gets at least one row."""
  total = sum(weights)
  quota = [w / total * batch for w in weights]
  counts = [math.floor(q) for q in quota]
  for i in sorted(range(len(quota)), key=lambda i: (counts[i] - quota[i], i))[:batch - sum(counts)]:
    counts[i] += 1
  if min(counts) < 1:
    raise ValueError(f"data.blend weights {list(weights)} give a source no row of a batch of "
                     f"{batch} ({counts}); raise its weight or the batch size.")
  return counts


def source_size(source: BlendSource, train_lists: Sequence[str]) -> int:
  """Records a blend source draws from: its split's train lists, or every record."""
  if source.split is None:
    return records.load_manifest(source.data_dir)["num_records"]
  return len(records.load_split(source.data_dir, source.split, train_lists))
