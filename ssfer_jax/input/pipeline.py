"""grain input pipelines: per-process shards of a split, as uint8 batches, checkpointable.

Train (`make_train_iterator`), per process:
  split record indices -> seeded shuffle, reshuffled every epoch, repeated forever
  -> read + decode + transform (random_map: one generator per position of that global
     stream, so an example's crop and flip do not depend on the number of processes)
  -> this process's slice [process_index::process_count] -> batches -> threads.
Slicing after the shuffle gives processes disjoint parts of every epoch's permutation; one
epoch over all processes is the whole split. The iterator's state is one integer
(`get_state`/`set_state`, or orbax via `grain.checkpoint.CheckpointSave/Restore`): a resumed
run with the same process count sees exactly the batches it would have seen.

Eval (`make_eval_iterator`): one pass in record order, each process's slice padded to whole
batches and to the same batch count on every process (collectives need that); padding rows
have `valid` False, index -1 and zero pixels.

Threads by default, not worker processes: cv2 releases the GIL while it decodes and resizes
(most of the work), and on a few cores processes lose (REFERENCE.md section 4); `worker_count`
adds grain worker processes for hosts with many cores. Batches are built whole in a worker
thread, so the prefetch buffer counts batches.

The shuffle is `_Epochs`, not grain's `shuffle().repeat()`, and the record is read inside the
per-example function rather than through `MapDataset.source`: both measured (see `_Epochs`).

Batch kinds (process-local dicts of numpy arrays; `batch_spec` gives global shapes):
  unlabeled  image uint8[b, S, S, 3], index int32[b] (global record index)
  labeled    + label int32[b], box float32[b, 4] (normalised xyxy in the output image)
  eval       labeled + valid bool[b]
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Callable, Sequence

import cv2
import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from ssfer_jax.input import augment, records

FIELDS = {  # name -> (shape after the batch dim, given the image size; dtype)
    "image": (lambda s: (s, s, 3), np.uint8),
    "index": (lambda s: (), np.int32),
    "label": (lambda s: (), np.int32),
    "box": (lambda s: (4,), np.float32),
    "valid": (lambda s: (), np.bool_),
}
KINDS = {
    "unlabeled": ("image", "index"),
    "labeled": ("image", "label", "box", "index"),
    "eval": ("image", "label", "box", "index", "valid"),
}
DEFAULT_THREADS = min(os.cpu_count() or 1, 16)


def batch_spec(kind: str, global_batch_size: int, image_size: int,
               sharding: jax.sharding.Sharding | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Global shapes and dtypes of a batch kind, to compile a step before any data is read."""
  _check("kind", kind, KINDS)
  return {name: jax.ShapeDtypeStruct((global_batch_size, *FIELDS[name][0](image_size)),
                                     FIELDS[name][1], sharding=sharding)
          for name in KINDS[kind]}


@dataclasses.dataclass(frozen=True)
class _Example:
  """Reads one record and makes the fields of its batch kind; index -1 is an eval pad."""
  source: grain.sources.ArrayRecordDataSource
  kind: str
  image_size: int
  num_classes: int
  where: str  # names the data for error messages
  transform: Callable | None = None  # a train transform of `augment.TRANSFORMS`; None: eval

  def __call__(self, index, rng: np.random.Generator | None = None) -> dict:
    if index < 0:
      pad = {name: np.zeros(FIELDS[name][0](self.image_size), FIELDS[name][1])
             for name in KINDS[self.kind]}
      return {**pad, "index": np.int32(-1)}
    rec = records.decode(self.source[index])
    image = augment.decode(rec["image"], rgb=False)
    if self.transform is None:
      image, box = augment.eval_transform(image, rec["box"], self.image_size)
    else:
      image, box = self.transform(image, rec["box"], rng, self.image_size)
    out = {"image": image, "index": np.int32(index)}  # grey stays [S, S] until `_stack`
    if self.kind != "unlabeled":
      label = rec["label"]
      if not 0 <= label < self.num_classes:
        raise records.DatasetError(
            f"{self.where}: record {rec['id']!r} (index {index}) has label {label}, not one of "
            f"the {self.num_classes} classes; a {self.kind} pipeline needs labeled lists "
            "(train_labeled, val, test) or use kind='unlabeled'.")
      out.update(label=np.int32(label), box=box)
    if self.kind == "eval":
      out["valid"] = np.True_
    return out


def _stack(examples: Sequence[dict]) -> dict:
  """Batches examples, expanding grey images to RGB straight into the batch (one copy)."""
  out = {k: np.stack([e[k] for e in examples]) for k in examples[0] if k != "image"}
  out["image"] = np.empty((len(examples), *examples[0]["image"].shape[:2], 3), np.uint8)
  for row, e in zip(out["image"], examples):
    if e["image"].ndim == 2:
      cv2.cvtColor(e["image"], cv2.COLOR_GRAY2RGB, dst=row)
    else:
      row[...] = e["image"]
  return out


