"""Optimiser and learning-rate schedule, built from the config's `optim` block with optax."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

# MAE and timm decay only weight matrices: no biases ('bias', 'qkv_bias'), no norm scales,
# no cls/mask tokens or position embeddings.
_NO_DECAY_SUFFIXES = ("bias", "scale")
_NO_DECAY_PREFIXES = ("cls", "mask_token", "pos_embed")


def peak_learning_rate(cfg: ml_collections.ConfigDict, global_batch_size: int) -> float:
  """The linear scaling rule of MAE: lr = base_lr * batch / 256."""
  return cfg.base_lr * global_batch_size / 256


def learning_rate_schedule(cfg: ml_collections.ConfigDict, global_batch_size: int,
                           total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """Linear warm-up from `warmup_init_lr`, then half-cycle cosine to `min_lr`, per step.

  Per step rather than per epoch (as SSFER's code): the same curve, without the jumps.
  """
  peak = peak_learning_rate(cfg, global_batch_size)
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


def make_optimizer(cfg: ml_collections.ConfigDict, global_batch_size: int, total_steps: int,
                   steps_per_epoch: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(cfg, global_batch_size, total_steps, steps_per_epoch)
  adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.get("eps", 1e-8),
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  clip = cfg.get("clip_grad_norm")
  tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip else adamw
  return tx, schedule
