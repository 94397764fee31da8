"""Vanilla ViT (MAE / timm layout) as pure Linen modules.

Parameters are float32 and boxed with logical axis names; the trainer maps the names
to mesh axes. Names used: 'embed' (model width, also the MAE decoder's), 'mlp',
'heads', 'head_dim', 'qkv' (the 3 of q/k/v, never sharded), 'patch' (flattened
patch pixels), 'classes', 'experts' (LEAF's mixtures). A name may not repeat inside one
parameter, so an axis that would repeat one is left unnamed (None).

The encoder's submodules ('embedding', 'cls', 'encoder', 'encoder_norm') are shared
by name and structure with `mae.MAE`, so pretrained encoder weights drop into a ViT
(`encoder_params_from_mae`). rng streams: 'dropout' (drop path).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.shard_alike import shard_alike

from ssfer_jax.models import leaf_levels

# name: (width, depth, num_heads, mlp_dim)
VIT_SIZES = {
    "mu": (64, 2, 4, 256),
    "xs": (128, 4, 4, 512),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}

ENCODER_KEYS = ("embedding", "cls", "encoder", "encoder_norm")
POOLS = ("cls", "gap", "flatten")
# What a rematerialised block keeps for its backward pass (the rest is recomputed there):
# "nothing" its input alone; "dots" every matmul output; "dots_no_batch" the dense layers'
# matmuls but not attention's (which have batch dimensions and grow with the tokens squared).
REMAT_POLICIES = {
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros
_ones = nn.initializers.ones


def vit_kwargs(size: str, **overrides) -> dict:
  """Module kwargs for a named size (ViT or MAE encoder); overrides win."""
  if size not in VIT_SIZES:
    raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
  width, depth, num_heads, mlp_dim = VIT_SIZES[size]
  return dict(width=width, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim) | overrides


def boxed(init, names):
  return nn.with_logical_partitioning(init, names)


def patchify(imgs: jax.Array, p: int) -> jax.Array:
  """[B, H, W, C] -> [B, L, p*p*C], each patch row-major then channel (MAE's 'nhwpqc')."""
  b, hh, ww, c = imgs.shape
  if hh % p or ww % p:
    raise ValueError(f"image size {hh}x{ww} is not divisible by the patch size {p}")
  h, w = hh // p, ww // p
  x = imgs.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, p * p * c)


