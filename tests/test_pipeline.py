"""grain pipelines over a small real-face dataset: shapes, determinism, sharding, resume, eval,
and what the weak transform leaves in a batch for the device (images whole, window, flip)."""

import collections

import cv2

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ssfer_jax import errors
from ssfer_jax.input import augment, pipeline, records
from tests.helpers import dataset_fixture

SIZE = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, demo_data_dir):
  faces = dataset_fixture.read_faces(demo_data_dir / "images", demo_data_dir / "labels.csv",
                                     limit=120)
  return dataset_fixture.write_dataset(tmp_path_factory.mktemp("faces"), faces, size=SIZE)


@pytest.fixture(scope="module")
def stored(data_dir):
  """Global record index -> decoded record, read without the pipeline."""
  source = grain.sources.ArrayRecordDataSource(
      records.shard_paths(data_dir, records.load_manifest(data_dir)))
  return [records.decode(source[i]) for i in range(len(source))]


def _train(data_dir, **kw):
  args = dict(kind="labeled", global_batch_size=8, image_size=SIZE, seed=0, num_threads=2)
  return pipeline.make_train_iterator(data_dir, "default", ["train_labeled"], **{**args, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def _stored_rgb(rec):
  return cv2.imdecode(np.frombuffer(rec["image"], np.uint8), cv2.IMREAD_COLOR_RGB)


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _assert_matches_spec(batch, spec):
  assert batch.keys() == spec.keys()
  for k, s in spec.items():
    assert (batch[k].shape, batch[k].dtype) == (s.shape, s.dtype), k


@pytest.mark.parametrize("kind,names,size", [
    ("unlabeled", ["train_labeled", "train_unlabeled"], SIZE),
    ("labeled", ["train_labeled"], SIZE),
    ("labeled", ["train_labeled"], 24),
])
def test_train_batch_shapes_and_dtypes(data_dir, kind, names, size):
  it = pipeline.make_train_iterator(data_dir, "default", names, kind=kind, global_batch_size=8,
                                    image_size=size, seed=0, num_threads=2)
  _assert_matches_spec(next(it), pipeline.batch_spec(kind, 8, size))


def test_eval_batch_shapes_and_dtypes(data_dir):
  it = pipeline.make_eval_iterator(data_dir, "default", ["val"], global_batch_size=8,
                                   image_size=48, num_threads=2)
  _assert_matches_spec(next(it), pipeline.batch_spec("eval", 8, 48))


def test_seeded_determinism(data_dir):
  _assert_same_batches(_take(_train(data_dir, seed=3), 4), _take(_train(data_dir, seed=3), 4))
  a, b = next(_train(data_dir, seed=3)), next(_train(data_dir, seed=4))
  assert not np.array_equal(a["index"], b["index"])


def test_labels_and_indices_match_the_records(data_dir, stored):
  split = set(records.load_split(data_dir, "default", ["train_labeled"]).tolist())
  for batch in _take(_train(data_dir), 3):
    assert set(batch["index"].tolist()) <= split
    assert batch["label"].tolist() == [stored[i]["label"] for i in batch["index"]]


def test_eval_rows_are_the_stored_records(data_dir, stored):
  grey = 0
  for batch in pipeline.make_eval_iterator(data_dir, "default", ["val", "test"],
                                           global_batch_size=8, image_size=SIZE, num_threads=2):
    for row in np.flatnonzero(batch["valid"]):
      rec = stored[batch["index"][row]]
      assert batch["label"][row] == rec["label"]
      np.testing.assert_allclose(batch["box"][row], rec["box"], atol=1e-6)
      image = batch["image"][row]
      np.testing.assert_array_equal(image, _stored_rgb(rec))
      grey += np.array_equal(image[..., 0], image[..., 2])
  assert 0 < grey < 36  # both grey and colour records went through


def test_train_stream_with_the_eval_transform_is_shuffled_and_unaugmented(data_dir, stored):
  # What figures use: a seeded, diverse set of whole faces.
  a, b = (next(_train(data_dir, seed=5, transform="eval")) for _ in range(2))
  _assert_same_batches([a], [b])
  assert not np.array_equal(a["index"], np.sort(a["index"]))
  for row, index in enumerate(a["index"]):
    rec = stored[index]
    np.testing.assert_array_equal(a["image"][row], _stored_rgb(rec))
    np.testing.assert_allclose(a["box"][row], rec["box"], atol=1e-6)
  np.testing.assert_array_equal(a["crop"], np.tile(np.float32(augment.FULL_CROP), (8, 1)))
  assert not a["flip"].any()
  weak = next(_train(data_dir, seed=5))
  np.testing.assert_array_equal(weak["index"], a["index"])  # same stream, other transform
  np.testing.assert_array_equal(weak["image"], a["image"])  # the device crops and flips
  assert (weak["crop"] != a["crop"]).any() and weak["flip"].any()


def test_weak_batches_carry_the_hosts_window_flip_and_box(data_dir, stored):
  # Rows are the stored images; crop, flip and box are the draws of each stream position.
  batch = next(_train(data_dir, seed=2))
  u = augment.uniforms(2, np.arange(8), augment.TRANSFORMS["weak"].draws).tolist()
  for row, index in enumerate(batch["index"]):
    rec = stored[index]
    np.testing.assert_array_equal(batch["image"][row], _stored_rgb(rec))
    y, x, h, w = window = augment.sample_crop(u[row], SIZE, SIZE)
    flip = u[row][augment.CROP_DRAWS] < 0.5
    np.testing.assert_array_equal(
        batch["crop"][row], np.float32([y / SIZE, x / SIZE, (y + h) / SIZE, (x + w) / SIZE]))
    assert batch["flip"][row] == flip
    np.testing.assert_array_equal(batch["box"][row],
                                  augment.crop_box(rec["box"], window, SIZE, SIZE, flip))
  # At another image size the rows are resized; window, flip and box are the same.
  other = next(_train(data_dir, seed=2, image_size=24))
  assert other["image"].shape == (8, 24, 24, 3)
  for k in ("crop", "flip", "box", "index"):
    np.testing.assert_array_equal(other[k], batch[k], err_msg=k)


def test_labeled_kind_rejects_unlabeled_records(data_dir):
  it = pipeline.make_train_iterator(data_dir, "default", ["train_unlabeled"], kind="labeled",
                                    global_batch_size=8, image_size=SIZE, seed=0, num_threads=2)
  with pytest.raises(errors.DatasetError, match="label -1.*kind='unlabeled'"):
    next(it)


def test_state_round_trip_resumes_the_same_batches(data_dir):
  # 60 records, 8 a batch: batches 5..11 cross the first epoch boundary.
  it = _train(data_dir)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  resumed = _train(data_dir)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 6), expected)


