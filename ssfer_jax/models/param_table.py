"""One table between our parameter trees and PyTorch state dicts.

kind="vit": timm `VisionTransformer` keys (`norm.*` with pool="cls", `fc_norm.*` with
pool="gap", `head.*` when the model has a head). kind="mae": the official MAE
pretraining checkpoint (`models_mae.MaskedAutoencoderViT`). Layouts:

  ours                                 theirs
  embedding.kernel [p*p*C, D]          patch_embed.proj.weight [D, C, p, p] (OIHW)
  attn.qkv_kernel  [D, 3, H, Dh]       attn.qkv.weight [3*H*Dh, D]  (out = (3, H, Dh))
  attn.qkv_bias    [3, H, Dh]          attn.qkv.bias [3*H*Dh]
  attn.proj_kernel [H, Dh, D]          attn.proj.weight [D, H*Dh]
  Dense kernel     [in, out]           Linear weight [out, in]
  LayerNorm scale/bias                 weight/bias

Position embeddings are parameters in torch, and here too with ViT(pos_embed="learned"):
`pos_embed` [1, 1+L, D] then maps one to one, and a checkpoint's table for another grid
is resampled to ours: as MAE's fine-tuning does (`vit.resample_pos_embed`, the default) or
as timm's loader does (`resample_pos_embed_timm`, antialiased). Otherwise ours are
fixed sin-cos tables: export writes the table; import checks the checkpoint's against it
(a learned table would be lost).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Callable

import flax.linen as nn
import numpy as np
from flax import traverse_util

from ssfer_jax.models.vit import resample_pos_embed, sincos_pos_embed

Path = tuple[str, ...]
# How a learned position table for another grid is resampled, as the log names it.
POS_RESAMPLING = {"mae": "MAE's resampling (bicubic, no antialias: interpolate_pos_embed)",
                  "timm": "timm's resampling (bicubic, antialiased: resample_abs_pos_embed)"}


@dataclasses.dataclass(frozen=True)
class Entry:
  ours: Path
  theirs: str
  to_theirs: Callable[[np.ndarray], np.ndarray]
  to_ours: Callable[[np.ndarray, tuple], np.ndarray]


def _copy(a, shape=None):
  return a


def _transpose(a, shape=None):
  return a.T


def _flat_in_t(a):  # [D, ...out] -> [prod(out), D]
  return a.reshape(a.shape[0], -1).T


def _flat_out_t(a):  # [...in, D] -> [D, prod(in)]
  return a.reshape(-1, a.shape[-1]).T


def _unflat_t(a, shape):
  return a.T.reshape(shape)


def _flatten(a):
  return a.reshape(-1)


def _reshape(a, shape):
  return a.reshape(shape)


def _patch_size(rows: int) -> int:
  p = math.isqrt(rows // 3)
  if p * p * 3 != rows:
    raise ValueError(f"patch kernel has {rows} rows; the table handles RGB patches (p*p*3 rows)")
  return p


def _patch_to_oihw(a):
  p = _patch_size(a.shape[0])
  return a.reshape(p, p, 3, a.shape[1]).transpose(3, 2, 0, 1)


def _patch_from_oihw(a, shape):
  return a.transpose(2, 3, 1, 0).reshape(shape)


def _norm(ours: Path, theirs: str) -> list[Entry]:
  return [Entry(ours + ("scale",), f"{theirs}.weight", _copy, _copy),
          Entry(ours + ("bias",), f"{theirs}.bias", _copy, _copy)]


def _linear(ours: Path, theirs: str) -> list[Entry]:
  return [Entry(ours + ("kernel",), f"{theirs}.weight", _transpose, _transpose),
          Entry(ours + ("bias",), f"{theirs}.bias", _copy, _copy)]


def _blocks(ours: Path, theirs: str, depth: int) -> list[Entry]:
  out = []
  for i in range(depth):
    o, t = ours + (f"block_{i:02d}",), f"{theirs}.{i}"
    out += _norm(o + ("norm1",), f"{t}.norm1")
    out += [Entry(o + ("attn", "qkv_kernel"), f"{t}.attn.qkv.weight", _flat_in_t, _unflat_t),
            Entry(o + ("attn", "qkv_bias"), f"{t}.attn.qkv.bias", _flatten, _reshape),
            Entry(o + ("attn", "proj_kernel"), f"{t}.attn.proj.weight", _flat_out_t, _unflat_t),
            Entry(o + ("attn", "proj_bias"), f"{t}.attn.proj.bias", _copy, _copy)]
    out += _norm(o + ("norm2",), f"{t}.norm2")
    out += _linear(o + ("mlp", "fc1"), f"{t}.mlp.fc1")
    out += _linear(o + ("mlp", "fc2"), f"{t}.mlp.fc2")
  return out


def _depth(flat: dict, module: str) -> int:
  blocks = {p[1] for p in flat if p[0] == module and re.fullmatch(r"block_\d\d", p[1])}
  return len(blocks)


def param_table(params: dict, kind: str) -> list[Entry]:
  """Entries for the modules present in `params` (a flat or nested 'params' tree)."""
  if kind not in ("vit", "mae"):
    raise ValueError(f"kind must be 'vit' or 'mae', got {kind!r}")
  flat = params if all(isinstance(k, tuple) for k in params) else traverse_util.flatten_dict(params)
  tops = {p[0] for p in flat}
  if kind == "mae" and "decoder" not in tops:
    raise ValueError("kind='mae' needs the params of an mae.MAE (no 'decoder' found)")
  table = [Entry(("embedding", "kernel"), "patch_embed.proj.weight", _patch_to_oihw,
                 _patch_from_oihw),
           Entry(("embedding", "bias"), "patch_embed.proj.bias", _copy, _copy),
           Entry(("cls",), "cls_token", _copy, _copy)]
  if ("pos_embed",) in flat:
    table.append(Entry(("pos_embed",), "pos_embed", _copy, _copy))
  table += _blocks(("encoder",), "blocks", _depth(flat, "encoder"))
  if "encoder_norm" in tops:
    table += _norm(("encoder_norm",), "norm")
  if "fc_norm" in tops:
    table += _norm(("fc_norm",), "fc_norm")
  if "head" in tops:
    table += _linear(("head",), "head")
  if kind == "mae":
    table.append(Entry(("mask_token",), "mask_token", _copy, _copy))
    table += _linear(("decoder_embed",), "decoder_embed")
    table += _blocks(("decoder",), "decoder_blocks", _depth(flat, "decoder"))
    table += _norm(("decoder_norm",), "decoder_norm")
    table += _linear(("decoder_pred",), "decoder_pred")
  return table


def state_dict_shapes(params: dict, kind: str = "vit") -> dict[str, tuple[int, ...]]:
  """The torch-layout shape of every tensor the table maps for `params` (arrays or
  ShapeDtypeStructs, boxed or not), without touching their values."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  return {e.theirs: _theirs_shape(e, tuple(flat[e.ours].shape)) for e in param_table(flat, kind)}


