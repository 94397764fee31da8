"""Masked autoencoder (He et al. 2021) around `vit`'s encoder, with MAE's numerics.

The encoder submodules carry ViT's names ('embedding', 'cls', 'encoder',
'encoder_norm'); the decoder adds 'decoder_embed', 'mask_token', 'decoder',
'decoder_norm', 'decoder_pred'. rng streams: 'mask' (masking noise), 'dropout'
(drop path, off by default as in MAE pretraining).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssfer_jax.models.vit import (Encoder, boxed, dense, layer_norm, make_stem, patchify,
                                  prepend_cls, sincos_pos_embed, unpatchify)

__all__ = ["MAE", "patchify", "unpatchify", "random_masking", "patch_targets", "masked_mse",
           "reconstruct_images"]


def random_masking(x: jax.Array, mask_ratio: float, key: jax.Array):
  """MAE's per-example shuffle: keep the tokens with the smallest uniform noise.

  Returns (x_visible [B, len_keep, D], mask [B, L] float32 with 1 = removed, in the
  original order, ids_restore [B, L]), len_keep = int(L * (1 - mask_ratio)).
  """
  b, l, _ = x.shape
  len_keep = int(l * (1 - mask_ratio))
  ids_shuffle = jnp.argsort(jax.random.uniform(key, (b, l)), axis=1)
  ids_restore = jnp.argsort(ids_shuffle, axis=1)
  x_visible = jnp.take_along_axis(x, ids_shuffle[:, :len_keep, None], axis=1)
  mask = jnp.ones((b, l), jnp.float32).at[:, :len_keep].set(0.0)
  return x_visible, jnp.take_along_axis(mask, ids_restore, axis=1), ids_restore


def _patch_stats(patches):
  # torch's Tensor.var defaults to the unbiased estimator and MAE relies on it.
  return jnp.mean(patches, axis=-1, keepdims=True), jnp.var(patches, axis=-1, ddof=1, keepdims=True)


def patch_targets(imgs: jax.Array, p: int, norm_pix_loss: bool) -> jax.Array:
  """Reconstruction targets [B, L, p*p*C] float32; per-patch normalised if norm_pix_loss."""
  target = patchify(imgs.astype(jnp.float32), p)
  if norm_pix_loss:
    mean, var = _patch_stats(target)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-patch MSE averaged over the removed patches only."""
  per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def reconstruct_images(pred, target_imgs, mask, norm_pix_loss: bool, p: int) -> dict:
  """Images for a reconstruction figure, in the input's (normalised) pixel space.

  pred is de-normalised with each patch's own mean/var from the original image when
  norm_pix_loss (as MAE's visualisation). Returns {"masked": original with removed
  patches zeroed, "reconstruction": the raw prediction, "pasted": prediction on removed
  patches and the original on visible ones}, each [B, H, W, C] float32.
  """
  b, hh, ww, _ = target_imgs.shape
  orig = patchify(target_imgs.astype(jnp.float32), p)
  pred = pred.astype(jnp.float32)
  if norm_pix_loss:
    mean, var = _patch_stats(orig)
    pred = pred * jnp.sqrt(var + 1e-6) + mean
  removed = mask[..., None] > 0.5
  h, w = hh // p, ww // p
  return {
      "masked": unpatchify(jnp.where(removed, 0.0, orig), p, h, w),
      "reconstruction": unpatchify(pred, p, h, w),
      "pasted": unpatchify(jnp.where(removed, pred, orig), p, h, w),
  }


class MAE(nn.Module):
  """imgs [B, H, W, C] normalised -> (loss, {"pred", "mask", "target"}).

  pred [B, L, p*p*C] float32 (in target space), mask [B, L] (1 = removed), target =
  `patch_targets` of imgs. Position embeddings are fixed sin-cos tables; the encoder's
  are added before masking.
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  decoder_width: int = 512
  decoder_depth: int = 8
  decoder_heads: int = 16
  decoder_mlp_dim: int | None = None  # None: 4 x decoder_width
  channels: int = 3
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None  # "cudnn" for flash attention on GPU (see vit.Attention)
  stem: str = "patch"                # or "conv" (vit.ConvStem, per patch: masking stays exact)
  remat_policy: str = "nothing"      # with remat, what each block keeps (vit.REMAT_POLICIES)

  def setup(self):
    self.embedding = make_stem(self.stem, self.patch_size, self.width, self.dtype)
    self.cls = self.param("cls", boxed(nn.initializers.normal(0.02), (None, None, "embed")),
                          (1, 1, self.width))
    self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate,
                           self.dtype, self.remat, self.attention_impl, self.remat_policy)
    self.encoder_norm = layer_norm(self.dtype)
    # The encoder-width axis stays unnamed: a logical name cannot repeat in one parameter.
    self.decoder_embed = dense(self.decoder_width, (None, "embed"), self.dtype, None)
    self.mask_token = self.param("mask_token",
                                 boxed(nn.initializers.normal(0.02), (None, None, "embed")),
                                 (1, 1, self.decoder_width))
    self.decoder = Encoder(self.decoder_depth, self.decoder_heads,
                           self.decoder_mlp_dim or 4 * self.decoder_width, 0.0, self.dtype,
                           self.remat, self.attention_impl, self.remat_policy)
    self.decoder_norm = layer_norm(self.dtype)
    self.decoder_pred = dense(self.patch_size**2 * self.channels, ("embed", "patch"), self.dtype, None)

  def encode(self, imgs, *, train: bool):
    """(latent [B, 1+len_keep, D] after encoder_norm, mask [B, L], ids_restore [B, L])."""
    x = self.embedding(imgs)
    p = self.patch_size
    pos = sincos_pos_embed(self.width, imgs.shape[1] // p, imgs.shape[2] // p, cls_token=True)
    x, mask, ids_restore = random_masking(x + pos[1:].astype(x.dtype), self.mask_ratio,
                                          self.make_rng("mask"))
    x = self.encoder(prepend_cls(x, self.cls, pos[:1]), train)
    return self.encoder_norm(x), mask, ids_restore

  def decode(self, latent, ids_restore, grid: tuple[int, int], *, train: bool):
    """Predicted patches [B, L, p*p*C] float32 for all positions (cls dropped)."""
    x = self.decoder_embed(latent)
    b, _, d = x.shape
    n_mask = ids_restore.shape[1] + 1 - x.shape[1]
    masked = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n_mask, d))
    tokens = jnp.concatenate([x[:, 1:], masked], axis=1)
    tokens = jnp.take_along_axis(tokens, ids_restore[..., None], axis=1)
    pos = sincos_pos_embed(d, *grid, cls_token=True).astype(x.dtype)
    x = jnp.concatenate([x[:, :1], tokens], axis=1) + pos
    x = self.decoder_norm(self.decoder(x, train))
    return self.decoder_pred(x[:, 1:]).astype(jnp.float32)

  def __call__(self, imgs, *, train: bool):
    p = self.patch_size
    if imgs.shape[-1] != self.channels:
      raise ValueError(f"MAE built for {self.channels} channels got images {imgs.shape} (NHWC expected)")
    latent, mask, ids_restore = self.encode(imgs, train=train)
    pred = self.decode(latent, ids_restore, (imgs.shape[1] // p, imgs.shape[2] // p), train=train)
    target = patch_targets(imgs, p, self.norm_pix_loss)
    return masked_mse(pred, target, mask), {"pred": pred, "mask": mask, "target": target}
