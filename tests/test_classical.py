"""The classical floor (ssfer_jax/analysis/classical.py): its features and its reports on a real build."""

import cv2
import numpy as np

from ssfer_jax.analysis import classical
from ssfer_jax.input import records


def test_hog_features_of_the_mirror_swap_halves():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (80, 72), np.uint8)
  f = classical.hog_features(image)
  g = classical.hog_features(image[:, ::-1].copy())
  half = f.size // 2
  assert f.size == 2 * classical._HOG.getDescriptorSize()
  np.testing.assert_array_equal(f[:half], g[half:])
  np.testing.assert_array_equal(f[half:], g[:half])


def test_pixel_features_are_the_32px_area_resize():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (96, 96), np.uint8)
  expected = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
  np.testing.assert_array_equal(classical.pixel_features(image), expected.ravel())


def test_floor_reports_on_a_real_build(small_dataset):
  test = records.load_split(small_dataset, "default", ["test"])
  labels = records.read_labels(small_dataset, test)
  reports = classical.floor_reports(small_dataset, "default", ("test",), log=lambda *_: None)
  assert [r["name"] for r in reports] == ["floor: pixels + logistic regression",
                                          "floor: hog + logistic regression"]
  for r, kind in zip(reports, ("pixels", "hog")):
    cm = np.asarray(r["confusion_matrix"])
    assert r["count"] == cm.sum() == len(test)
    np.testing.assert_array_equal(cm.sum(1), np.bincount(labels, minlength=cm.shape[0]))
    assert r["C"] in classical.C_GRID[kind]
    assert 0.0 <= r["val_accuracy"] <= 1.0
    assert r["accuracy"] == np.trace(cm) / cm.sum()