def unpatchify(x: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of `patchify` for a grid of h x w patches."""
  b, l, k = x.shape
  c = k // (p * p)
  if l != h * w or k != p * p * c:
    raise ValueError(f"patches {x.shape} do not fit a {h}x{w} grid of {p}x{p} patches")
  x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  # float32 throughout, as MAE's numpy code, so the tables agree bit for bit.
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> np.ndarray:
  """MAE's fixed 2-D sin-cos table [(1+)grid_h*grid_w, dim], float32.

  Mirrors `get_2d_sincos_pos_embed`: despite MAE's names, its first dim/2 channels
  encode the column index (np.meshgrid(w, h)[0]) and the last dim/2 the row index.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
  cols, rows = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, dim]), emb], axis=0)
  return emb.astype(np.float32)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic resize (upsample_bicubic2d)."""
  a = -0.75
  src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5  # align_corners=False
  i0 = np.floor(src)
  offsets = np.arange(-1, 3)
  d = np.abs((src - i0)[:, None] - offsets)  # distances to the taps i0-1 .. i0+2
  w = np.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1, ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)
  taps = np.clip(i0.astype(int)[:, None] + offsets, 0, n_in - 1)  # off-grid taps repeat the edge
  m = np.zeros((n_out, n_in))
  np.add.at(m, (np.arange(n_out)[:, None], taps), w)
  return m


def resample_pos_embed(table: np.ndarray, new_grid: tuple[int, int],
                       old_grid: tuple[int, int] | None = None) -> np.ndarray:
  """A learned position table [(1,) 1+L, D] (cls row first) moved to another patch grid.

  MAE's `interpolate_pos_embed`: the cls row is kept and the grid resized as torch's
  interpolate(mode="bicubic", align_corners=False) does (cubic kernel a=-0.75, taps
  clamped to the border; jax.image.resize uses a=-0.5), so fine-tuning at another
  resolution starts from the same table as in PyTorch. old_grid defaults to a square.
  """
  table = np.asarray(table)
  if table.ndim not in (2, 3) or table.shape[:-2] not in ((), (1,)):
    raise ValueError(f"position table has shape {table.shape}; expected [1, 1+L, D] or [1+L, D]")
  rows, d = table.shape[-2:]
  if old_grid is None:
    g = math.isqrt(rows - 1)
    if g * g != rows - 1:
      raise ValueError(f"position table has {rows - 1} grid rows, not a square grid: pass old_grid")
    old_grid = (g, g)
  if old_grid[0] * old_grid[1] != rows - 1:
    raise ValueError(f"old_grid {old_grid} does not hold the table's {rows - 1} grid rows")
  if tuple(new_grid) == tuple(old_grid):
    return table.copy()
  flat = table.reshape(rows, d).astype(np.float64)
  grid = np.einsum("ih,jw,hwd->ijd", _bicubic_matrix(old_grid[0], new_grid[0]),
                   _bicubic_matrix(old_grid[1], new_grid[1]), flat[1:].reshape(*old_grid, d))
  out = np.concatenate([flat[:1], grid.reshape(-1, d)])
  return out.reshape(table.shape[:-2] + out.shape).astype(table.dtype)


def prepend_cls(x: jax.Array, cls: jax.Array, cls_pos: jax.Array | np.ndarray) -> jax.Array:
  """cls (with its position row) + tokens; MAE adds the other rows before masking."""
  tok = (cls + cls_pos).astype(x.dtype)
  return jnp.concatenate([jnp.broadcast_to(tok, (x.shape[0], 1, x.shape[2])), x], axis=1)


def layer_norm(dtype, name: str | None = None) -> nn.LayerNorm:
  # flax computes the statistics in float32 even for bf16 inputs.
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name,
                      scale_init=boxed(_ones, ("embed",)), bias_init=boxed(_zeros, ("embed",)))


def dense(features: int, names: tuple, dtype, name: str | None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=boxed(_xavier, names), bias_init=boxed(_zeros, names[-1:]))


class PatchEmbed(nn.Module):
  """Patchify + dense: the same map as MAE's stride-p conv, kernel laid out [p*p*C, D]."""
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    kernel = self.param("kernel", boxed(_xavier, ("patch", "embed")), (p * p * c, self.width))
    bias = self.param("bias", boxed(_zeros, ("embed",)), (self.width,))
    x = patchify(images.astype(self.dtype), p)
    return jnp.einsum("blk,kd->bld", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)


