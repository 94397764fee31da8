"""The device half of the weak transform: `crop_resize_flip` reproduces the image for a full
window, agrees with cv2 on the host's windows, keeps the host's face box on the face, and runs
sharded under jit; the host's `augment.crop_resize_flip` (strong views on a CPU backend)
agrees with it."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from ssfer_jax.input import augment, device

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def faces(demo_data_dir):
  """16 real 96 px faces (grey and colour), RGB uint8 [16, 96, 96, 3]."""
  paths = sorted((demo_data_dir / "images").glob("*.jpg"))[::60][:16]
  images = [augment.decode(p.read_bytes()) for p in paths]
  return np.stack([i if i.shape[:2] == (96, 96) else cv2.resize(i, (96, 96)) for i in images])


def _weak_geometry(n, height, width, seed=0):
  """The host's windows (pixels), crops (normalised y0, x0, y1, x1) and flips of n examples."""
  u = augment.uniforms(seed, np.arange(n), augment.TRANSFORMS["weak"].draws).tolist()
  windows = [augment.sample_crop(x, height, width) for x in u]
  crops = np.array([(y / height, x / width, (y + h) / height, (x + w) / width)
                    for y, x, h, w in windows], np.float32)
  return windows, crops, np.array([x[augment.CROP_DRAWS] < 0.5 for x in u])


def test_full_window_reproduces_the_image(faces):
  noise = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), np.uint8)
  images = np.concatenate([faces[:2], noise])
  full = np.tile(np.float32(augment.FULL_CROP), (4, 1))
  flip = np.array([False, True, False, True])
  out = np.asarray(device.crop_resize_flip(images, full, flip, 96))
  assert out.dtype == np.float32 and out.shape == images.shape
  expected = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("size", [96, 224])
def test_agrees_with_cv2_on_the_hosts_windows(faces, size):
  windows, crops, flips = _weak_geometry(len(faces), 96, 96)
  out = np.asarray(device.crop_resize_flip(faces, crops, flips, size))
  centres = np.arange(size) + 0.5
  for image, (y, x, h, w), flip, got in zip(faces, windows, flips, out):
    expected = cv2.resize(image[y:y + h, x:x + w], (size, size), interpolation=cv2.INTER_LINEAR)
    if flip:
      expected = cv2.flip(expected, 1)
    diff = np.abs(got - expected)
    # Measured: 0.27-0.33 grey levels on average (cv2's 11-bit fixed-point weights).
    assert diff.mean() < 0.5
    # Away from the window's edge both interpolate the same pixels: off by rounding only.
    # At the edge cv2 repeats the cut-out's border pixel, the device reads the real neighbour
    # (measured up to 30 grey levels there).
    rows = (centres * h / size >= 0.5) & (centres * h / size <= h - 0.5)
    cols = (centres * w / size >= 0.5) & (centres * w / size <= w - 0.5)
    inner = np.abs(np.round(got) - expected)[rows][:, cols[::-1] if flip else cols]
    assert inner.max() <= 1


@st.composite
def _masks(draw):
  """A square image with a box of integer pixel edges, a seed for the host's draws and an
  output size (the stored size, as in the pipeline, or larger).

  Boxes are at least 2 px a side: a 1 x 1 px box's bilinear peak falls between the output's
  samples, so it can vanish under the threshold; no face box is that small.
  """
  side = draw(st.sampled_from([24, 40]))
  x0, y0 = draw(st.integers(0, side - 2)), draw(st.integers(0, side - 2))
  x1, y1 = draw(st.integers(x0 + 2, side)), draw(st.integers(y0 + 2, side))
  return side, (x0, y0, x1, y1), draw(st.integers(0, 2**32 - 1)), side * draw(
      st.sampled_from([1, 2]))


