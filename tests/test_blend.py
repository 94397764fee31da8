"""Several builds in one train stream (data.blend): exact per-batch counts, labels mapped by
class name, exact resume; and the check that pretraining never saw an evaluation image."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from data_prep import split
from ssfer_jax import errors
from ssfer_jax.input import blend, leakage, pipeline, records
from tests.helpers import paper_datasets

SIZE = 32


@pytest.fixture(scope="module")
def ferplus(demo_data_dir, tmp_path_factory):
  """FERPlus-format build (48 px, FERPlus class order), split over its own partition."""
  out = paper_datasets.ferplus_dataset(tmp_path_factory.mktemp("ferplus"), demo_data_dir)
  split.split(out, "default", split.Options(labeled_fraction=0.5))
  return out


def test_row_counts_are_exact_and_refuse_an_empty_source():
  assert blend.row_counts([0.7, 0.3], 10) == [7, 3]
  assert blend.row_counts([1, 1, 1], 8) == [3, 3, 2]
  for weights, batch in (([0.5, 0.25, 0.25], 16), ([2, 1], 9), ([1, 3, 4], 64)):
    counts = blend.row_counts(weights, batch)
    assert sum(counts) == batch
    assert all(abs(c - w / sum(weights) * batch) < 1 for c, w in zip(counts, weights))
  with pytest.raises(ValueError, match="no row"):
    blend.row_counts([0.99, 0.01], 8)


def test_parse():
  assert blend.parse("") == []
  assert blend.parse("data/a=0.7, data/b@p10=0.3") == [
      blend.BlendSource("data/a", None, 0.7), blend.BlendSource("data/b", "p10", 0.3)]
  for bad in ("data/a", "data/a=0", "data/a=x", "=1"):
    with pytest.raises(ValueError, match="data.blend entry"):
      blend.parse(bad)


def _blended(small_dataset, ferplus, **kw):
  sources = [blend.BlendSource(small_dataset, "default", 3.0), blend.BlendSource(ferplus, None, 1.0)]
  args = dict(kind="unlabeled", global_batch_size=8, image_size=SIZE, seed=5, num_threads=2,
              blend=sources, process_index=0, process_count=1)
  return pipeline.make_train_iterator(small_dataset, "default", ["train_labeled",
                                                                "train_unlabeled"],
                                      **{**args, **kw})


def test_blended_batches_hold_exact_counts_and_resume_exactly(small_dataset, ferplus):
  offset = records.load_manifest(small_dataset)["num_records"]
  it = _blended(small_dataset, ferplus)
  batches = [next(it) for _ in range(12)]
  for b in batches:
    assert b["image"].shape == (8, SIZE, SIZE, 3)
    assert int(np.sum(b["index"] >= offset)) == 2     # round(1/4 x 8) FERPlus rows, always
  # Both sources cycle through their own lists: FERPlus (60 records) in 30 batches.
  seen = {int(i) for b in batches for i in b["index"] if i >= offset}
  assert len(seen) == 24
  it = _blended(small_dataset, ferplus)
  for _ in range(5):
    next(it)
  state = it.get_state()
  resumed = _blended(small_dataset, ferplus)
  resumed.set_state(state)
  for want in batches[5:9]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_processes_share_each_blended_batch(small_dataset, ferplus):
  """Two processes' parts of batch n are, together, the rows one process gets for it."""
  whole = _blended(small_dataset, ferplus)
  halves = [_blended(small_dataset, ferplus, global_batch_size=8, process_index=p,
                   process_count=2) for p in (0, 1)]
  for _ in range(6):
    want = next(whole)
    parts = [next(h) for h in halves]
    assert all(len(p["index"]) == 4 for p in parts)
    assert sorted(np.concatenate([p["index"] for p in parts]).tolist()) == sorted(
        want["index"].tolist())


def test_labeled_blend_maps_classes_by_name(small_dataset, ferplus):
  """Labels come out in the run's class order (its data.dir, here FERPlus's), whatever order
  each build stores; a build with a class the run lacks is refused."""
  ours = records.load_manifest(ferplus)["classes"]
  theirs = records.load_manifest(small_dataset)["classes"]
  assert ours != theirs and set(theirs) <= set(ours)
  labels = records.read_labels(small_dataset,
                               np.arange(records.load_manifest(small_dataset)["num_records"]))
  offset = len(labels)   # the blend's first source is small_dataset, at offset 0
  it = pipeline.make_train_iterator(
      ferplus, "default", ["train_labeled"], kind="labeled", global_batch_size=8,
      image_size=SIZE, seed=1, num_threads=2, process_index=0, process_count=1,
      blend=[blend.BlendSource(small_dataset, "default", 1.0),
           blend.BlendSource(ferplus, "default", 1.0)])
  mapped = 0
  for _ in range(4):
    b = next(it)
    for index, label in zip(b["index"], b["label"]):
      if index < offset:
        assert ours[label] == theirs[labels[int(index)]]
        mapped += 1
  assert mapped == 16
  with pytest.raises(errors.DatasetError, match="has class"):
    _blended(small_dataset, ferplus, kind="labeled", seed=0)


def test_a_blend_is_refused_for_stage_3(small_dataset, ferplus):
  with pytest.raises(ValueError, match="stage 3"):
    _blended(small_dataset, ferplus, kind="semisup", unlabeled_names=("train_unlabeled",),
           unlabeled_ratio=1)