class ConvStem(nn.Module):
  """A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see
  better") in place of the linear patch embedding: log2(p) 3x3 convolutions of stride 2, each
  followed by LayerNorm over channels and GELU, channels doubling up to `width`, then a 1x1
  projection to `width`. It runs on each p x p patch on its own (Xiao's stem overlaps
  patches): tokens stay independent, so MAE's masking hides a patch from the encoder exactly
  as with `PatchEmbed`, and ViT and MAE share the module under the name 'embedding'.
  """
  patch_size: int
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    p, c = self.patch_size, images.shape[-1]
    n = stem_convs(p)
    b, hh, ww = images.shape[:3]
    x = patchify(images.astype(self.dtype), p).reshape(-1, p, p, c)   # every patch an image
    for i in range(n):
      features = max(self.width // 2 ** (n - 1 - i), 8)
      x = nn.Conv(features, (3, 3), strides=(2, 2), padding="SAME", use_bias=False,
                  dtype=self.dtype, param_dtype=jnp.float32, name=f"conv_{i}",
                  kernel_init=boxed(nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                                    (None, None, None, None)))(x)
      x = nn.gelu(nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, param_dtype=jnp.float32,
                               name=f"norm_{i}", scale_init=boxed(_ones, (None,)),
                               bias_init=boxed(_zeros, (None,)))(x), approximate=False)
    x = x.reshape(b, (hh // p) * (ww // p), -1)
    return dense(self.width, (None, "embed"), self.dtype, "proj")(x)


def stem_convs(patch_size: int) -> int:
  """The conv stem's stride-2 convolutions: log2 of the patch size, which must be 2^k >= 2."""
  n = patch_size.bit_length() - 1
  if patch_size < 2 or patch_size != 1 << n:
    raise ValueError(f"stem='conv' needs a power-of-two patch_size >= 2, got {patch_size}")
  return n


STEMS = {"patch": PatchEmbed, "conv": ConvStem}


def make_stem(stem: str, patch_size: int, width: int, dtype) -> nn.Module:
  """The patch embedding named `stem` ("patch": linear, as MAE and timm; "conv": `ConvStem`)."""
  if stem not in STEMS:
    raise ValueError(f"stem must be one of {sorted(STEMS)}, got {stem!r}")
  if stem == "conv":
    stem_convs(patch_size)
  return STEMS[stem](patch_size, width, dtype, name="embedding")


class Attention(nn.Module):
  """Self-attention with an explicit head axis in the parameters (shardable by heads).

  qkv_kernel [D, 3, H, Dh] is MAE's fused Linear(D, 3D) (xavier over fan_in D,
  fan_out 3D); proj_kernel [H, Dh, D]. The product goes through
  `jax.nn.dot_product_attention` (float32 softmax). Its default implementation is
  XLA's even on GPU (jax 0.10): pass attention_impl="cudnn" there for flash attention
  (bf16/fp16 compute, head_dim a multiple of 8).
  """
  num_heads: int
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    d, h = x.shape[-1], self.num_heads
    if d % h:
      raise ValueError(f"width {d} is not divisible by num_heads {h}")
    dh = d // h
    qkv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0,
                                                out_axis=(1, 2, 3))
    proj_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1),
                                                 out_axis=2)
    qkv_kernel = self.param("qkv_kernel",
                            boxed(qkv_init, ("embed", "qkv", "heads", "head_dim")), (d, 3, h, dh))
    qkv_bias = self.param("qkv_bias", boxed(_zeros, ("qkv", "heads", "head_dim")), (3, h, dh))
    proj_kernel = self.param("proj_kernel", boxed(proj_init, ("heads", "head_dim", "embed")),
                             (h, dh, d))
    proj_bias = self.param("proj_bias", boxed(_zeros, ("embed",)), (d,))
    dt = self.dtype
    qkv = jnp.einsum("btd,dshk->sbthk", x.astype(dt), qkv_kernel.astype(dt))
    qkv = qkv + qkv_bias[:, None, None].astype(dt)
    out = jax.nn.dot_product_attention(qkv[0], qkv[1], qkv[2], implementation=self.attention_impl)
    return jnp.einsum("bthk,hkd->btd", out, proj_kernel.astype(dt)) + proj_bias.astype(dt)