@settings(max_examples=60, deadline=None)
@given(_masks())
def test_host_box_matches_the_mask_in_the_device_output(scene):
  side, (x0, y0, x1, y1), seed, size = scene
  mask = np.zeros((side, side), np.uint8)  # grey, as most stored faces
  mask[y0:y1, x0:x1] = 255
  box = (x0 / side, y0 / side, x1 / side, y1 / side)
  u = augment.uniforms(seed, [0], augment.TRANSFORMS["weak"].draws)[0].tolist()
  row = np.empty((side, side, 3), np.uint8)
  view = augment.weak(mask, box, u, row)
  out = np.asarray(device.crop_resize_flip(row[None], np.float32([view.crop]),
                                           np.array([view.flip]), size))[0]
  # Bilinear ramps cross half intensity at the box edge: the thresholded mask's extent is the
  # box to half an output pixel (a sample on either side of the edge).
  ys, xs = np.nonzero(out[..., 0] >= 127.5)
  if not len(xs):
    np.testing.assert_array_equal(view.box, augment.EMPTY_BOX)  # cropped away
    return
  seen = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
  np.testing.assert_allclose(view.box, seen, atol=0.5 / size + 1e-5)


def test_downsampling_filters_instead_of_aliasing():
  # 1 px stripes reduced 3:1: point samples would keep their full contrast.
  stripes = np.tile(np.uint8([0, 255] * 48)[None, :, None], (96, 1, 3))[None]
  out = np.asarray(device.crop_resize_flip(stripes, np.float32([augment.FULL_CROP]),
                                           np.array([False]), 32))
  assert np.ptp(out[0, 8:-8, 8:-8]) <= 255 / 9 + 1  # the triangle filter's 1/9 left


def test_prepare_train_images_normalises_the_resampled_crops(faces):
  _, crops, flips = _weak_geometry(4, 96, 96)
  batch = {"image": faces[:4], "crop": crops, "flip": flips}
  x = device.prepare_train_images(batch, 64, MEAN, STD, jnp.bfloat16)
  assert x.dtype == jnp.bfloat16 and x.shape == (4, 64, 64, 3)
  resampled = device.crop_resize_flip(faces[:4], crops, flips, 64)
  np.testing.assert_array_equal(x, device.normalize(resampled, MEAN, STD, jnp.bfloat16))
  # Float input in 0..255 normalises as uint8 does.
  np.testing.assert_array_equal(device.normalize(faces.astype(np.float32), MEAN, STD),
                                device.normalize(faces, MEAN, STD))


def test_sharded_over_data_and_fsdp_under_jit(faces):
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  _, crops, flips = _weak_geometry(len(faces), 96, 96, seed=1)
  host = {"image": faces, "crop": crops, "flip": flips}
  batch = jax.device_put(host, sharding)
  prepare = jax.jit(lambda b: device.prepare_train_images(b, 64, MEAN, STD))
  out = prepare(batch)
  assert out.shape == (16, 64, 64, 3)
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  assert {s.data.shape[0] for s in out.addressable_shards} == {2}
  # Each device resamples its own examples: nothing crosses devices.
  hlo = prepare.lower(batch).compile().as_text()
  assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute",
                                      "all-reduce"))
  single = prepare(jax.device_put(host, jax.devices()[0]))
  np.testing.assert_allclose(out, single, rtol=0, atol=1e-5)


def test_host_crop_resize_flip_agrees_with_the_device(faces):
  """The strong view made on the host resamples each window as the device does: within a
  grey level or two (cv2's 1/32 pixel sample grid and integer output)."""
  size = faces.shape[1]
  u = augment.uniforms(9, np.arange(len(faces)), augment.WEAK_DRAWS).tolist()
  views = [augment.weak_view(size, size, [0.2, 0.2, 0.8, 0.8], r) for r in u]
  crop, flip = np.float32([v.crop for v in views]), np.array([v.flip for v in views])
  assert 0 < flip.sum() < len(flip)
  device_out = np.asarray(device.crop_resize_flip(faces, crop, flip, size))
  host = np.empty_like(faces)
  for i in range(len(faces)):
    augment.crop_resize_flip(faces[i], crop[i], flip[i], host[i])
  diff = np.abs(host - device_out)
  assert diff.mean() < 0.35 and diff.max() < 2.5 and (diff > 1).mean() < 0.01
  full = np.empty_like(faces[0])
  augment.crop_resize_flip(faces[0], augment.FULL_CROP, True, full)
  np.testing.assert_array_equal(full, faces[0][:, ::-1])   # a full window: the image, mirrored
