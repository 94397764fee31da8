"""Evaluation: metrics from a confusion matrix, class matching by name, every record counted
once (odd sizes, simulated processes), unlabeled records skipped and counted, the report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssfer_jax import evaluate
from ssfer_jax.input import pipeline, records
from ssfer_jax.runtime import sharding
from tests.helpers import dataset_fixture


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory, demo_data_dir):
  """Real faces in the records layout; train_unlabeled records carry label -1."""
  faces = dataset_fixture.read_faces(demo_data_dir / "images", demo_data_dir / "labels.csv",
                                     limit=53)
  return dataset_fixture.write_dataset(tmp_path_factory.mktemp("eval"), faces, size=32)


def test_metrics_from_confusion_by_hand():
  cm = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 0]])   # class c: no true records, no predictions
  r = evaluate.metrics_from_confusion(cm, ["a", "b", "c"])
  assert r["count"] == 8
  np.testing.assert_allclose(r["accuracy"], 5 / 8)
  np.testing.assert_allclose(r["mean_class_accuracy"], (3 / 4 + 2 / 4) / 2)
  f1_a, f1_b = 2 * 3 / (4 + 5), 2 * 2 / (4 + 3)
  np.testing.assert_allclose(r["macro_f1"], (f1_a + f1_b) / 2)
  assert r["per_class"]["a"] == {"support": 4, "precision": 3 / 5, "recall": 3 / 4, "f1": f1_a}
  assert r["per_class"]["c"] == {"support": 0, "precision": None, "recall": None, "f1": None}
  assert evaluate.subset_mean_class_accuracy(r, 4) == pytest.approx(0.625)
  assert evaluate.subset_mean_class_accuracy(r, 5) is None


def test_class_matching_by_name():
  m = evaluate.match_classes(["neutral", "happiness", "anger"], ["anger", "disgust", "neutral"])
  np.testing.assert_array_equal(m.to_model, [2, -1, 0])
  assert m.unknown == ("disgust",) and m.absent == ("happiness",)
  with pytest.raises(evaluate.ClassMismatchError, match="none of which the model knows"):
    evaluate.match_classes(["cat", "dog"], ["anger", "neutral"], "DATA")


def constant_model(index):
  return lambda params, x: jax.nn.one_hot(jnp.full((x.shape[0],), index), 9) * 10.0 + params


@pytest.mark.parametrize("batch_size", [8, 24])
def test_every_record_counts_once_with_names_matched(fixture_data, batch_size):
  data_classes = records.load_manifest(fixture_data)["classes"]
  # The model knows the dataset's classes in another order, plus one the data lacks.
  model_classes = list(reversed(data_classes)) + ["contempt_x"]
  predicted = model_classes.index(data_classes[0])
  mesh = sharding.make_mesh((4, 2))
  ev = evaluate.Evaluator(data_dir=fixture_data, split="default", lists=("val", "test"),
                          model_classes=model_classes, image_size=32, mean=(0.5,) * 3,
                          std=(0.5,) * 3, dtype=jnp.float32, batch_size=batch_size, mesh=mesh,
                          apply_fn=constant_model(predicted), num_threads=1)
  report = ev(jnp.zeros(()))
  idx = records.load_split(fixture_data, "default", ["val", "test"])
  labels = records.read_labels(fixture_data, idx)
  assert report["records_read"] == report["count"] == len(idx)   # odd size: 53 faces -> 16
  for name in data_classes:
    assert report["per_class"][name]["support"] == int((labels == data_classes.index(name)).sum())
  # Every prediction is data class 0, counted in its own (model-order) column.
  cm = np.asarray(report["confusion_matrix"])
  assert cm[:, predicted].sum() == len(idx) and cm.sum() == len(idx)
  assert report["classes_absent_from_data"] == ["contempt_x"]


def test_unlabeled_records_are_skipped_and_counted(fixture_data):
  mesh = sharding.make_mesh((-1, 1))
  classes = records.load_manifest(fixture_data)["classes"]
  ev = evaluate.Evaluator(data_dir=fixture_data, split=None, lists=(), model_classes=classes,
                          image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, dtype=jnp.float32,
                          batch_size=16, mesh=mesh, apply_fn=constant_model(0), num_threads=1)
  report = ev(jnp.zeros(()))
  n_unlabeled = len(records.load_split(fixture_data, "default", ["train_unlabeled"]))
  assert report["records_read"] == 53
  assert report["skipped_unlabeled"] == n_unlabeled > 0
  assert report["count"] == 53 - n_unlabeled


def test_eval_slices_of_several_processes_cover_each_record_once(fixture_data):
  idx = records.load_split(fixture_data, "default", ["train_labeled", "val"])
  seen, batches = [], set()
  for p in range(3):
    it = pipeline.make_eval_iterator(fixture_data, "default", ("train_labeled", "val"),
                                     global_batch_size=12, image_size=32, process_index=p,
                                     process_count=3, num_threads=1)
    got = list(it)
    batches.add(len(got))
    for b in got:
      seen += b["index"][b["valid"]].tolist()
  assert len(batches) == 1                    # the same batch count on every process
  assert sorted(seen) == sorted(idx.tolist())  # every record once


def test_report_files(fixture_data, tmp_path):
  cm = np.array([[5, 1], [2, 7]])
  report = evaluate.metrics_from_confusion(cm, ["anger", "neutral"])
  report.update(records_read=15, skipped_unlabeled=0, excluded_unknown_class=0,
                unknown_classes=[], data="x")
  paths = evaluate.write_report(report, str(tmp_path), "test")
  assert [os.path.basename(p) for p in paths] == ["test.json", "test_confusion.png",
                                                   "test_per_class.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths[1:])
  assert json.load(open(paths[0]))["confusion_matrix"] == cm.tolist()
  table = evaluate.format_report(report)
  assert "accuracy 80.0%" in table and "neutral" in table
