"""A stage's training data as the loop sees it: how many records, the shape of an epoch and of
a step, and how to read it.

The loop asks `train_data(config, mesh)` for one `TrainData` and knows nothing else of the
data side: not stage 3's geometry (with `data.unlabeled_lists` an epoch is a pass over the
unlabeled lists, `unlabeled_ratio * batch_size` rows a step, each with `strong_views` strong
views, beside `batch_size` labeled rows), not a blend of several builds (`data.blend`: an
epoch is a pass over every record the blend can draw), not the few-labels rule (fewer
labeled records than `few_labels` train `few_labels_epochs`). Every check here runs before
anything compiles.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import ml_collections

from ssfer_jax import errors
from ssfer_jax.input import augment, blend, leakage, pipeline, randaugment, records
from ssfer_jax.runtime import sharding


@dataclasses.dataclass(frozen=True)
class TrainData:
  """The numbers a stage and the loop plan with, and (when built from a config) the reader.

  `records` are the train lists' records (of every blended build); `unlabeled_records`, the
  unlabeled lists' (stage 3's per-record state is that long). `config` is None for data
  described by numbers alone (benchmarks, shape-only stages), which cannot be read.
  """
  batch_size: int
  records: int
  steps_per_epoch: int
  epochs: int
  unlabeled_records: int = 0
  unlabeled_ratio: int = 0
  strong_views: int = 1
  config: ml_collections.ConfigDict | None = dataclasses.field(default=None, repr=False)
  few_labels: bool = False   # fewer records than `few_labels`: `few_labels_epochs` epochs

  def describe(self) -> str:
    """'N training records' and, where the few-labels rule set the length, why."""
    text = f"{self.records} training records"
    if self.few_labels:
      text += f" (< few_labels={self.config.few_labels}: {self.epochs} epochs)"
    return text

  @property
  def images_per_step(self) -> int:
    return self.batch_size * (1 + self.unlabeled_ratio)

  def batch_spec(self, kind: str) -> Any:
    """The abstract batch of `kind` (a `pipeline` batch kind) a step takes, for compiling."""
    return pipeline.batch_spec(kind, self.batch_size, self._config.data.image_size,
                               unlabeled_ratio=self.unlabeled_ratio,
                               strong_views=self.strong_views, strong_view=self._strong_view)

  def iterator(self, kind: str, seed: int):
    """This process's endless, checkpointable iterator of weakly augmented train batches."""
    d = self._config.data
    return pipeline.make_train_iterator(
        d.dir, d.split, d.train_lists, kind=kind, global_batch_size=self.batch_size,
        image_size=d.image_size, seed=seed, transform="weak",
        unlabeled_names=d.get("unlabeled_lists", ()), unlabeled_ratio=self.unlabeled_ratio,
        strong_views=self.strong_views, num_threads=d.num_threads,
        blend=blend.parse(d.get("blend", "")), crop_scale=d.crop_scale,
        crop_ratio=d.crop_ratio, center_crop=d.center_crop, strong_view=self._strong_view,
        strong_fill=randaugment.fill_colour(d.mean))

  @property
  def _strong_view(self) -> str:
    return self._config.data.get("strong_view", "device")

  def identity(self) -> dict[str, dict[str, str | None]]:
    """What the records are, beyond their path: per build read, its manifest checksum and the
    sha256 of the split file that picks its lists (None: every record). A checkpoint keeps it,
    so a resume on a rebuilt or re-split folder at the same path is refused."""
    d = self._config.data
    sources = [(s.data_dir, s.split) for s in blend.parse(d.get("blend", ""))]
    out = {}
    for data_dir, split in sources or [(d.dir, d.split)]:
      split_sha = None
      if split is not None:
        with open(records.split_path(data_dir, split), "rb") as f:
          split_sha = hashlib.sha256(f.read()).hexdigest()
      out[data_dir] = {"build": records.load_manifest(data_dir)["manifest_sha256"],
                       "split": split_sha}
    return out

  @property
  def _config(self) -> ml_collections.ConfigDict:
    if self.config is None:
      raise ValueError("this TrainData was described by numbers alone; it has nothing to read.")
    return self.config


def train_data(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> TrainData:
  """The training data `config` describes, checked against the mesh and the builds."""
  batch_size = config.batch_size
  try:
    augment.check_crop(config.data.crop_scale, config.data.crop_ratio)
    augment.check_center(config.data.center_crop)
  except ValueError as e:
    raise errors.ConfigError(f"data.crop_scale / crop_ratio / center_crop: {e}") from None
  try:
    pipeline.strong_view_place(config.data.get("strong_view", "device"))
  except ValueError as e:
    raise errors.ConfigError(f"data.strong_view: {e}") from None
  sources = blend.parse(config.data.get("blend", ""))
  if sources:
    if config.data.get("unlabeled_lists"):
      raise errors.ConfigError("data.blend is for stages 1 and 2; stage 3 reads one build (its "
                               "per-record threshold state indexes that build's unlabeled "
                               "list). Unset data.blend.")
    blend.row_counts([s.weight for s in sources], batch_size)
    n = sum(blend.source_size(s, config.data.train_lists) for s in sources)
    # The blend must keep out its own split's val and test (data.dir / data.split).
    leakage.check(config.data.to_dict(), config.data.dir, config.data.split, "data.blend")
  else:
    n = len(records.load_split(config.data.dir, config.data.split, config.data.train_lists))
  if n < batch_size:
    raise errors.ConfigError(
        f"{config.data.dir}: lists {tuple(config.data.train_lists)} of split "
        f"'{config.data.split}' hold {n} records, fewer than batch_size={batch_size}.")
  steps_per_epoch = n // batch_size
  n_unlabeled, ratio, views = 0, 0, 1
  if config.data.get("unlabeled_lists"):
    ratio, views = config.data.unlabeled_ratio, config.data.get("strong_views", 1)
    for name, value in (("unlabeled_ratio (mu)", ratio), ("strong_views", views)):
      if not (isinstance(value, int) and value >= 1):
        raise errors.ConfigError(f"data.{name} is {value!r}; use an integer >= 1.")
    rows = ratio * batch_size
    sharding.check_batch_size(rows, mesh, "the unlabeled batch (data.unlabeled_ratio x "
                              "batch_size)")
    lists = tuple(config.data.unlabeled_lists)
    n_unlabeled = len(records.load_split(config.data.dir, config.data.split, lists))
    if n_unlabeled < rows:
      raise errors.ConfigError(
          f"{config.data.dir}: unlabeled lists {lists} of split '{config.data.split}' hold "
          f"{n_unlabeled} records, fewer than one unlabeled batch ({ratio} x {batch_size}"
          f" = {rows}); split the build with unlabeled records (`data_prep split "
          "--labeled-fraction` below 1) or lower batch_size / data.unlabeled_ratio.")
    steps_per_epoch = n_unlabeled // rows
  epochs = config.num_epochs
  few = bool(config.get("few_labels", 0) and n < config.few_labels)   # SSFER: longer on few
  if few:
    epochs = config.few_labels_epochs
  return TrainData(batch_size, n, steps_per_epoch, epochs, n_unlabeled, ratio, views, config,
                   few_labels=few)
