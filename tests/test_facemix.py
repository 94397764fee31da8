"""FaceMix: IoU and kappa, pairings, the loss against a NumPy transcription of the paper's
equations, and that the real-image terms see the unmixed images (unlike the published code)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as finetune_config
from ssfer_jax.input import augment, device
from ssfer_jax.methods import facemix
from ssfer_jax.trainers import finetune


def np_iou(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


@pytest.mark.parametrize("a,b,expected", [
    ((0.1, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5), 1.0),           # identical
    ((0.0, 0.0, 0.2, 0.2), (0.5, 0.5, 0.9, 0.9), 0.0),           # disjoint
    ((0.0, 0.0, 0.5, 0.5), (0.5, 0.0, 1.0, 0.5), 0.0),           # touching edges
    ((0.0, 0.0, 0.5, 1.0), (0.25, 0.0, 0.75, 1.0), 1.0 / 3.0),   # half overlap
    ((0.0, 0.0, 1.0, 1.0), (0.25, 0.25, 0.75, 0.75), 0.25),      # contained
    ((0.3, 0.3, 0.3, 0.3), (0.3, 0.3, 0.3, 0.3), 0.0),           # degenerate: no union
    ((0.3, 0.3, 0.3, 0.8), (0.0, 0.0, 1.0, 1.0), 0.0),           # zero-width box
])
def test_iou_edge_cases(a, b, expected):
  got = float(facemix.box_iou(jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_allclose(got, expected, atol=1e-6)
  np.testing.assert_allclose(float(facemix.box_iou(jnp.asarray(b), jnp.asarray(a))), expected,
                             atol=1e-6)


def test_kappa_follows_crops_and_flips():
  # Two faces in 100x100 images; image 2 is cropped to its right half, then mirrored or not.
  face1 = np.array([0.2, 0.2, 0.6, 0.6], np.float32)
  face2 = np.array([0.55, 0.2, 0.85, 0.6], np.float32)
  window = augment.Window(0, 50, 100, 50)
  plain = augment.crop_box(face2, window, 100, 100)
  mirrored = augment.crop_box(face2, window, 100, 100, flip=True)
  # x: (55-50)/50 .. (85-50)/50 = 0.1..0.7; mirrored 0.3..0.9.
  np.testing.assert_allclose(plain, [0.1, 0.2, 0.7, 0.6], atol=1e-6)
  np.testing.assert_allclose(mirrored, [0.3, 0.2, 0.9, 0.6], atol=1e-6)
  for seen, iou in ((plain, 0.16 / 0.24), (mirrored, 0.12 / 0.28)):
    k = facemix.kappa("iou", jnp.asarray(face1[None]), jnp.asarray(seen[None]), None, None)
    np.testing.assert_allclose(float(k[0]), 1.0 - iou, atol=1e-6)
    np.testing.assert_allclose(1.0 - np_iou(face1, seen), 1.0 - iou, atol=1e-6)


def test_pairings():
  x = jnp.arange(8)
  rng = jax.random.key(0)
  np.testing.assert_array_equal(facemix.partner_fn("swap", 8, rng)(x), [1, 0, 3, 2, 5, 4, 7, 6])
  np.testing.assert_array_equal(facemix.partner_fn("reverse", 8, rng)(x), np.arange(8)[::-1])
  perm = np.asarray(facemix.partner_fn("permutation", 8, rng)(x))
  assert sorted(perm.tolist()) == list(range(8))
  with pytest.raises(ValueError, match="even batch"):
    facemix.partner_fn("swap", 7, rng)


def log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_facemix(lm, lr, labels, lam, boxes, partner, variant, c, smoothing):
  """SSFER eqs. 7-14 transcribed: per pair, L_v on the mixed image with targets
  lam y_i + (1 - lam) y_j, CE on the real images i and j, kappa = 1 - IoU."""
  y = np.eye(c)[labels] * (1 - smoothing) + smoothing / c
  out = []
  for i in range(len(labels)):
    j = partner[i]
    t = lam[i] * y[i] + (1 - lam[i]) * y[j]
    lv = -(t * log_softmax(lm[i])).sum()
    ce_i = -(y[i] * log_softmax(lr[i])).sum()
    ce_j = -(y[j] * log_softmax(lr[j])).sum()
    k = 1 - np_iou(boxes[i], boxes[j])
    out.append({"L1": (1 - k) * lv + ce_i + ce_j, "L2": lv + (1 - k) * (ce_i + ce_j),
                "L3": k * lv + ce_i + ce_j, "L4": lv + k * (ce_i + ce_j)}[variant])
  return np.mean(out)


@pytest.mark.parametrize("pairing", ["swap", "reverse"])
@pytest.mark.parametrize("variant", facemix.VARIANTS)
def test_facemix_loss_matches_numpy(pairing, variant):
  rs = np.random.RandomState(0)
  n, c = 10, 7
  lm, lr = rs.randn(n, c).astype(np.float32) * 3, rs.randn(n, c).astype(np.float32) * 3
  labels = rs.randint(0, c, n)
  lam = rs.beta(1.0, 1.0, n).astype(np.float32)
  lo = rs.uniform(0, 0.5, (n, 2))
  boxes = np.concatenate([lo, lo + rs.uniform(0.1, 0.5, (n, 2))], 1).astype(np.float32)
  partner = facemix.partner_fn(pairing, n, jax.random.key(0))
  idx = np.asarray(partner(jnp.arange(n)))
  y = optax.smooth_labels(jax.nn.one_hot(labels, c), 0.1)
  ym = lam[:, None] * y + (1 - lam[:, None]) * partner(y)
  k = facemix.kappa("iou", jnp.asarray(boxes), partner(jnp.asarray(boxes)), None, None)
  loss, _ = facemix.facemix_loss(jnp.asarray(lm), jnp.asarray(lr), y, ym, k, partner, variant)
  expected = np_facemix(lm, lr, labels, lam, boxes, idx, variant, c, 0.1)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_ssim_and_psnr_kappas():
  rs = np.random.RandomState(1)
  a = jnp.asarray(rs.uniform(0, 1, (2, 24, 24, 3)).astype(np.float32))
  same = facemix.kappa("ssim", None, None, a, a)
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  other = facemix.kappa("ssim", None, None, a, a[::-1])
  assert np.all(np.asarray(other) > 0.5)             # independent noise: SSIM ~ 0
  np.testing.assert_allclose(facemix.kappa("psnr", None, None, a, a), 0.0, atol=1e-6)
  # PSNR of a uniform offset of 0.1: 20 dB -> halfway on the 10..30 dB map.
  shifted = jnp.clip(a * 0.8 + 0.1, 0, 1)
  offset = jnp.full_like(a, 0.5)
  k = facemix.kappa("psnr", None, None, offset, offset + 0.1)
  np.testing.assert_allclose(k, 0.5, atol=1e-4)
  assert np.all((np.asarray(facemix.kappa("psnr", None, None, a, shifted)) >= 0))


def test_cutmix_masks_area_matches_lambda():
  lam = jnp.array([0.3, 0.7, 0.5, 0.9])
  masks, adjusted = facemix.cutmix_masks(jax.random.key(3), lam, 32, 32)
  np.testing.assert_allclose(1 - masks.mean(axis=(1, 2, 3)), adjusted, atol=1e-6)
  assert masks.shape == (4, 32, 32, 1)


def test_real_image_terms_use_the_unmixed_images(demo_data_dir):
  """loss_real must be the CE of the model on the images before mixing."""
  import cv2  # pylint: disable=g-import-not-at-top
  config = finetune_config.get_config("test").unlock()
  config.mix.kind = "facemix"
  config.loss.label_smoothing = 0.0
  size, c = config.data.image_size, 6
  paths = sorted((demo_data_dir / "images").glob("*.jpg"))[:8]
  images = np.stack([cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size)) for p in paths])
  batch = {"image": jnp.asarray(images), "crop": jnp.tile(jnp.array([[0., 0., 1., 1.]]), (8, 1)),
           "flip": jnp.zeros(8, bool), "label": jnp.arange(8) % c,
           "box": jnp.tile(jnp.array([[0.2, 0.2, 0.8, 0.8]]), (8, 1)), "index": jnp.arange(8)}
  model = finetune.make_model(config, c)
  params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)["params"]
  params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                        is_leaf=lambda p: hasattr(p, "value"))
  params["head"]["kernel"] = jax.random.normal(jax.random.key(1), params["head"]["kernel"].shape)
  loss_fn = finetune.make_loss(config, model, c, None)
  _, aux = loss_fn(params, {}, batch, jax.random.key(2))
  x = device.prepare_train_images(batch, size, config.data.mean, config.data.std)
  logits = model.apply({"params": params}, x, train=False)
  real = facemix.soft_cross_entropy(logits, jax.nn.one_hot(batch["label"], c))
  np.testing.assert_allclose(float(aux["loss_real"]), float(real.mean()), rtol=1e-5)
  assert abs(float(aux["loss_virtual"]) - float(real.mean())) > 1e-3  # the mixed ones differ
