"""On-device image preparation: images travel as uint8 and become floats only here.

Train batches carry each image as stored plus the random-resized-crop window (`crop`) and the
flip the host drew for it (`input/pipeline.py`); `crop_resize_flip` resamples them here,
inside the jitted step. On the host that bilinear resize cost ~37 us an image, a third of
the decode ceiling the input pipeline is held to. Here it is two dense matmuls an image,
~0.13 GFLOP at 224 px: 0.2% of a ViT-B/16 MAE train step's FLOPs, on hardware built for
matmuls. It moved rather than vanished: on a CPU backend it costs milliseconds an image
(benchmarks/input_pipeline.py measures it), and for the tiny 96 px CPU model it is a
quarter of the step's FLOPs.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp


@functools.partial(jax.jit, static_argnames="size")
def crop_resize_flip(images: jax.Array, crop: jax.Array, flip: jax.Array,
                     size: int) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, size, size, C] in 0..255: each image's window `crop`
  (normalised y0, x0, y1, x1) resized bilinearly to size x size, then mirrored left-right
  where `flip`.

  The window's continuous span [x0 W, x1 W] (pixel centres at +0.5, as cv2 and the host's
  box maths use) maps onto [0, size], so a face box mapped by `augment.crop_box` lands on the
  face. A full window at size == H, W reproduces the image exactly. Antialiasing is on: it
  changes nothing when upsampling (every pipeline window: at most the image, resized to the
  image size) and low-pass filters a window resized smaller, where plain bilinear aliases.
  Samples next to the window's edge interpolate with the pixels beyond it (cv2 on the cut-out
  window repeats its edge instead). The matmuls keep jax's default here, HIGHEST precision:
  in bf16 the steps between values above 128 are whole grey levels.
  """
  _, h, w, c = images.shape

  def one(image, window):
    y0, x0, y1, x1 = window[0], window[1], window[2], window[3]
    scale = jnp.stack([size / ((y1 - y0) * h), size / ((x1 - x0) * w)])
    translation = -jnp.stack([y0 * h, x0 * w]) * scale  # out = in * scale + translation
    return jax.image.scale_and_translate(image.astype(jnp.float32), (size, size, c), (0, 1),
                                         scale, translation, "linear", antialias=True)

  out = jax.vmap(one)(images, crop.astype(jnp.float32))
  return jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float],
              dtype=jnp.float32) -> jax.Array:
  """Pixel values in 0..255 (uint8, or floats from `crop_resize_flip`) -> (x / 255 - mean) / std."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


def prepare_train_images(batch: Mapping[str, jax.Array], size: int, mean: Sequence[float],
                         std: Sequence[float], dtype=jnp.float32) -> jax.Array:
  """The images a train batch's model sees: its crops resized and flipped, normalised."""
  return normalize(crop_resize_flip(batch["image"], batch["crop"], batch["flip"], size),
                   mean, std, dtype)


def denormalize(x: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """Back to uint8 RGB, e.g. for figures."""
  x = x.astype(jnp.float32) * jnp.asarray(std) + jnp.asarray(mean)
  return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)
