"""Host-side transforms: decoding real JPEGs, counter-based uniforms, the crop sampler, exact box
bookkeeping, and what the transforms write into batch rows (the resample itself is on device:
tests/test_device_augment.py)."""

import cv2
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from ssfer_jax.input import augment


def _demo_jpeg(demo_data_dir, grey: bool) -> bytes:
  for path in sorted((demo_data_dir / "images").iterdir()):
    if (cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2) == grey:
      return path.read_bytes()
  pytest.fail(f"no {'grey' if grey else 'colour'} JPEG in {demo_data_dir}/images")


def test_decode_grey_jpeg_gives_three_equal_channels(demo_data_dir):
  image = augment.decode(_demo_jpeg(demo_data_dir, grey=True))
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
  assert np.array_equal(image[..., 0], image[..., 1])
  assert np.array_equal(image[..., 0], image[..., 2])


def test_decode_colour_jpeg_is_rgb(demo_data_dir):
  jpeg = _demo_jpeg(demo_data_dir, grey=False)
  image = augment.decode(jpeg)
  bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
  assert image.dtype == np.uint8 and image.shape == bgr.shape
  assert np.array_equal(image, bgr[..., ::-1])
  assert not np.array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize("grey", [True, False])
@pytest.mark.parametrize("progressive", [False, True])
def test_decode_matches_opencv_rgb_decode(demo_data_dir, grey, progressive):
  jpeg = _demo_jpeg(demo_data_dir, grey)
  if progressive:  # a different frame header (SOF2)
    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
  expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR_RGB)
  np.testing.assert_array_equal(augment.decode(jpeg), expected)
  native = augment.decode(jpeg, rgb=False)
  assert native.ndim == (2 if grey else 3)
  np.testing.assert_array_equal(augment.to_rgb(native), expected)


def test_decode_rejects_non_jpeg_bytes():
  with pytest.raises(ValueError, match="cannot decode image"):
    augment.decode(b"not a jpeg at all")


# An image size, a crop window inside it and a flip.
@st.composite
def _scenes(draw):
  height, width = draw(st.integers(4, 48)), draw(st.integers(4, 48))
  h, w = draw(st.integers(1, height)), draw(st.integers(1, width))
  window = augment.Window(draw(st.integers(0, height - h)), draw(st.integers(0, width - w)), h, w)
  return height, width, window, draw(st.booleans())


@st.composite
def _boxes(draw):
  coord = st.floats(-0.5, 1.5, allow_nan=False)
  x0, x1 = sorted([draw(coord), draw(coord)])
  y0, y1 = sorted([draw(coord), draw(coord)])
  return (x0, y0, x1, y1)


@settings(max_examples=300, deadline=None)
@given(_boxes(), _scenes())
def test_box_invariants(box, scene):
  height, width, window, flip = scene
  out = augment.crop_box(box, window, height, width)
  if flip:
    out = augment.flip_box(out)
  assert out.dtype == np.float32 and out.shape == (4,)
  assert np.all((out >= 0) & (out <= 1))
  assert out[0] <= out[2] and out[1] <= out[3]
  if out[0] == out[2] or out[1] == out[3]:
    np.testing.assert_array_equal(out, augment.EMPTY_BOX)  # one form for "no face left"
  if min(out[2] - out[0], out[3] - out[1]) > 1e-6:  # 1 - x rounds away narrower slivers
    np.testing.assert_allclose(augment.flip_box(augment.flip_box(out)), out, atol=1e-6)


def test_box_cropped_away_is_the_empty_box():
  box = augment.crop_box((0.0, 0.0, 0.2, 0.2), augment.Window(50, 50, 40, 40), 100, 100)
  np.testing.assert_array_equal(box, augment.EMPTY_BOX)
  np.testing.assert_array_equal(augment.flip_box(box), augment.EMPTY_BOX)