def test_state_round_trip_through_orbax(data_dir, tmp_path):
  it = _train(data_dir)
  _take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  resumed = _train(data_dir)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  _assert_same_batches(_take(resumed, 3), expected)


def test_worker_processes_give_the_same_batches_and_resume(data_dir):
  expected = _take(_train(data_dir), 5)
  it = _train(data_dir, worker_count=2)
  try:
    _assert_same_batches(_take(it, 3), expected[:3])
    state = it.get_state()
  finally:
    it.close()
  resumed = _train(data_dir, worker_count=2)
  try:
    resumed.set_state(state)
    _assert_same_batches(_take(resumed, 2), expected[3:])
  finally:
    resumed.close()


def test_processes_get_disjoint_shards_covering_each_epoch(data_dir):
  split = records.load_split(data_dir, "default", ["train_labeled"]).tolist()
  n = len(split)  # 60: 30 per process per epoch, 4 per batch
  single = np.concatenate([b["index"] for b in _take(_train(data_dir), 2 * n // 8 + 1)])
  streams = [np.concatenate([b["index"] for b in _take(_train(data_dir, process_index=p,
                                                                process_count=2), n // 4 + 1)])
             for p in range(2)]
  for epoch in range(2):
    shards = [set(s[epoch * n // 2:(epoch + 1) * n // 2].tolist()) for s in streams]
    assert not shards[0] & shards[1]
    assert sorted(shards[0] | shards[1]) == split
  assert not np.array_equal(single[:n], single[n:2 * n])  # each epoch is reshuffled
  # Processes read interleaved slices of the single-process stream.
  np.testing.assert_array_equal(streams[0][:n // 2], single[0:n:2])
  np.testing.assert_array_equal(streams[1][:n // 2], single[1:n:2])


def test_augmentation_does_not_depend_on_the_process_count(data_dir):
  # Global stream positions 0..3 on one process; 0 and 2 are process 0's first batch of 2.
  single = next(_train(data_dir, global_batch_size=4))
  first = next(_train(data_dir, global_batch_size=4, process_index=0, process_count=2))
  for k in single:
    np.testing.assert_array_equal(first[k], single[k][[0, 2]], err_msg=k)


@pytest.mark.parametrize("names,process_count,global_batch", [(["test"], 2, 8),
                                                               (["val", "test"], 3, 12),
                                                               (["val"], 1, 10)])
def test_eval_covers_every_record_once(data_dir, names, process_count, global_batch):
  split = records.load_split(data_dir, "default", names).tolist()
  per_process = [list(pipeline.make_eval_iterator(
      data_dir, "default", names, global_batch_size=global_batch, image_size=SIZE,
      process_index=p, process_count=process_count, num_threads=2))
                 for p in range(process_count)]
  assert len({len(batches) for batches in per_process}) == 1  # same count on every process
  seen = collections.Counter()
  for batches in per_process:
    for b in batches:
      assert len(b["index"]) == global_batch // process_count
      seen.update(b["index"][b["valid"]].tolist())
      pad = ~b["valid"]
      assert np.all(b["index"][pad] == -1) and not b["image"][pad].any()
  assert sorted(seen) == split and set(seen.values()) == {1}


def test_to_global_shards_the_batch_over_data_and_fsdp(data_dir):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = next(_train(data_dir, global_batch_size=16))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  spec = pipeline.batch_spec("labeled", 16, SIZE, sharding)
  out = pipeline.to_global(batch, mesh)
  for k, arr in out.items():
    assert (arr.shape, arr.dtype) == (spec[k].shape, spec[k].dtype)
    assert arr.sharding.is_equivalent_to(sharding, arr.ndim)
    assert {s.data.shape[0] for s in arr.addressable_shards} == {2}
    np.testing.assert_array_equal(np.asarray(arr), batch[k])
  # The spec compiles a step ahead of time; the real batch then runs it.
  step = jax.jit(lambda b: b["image"].astype(np.float32).mean() + b["box"].sum()).lower(spec)
  assert np.isfinite(step.compile()(out))


def test_indivisible_batches_raise_clear_errors(data_dir):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = next(_train(data_dir, global_batch_size=12))
  with pytest.raises(ValueError, match="12 is not divisible by 8.*multiple of 8"):
    pipeline.to_global(batch, mesh)
  with pytest.raises(ValueError, match="not axes of the mesh"):
    pipeline.to_global(batch, mesh, batch_axes=("batch",))
  with pytest.raises(ValueError, match="not divisible by the 2 processes"):
    _train(data_dir, global_batch_size=7, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="unknown kind"):
    _train(data_dir, kind="eval")
  with pytest.raises(ValueError, match="unknown transform 'strong'"):
    _train(data_dir, transform="strong")