class Mlp(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(x)
    y = nn.gelu(y, approximate=False)  # exact erf GELU, as torch.nn.GELU
    return dense(x.shape[-1], ("mlp", "embed"), self.dtype, "fc2")(y)


class Block(nn.Module):
  """Pre-norm transformer block with per-sample stochastic depth.

  `drop`, given by `Encoder`'s scan over blocks, is (rate, key of the attention branch, key
  of the MLP branch) in place of `drop_path` and the block's own draws of 'dropout' keys."""
  num_heads: int
  mlp_dim: int
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: str | None = None

  def _drop_path(self, y, train: bool, drop: tuple | None, branch: int):
    if drop is not None:
      rate, key = drop[0], drop[1 + branch]
    elif not train or self.drop_path == 0.0:
      return y
    else:
      rate, key = self.drop_path, self.make_rng("dropout")
    keep = 1.0 - rate
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    alive = jax.random.bernoulli(key, keep, shape)
    return jnp.where(alive, y / keep, 0).astype(y.dtype)

  @nn.compact
  def __call__(self, x, train: bool, drop: tuple | None = None):
    attention = Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")
    y = attention(layer_norm(self.dtype, "norm1")(x))
    x = x + self._drop_path(y, train, drop, 0)
    y = Mlp(self.mlp_dim, self.dtype, name="mlp")(layer_norm(self.dtype, "norm2")(x))
    return x + self._drop_path(y, train, drop, 1)


class Encoder(nn.Module):
  """`depth` blocks named block_00...; drop-path rate grows linearly to `drop_path_rate`.

  The last block's input passes through `perturb("last_block_input")`: an identity unless
  apply is given {"perturbations": {"encoder": {"last_block_input": zeros}}}, whose gradient
  is then the gradient with respect to those tokens (Grad-CAM's, `gradcam.py`).

  remat: the blocks before the last run as one `jax.lax.scan` of a `jax.checkpoint`ed block
  over their parameters stacked on the fly (the tree keeps block_00...), so the backward pass
  recomputes each block inside its own loop iteration and keeps only what `remat_policy`
  (`REMAT_POLICIES`) saves. `nn.remat` on unrolled blocks saved nothing on the CPU backend:
  XLA:CPU removes the optimisation barriers that stop CSE before its last CSE pass, which then
  merges the recomputation back into the forward pass (benchmarks/RESULTS.md, issue 20). The
  last block runs plainly: its backward comes first, so it would keep the same memory.
  Results equal the unrolled blocks', dropout keys included."""
  depth: int
  num_heads: int
  mlp_dim: int
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None
  remat_policy: str = "nothing"

  @nn.compact
  def __call__(self, x, train: bool):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, "
                       f"got {self.remat_policy!r}")
    blocks = [Block(self.num_heads, self.mlp_dim, float(rate), self.dtype, self.attention_impl,
                    name=f"block_{i:02d}")
              for i, rate in enumerate(np.linspace(0.0, self.drop_path_rate, self.depth))]
    if self.remat and self.depth > 1 and not self.is_initializing():
      x = self._scan(blocks[:-1], x, train)
    else:
      for block in blocks[:-1]:
        x = block(x, train)
    if not self.is_initializing():   # no variable at init
      x = self.perturb("last_block_input", x)
    return blocks[-1](x, train)

  def _scan(self, blocks: list[Block], x, train: bool):
    params = nn.meta.unbox(self.variables["params"])
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[b.name] for b in blocks])
    if train and self.drop_path_rate > 0:
      # The keys each block would draw itself, so that remat changes no number.
      keys = jnp.stack([jnp.stack([b.make_rng("dropout"), b.make_rng("dropout")]) for b in blocks])
      drop = (jnp.asarray([b.drop_path for b in blocks], jnp.float32), keys)
    else:
      drop = None
    block = Block(self.num_heads, self.mlp_dim, 0.0, self.dtype, self.attention_impl, parent=None)

    def body(x, inputs):
      p, d = inputs
      return block.apply({"params": p}, x, train, None if d is None else (d[0], *d[1])), None

    # The loop already keeps the recomputation apart: no barriers, which cost fusion on GPU.
    body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    return shard_alike(jax.lax.scan(body, x, (stacked, drop))[0], x)[0]


