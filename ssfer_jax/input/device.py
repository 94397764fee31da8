"""On-device image preparation: images travel as uint8 and become floats only here."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype=jnp.float32) -> jax.Array:
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def denormalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Back to uint8 RGB, e.g. for figures."""
  x = x.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
  return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)
