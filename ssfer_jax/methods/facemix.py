"""FaceMix and the mixing baselines it is compared with (SSFER section 3.4, Tables 13-15).

FaceMix is mixup whose loss also trains on the two *real* images, weighted by how unlike
their faces are: kappa = 1 - IoU of the two face boxes, and the adopted loss (the paper's
L4) is `L_v + kappa (CE_i + CE_j)`, with L_v the soft-target cross entropy of the mixed
image. The boxes in a batch are those of the image the model sees (the host moved them
through the crop and flip), so kappa follows the geometric augmentation.

Unlike the published code, CE_i and CE_j are computed on the unmixed images (it mixes in
place and computes them on the mixed ones): one forward pass over [mixed, real] rows,
interleaved so that every device keeps its own rows. CE_j needs no extra pass: image j is
in the batch, so CE_j is CE_i of the partner.

Pairing. "swap" (the default) pairs rows 2k and 2k+1. The batch is already a random draw,
so this is as random a pairing as a permutation, it is a perfect matching like the
published "reverse" pairing (row i with row N-1-i, also available), and it never leaves a
device: the sharded step equals the single-device step without moving images between
devices. "permutation" draws a global random permutation (the images move; pairs are not
reciprocal and a row may draw itself, which makes it a plain CE row with kappa 0). CutMix
draws one box per example even with one lambda per batch (timm draws one per batch).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

MIXINGS = ("none", "mixup", "cutmix", "facemix")
PAIRINGS = ("swap", "reverse", "permutation")
KAPPAS = ("iou", "ssim", "psnr")
VARIANTS = ("L1", "L2", "L3", "L4")
LAMBDA_MODES = ("per_example", "per_batch")

# PSNR -> kappa (the paper gives no map): linear from "unrelated images" (10 dB: kappa 1)
# to "near duplicates" (30 dB: kappa 0), clipped. Two different aligned faces land near
# 12-16 dB, so kappa_psnr sits around 0.7-0.9: it weights the real images far more than
# kappa_iou on tight crops does.
PSNR_UNRELATED_DB = 10.0
PSNR_DUPLICATE_DB = 30.0


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """IoU of boxes [..., 4] (x0, y0, x1, y1). Zero when the union is empty (degenerate boxes),
  so kappa falls back to 1: with no face to compare, FaceMix trusts the real images."""
  w = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  h = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = w * h
  area = lambda r: jnp.clip(r[..., 2] - r[..., 0], 0) * jnp.clip(r[..., 3] - r[..., 1], 0)
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def _gaussian_band(n: int, size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """[n - size + 1, n]: the valid 1-D Gaussian filter as a matrix (SSIM's window)."""
  g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  g /= g.sum()
  out = np.zeros((n - size + 1, n), np.float32)
  for i in range(n - size + 1):
    out[i, i:i + size] = g
  return out


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
  """Mean SSIM of image pairs [B, H, W, C] in 0..1 (Wang et al.: 11x11 Gaussian window,
  sigma 1.5, K1 0.01, K2 0.03, per channel, averaged)."""
  gh, gw = jnp.asarray(_gaussian_band(a.shape[1])), jnp.asarray(_gaussian_band(a.shape[2]))
  # HIGHEST: E[x^2] - mu^2 in bf16/TF32 passes loses what C2 = 9e-4 keeps.
  filt = lambda x: jnp.einsum("ih,bhwc,jw->bijc", gh, x, gw, precision=jax.lax.Precision.HIGHEST)
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mu_a, mu_b = filt(a), filt(b)
  var_a = filt(a * a) - mu_a ** 2
  var_b = filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """PSNR in dB of image pairs [B, H, W, C] in 0..1 (capped at 100 dB for identical pairs)."""
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return jnp.minimum(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)), 100.0)


def kappa(kind: str, boxes: jax.Array, partner_boxes: jax.Array, images01: jax.Array,
          partner_images01: jax.Array) -> jax.Array:
  """Per-pair kappa in [0, 1]: 1 - IoU of the face boxes, 1 - SSIM, or PSNR mapped."""
  if kind == "iou":
    return 1.0 - box_iou(boxes, partner_boxes)
  if kind == "ssim":
    return jnp.clip(1.0 - ssim(images01, partner_images01), 0.0, 1.0)
  if kind == "psnr":
    p = psnr(images01, partner_images01)
    return jnp.clip((PSNR_DUPLICATE_DB - p) / (PSNR_DUPLICATE_DB - PSNR_UNRELATED_DB), 0.0, 1.0)
  raise ValueError(f"unknown kappa {kind!r}; use one of {KAPPAS}")