def test_uniforms_are_a_function_of_seed_and_position():
  u = augment.uniforms(3, np.arange(1000), 23)
  assert u.shape == (1000, 23) and u.dtype == np.float64
  assert np.all((u >= 0) & (u < 1)) and abs(u.mean() - 0.5) < 0.01
  np.testing.assert_array_equal(augment.uniforms(3, [999, 7], 23), u[[999, 7]])
  np.testing.assert_array_equal(augment.uniforms(3, [7], 5), u[[7], :5])  # draws are a prefix
  assert not np.isin(augment.uniforms(4, np.arange(1000), 23), u).any()
  assert len(np.unique(u)) == u.size
  assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1
  assert abs(np.corrcoef(u[:-1, 0], u[1:, 0])[0, 1]) < 0.1
  assert augment.uniforms(0, np.arange(4), 0).shape == (4, 0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_sample_crop_window_inside_image(height, width, seed):
  u = augment.uniforms(seed, [0], augment.CROP_DRAWS)[0].tolist()
  y, x, h, w = augment.sample_crop(u, height, width)
  assert 0 < h <= height and 0 < w <= width
  assert 0 <= y <= height - h and 0 <= x <= width - w


def test_sample_crop_scale_and_ratio_on_a_square_image():
  windows = np.array([augment.sample_crop(u, 224, 224)
                      for u in augment.uniforms(0, np.arange(2000), augment.CROP_DRAWS)])
  area = windows[:, 2] * windows[:, 3] / 224**2
  aspect = windows[:, 3] / windows[:, 2]
  full = area == 1.0  # the centre-crop fallback, rare on a square image
  assert full.mean() < 0.05
  assert area[~full].min() >= 0.19 and np.all(area <= 1.0)
  assert aspect[~full].min() >= 0.74 and aspect[~full].max() <= 1.35
  assert 0.5 < area.mean() < 0.7  # uniform in [0.2, 1] (and some resampled tries)


def test_sample_crop_falls_back_to_a_centre_crop():
  # A 10 x 100 strip: no window of area >= 20% fits the ratio range, every try fails.
  u = augment.uniforms(0, [0], augment.CROP_DRAWS)[0]
  assert augment.sample_crop(u, 10, 100) == augment.Window(0, 43, 10, 13)


def test_weak_is_a_function_of_its_uniforms(demo_data_dir):
  image = augment.decode(_demo_jpeg(demo_data_dir, grey=False))  # not square
  box = (0.2, 0.1, 0.8, 0.9)
  draws = augment.TRANSFORMS["weak"].draws
  u = augment.uniforms(0, [7, 7, 8], draws).tolist()
  out = np.empty((3, 32, 32, 3), np.uint8)
  views = [augment.weak(image, box, u[i], out[i]) for i in range(3)]
  assert views[0].box.dtype == np.float32 and views[0].box.shape == (4,)
  np.testing.assert_array_equal(views[0].box, views[1].box)
  assert (views[0].crop, views[0].flip) == (views[1].crop, views[1].flip)
  assert views[0].crop != views[2].crop
  np.testing.assert_array_equal(out[0], out[2])  # the image is written whole either way
  flips = [u[augment.CROP_DRAWS] < 0.5 for u in augment.uniforms(0, np.arange(1000), draws)]
  assert 0.45 < np.mean(flips) < 0.55


@pytest.mark.parametrize("grey", [True, False])
@pytest.mark.parametrize("size", [None, 24])  # the stored height, or another size
def test_weak_writes_the_image_whole_and_returns_its_window(demo_data_dir, grey, size):
  image = augment.decode(_demo_jpeg(demo_data_dir, grey), rgb=False)
  height, width = image.shape[:2]
  size = size or height
  box = (0.2, 0.1, 0.8, 0.9)
  for position in range(20):
    u = augment.uniforms(3, [position], augment.TRANSFORMS["weak"].draws)[0].tolist()
    batch = np.full((2, size, size, 3), 7, np.uint8)
    view = augment.weak(image, box, u, batch[1])
    assert np.all(batch[0] == 7)  # only its row written
    out = batch[1]
    expected = augment.to_rgb(image if image.shape[:2] == (size, size) else cv2.resize(
        image, (size, size), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out, expected)
    y, x, h, w = window = augment.sample_crop(u, height, width)
    flip = u[augment.CROP_DRAWS] < 0.5
    assert view.flip == flip
    # Normalised to the stored image, hence to the row whatever its size.
    np.testing.assert_allclose(view.crop, (y / height, x / width, (y + h) / height,
                                           (x + w) / width))
    np.testing.assert_array_equal(view.box, augment.crop_box(box, window, height, width, flip))


def test_eval_transform_resizes_and_keeps_the_box(demo_data_dir):
  fn = augment.TRANSFORMS["eval"].fn
  assert augment.TRANSFORMS["eval"].draws == 0
  image = augment.decode(_demo_jpeg(demo_data_dir, grey=True), rgb=False)
  same = np.empty((*image.shape, 3), np.uint8)
  view = fn(image, (0.1, 0.2, 0.9, 0.8), [], same)
  np.testing.assert_array_equal(same, augment.to_rgb(image))
  np.testing.assert_allclose(view.box, (0.1, 0.2, 0.9, 0.8), atol=1e-7)
  assert (view.crop, view.flip) == (augment.FULL_CROP, False)
  small = np.empty((24, 24, 3), np.uint8)
  fn(image, view.box, [], small)
  np.testing.assert_array_equal(small, augment.to_rgb(cv2.resize(image, (24, 24),
                                                                 interpolation=cv2.INTER_LINEAR)))


def test_weak_transform_takes_its_crop_scale_ratio_and_centre(demo_data_dir):
  image = augment.decode(_demo_jpeg(demo_data_dir, grey=True), rgb=False)
  height, width = image.shape[:2]
  t = augment.transform("weak", (0.6, 1.0), (0.9, 1.1), center=0.5)
  region = augment.center_window(height, width, 0.5)
  out = np.empty((32, 32, 3), np.uint8)
  areas = []
  for u in augment.uniforms(5, np.arange(300), t.draws).tolist():
    view = t.fn(image, (0.2, 0.1, 0.8, 0.9), u, out)
    y0, x0, y1, x1 = view.crop
    # Inside the centre window, at 60-100% of its area, aspect 0.9-1.1 (up to rounding).
    assert y0 * height >= region.y - 1e-9 and y1 * height <= region.y + region.h + 1e-9
    assert x0 * width >= region.x - 1e-9 and x1 * width <= region.x + region.w + 1e-9
    areas.append((y1 - y0) * height * (x1 - x0) * width / (region.h * region.w))
    np.testing.assert_array_equal(view.crop, t.view(height, width, (0.2, 0.1, 0.8, 0.9), u).crop)
  assert min(areas) >= 0.58 and max(areas) <= 1.0
  # The defaults are the plain entries; a bad range is refused with the fault named.
  assert augment.transform("weak") is augment.TRANSFORMS["weak"]
  assert augment.transform("eval", center=1.0) is augment.TRANSFORMS["eval"]
  with pytest.raises(ValueError, match="crop scale"):
    augment.transform("weak", (0.0, 1.0))
  with pytest.raises(ValueError, match="center crop"):
    augment.transform("eval", center=1.5)


def test_eval_transform_with_a_centre_crop_maps_the_box(demo_data_dir):
  image = augment.decode(_demo_jpeg(demo_data_dir, grey=True), rgb=False)
  height, width = image.shape[:2]
  t = augment.transform("eval", center=0.625)
  out = np.empty((40, 40, 3), np.uint8)
  box = (0.2, 0.2, 0.8, 0.8)
  view = t.fn(image, box, [], out)
  y, x, h, w = window = augment.center_window(height, width, 0.625)
  np.testing.assert_array_equal(out, augment.to_rgb(cv2.resize(
      image[y:y + h, x:x + w], (40, 40), interpolation=cv2.INTER_LINEAR)))
  np.testing.assert_array_equal(view.box, augment.crop_box(box, window, height, width))
  assert (view.crop, view.flip) == (augment.FULL_CROP, False)
  np.testing.assert_array_equal(augment.center_crop(image, 0.625), image[y:y + h, x:x + w])
