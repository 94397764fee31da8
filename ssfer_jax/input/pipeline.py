"""grain input pipelines: per-process shards of a split, as uint8 batches, checkpointable.

The grain element is a whole batch: `MapDataset.range` over this process's batch numbers,
mapped by `_Batch`, which reads the batch's records, decodes them and has the transform write
each image straight into a preallocated uint8 [b, S, S, 3] array. grain and Python overhead
(element bookkeeping, dicts, stacking) is paid once a batch, not once an example.

Train images go into the batch whole; the random-resized-crop window and flip travel beside
them (`crop`, `flip`) and `device.crop_resize_flip` applies them in the jitted step. The
bilinear resize was 0.30 of the decode ceiling on the host and is nearly free on an
accelerator; the host still draws the window and maps the face box through it, so the box
in the batch is the box of the image the model sees.

Train (`make_train_iterator`), per process, batch number n:
  global stream positions (n * b + j) * process_count + process_index, j < b
  -> record indices: a seeded permutation of the split per epoch (`_Epochs`), endless
  -> read + decode + transform, each example's randomness hashed from (seed, its position)
     (`augment.uniforms`), so crops and flips do not depend on the number of processes.
Processes read interleaved positions of one stream, i.e. disjoint parts of every epoch's
permutation; one epoch over all processes is the whole split. The iterator's state is one
integer (`get_state`/`set_state`, or orbax via `grain.checkpoint.CheckpointSave/Restore`): a
resumed run with the same process count sees exactly the batches it would have seen.

Eval (`make_eval_iterator`): one pass in record order, each process's slice padded to whole
batches and to the same batch count on every process (collectives need that); padding rows
have `valid` False, index -1 and zero pixels.

Threads by default, not worker processes: cv2 releases the GIL while it decodes (most of
the work), and on a few cores processes lose (docs/REFERENCE.md section 4); `worker_count`
adds grain worker processes for hosts with many cores. Each thread builds whole batches, so
the prefetch buffer counts batches.

Batch kinds (process-local dicts of numpy arrays; `batch_spec` gives global shapes):
  unlabeled  image uint8[b, S, S, 3] (as stored, resized only if stored at another size),
             crop float32[b, 4] (the window, normalised y0, x0, y1, x1 in `image`; the whole
             image for transform "eval"), flip bool[b] (mirror after the resize),
             index int32[b] (global record index)
  labeled    + label int32[b], box float32[b, 4] (normalised xyxy in the image the model
             sees: `crop_resize_flip` of `image`)
  eval       image, label (-1 where unlabeled), box (in `image`: no crop or flip to apply),
             index, valid bool[b]
  semisup    {"labeled": a labeled batch of b rows, "unlabeled": mu x b rows of
             image, crop, flip (the weak view), strong_crop float32[b, V, 4], strong_flip
             bool[b, V] (V strong views: further independent crops and flips of the same
             stored image; LEAF's consistency needs V = 2) and strong_u float32[b, V, DRAWS]
             (the RandAugment draws the device applies on top: `input/randaugment.py`); or
             in their place, the strong views made on the host (`strong_view`, kind
             "host_views"), strong_image uint8[b, V, S, S, 3] from the same draws; label
             (-1 where unknown; for diagnostics only, never trained on), index and position
             int32 (the row's place in the unlabeled list, for per-record threshold state)}.
             The two lists are separate streams, each with its own epochs, permutations and
             augmentation seed; both are functions of the batch number, so the iterator's
             state is still one integer and a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Any, Sequence

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec as P

from ssfer_jax import errors
from ssfer_jax.input import augment, blend as blend_lib, randaugment, records
from ssfer_jax.runtime import sharding as sharding_lib

FIELDS = {  # name -> (shape after the batch dim, given image size and strong views; dtype)
    "image": (lambda s, v: (s, s, 3), np.uint8),
    "index": (lambda s, v: (), np.int32),
    "label": (lambda s, v: (), np.int32),
    "box": (lambda s, v: (4,), np.float32),
    "crop": (lambda s, v: (4,), np.float32),
    "flip": (lambda s, v: (), np.bool_),
    "valid": (lambda s, v: (), np.bool_),
    "strong_crop": (lambda s, v: (v, 4), np.float32),
    "strong_flip": (lambda s, v: (v,), np.bool_),
    "strong_u": (lambda s, v: (v, randaugment.DRAWS), np.float32),
    "strong_image": (lambda s, v: (v, s, s, 3), np.uint8),
    "position": (lambda s, v: (), np.int32),
}
KINDS = {
    "unlabeled": ("image", "crop", "flip", "index"),
    "labeled": ("image", "crop", "flip", "label", "box", "index"),
    "eval": ("image", "label", "box", "index", "valid"),
    # The unlabeled part of a "semisup" batch.
    "views": ("image", "crop", "flip", "strong_crop", "strong_flip", "strong_u", "label",
              "index", "position"),
  # ... with its strong views made on the host (`strong_images`).
  "host_views": ("image", "crop", "flip", "strong_image", "label", "index", "position"),
}
STRONG_VIEW_PLACES = ("device", "host", "auto")
SEMISUP = "semisup"
_UNLABELED_STREAM = 1   # `augment.uniforms` key of the unlabeled stream of a semisup batch
_BLEND_STREAM = 1000    # + i: the key of the i-th source of a blended stream (i > 0)
DEFAULT_THREADS = min(os.cpu_count() or 1, 16)


def batch_spec(kind: str, global_batch_size: int, image_size: int,
               sharding: jax.sharding.Sharding | None = None,
               unlabeled_ratio: int = 0, strong_views: int = 1,
               strong_view: str = "device") -> dict[str, Any]:
  """Global shapes and dtypes of a batch kind, to compile a step before any data is read.
  A "semisup" batch has `global_batch_size` labeled and `unlabeled_ratio` times as many
  unlabeled rows, each with `strong_views` strong views, made where `strong_view` says
  (`strong_view_place`)."""
  if kind == SEMISUP:
    _check_semisup(unlabeled_ratio, strong_views)
    views = "host_views" if strong_view_place(strong_view) == "host" else "views"
    return {"labeled": batch_spec("labeled", global_batch_size, image_size, sharding),
            "unlabeled": batch_spec(views, unlabeled_ratio * global_batch_size, image_size,
                                    sharding, strong_views=strong_views)}
  _check("kind", kind, KINDS)
  return {name: jax.ShapeDtypeStruct(
      (global_batch_size, *FIELDS[name][0](image_size, strong_views)), FIELDS[name][1],
      sharding=sharding) for name in KINDS[kind]}


def strong_view_place(where: str) -> str:
  """"host" or "device": where a semisup batch's strong views (crop, flip, RandAugment) are
  made. "auto" is the host on a CPU backend, where the device's RandAugment computes every
  op family for every image and slot (~1 ms an image at 64 px, against ~0.1 ms for the host's
  one op), and the device elsewhere, where it is nearly free and the host's decode budget is
  not."""
  _check("strong_view", where, STRONG_VIEW_PLACES)
  if where == "auto":
    return "host" if jax.default_backend() == "cpu" else "device"
  return where


def strong_images(images: np.ndarray, crop: np.ndarray, flip: np.ndarray, u: np.ndarray,
                  fill: Sequence[int], out: np.ndarray) -> None:
  """The strong views `semisup.strong_view` makes on the device, made on the host into `out`
  uint8 [b, S, S, 3]: each image's window `crop` resized and mirrored where `flip`
  (`augment.crop_resize_flip`), then RandAugment from its draws `u` [b, DRAWS]
  (`randaugment.rand_augment_host`, fill colour `fill`). The same draws choose the same ops
  and magnitudes as on the device; pixels agree within a grey level or two."""
  for row, image in enumerate(images):
    augment.crop_resize_flip(image, crop[row], flip[row], out[row])
  randaugment.rand_augment_host(out, u, fill, out)


def _check_semisup(unlabeled_ratio: int, strong_views: int) -> None:
  for name, value in (("unlabeled_ratio (mu)", unlabeled_ratio), ("strong_views", strong_views)):
    if not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{name} is {value!r}; a semi-supervised batch needs a whole number "
                       ">= 1 of them.")


class _Epochs:
  """Global stream positions -> record indices: a new seeded permutation of the split each
  epoch.

  Stands in for `MapDataset.shuffle().repeat()`: grain's index_shuffle costs ~35 us an element
  on a 1000-record split and ~460 us on a 60-record one (more than decoding the JPEG), where a
  permutation drawn once per epoch costs well under a microsecond an element.
  """

  def __init__(self, indices: np.ndarray, seed: int):
    self._indices, self._seed = indices, seed
    self._recent = {}  # epoch -> permutation; threads can straddle an epoch boundary

  def _order(self, epoch: int) -> np.ndarray:
    order = self._recent.get(epoch)
    if order is None:  # a race computes the same permutation twice, harmlessly
      order = self._indices[np.random.default_rng((self._seed, epoch)).permutation(
          len(self._indices))]
      self._recent = {e: o for e, o in self._recent.items() if e == epoch - 1} | {epoch: order}
    return order

  def list_positions(self, indices: np.ndarray) -> np.ndarray:
    """Record indices -> their places in the (sorted) list."""
    return np.searchsorted(self._indices, indices)

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    epochs, ks = np.divmod(positions, len(self._indices))
    if epochs[0] == epochs[-1]:  # the usual case: one epoch in the batch
      return self._order(int(epochs[0]))[ks]
    return np.array([self._order(e)[k] for e, k in zip(epochs.tolist(), ks.tolist())])


@dataclasses.dataclass(frozen=True)
class _TrainRows:
  """Batch number -> (record index, global stream position) of each row."""
  epochs: _Epochs
  batch: int
  process_index: int
  process_count: int

  def __call__(self, number: int) -> tuple[np.ndarray, np.ndarray]:
    positions = ((number * self.batch + np.arange(self.batch)) * self.process_count
                 + self.process_index)
    return self.epochs(positions), positions


@dataclasses.dataclass(frozen=True)
class _EvalRows:
  """Batch number -> rows of the padded index list (-1 pads); positions unused (no draws)."""
  indices: np.ndarray
  batch: int

  def __call__(self, number: int) -> tuple[np.ndarray, np.ndarray]:
    rows = self.indices[number * self.batch:(number + 1) * self.batch]
    return rows, np.zeros(len(rows), np.int64)


@dataclasses.dataclass(frozen=True)
class _Batch:
  """Batch number -> the batch of its kind: records read and decoded one by one, each image
  written into its row by `transform` (train kinds also keep its crop and flip), its
  randomness drawn for the whole batch at once."""
  source: grain.sources.ArrayRecordDataSource
  kind: str
  image_size: int
  num_classes: int
  where: str  # names the data for error messages
  data_dir: str
  rows: _TrainRows | _EvalRows
  transform: augment.Transform
  seed: int
  strong_views: int = 1
  fill: tuple[int, ...] = ()   # "host_views": RandAugment's fill colour
  label_noise: dict | None = None   # record index -> label, from a split's --label-noise
  label_map: tuple[int, ...] | None = None   # this build's label -> the run's (a blended stream)

  def __call__(self, number: int) -> dict:
    indices, positions = self.rows(number)
    # Every image row gets written (pads zeroed below): np.empty skips zeroing them twice.
    out = {name: (np.empty if name == "image" else np.zeros)(
        (len(indices), *FIELDS[name][0](self.image_size, self.strong_views)), FIELDS[name][1])
           for name in KINDS[self.kind]}
    out["index"][:] = indices
    image, train, views = out["image"], "crop" in out, self.kind in ("views", "host_views")
    weak = self.transform.draws
    # "views" rows: the weak window and flip, then per strong view its window and flip and
    # RandAugment's draws (one strong view reads the same draws whatever V is).
    per_view = weak + randaugment.DRAWS
    draws = augment.uniforms(self.seed, positions,
                             weak + self.strong_views * per_view if views else weak)
    if views:
      out["position"][:] = self.rows.epochs.list_positions(indices)
      strong = draws[:, weak:].reshape(len(indices), self.strong_views, per_view)
      strong_u = strong[:, :, weak:].astype(np.float32)
      crops = np.empty((len(indices), self.strong_views, 4), np.float32)
      flips = np.empty((len(indices), self.strong_views), bool)
    # Evaluation and the unlabeled views may read unlabeled records (label -1).
    lowest = records.UNLABELED if self.kind in ("eval", "views") else 0
    for row, (index, u) in enumerate(zip(indices.tolist(), draws.tolist())):
      if index < 0:  # an eval pad
        image[row] = 0
        continue
      try:
        rec = records.decode(self.source[index])
      except Exception as e:  # pylint: disable=broad-except   (array_record, msgpack errors)
        raise records.read_error(self.data_dir, index, e) from e
      decoded = augment.decode(rec["image"], rgb=False)
      view = self.transform.fn(decoded, rec["box"], u, image[row])
      if train:
        out["crop"][row], out["flip"][row] = view.crop, view.flip
      for v in range(self.strong_views if views else 0):
        at = weak + v * per_view
        strong = self.transform.view(*decoded.shape[:2], rec["box"], u[at:at + weak])
        crops[row, v], flips[row, v] = strong.crop, strong.flip
      if "label" in out:
        label = self.label_noise.get(index, rec["label"]) if self.label_noise else rec["label"]
        if self.label_map is not None and 0 <= label < len(self.label_map):
          label = self.label_map[label]
        if not lowest <= label < self.num_classes:
          raise errors.DatasetError(
              f"{self.where}: record {rec['id']!r} (index {index}) has label {label}, not one "
              f"of the {self.num_classes} classes; a {self.kind} pipeline needs labeled lists "
              "(train_labeled, val, test) or use kind='unlabeled'.")
        out["label"][row] = label
      if "box" in out:
        out["box"][row] = view.box
    if self.kind == "eval":
      out["valid"][:] = indices >= 0
    if self.kind == "views":
      out["strong_crop"][:], out["strong_flip"][:], out["strong_u"][:] = crops, flips, strong_u
    for v in range(self.strong_views if self.kind == "host_views" else 0):
      strong_images(image, crops[:, v], flips[:, v], strong_u[:, v], self.fill,
                    out["strong_image"][:, v])
    return out


@dataclasses.dataclass(frozen=True)
class _SemisupBatch:
  """Batch number -> {"labeled": that batch of the labeled stream, "unlabeled": of the
  unlabeled one}."""
  labeled: _Batch
  unlabeled: _Batch

  def __call__(self, number: int) -> dict:
    return {"labeled": self.labeled(number), "unlabeled": self.unlabeled(number)}


@dataclasses.dataclass(frozen=True)
class _BlendedBatch:
  """Batch number -> the rows of every source's batch, concatenated then shuffled (seeded
  per batch) so each device's shard holds every source. `index` is offset per source (the sum of
  the record counts of the builds before it), so it names one record of one build."""
  parts: tuple[_Batch, ...]
  offsets: tuple[int, ...]
  seed: int

  def __call__(self, number: int) -> dict:
    outs = [p(number) for p in self.parts]
    for out, offset in zip(outs, self.offsets):
      out["index"] += offset
    batch = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    order = np.random.default_rng((self.seed, _BLEND_STREAM, number)).permutation(
        len(batch["index"]))
    return {k: v[order] for k, v in batch.items()}


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


def _open(data_dir, split, names, kind, image_size, source=None):
  """The split's sorted record indices and the `_Batch` fields that do not depend on it.
  `split` None means every record of the build; `source`, an already open data source of
  the build (the two streams of a semisup batch share one)."""
  manifest = records.load_manifest(data_dir)
  if split is None:
    indices = np.arange(manifest["num_records"], dtype=np.int64)
    where = f"{data_dir} (every record)"
  else:
    indices = records.load_split(data_dir, split, names)
    where = f"{data_dir} (split {split!r}, lists {list(names)})"
  noise = records.load_label_noise(data_dir, split) if split is not None else {}
  if not len(indices):
    raise errors.DatasetError(f"{where}: no records; name lists that are not empty.")
  if source is None:
    paths = records.shard_paths(data_dir, manifest)
    try:
      source = grain.sources.ArrayRecordDataSource(paths)
    except Exception as e:  # pylint: disable=broad-except   (a damaged shard's footer)
      raise records.open_error(data_dir, paths, e) from e
  return indices, dict(source=source, kind=kind, image_size=image_size,
                       num_classes=len(manifest["classes"]), where=where, data_dir=data_dir,
                       label_noise=noise or None)


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
                        transform: str = "weak", unlabeled_names: Sequence[str] = (),
                        unlabeled_ratio: int = 0, strong_views: int = 1,
                        process_index: int | None = None,
                        process_count: int | None = None, num_threads: int = DEFAULT_THREADS,
                        prefetch_batches: int | None = None,
                        worker_count: int = 0,
                        blend: Sequence[blend_lib.BlendSource] = (),
                        crop_scale: Sequence[float] = augment.SCALE,
                        crop_ratio: Sequence[float] = augment.RATIO,
                        center_crop: float = 1.0, strong_view: str = "device",
                        strong_fill: Sequence[int] | None = None) -> grain.DatasetIterator:
  """An endless iterator of this process's train batches.

  `blend` (kinds "unlabeled" and "labeled") reads several builds instead of `data_dir`:
  source i gives `blend.row_counts` rows of every batch from its own stream (its own epochs,
  permutations and seed), its labels mapped by class name onto `data_dir`'s classes. The
  state is still one integer.

  kind "semisup" pairs `global_batch_size` rows of the `names` lists (labeled, weak) with
  `unlabeled_ratio` times as many of the `unlabeled_names` lists (a weak and `strong_views`
  strong views, made where `strong_view` says, `strong_view_place`; on the host RandAugment
  fills with `strong_fill`, `randaugment.fill_colour` of the run's mean).

  `transform` names an `augment.TRANSFORMS` entry seeing the `center_crop` share of each
  stored image, "weak" with its random crop's area `crop_scale` and aspect `crop_ratio` of
  that (also the strong views' crop); "eval" gives a shuffled stream of un-augmented images
  (e.g. a diverse fixed set of faces for figures), with whole-image crops and no flips, so the
  same device preparation serves both. `num_threads` threads build whole batches,
  `prefetch_batches` (default 2 * num_threads) ahead. `worker_count` > 0 runs that many grain
  worker processes, each with those threads, for hosts where the GIL-bound share of the work
  limits threads; the batches are the same. Close an iterator with workers
  (`it.close()`) when done with it.
  """
  _check("kind", kind, ("unlabeled", "labeled", SEMISUP))
  _check("transform", transform, augment.TRANSFORMS)
  process_index, process_count, batch = _processes(global_batch_size, process_index,
                                                   process_count)
  transform_fn = augment.transform(transform, crop_scale, crop_ratio, center_crop)

  def stream(lists, kind, batch, seed, source=None, fill=()):
    indices, fields = _open(data_dir, split, lists, kind, image_size, source)
    rows = _TrainRows(_Epochs(indices, seed), batch, process_index, process_count)
    return _Batch(**fields, rows=rows, transform=transform_fn, seed=seed,
                  strong_views=strong_views, fill=fill)

  if blend:
    make_batch = _blended(data_dir, names, kind, image_size, seed, blend, global_batch_size,
                        process_index, process_count, transform_fn)
  elif kind == SEMISUP:
    _check_semisup(unlabeled_ratio, strong_views)
    if not unlabeled_names:
      raise ValueError("a semisup iterator needs unlabeled_names (e.g. ('train_unlabeled',)).")
    views = "host_views" if strong_view_place(strong_view) == "host" else "views"
    if views == "host_views" and (strong_fill is None or len(strong_fill) != 3):
      raise ValueError(f"strong views made on the host need strong_fill, RandAugment's fill "
                       f"colour (3 values, randaugment.fill_colour(mean)), not {strong_fill!r}.")
    # Its own seed: the two streams' permutations and augmentations are independent.
    unlabeled_seed = int(augment.uniforms(seed, [_UNLABELED_STREAM], 1)[0, 0] * 2**53)
    labeled = stream(names, "labeled", batch, seed)
    make_batch = _SemisupBatch(labeled, stream(
        unlabeled_names, views, unlabeled_ratio * batch, unlabeled_seed, labeled.source,
        tuple(int(c) for c in strong_fill or ())))
  else:
    make_batch = stream(names, kind, batch, seed)
  ds = grain.MapDataset.range(sys.maxsize // global_batch_size).map(make_batch)
  return _iterate(ds, num_threads, prefetch_batches, worker_count)


def _blended(data_dir, names, kind, image_size, seed, blend, global_batch_size, process_index,
           process_count, transform) -> _BlendedBatch:
  if kind not in ("unlabeled", "labeled"):
    raise ValueError(f"data.blend reads several builds for kinds 'unlabeled' and 'labeled' (stages "
                     f"1 and 2), not {kind!r}: stage 3's per-record state indexes one build's "
                     "unlabeled list.")
  counts = blend_lib.row_counts([b.weight for b in blend], global_batch_size)
  uneven = [(b.data_dir, c) for b, c in zip(blend, counts) if c % process_count]
  if uneven:
    raise ValueError(f"data.blend rows per batch {counts} must each split over the "
                     f"{process_count} processes ({uneven} do not); adjust the weights or "
                     "batch size.")
  classes = records.load_manifest(data_dir)["classes"]
  parts, offsets, offset = [], [], 0
  for i, (m, count) in enumerate(zip(blend, counts)):
    indices, fields = _open(m.data_dir, m.split, names, kind, image_size)
    manifest = records.load_manifest(m.data_dir)
    theirs = manifest["classes"]
    if kind == "labeled" and m.split is None and manifest["counts"].get("unlabeled", 0):
      raise errors.DatasetError(
          f"data.blend: {m.data_dir} (every record) holds {manifest['counts']['unlabeled']} "
          "unlabeled records, which a labeled stream cannot train on; name a split whose "
          f"train lists are labeled ({m.data_dir}@SPLIT).")
    if kind == "labeled":
      missing = [c for c in theirs if c not in classes]
      if missing:
        raise errors.DatasetError(
            f"data.blend: {m.data_dir} has class(es) {missing} that {data_dir} (the run's "
            f"data.dir, classes {classes}) lacks; a labeled blend maps classes by name.")
      fields["label_map"] = tuple(classes.index(c) for c in theirs)
    fields["num_classes"] = len(classes)   # labels are checked after the mapping
    stream_seed = seed if i == 0 else int(augment.uniforms(seed, [_BLEND_STREAM + i], 1)[0, 0]
                                          * 2**53)
    rows = _TrainRows(_Epochs(indices, stream_seed), count // process_count, process_index,
                      process_count)
    parts.append(_Batch(**fields, rows=rows, transform=transform, seed=stream_seed))
    offsets.append(offset)
    offset += manifest["num_records"]
  return _BlendedBatch(tuple(parts), tuple(offsets), seed)


def make_eval_iterator(data_dir: str, split: str | None, names: Sequence[str], *,
                       global_batch_size: int, image_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       num_threads: int = DEFAULT_THREADS, prefetch_batches: int | None = None,
                       worker_count: int = 0, center_crop: float = 1.0) -> grain.DatasetIterator:
  """One pass over the named lists (every record of the build when `split` is None); every
  process yields the same number of batches. Labels may be -1 (unlabeled records). Each image
  is its `center_crop` share of the stored side, centred (`augment.center_window`).

  Threads, prefetch and workers as in `make_train_iterator`.
  """
  process_index, process_count, batch = _processes(global_batch_size, process_index,
                                                   process_count)
  indices, fields = _open(data_dir, split, names, "eval", image_size)
  # Every process pads to the longest slice rounded up to whole batches.
  length = math.ceil(math.ceil(len(indices) / process_count) / batch) * batch
  mine = indices[process_index::process_count]
  padded = np.concatenate([mine, np.full(length - len(mine), -1, mine.dtype)])
  ds = grain.MapDataset.range(length // batch).map(
      _Batch(**fields, rows=_EvalRows(padded, batch),
             transform=augment.transform("eval", center=center_crop), seed=0))
  return _iterate(ds, num_threads, prefetch_batches, worker_count)


def to_global(batch: Any, mesh: jax.sharding.Mesh,
              batch_axes: Sequence[str] = sharding_lib.BATCH_AXES) -> Any:
  """Process-local batch (a dict of arrays, or of such dicts) -> global arrays, the batch dim
  sharded over `batch_axes` of `mesh`."""
  unknown = [a for a in batch_axes if a not in mesh.shape]
  if unknown:
    raise ValueError(f"batch axes {unknown} are not axes of the mesh {dict(mesh.shape)}.")
  shards = math.prod(mesh.shape[a] for a in batch_axes)
  sharding = NamedSharding(mesh, P(tuple(batch_axes)))

  def one(path, v):
    global_size = len(v) * jax.process_count()
    if global_size % shards:
      raise ValueError(
          f"global batch size {global_size} is not divisible by {shards}, the product of the "
          f"mesh axes {tuple(batch_axes)} it is split over ({dict(mesh.shape)}); pick a "
          f"multiple of {shards} (batch field {jax.tree_util.keystr(path)}).")
    return jax.make_array_from_process_local_data(sharding, v)

  return jax.tree_util.tree_map_with_path(one, batch)