def partner_fn(pairing: str, n: int, rng: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """x[B, ...] -> the partner of each row, x[j(i), ...]."""
  if pairing == "swap":
    if n % 2:
      raise ValueError(f"pairing 'swap' needs an even batch, got {n}")
    return lambda x: x.reshape(n // 2, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)
  if pairing == "reverse":
    return lambda x: x[::-1]
  if pairing == "permutation":
    perm = jax.random.permutation(rng, n)
    return lambda x: jnp.take(x, perm, axis=0)
  raise ValueError(f"unknown pairing {pairing!r}; use one of {PAIRINGS}")


def sample_lambda(rng: jax.Array, alpha: float, n: int, mode: str) -> jax.Array:
  """lambda ~ Beta(alpha, alpha): one per example [n], or one per batch broadcast to [n]."""
  if mode == "per_example":
    return jax.random.beta(rng, alpha, alpha, (n,))
  if mode == "per_batch":
    return jnp.broadcast_to(jax.random.beta(rng, alpha, alpha), (n,))
  raise ValueError(f"unknown lambda mode {mode!r}; use one of {LAMBDA_MODES}")


def cutmix_masks(rng: jax.Array, lam: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
  """CutMix (Yun et al.): per example a box of area (1 - lam) at a uniform centre, clipped.

  Returns masks [B, H, W, 1] (1 = partner's pixels) and the lambda of the clipped box
  (the fraction of the image's own pixels), which weights the labels.
  """
  n = lam.shape[0]
  cy_rng, cx_rng = jax.random.split(rng)
  cut = jnp.sqrt(1.0 - lam)
  cy = jax.random.uniform(cy_rng, (n,)) * height
  cx = jax.random.uniform(cx_rng, (n,)) * width
  y0 = jnp.clip(jnp.round(cy - cut * height / 2), 0, height)
  y1 = jnp.clip(jnp.round(cy + cut * height / 2), 0, height)
  x0 = jnp.clip(jnp.round(cx - cut * width / 2), 0, width)
  x1 = jnp.clip(jnp.round(cx + cut * width / 2), 0, width)
  ys, xs = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  inside = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None]) &
            (xs >= x0[:, None, None]) & (xs < x1[:, None, None]))
  adjusted = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
  return inside[..., None].astype(jnp.float32), adjusted


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       class_weights: jax.Array | None = None) -> jax.Array:
  """Per-example -sum_c w_c t_c log p_c; logits, targets [..., C] (targets sum to 1)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if class_weights is not None:
    targets = targets * class_weights
  return -jnp.sum(targets * logp, axis=-1)


def combine(variant: str, lv: jax.Array, ce_i: jax.Array, ce_j: jax.Array,
            k: jax.Array) -> jax.Array:
  """The paper's four FaceMix losses per example (eqs. 11-14); L4 is the one adopted."""
  real = ce_i + ce_j
  if variant == "L1":
    return (1 - k) * lv + real
  if variant == "L2":
    return lv + (1 - k) * real
  if variant == "L3":
    return k * lv + real
  if variant == "L4":
    return lv + k * real
  raise ValueError(f"unknown FaceMix loss {variant!r}; use one of {VARIANTS}")


def interleave(a: jax.Array, b: jax.Array) -> jax.Array:
  """[B, ...] x2 -> [2B, ...] as a0, b0, a1, b1, ...: each device keeps its own rows."""
  return jnp.stack([a, b], axis=1).reshape(2 * a.shape[0], *a.shape[1:])


def facemix_loss(logits_mixed: jax.Array, logits_real: jax.Array, targets: jax.Array,
                 mixed_targets: jax.Array, k: jax.Array, partner: Callable[[jax.Array], jax.Array],
                 variant: str = "L4", class_weights: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Batch mean of the FaceMix loss: L_v on the mixed images, CE_i on the real ones, CE_j
  = CE_i of each row's partner; returns the loss and its parts (per example)."""
  lv = soft_cross_entropy(logits_mixed, mixed_targets, class_weights)
  ce_i = soft_cross_entropy(logits_real, targets, class_weights)
  per_example = combine(variant, lv, ce_i, partner(ce_i), k)
  return jnp.mean(per_example), {"loss_virtual": lv, "loss_real": ce_i}
