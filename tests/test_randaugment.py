"""The strong view: `rand_augment` keeps shape and range, is the identity when no slot applies,
does each op as PIL does what timm asks of it, maps magnitudes as timm's level functions, draws
ops uniformly, and is the same sharded as on one device; the host's `rand_augment_host` draws
the same ops and magnitudes and agrees with it pixel for pixel within a grey level or two."""

import math

import cv2
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image, ImageEnhance, ImageOps

from ssfer_jax.input import augment, randaugment as ra

SIZE = 64
FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


@pytest.fixture(scope="module")
def faces(demo_data_dir):
  """8 real faces (grey and colour) at 64 px, RGB uint8 [8, 64, 64, 3]."""
  paths = sorted((demo_data_dir / "images").glob("*.jpg"))[::90][:8]
  return np.stack([cv2.resize(augment.decode(p.read_bytes()), (SIZE, SIZE),
                              interpolation=cv2.INTER_AREA) for p in paths])


def _forcing(n, op, negate=False, magnitude_normal=0.0):
  """u that applies `op` in slot 0 at magnitude 9 + 0.5 normal (u_b = 0: cos 1), slot 1 off."""
  u = np.zeros((n, ra.DRAWS), np.float32)
  u[:, 1] = (op + 0.5) / len(ra.OPS)
  u[:, 2] = -math.expm1(-magnitude_normal ** 2 / 2)  # sqrt(-2 log(1 - u_a)) = |normal|
  u[:, 4] = 0.9 if negate else 0.1
  u[:, ra.SLOT_DRAWS] = 0.7
  return u


# timm/data/auto_augment.py (commit 066e4906), level functions transcribed in float64.
def _timm_level(name, m, negate):
  sign = -1.0 if negate else 1.0
  if name == "Rotate":
    return sign * m / 10 * 30.0
  if name.endswith("Increasing") and name[:-10] in ("Color", "Contrast", "Brightness", "Sharpness"):
    return max(0.1, 1.0 + sign * m / 10 * 0.9)
  if name in ("ShearX", "ShearY"):
    return sign * m / 10 * 0.3
  if name in ("TranslateXRel", "TranslateYRel"):
    return sign * m / 10 * 0.45
  if name == "PosterizeIncreasing":
    return 4 - int(m / 10 * 4)
  if name == "SolarizeIncreasing":
    return 256 - int(m / 10 * 256)
  if name == "SolarizeAdd":
    return int(m / 10 * 110)
  return 0.0


def _timm_op(img, name, arg):
  """timm's op on a PIL image (bilinear resampling, fill = FILL)."""
  kw = dict(resample=Image.BILINEAR, fillcolor=FILL)
  w, h = img.size
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Invert":
    return ImageOps.invert(img)
  if name == "Rotate":
    return img.rotate(arg, **kw)
  if name == "PosterizeIncreasing":
    return ImageOps.posterize(img, int(arg))
  if name == "SolarizeIncreasing":
    return ImageOps.solarize(img, arg)
  if name == "SolarizeAdd":
    return img.point([min(255, i + int(arg)) if i < 128 else i for i in range(256)] * 3)
  if name.endswith("Increasing"):
    return getattr(ImageEnhance, name[:-10])(img).enhance(arg)
  matrix = {"ShearX": (1, arg, 0, 0, 1, 0), "ShearY": (1, 0, 0, arg, 1, 0),
            "TranslateXRel": (1, 0, arg * w, 0, 1, 0),
            "TranslateYRel": (1, 0, 0, 0, 1, arg * h)}[name]
  return img.transform(img.size, Image.AFFINE, matrix, **kw)


def test_shape_dtype_and_range(faces):
  u = augment.uniforms(0, np.arange(len(faces)), ra.DRAWS)
  x = faces.astype(np.float32) + 0.3
  out = np.asarray(ra.rand_augment(x, u, FILL))
  assert out.shape == faces.shape and out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255


def test_no_slot_applied_is_the_identity(faces):
  u = augment.uniforms(1, np.arange(len(faces)), ra.DRAWS)
  u[:, 0::ra.SLOT_DRAWS] = np.maximum(u[:, 0::ra.SLOT_DRAWS], ra.PROB)
  x = faces.astype(np.float32) * 0.97 + 0.123  # not on the integer grid: passed through as is
  np.testing.assert_array_equal(np.asarray(ra.rand_augment(x, u, FILL)), x)


