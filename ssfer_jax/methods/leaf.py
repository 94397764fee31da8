"""LEAF's category level and its two-view terms (docs/REFERENCE.md section 3); the semantic and
instance levels are model layers (`models/leaf_levels.py`).

  positive_sets(probs, bound, max_k) -> bool [N, C]
  ambiguous_loss(logits, positive)   -> [N]   softplus(logsumexp(-z_pos) + logsumexp(z_neg))
  consistency_loss(logits_a, logits_b) -> [N] squared distance of the two views' softmax
  contrastive_loss(views, valid, temperature) -> scalar   SupConLoss without labels

Ambiguous pseudo-labels: the positive set is the smallest top-k (k <= max_k, 3) of the
teacher's classes whose cumulative probability reaches `bound` (0.9), the top max_k when no
k <= max_k does; the rest are negative. The loss raises every positive logit above every
negative one (a smooth max-margin between the two sets), so a face the teacher finds
ambiguous between two expressions is only pushed away from the others. The published code
(`topk_ce_FPL`) tests the mass of k + 1 classes for a k-class positive set (a face at
0.5 / 0.45 gets the top-1 alone), then weighs each row by a "concave" margin weight and
rescales the batch mean to the value of a cross entropy on the argmax; we use the definition
above, unweighted, with the same row selection as every stage-3 loss (the threshold mask):
there, every row (rejected ones included) gets the ambiguous loss's gradient, scaled by the
batch's mask rate.

Where the labels come from: the public code takes them from the student itself, the
softmax of its averaged logits on two weak views (train mode); here from the configured
teacher (the EMA teacher by default) on the one weak view, as every stage-3 option. Its
"consistency between two views" is that averaging; ours is an explicit term between the
two strong views the student trains on, added to L_u (weight `leaf.weight_consistency`, 1),
so the total keeps the public form 0.5 L_x + L_u + 0.1 L_supcon. Its contrastive term
compares two weak views of the student; ours the two strong views.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def positive_sets(probs: jax.Array, bound: float = 0.9, max_k: int = 3) -> jax.Array:
  """bool [N, C]: each row's positive set (see the module doc)."""
  probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
  order = jnp.argsort(-probs, axis=-1)
  cumulative = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
  # Cumulative mass only grows: k is 1 + the number of shorter prefixes below the bound.
  k = 1 + jnp.sum(cumulative[:, :max_k - 1] < bound, axis=-1)
  rank = jnp.argsort(order, axis=-1)
  return rank < k[:, None]


def ambiguous_loss(logits: jax.Array, positive: jax.Array) -> jax.Array:
  """Per row softplus(logsumexp(-z_pos) + logsumexp(z_neg)); every row needs a class on
  each side (C > max_k)."""
  z = logits.astype(jnp.float32)
  return jax.nn.softplus(jax.nn.logsumexp(-z, axis=-1, where=positive)
                         + jax.nn.logsumexp(z, axis=-1, where=~positive))


def consistency_loss(logits_a: jax.Array, logits_b: jax.Array) -> jax.Array:
  """Per row sum_c (p_a - p_b)^2 of the softmax of two views of one image; both views get
  gradients (the views play symmetric roles)."""
  pa = jax.nn.softmax(logits_a.astype(jnp.float32), axis=-1)
  pb = jax.nn.softmax(logits_b.astype(jnp.float32), axis=-1)
  return jnp.sum(jnp.square(pa - pb), axis=-1)


def contrastive_loss(views: Sequence[jax.Array], valid: jax.Array, temperature: float = 0.07,
                     base_temperature: float = 0.07) -> jax.Array:
  """SupConLoss (Khosla et al., contrast_mode "all") without labels, as LEAF's code calls it:
  each view of a row is pulled to the row's other views and pushed from every other view of
  every other row. `views`: V >= 2 arrays [N, D] of L2-normalised features; only rows where
  `valid` take part (as anchors and as contrast), and the loss averages over their views
  (0 when no row is valid)."""
  v, n = len(views), views[0].shape[0]
  if v < 2:
    raise ValueError(f"contrastive_loss needs at least two views per row, got {v}")
  flat = jnp.concatenate([f.astype(jnp.float32) for f in views])   # view-major, as SupCon
  ok = jnp.tile(valid, v)
  sim = flat @ flat.T / temperature
  row = jnp.tile(jnp.arange(n), v)
  not_self = ~jnp.eye(v * n, dtype=bool)
  # Invalid anchors keep every column so their (discarded) log-sum-exp stays finite.
  others = not_self & (ok[None, :] | ~ok[:, None])
  positive = others & (row[:, None] == row[None, :])
  log_prob = sim - jax.nn.logsumexp(sim, axis=1, keepdims=True, where=others)
  mean_positive = (jnp.sum(jnp.where(positive, log_prob, 0.0), axis=1)
                   / jnp.maximum(jnp.sum(positive, axis=1), 1))
  per_anchor = -(temperature / base_temperature) * mean_positive
  return jnp.sum(jnp.where(ok, per_anchor, 0.0)) / jnp.maximum(jnp.sum(ok), 1)
