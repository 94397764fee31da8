"""Optimiser, learning-rate schedule, layer-wise lr decay and weight EMA (the config's `optim`
block, with optax)."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ssfer_jax import errors

# MAE and timm decay only weight matrices: no biases ('bias', 'qkv_bias'), no norm scales,
# no cls/mask tokens or position embeddings.
_NO_DECAY_SUFFIXES = ("bias", "scale")
_NO_DECAY_PREFIXES = ("cls", "mask_token", "pos_embed")


# (field, lowest allowed, whether the lowest is allowed): values outside make no optimiser.
_RANGES = (("base_lr", 0.0, False), ("weight_decay", 0.0, True), ("min_lr", 0.0, True),
           ("warmup_init_lr", 0.0, True), ("warmup_epochs", 0.0, True),
           ("clip_grad_norm", 0.0, True), ("eps", 0.0, False), ("reference_batch", 0, False),
           ("layer_decay", 0.0, False))


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError for an `optim` block no optimiser can run with (a learning rate that is not
  a positive number, a negative decay, betas outside [0, 1)), before anything compiles."""
  for name, low, inclusive in _RANGES:
    v = cfg.get(name)
    if v is None:
      continue
    if not (isinstance(v, (int, float)) and (v >= low if inclusive else v > low)):
      raise errors.ConfigError(f"optim.{name}={v!r}; use a number "
                               f"{'>=' if inclusive else '>'} {low}.")
  for name in ("b1", "b2"):
    v = cfg.get(name)
    if v is not None and not (isinstance(v, (int, float)) and 0 <= v < 1):
      raise errors.ConfigError(f"optim.{name}={v!r}; use a number in [0, 1).")


def peak_learning_rate(cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
  """The linear scaling rule: lr = base_lr * batch / reference_batch (MAE: 256). SSFER's paper
  states absolute rates at batch 32: its recipe sets reference_batch = 32."""
  return cfg.base_lr * global_batch_size / cfg.get("reference_batch", 256)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, global_batch_size: int,
                           total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from `warmup_init_lr`, then half-cycle cosine to `min_lr`, per step;
  `schedule="constant"` holds the peak (SSFER's stage-3 code in practice).

  Per step rather than per epoch (as SSFER's code): the same curve, without the jumps.
  """
  peak = peak_learning_rate(cfg, global_batch_size)
  kind = cfg.get("schedule", "cosine")
  if kind == "constant":
    return optax.constant_schedule(peak)
  if kind != "cosine":
    raise ValueError(f"optim.schedule={kind!r}; use 'cosine' or 'constant'.")
  warmup = min(round(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=cfg.get("warmup_init_lr", 0.0), peak_value=peak, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.get("min_lr", 0.0))


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and kernels, not biases/norms/tokens."""

  def decays(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return leaf.ndim >= 2 and not any(
        n.endswith(_NO_DECAY_SUFFIXES) or n.startswith(_NO_DECAY_PREFIXES) for n in names)

  return jax.tree_util.tree_map_with_path(decays, params)


def layer_id(path: tuple[str, ...], depth: int) -> int:
  """MAE's `get_layer_id_for_vit`: patch embedding, cls and pos_embed are layer 0, block i is
  i + 1, everything after the blocks (norms, head) is depth + 1."""
  top = path[0]
  if top in ("embedding", "cls") or top.startswith("pos_embed"):
    return 0
  if top == "encoder":
    return int(re.fullmatch(r"block_(\d+)", path[1]).group(1)) + 1
  return depth + 1


def layer_decay_scales(params: Any, depth: int, decay: float) -> Any:
  """lr scale per parameter: decay ** (depth + 1 - layer_id) (MAE's `param_groups_lrd`)."""

  def scale(path, _):
    names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return decay ** (depth + 1 - layer_id(names, depth))

  return jax.tree_util.tree_map_with_path(scale, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
  """Multiplies each update by its constant in `scales` (a tree shaped like the params)."""

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def make_optimizer(cfg: ml_collections.ConfigDict, global_batch_size: int, total_steps: int,
                   steps_per_epoch: int, lr_scales: Any | None = None,
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW on the schedule; `lr_scales` (e.g. `layer_decay_scales`) scales each parameter's
  whole update, weight decay included, as MAE's per-group learning rates do."""
  schedule = learning_rate_schedule(cfg, global_batch_size, total_steps, steps_per_epoch)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8),
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  parts = [adamw] if lr_scales is None else [adamw, scale_by_tree(lr_scales)]
  clip = cfg.get("clip_grad_norm")
  if clip:
    parts.insert(0, optax.clip_by_global_norm(clip))
  return (optax.chain(*parts) if len(parts) > 1 else adamw), schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
  """One step of a weight EMA (timm's ModelEmaV2, no warm-up): decay e + (1 - decay) p."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
