"""Selective negative learning: what a face below the confidence threshold still teaches.

A pseudo-label that fails the threshold is too unsure to train on, but the teacher is
usually sure what the face is not. Selective negative learning, as proposed for DTM's
successor, uses exactly that: for each unlabeled row the threshold rejected, the classes
whose teacher probability is below `bound` are its complementary labels, and the student's
probability of each is pushed down with -log(1 - p_c), the negative-learning loss of NLNL
(Kim et al., ICCV 2019).

  negative_classes(probs, mask, bound) -> bool [N, C]
  negative_loss(logits, negative) -> [N]  mean over the row's negative classes (0 if none)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def negative_classes(probs: jax.Array, mask: jax.Array, bound: float) -> jax.Array:
  """bool [N, C]: classes below `bound` in the rows the threshold rejected (mask 0)."""
  probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
  return (probs < bound) & (mask <= 0)[:, None]


def negative_loss(logits: jax.Array, negative: jax.Array) -> jax.Array:
  """Per row, the mean of -log(1 - p_c) over its negative classes, computed as
  logsumexp(z) - logsumexp(z without c) (no 1 - p cancellation as p_c -> 1)."""
  z = logits.astype(jnp.float32)
  c = z.shape[-1]
  without = jax.nn.logsumexp(jnp.broadcast_to(z[:, None, :], (z.shape[0], c, c)), axis=-1,
                             where=~jnp.eye(c, dtype=bool)[None])
  per_class = jax.nn.logsumexp(z, axis=-1, keepdims=True) - without
  count = jnp.sum(negative, axis=-1)
  return jnp.sum(jnp.where(negative, per_class, 0.0), axis=-1) / jnp.maximum(count, 1)