def test_pretraining_on_evaluation_images_is_refused(small_dataset, ferplus, tmp_path):
  """Pretraining on a split's train lists passes; on every record of the build, or on a copy
  of it under another path, or through another split whose train lists hold this split's
  test records, is refused naming the images."""
  data = {"dir": small_dataset, "split": "default",
          "train_lists": ["train_labeled", "train_unlabeled"], "blend": ""}
  leakage.check(data, small_dataset, "default", "runs/mae")
  leakage.check(dict(data, blend=f"{ferplus}@default=1"), small_dataset, "default", "runs/mae")
  with pytest.raises(errors.DatasetError, match="trains on .* image"):
    leakage.check(dict(data, blend=f"{small_dataset}=1,{ferplus}=1"), small_dataset, "default",
                  "runs/mae")
  copy = str(tmp_path / "copy")
  shutil.copytree(small_dataset, copy)   # the same photos, another build path
  with pytest.raises(errors.DatasetError, match="runs/mae trains on"):
    leakage.check(dict(data, blend=f"{copy}=1"), small_dataset, "default", "runs/mae")
  other = split.split(copy, "other", split.Options(labeled_fraction=0.5, seed=9))
  held = set(json.load(open(os.path.join(small_dataset, "splits", "default.json")))["lists"][
      "test"])
  assert held & set(other["lists"]["train_labeled"] + other["lists"]["train_unlabeled"])
  with pytest.raises(errors.DatasetError, match="val/test lists of split 'default'"):
    leakage.check(dict(data, dir=copy, split="other"), small_dataset, "default", "runs/mae")


def test_a_blend_that_reads_its_own_splits_val_or_test_is_refused(small_dataset, ferplus):
  """Stage 1 or 2: a data.blend entry over every record of data.dir (or another split of it)
  would train on the run's own val/test: refused while planning, before compiling."""
  from tests.conftest import small_config  # pylint: disable=g-import-not-at-top
  from configs import finetune as finetune_config
  from ssfer_jax.trainers import loop

  ft = small_config(finetune_config, ferplus, total_steps=2)
  ft.data.blend = f"{ferplus}=1"
  with pytest.raises(errors.DatasetError, match="data.blend trains on 20 image"):
    loop.plan_run(ft)
  ft.data.blend = f"{ferplus}@default=1,{small_dataset}@default=1"
  assert loop.plan_run(ft).data.records > 0


def test_a_labeled_blend_needs_labeled_records(small_dataset, ferplus, tmp_path):
  unlabeled = str(tmp_path / "unlabeled")
  shutil.copytree(small_dataset, unlabeled)
  manifest = records.load_manifest(unlabeled)
  manifest["counts"]["unlabeled"] = 3   # as a build with an unlabeled source would say
  with open(os.path.join(unlabeled, records.MANIFEST), "w") as f:
    json.dump(manifest, f)
  with pytest.raises(errors.DatasetError, match="unlabeled records"):
    pipeline.make_train_iterator(
        ferplus, "default", ["train_labeled"], kind="labeled", global_batch_size=8,
        image_size=SIZE, seed=0, num_threads=1, process_index=0, process_count=1,
        blend=[blend.BlendSource(unlabeled, None, 1.0), blend.BlendSource(ferplus, "default", 1.0)])


def test_the_same_benchmark_faces_in_another_variant_are_caught(demo_data_dir, tmp_path):
  """RAF-DB's aligned and original images are different files of the same faces: pretraining
  on every aligned record leaks the original build's test faces (matched by RAF-DB's names)."""
  from data_prep import build, readers  # pylint: disable=g-import-not-at-top
  paper_datasets.write_rafdb(tmp_path / "basic", demo_data_dir)
  src = readers.RafDbSource("rafdb", str(tmp_path / "basic"))
  aligned, original = str(tmp_path / "aligned"), str(tmp_path / "original")
  build.build([src], aligned, build.Config(size=32, crop="none", detector="none"), workers=1,
              progress=False)
  build.build([dataclasses.replace(src, images="original")], original,
              build.Config(size=32, crop="align", detector="dataset"), workers=1, progress=False)
  split.split(original, "own", split.Options(labeled_fraction=1.0, val_fraction=0.0))
  split.split(aligned, "own", split.Options(labeled_fraction=1.0, val_fraction=0.0))
  data = {"dir": aligned, "split": "own", "train_lists": ["train_labeled", "train_unlabeled"]}
  leakage.check(data, original, "own", "runs/mae")   # the train part only: fine
  with pytest.raises(errors.DatasetError, match="rafdb/test_0001.jpg"):
    leakage.check(dict(data, blend=f"{aligned}=1"), original, "own", "runs/mae")


def test_stage_1_trains_on_a_blend_and_stage_2_refuses_what_it_saw(small_dataset, ferplus,
                                                                 tmp_path):
  """A real MAE run over one whole build and another's train lists; fine-tuning on the
  whole build's split is refused before compiling (its val/test were pretrained on)."""
  from tests.conftest import small_config  # pylint: disable=g-import-not-at-top
  from configs import finetune as finetune_config, pretrain as pretrain_config
  from ssfer_jax.trainers import finetune, loop, pretrain

  mae = small_config(pretrain_config, ferplus, total_steps=2)   # its own split: FERPlus's
  mae.data.blend = f"{small_dataset}=3,{ferplus}@default=1"
  plan = loop.plan_run(mae)
  assert plan.data.records == (records.load_manifest(small_dataset)["num_records"]
                                      + blend.source_size(blend.BlendSource(ferplus, "default", 1),
                                                      mae.data.train_lists))
  loop.train(mae, str(tmp_path / "mae"), pretrain.make_stage)
  ft = small_config(finetune_config, small_dataset, init_from=str(tmp_path / "mae"))
  with pytest.raises(errors.DatasetError, match=r"init_from .* \(stage 1\) trains on"):
    loop.train(ft, str(tmp_path / "ft"), finetune.make_stage)
  assert not os.path.exists(tmp_path / "ft" / "checkpoints" / "1")