_SIGNED = {"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
           "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
_CASES = [(n, False) for n in ra.OPS] + [(n, True) for n in ra.OPS if n in _SIGNED]


@pytest.mark.parametrize("name,negate", _CASES)
def test_each_op_matches_pil(faces, name, negate):
  op = ra.OPS.index(name)
  out = np.asarray(ra.rand_augment(faces.astype(np.float32), _forcing(len(faces), op, negate),
                                   FILL))
  arg = _timm_level(name, 9.0, negate)
  expected = np.stack([np.asarray(_timm_op(Image.fromarray(f), name, arg)) for f in faces])
  diff = np.abs(out - expected)
  if name == "AutoContrast":  # exact stretch, where PIL's float64 roundoff truncates a few
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # exact integers one lower
  elif name in ra._LUT_OPS:  # integer lookup tables: exactly PIL's
    np.testing.assert_array_equal(out, expected)
  else:  # the device rounds where PIL truncates: measured 0.27-0.50 grey levels on average,
    # never more than 1; geometric ops may also disagree on samples on the image's edge
    assert diff.mean() < 0.6
    assert (diff > 1).mean() <= (0.0 if name in ra._BLEND_OPS else 0.005)


def test_levels_match_timm():
  rng = np.random.default_rng(0)
  ms = np.concatenate([[0.0, 9.0, 10.0], rng.uniform(0, 10, 200)]).astype(np.float32)
  for negate in (False, True):
    got = np.asarray(ra.levels(ms, np.full(ms.shape, negate)))
    expected = np.array([[_timm_level(n, float(m), negate) for n in ra.OPS] for m in ms])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_magnitude_is_clipped_normal_9_half():
  u = augment.uniforms(2, np.arange(20000), 2).astype(np.float32)
  m = np.asarray(ra.magnitude(u[:, 0], u[:, 1]))
  assert m.min() >= 0 and m.max() <= 10
  assert abs(m.mean() - 9.0) < 0.02 and abs(m.std() - 0.5) < 0.02


def test_draws_are_uniform_over_ops_and_apply_half():
  n = 30000
  applied, op, _ = (np.asarray(a) for a in ra.draw(augment.uniforms(3, np.arange(n), ra.DRAWS)))
  counts = np.bincount(op.ravel(), minlength=len(ra.OPS))
  expected = op.size / len(ra.OPS)
  chi2 = ((counts - expected) ** 2 / expected).sum()
  assert chi2 < 50  # 14 degrees of freedom: p < 1e-5
  assert abs(applied.mean() - ra.PROB) < 0.01


def test_deterministic_and_sharded_equals_single_device(faces):
  images = np.concatenate([faces, faces[:, ::-1]]).astype(np.float32)
  u = augment.uniforms(4, np.arange(len(images)), ra.DRAWS)
  single = np.asarray(ra.rand_augment(images, u, FILL))
  np.testing.assert_array_equal(np.asarray(ra.rand_augment(images, u, FILL)), single)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  out = ra.rand_augment(jax.device_put(images, sharding), jax.device_put(u, sharding), FILL)
  assert out.sharding.is_equivalent_to(sharding, out.ndim)
  np.testing.assert_array_equal(np.asarray(out), single)


# ---- The host's strong view (`rand_augment_host`): the device's, made on the host. ----

def test_host_draws_the_devices_ops_and_magnitudes():
  """Same draws -> the same slots applied, the same ops (so the same op frequencies) and the
  same magnitudes' arguments, whichever side draws them."""
  u = augment.uniforms(5, np.arange(20000), ra.DRAWS)
  device = [np.asarray(a) for a in ra.draw(u)]
  host = ra.draw(u, np)
  np.testing.assert_array_equal(host[0], device[0])
  np.testing.assert_array_equal(host[1], device[1])
  assert host[2].dtype == np.float32
  np.testing.assert_allclose(host[2], device[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,negate", _CASES)
def test_each_host_op_matches_the_device(faces, name, negate):
  op = ra.OPS.index(name)
  u = _forcing(len(faces), op, negate)
  device = np.asarray(ra.rand_augment(faces.astype(np.float32), u, FILL))
  host = np.empty_like(faces)
  ra.rand_augment_host(faces, u, FILL, host)
  diff = np.abs(host - device)
  if name in ra._AFFINE_OPS:  # cv2 places samples on a 1/32 pixel grid: measured 0.05-0.08
    assert diff.mean() < 0.15 and diff.max() <= 2 and (diff > 1).mean() < 0.001  # levels
  else:  # lookup tables and blends: the device's integers, but for float32 rounding ties
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02


def test_host_no_slot_applied_is_the_identity_and_random_draws_agree(faces):
  u = augment.uniforms(6, np.arange(len(faces)), ra.DRAWS)
  off = u.copy()
  off[:, 0::ra.SLOT_DRAWS] = np.maximum(off[:, 0::ra.SLOT_DRAWS], ra.PROB)
  out = np.zeros_like(faces)
  ra.rand_augment_host(faces, off, FILL, out)
  np.testing.assert_array_equal(out, faces)
  ra.rand_augment_host(faces, u, FILL, out)
  device = np.asarray(ra.rand_augment(faces.astype(np.float32), u, FILL))
  diff = np.abs(out - device)
  assert np.mean(np.abs(out.astype(int) - faces)) > 5   # the draws did change the images
  # Two ops in a row can carry a one-level difference across a posterize bucket or a
  # solarize threshold: rare, and no more than one op's own disagreement on average.
  assert diff.mean() < 0.1 and (diff > 2).mean() < 0.001


def test_fill_colour_is_timms_img_mean():
  assert ra.fill_colour((0.485, 0.456, 0.406)) == FILL
