"""Analytic matmul FLOPs (2 x multiply-adds) of the ViT and MAE, for MFU.

Counts every matmul of the forward: patch embedding, q/k/v and output projections,
the attention products QK^T and AV, the MLP, the head / decoder projections, LEAF's
expert mixtures.
Elementwise work (norms, GELU, softmax, adds) is left out: it is a few percent and
does not run on the matrix units. Training = 3 x forward (backward = 2 x forward).
"""

from __future__ import annotations

from ssfer_jax.models.mae import MAE
from ssfer_jax.models.vit import stem_convs, ViT


def _grid(image_size: int | tuple[int, int], patch_size: int) -> int:
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return (h // patch_size) * (w // patch_size)


def block_flops(tokens: int, width: int, mlp_dim: int) -> int:
  """One transformer block on `tokens` tokens (one example)."""
  projections = 2 * tokens * width * (3 * width + width + 2 * mlp_dim)
  attention = 2 * 2 * tokens * tokens * width  # QK^T and AV over all heads
  return projections + attention


def leaf_levels_flops(width: int, experts: int) -> int:
  """LEAF's two levels on one pooled feature, each: gate logits, MLP experts D -> D/2 -> D,
  their weighted sum (`models/leaf_levels.py`; every expert runs, the gates weigh them)."""
  return 2 * (2 * 2 * width * experts + 2 * experts * 2 * width * (width // 2))


def embed_flops(patch_size: int, width: int, channels: int = 3, stem: str = "patch") -> int:
  """The patch embedding of one patch: a matmul, or `vit.ConvStem`'s convolutions + 1x1."""
  if stem == "patch":
    return 2 * patch_size * patch_size * channels * width
  n, side, c_in, total = stem_convs(patch_size), patch_size, channels, 0
  for i in range(n):
    side, c_out = side // 2, max(width // 2 ** (n - 1 - i), 8)
    total += 2 * side * side * 9 * c_in * c_out
    c_in = c_out
  return total + 2 * c_in * width


def vit_forward_flops(image_size, patch_size: int, width: int, depth: int, mlp_dim: int,
                      num_classes: int = 0, channels: int = 3, leaf_experts: int = 0,
                      stem: str = "patch", pool: str = "cls") -> int:
  """Forward FLOPs of one image through `vit.ViT` (a flattened head reads every token)."""
  n = _grid(image_size, patch_size)
  embed = n * embed_flops(patch_size, width, channels, stem)
  head = 2 * width * num_classes * (n if pool == "flatten" else 1)
  return (embed + depth * block_flops(n + 1, width, mlp_dim) + head
          + (leaf_levels_flops(width, leaf_experts) if leaf_experts else 0))


def mae_forward_flops(image_size, patch_size: int, width: int, depth: int, mlp_dim: int,
                      decoder_width: int, decoder_depth: int, decoder_mlp_dim: int,
                      mask_ratio: float, channels: int = 3, stem: str = "patch") -> int:
  """Forward FLOPs of one image through `mae.MAE`: encoder on visible tokens + cls."""
  n = _grid(image_size, patch_size)
  keep = int(n * (1 - mask_ratio))
  pixels = patch_size * patch_size * channels
  return (n * embed_flops(patch_size, width, channels, stem)
          + depth * block_flops(keep + 1, width, mlp_dim)
          + 2 * (keep + 1) * width * decoder_width
          + decoder_depth * block_flops(n + 1, decoder_width, decoder_mlp_dim)
          + 2 * n * decoder_width * pixels)


def vit_train_flops(model_kwargs: dict, image_size, batch: int) -> int:
  """Training-step FLOPs of a ViT built as ViT(**model_kwargs)."""
  m = ViT(**model_kwargs)
  return 3 * batch * vit_forward_flops(image_size, m.patch_size, m.width, m.depth, m.mlp_dim,
                                       m.num_classes, leaf_experts=m.leaf_experts, stem=m.stem,
                                       pool=m.pool)


def mae_train_flops(model_kwargs: dict, image_size, batch: int) -> int:
  """Training-step FLOPs of an MAE built as MAE(**model_kwargs)."""
  m = MAE(**model_kwargs)
  return 3 * batch * mae_forward_flops(image_size, m.patch_size, m.width, m.depth, m.mlp_dim, m.decoder_width,
                                       m.decoder_depth, m.decoder_mlp_dim or 4 * m.decoder_width,
                                       m.mask_ratio, m.channels, m.stem)