class ViT(nn.Module):
  """ViT classifier. images [B, H, W, C] (normalised) -> float32 logits [B, num_classes].

  pool="cls": final LayerNorm ('encoder_norm') then the cls token (SSFER);
  pool="gap": mean of the patch tokens then 'fc_norm' (MAE fine-tuning; no encoder_norm);
  pool="flatten": final LayerNorm then every patch token, concatenated in grid order: the head
  sees where a feature is, so a linear map of the patch embeddings is there from the first
  step (the cls/gap heads must first learn to route it through attention).
  num_classes=0 returns the pooled features. head_init: "zeros" or "trunc_normal"
  (std 2e-5, MAE fine-tuning). attention_impl: see `Attention`.
  pos_embed="sincos": the fixed 2-D sin-cos table (SSFER, MAE pretraining), no parameter;
  "learned": a parameter 'pos_embed' [1, 1+L, D] for the init images' grid, starting as
  that table (MAE fine-tuning learns it); `resample_pos_embed` moves it to another grid.
  leaf_experts > 0 puts LEAF's semantic and instance levels (`models/leaf_levels.py`, that
  many experts each) between the pooled feature and the head. stem: "patch" (the vanilla
  linear patch embedding) or "conv" (`ConvStem`). remat, remat_policy: see `Encoder`.
  """
  num_classes: int = 0
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  pool: str = "cls"
  head_init: str = "trunc_normal"
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  attention_impl: str | None = None
  pos_embed: str = "sincos"
  leaf_experts: int = 0
  stem: str = "patch"
  remat_policy: str = "nothing"

  def setup(self):
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if self.pool == "flatten" and self.leaf_experts:
      raise ValueError("LEAF's levels take one pooled feature of the model's width: use pool "
                       "'cls' or 'gap' with leaf_experts.")
    if self.pos_embed not in ("sincos", "learned"):
      raise ValueError(f"pos_embed must be 'sincos' or 'learned', got {self.pos_embed!r}")
    self.embedding = make_stem(self.stem, self.patch_size, self.width, self.dtype)
    self.cls = self.param("cls", boxed(nn.initializers.normal(0.02), (None, None, "embed")),
                          (1, 1, self.width))
    self.encoder = Encoder(self.depth, self.num_heads, self.mlp_dim, self.drop_path_rate,
                           self.dtype, self.remat, self.attention_impl, self.remat_policy)
    if self.pool == "gap":
      self.fc_norm = layer_norm(self.dtype)
    else:
      self.encoder_norm = layer_norm(self.dtype)
    if self.leaf_experts:
      self.leaf = leaf_levels.Levels(self.leaf_experts, self.dtype)
    if self.num_classes:
      inits = {"zeros": _zeros, "trunc_normal": nn.initializers.truncated_normal(2e-5)}
      if self.head_init not in inits:
        raise ValueError(f"head_init must be one of {sorted(inits)}, got {self.head_init!r}")
      self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                           kernel_init=boxed(inits[self.head_init], ("embed", "classes")),
                           bias_init=boxed(_zeros, ("classes",)))

  @nn.compact  # only for the learned table, whose shape comes from the images
  def encode(self, images, *, train: bool):
    """All tokens [B, 1+L, D] (cls first); after encoder_norm unless pool="gap"."""
    x = self.embedding(images)
    p = self.patch_size
    gh, gw = images.shape[1] // p, images.shape[2] // p
    pos = sincos_pos_embed(self.width, gh, gw, cls_token=True)[None]
    if self.pos_embed == "learned":
      pos = self.param("pos_embed", boxed(nn.initializers.constant(pos), (None, None, "embed")), pos.shape)
    x = prepend_cls(x + pos[:, 1:].astype(x.dtype), self.cls, pos[0, :1])
    x = self.encoder(x, train)
    return x if self.pool == "gap" else self.encoder_norm(x)

  def __call__(self, images, *, train: bool, features: bool = False):
    """Logits; with `features`, (logits, {"feature": the L2-normalised semantic-level feature,
    "gates": {level: [B, E]}}) from the LEAF levels ({} without them)."""
    x = self.encode(images, train=train)
    if self.pool == "cls":
      x = x[:, 0]
    elif self.pool == "flatten":
      x = x[:, 1:].reshape(x.shape[0], -1)
    else:
      x = self.fc_norm(jnp.mean(x[:, 1:].astype(jnp.float32), axis=1).astype(self.dtype))
    out = {}
    if self.leaf_experts:
      x, out["feature"], out["gates"] = self.leaf(x)
    if self.num_classes:
      x = self.head(x)
    x = x.astype(jnp.float32)
    return (x, out) if features else x


def encoder_params_from_mae(mae_params: dict, pool: str = "cls") -> dict:
  """The subset of an MAE 'params' tree that a ViT's 'params' takes unchanged.

  Merge it over a freshly initialised ViT tree: {**vit_params, **subset}. With
  pool="gap" MAE's encoder_norm is dropped (its fine-tuning replaces it by fc_norm).
  """
  if pool not in POOLS:
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
  keys = ENCODER_KEYS[:-1] if pool == "gap" else ENCODER_KEYS
  missing = [k for k in keys if k not in mae_params]
  if missing:
    raise KeyError(f"MAE params lack {missing}; pass the 'params' collection of an mae.MAE")
  return {k: mae_params[k] for k in keys}