class _Epochs:
  """Position in the endless train stream -> record index: a new seeded permutation of the
  split each epoch.

  Stands in for `MapDataset.shuffle().repeat()`: grain's index_shuffle costs ~35 us an element
  on a 1000-record split and ~460 us on a 60-record one (more than decoding the JPEG), where a
  permutation drawn once per epoch costs well under a microsecond an element. A map over
  `MapDataset.range` also skips the per-element read metrics of `MapDataset.source` (~11 us).
  """

  def __init__(self, indices: np.ndarray, seed: int):
    self._indices, self._seed = indices, seed
    self._recent = {}  # epoch -> permutation; threads can straddle an epoch boundary

  def __call__(self, position: int) -> int:
    epoch, k = divmod(position, len(self._indices))
    order = self._recent.get(epoch)
    if order is None:  # a race computes the same permutation twice, harmlessly
      order = self._indices[np.random.default_rng((self._seed, epoch)).permutation(
          len(self._indices))]
      self._recent = {e: o for e, o in self._recent.items() if e == epoch - 1} | {epoch: order}
    return int(order[k])


def _check(what, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {what} {value!r}; use one of {sorted(allowed)}.")


def _processes(global_batch_size, process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{process_count} processes; pick a multiple of {process_count}.")
  return process_index, process_count, global_batch_size // process_count


def _open(data_dir, split, names, kind, image_size, transform=None):
  """The split's sorted record indices and the per-record function."""
  manifest = records.load_manifest(data_dir)
  indices = records.load_split(data_dir, split, names)
  where = f"{data_dir} (split {split!r}, lists {list(names)})"
  if not len(indices):
    raise records.DatasetError(f"{where}: no records; name lists that are not empty.")
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(data_dir, manifest))
  return indices, _Example(source, kind, image_size, len(manifest["classes"]), where, transform)


def _iterate(ds: grain.MapDataset, num_threads, prefetch_batches, worker_count):
  read = grain.ReadOptions(num_threads=num_threads,
                           prefetch_buffer_size=2 * num_threads if prefetch_batches is None
                           else prefetch_batches)
  ds = ds.to_iter_dataset(read)
  if worker_count:
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's worker processes die on unparsed absl flags
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def make_train_iterator(data_dir: str, split: str, names: Sequence[str], *, kind: str,
                        global_batch_size: int, image_size: int, seed: int,
                        transform: str = "weak", process_index: int | None = None,
                        process_count: int | None = None, num_threads: int = DEFAULT_THREADS,
                        prefetch_batches: int | None = None,
                        worker_count: int = 0) -> grain.DatasetIterator:
  """An endless iterator of this process's train batches.

  `num_threads` threads build whole batches, `prefetch_batches` (default 2 * num_threads)
  ahead. `worker_count` > 0 runs that many grain worker processes, each with those threads,
  for hosts where the GIL-bound share of the work limits threads; the batches are the same.
  Close an iterator with workers (`it.close()`) when done with it.
  """
  _check("kind", kind, ("unlabeled", "labeled"))
  _check("transform", transform, augment.TRANSFORMS)
  process_index, process_count, batch = _processes(global_batch_size, process_index,
                                                   process_count)
  indices, example = _open(data_dir, split, names, kind, image_size,
                           augment.TRANSFORMS[transform])
  ds = (grain.MapDataset.range(sys.maxsize).map(_Epochs(indices, seed)).seed(seed)
        .random_map(example)[process_index::process_count]
        .batch(batch, drop_remainder=True, batch_fn=_stack))
  return _iterate(ds, num_threads, prefetch_batches, worker_count)


def make_eval_iterator(data_dir: str, split: str, names: Sequence[str], *,
                       global_batch_size: int, image_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int = DEFAULT_THREADS, prefetch_batches: int | None = None,
                       worker_count: int = 0) -> grain.DatasetIterator:
  """One pass over the named lists; every process yields the same number of batches.

  Threads, prefetch and workers as in `make_train_iterator`.
  """
  process_index, process_count, batch = _processes(global_batch_size, process_index,
                                                   process_count)
  indices, example = _open(data_dir, split, names, "eval", image_size)
  # Every process pads to the longest slice rounded up to whole batches.
  length = math.ceil(math.ceil(len(indices) / process_count) / batch) * batch
  mine = indices[process_index::process_count]
  padded = np.concatenate([mine, np.full(length - len(mine), -1, mine.dtype)])
  ds = grain.MapDataset.source(padded).map(example).batch(batch, drop_remainder=True,
                                                          batch_fn=_stack)
  return _iterate(ds, num_threads, prefetch_batches, worker_count)


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
              batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
  """Process-local batch -> global arrays, the batch dim sharded over `batch_axes` of `mesh`."""
  unknown = [a for a in batch_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"batch axes {unknown} are not axes of the mesh {dict(mesh.shape)}.")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  global_size = len(next(iter(batch.values()))) * jax.process_count()
  if global_size % shards:
    raise ValueError(
        f"global batch size {global_size} is not divisible by {shards}, the product of the "
        f"mesh axes {tuple(batch_axes)} it is split over ({dict(mesh.shape)}); pick a "
        f"multiple of {shards}.")
  sharding = NamedSharding(mesh, P(tuple(batch_axes)))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