def _theirs_shape(e: Entry, shape: tuple) -> tuple[int, ...]:
  return e.to_theirs(np.broadcast_to(np.float32(0), shape)).shape  # a view: no memory


def _first(items: list[str], n: int = 3) -> str:
  return "; ".join(items[:n]) + ("; ..." if len(items) > n else "")


def _pos_keys(flat: dict, kind: str) -> dict[str, int]:
  """Keys of the fixed (sin-cos) position tables, which no parameter holds, and their widths."""
  keys = {} if ("pos_embed",) in flat else {"pos_embed": flat[("cls",)].shape[-1]}
  if kind == "mae":
    keys["decoder_pos_embed"] = flat[("mask_token",)].shape[-1]
  return keys


def to_state_dict(params: dict, kind: str = "vit", *,
                  image_size: int | tuple[int, int] = 224) -> dict[str, np.ndarray]:
  """Our 'params' tree (boxed or not) -> a torch-layout state dict of numpy arrays.

  image_size sets the grid of the fixed sin-cos tables written; a learned one goes as it is.
  """
  flat = traverse_util.flatten_dict(nn.meta.unbox(params))
  table = param_table(flat, kind)
  unmapped = set(flat) - {e.ours for e in table}
  if unmapped:
    raise ValueError(f"params not covered by the {kind} table: "
                     f"{sorted('.'.join(p) for p in unmapped)}")
  sd = {e.theirs: np.ascontiguousarray(e.to_theirs(np.asarray(flat[e.ours]))) for e in table}
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  p = _patch_size(flat[("embedding", "kernel")].shape[0])
  for key, width in _pos_keys(flat, kind).items():
    sd[key] = sincos_pos_embed(width, h // p, w // p, cls_token=True)[None]
  return sd


def from_state_dict(sd: dict, params_template: dict, kind: str = "vit", *,
                    check_pos_embed: bool = True, resample: str = "mae") -> dict:
  """A torch-layout state dict -> our 'params' tree shaped (and boxed) like the template.

  The template may hold arrays or ShapeDtypeStructs (jax.eval_shape of init); boxed
  leaves come back boxed with the same logical names. A learned pos_embed for another
  grid is resampled to the template's by `resample` (a key of POS_RESAMPLING); both grids
  are taken as square (timm's are).
  """
  if resample not in POS_RESAMPLING:
    raise ValueError(f"resample={resample!r}; use one of {sorted(POS_RESAMPLING)}")
  flat_t = traverse_util.flatten_dict(params_template)  # boxes are leaves (not dicts)
  flat_u = {k: nn.meta.unbox(v) for k, v in flat_t.items()}
  table = param_table(flat_u, kind)
  unmapped = set(flat_u) - {e.ours for e in table}
  if unmapped:
    raise ValueError(f"template params not covered by the {kind} table: "
                     f"{sorted('.'.join(p) for p in unmapped)}")
  pos = _pos_keys(flat_u, kind)
  expected = {e.theirs for e in table}
  missing = sorted(expected - set(sd))
  unexpected = sorted(set(sd) - expected - set(pos))
  if missing or unexpected:
    raise KeyError(f"state dict does not match the {kind} model: {len(missing)} missing "
                   f"({_first(missing, 4)}), {len(unexpected)} unexpected "
                   f"({_first(unexpected, 4)})")
  if ("pos_embed",) in flat_u:
    sd = sd | {"pos_embed": _fit_grid(np.asarray(sd["pos_embed"]),
                                      tuple(flat_u[("pos_embed",)].shape), resample)}
  out, bad = {}, []
  for e in table:
    shape = tuple(flat_u[e.ours].shape)
    theirs = np.asarray(sd[e.theirs])
    want = _theirs_shape(e, shape)
    if theirs.shape != want:
      bad.append(f"{e.theirs}: {theirs.shape} in the file, {want} here")
      continue
    out[e.ours] = np.ascontiguousarray(e.to_ours(theirs, shape)).astype(flat_u[e.ours].dtype)
  if bad:
    raise ValueError(f"{len(bad)} of {len(table)} tensors differ in shape: {_first(bad)}")
  if check_pos_embed:
    for key, width in pos.items():
      if key in sd:
        _check_pos(key, np.asarray(sd[key]), width)
  leaves = {k: (flat_t[k].replace_boxed(v) if isinstance(flat_t[k], nn.meta.AxisMetadata) else v)
            for k, v in out.items()}
  return traverse_util.unflatten_dict(leaves)


def _fit_grid(table: np.ndarray, shape: tuple, resample: str) -> np.ndarray:
  """A learned table resampled to the (square) grid of `shape` where only the grid differs."""
  if table.shape == shape or table.ndim != 3 or table.shape[::2] != shape[::2]:
    return table  # equal, or not [1, 1+L', D]: the shape check reports that
  g = math.isqrt(shape[1] - 1)
  if g * g != shape[1] - 1:
    raise ValueError(f"pos_embed {table.shape} cannot be resampled to {shape}: not a square grid")
  logging.info("pos_embed: the checkpoint's %d grid rows resampled to a %dx%d grid with %s",
               table.shape[1] - 1, g, g, POS_RESAMPLING[resample])
  if resample == "timm":
    return resample_pos_embed_timm(table, (g, g))
  return resample_pos_embed(table, (g, g))


def resample_pos_embed_timm(table: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """A learned position table [1, 1+L, D] (cls row first, square grid) moved to another grid
  as timm's checkpoint loader does (`resample_abs_pos_embed`: torch's interpolate(mode=
  "bicubic", antialias=True, align_corners=False)). That is PIL's bicubic, not MAE's: cubic
  kernel a=-0.5, widened by the scale when shrinking (so a smaller grid averages rather than
  skips rows), taps beyond the border dropped and the weights renormalised. A model trained
  on timm's side at another resolution saw this table."""
  rows, d = table.shape[-2:]
  g = math.isqrt(rows - 1)
  if table.shape[:-2] != (1,) or g * g != rows - 1:
    raise ValueError(f"position table has shape {table.shape}; expected [1, 1+g*g, D]")
  if tuple(new_grid) == (g, g):
    return table.copy()
  flat = table.reshape(rows, d).astype(np.float64)
  grid = np.einsum("ih,jw,hwd->ijd", _aa_bicubic_matrix(g, new_grid[0]),
                   _aa_bicubic_matrix(g, new_grid[1]), flat[1:].reshape(g, g, d))
  out = np.concatenate([flat[:1], grid.reshape(-1, d)])
  return out[None].astype(table.dtype)


def _aa_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] weights of torch's antialiased 1-D bicubic resize (PIL's algorithm, as
  aten's _compute_indices_weights_aa)."""
  scale = n_in / n_out
  support, stretch = 2.0 * max(scale, 1.0), max(scale, 1.0)
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    center = scale * (i + 0.5)
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
    x = np.abs((np.arange(lo, hi) - center + 0.5) / stretch)
    w = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1,
                 np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0))
    m[i, lo:hi] = w / w.sum()
  return m


def _check_pos(key: str, table: np.ndarray, width: int):
  n = table.shape[-2] - 1
  g = math.isqrt(n)
  if table.shape[-1] != width or g * g != n:
    raise ValueError(f"{key} has shape {table.shape}; expected [1, 1+g*g, {width}] (a square grid)")
  ours = sincos_pos_embed(width, g, g, cls_token=True)
  err = float(np.max(np.abs(table.reshape(ours.shape) - ours)))
  if err > 1e-4:
    raise ValueError(f"{key} differs from the fixed sin-cos table by up to {err:.3g}: it was "
                     "learned, and this model cannot hold it. Pass check_pos_embed=False to drop "
                     "it knowingly.")
