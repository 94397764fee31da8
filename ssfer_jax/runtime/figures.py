"""Figures people look at: the MAE reconstruction grid (as the paper's Fig. 3), curves."""

from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np


def mask_patches(images: np.ndarray, mask: np.ndarray, patch: int, fill: int = 96) -> np.ndarray:
  """Greys out the patches with mask == 1 (removed) in uint8 images [N, H, W, 3]."""
  n, h, w, _ = images.shape
  gh, gw = h // patch, w // patch
  m = mask.reshape(n, gh, gw).astype(bool)
  m = np.repeat(np.repeat(m, patch, axis=1), patch, axis=2)
  out = images.copy()
  out[m] = fill
  return out


def image_grid(columns: Sequence[np.ndarray], titles: Sequence[str], scale: int = 2,
               pad: int = 4) -> np.ndarray:
  """Rows = examples, columns = views; uint8 RGB [H', W', 3] with a title row."""
  n, h, w, _ = columns[0].shape
  h, w = h * scale, w * scale
  header = 22
  grid = np.full((header + n * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, np.uint8)
  for j, (col, title) in enumerate(zip(columns, titles)):
    x = pad + j * (w + pad)
    cv2.putText(grid, title, (x + 2, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i in range(n):
      y = header + pad + i * (h + pad)
      grid[y:y + h, x:x + w] = cv2.resize(col[i], (w, h), interpolation=cv2.INTER_NEAREST)
  return grid


def reconstruction_figure(original: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray,
                          patch: int) -> np.ndarray:
  """original | masked | reconstruction | reconstruction with the visible patches pasted."""
  m = mask.reshape(mask.shape[0], original.shape[1] // patch, original.shape[2] // patch)
  m = np.repeat(np.repeat(m, patch, axis=1), patch, axis=2)[..., None].astype(bool)
  pasted = np.where(m, reconstruction, original)
  return image_grid([original, mask_patches(original, mask, patch), reconstruction, pasted],
                    ["original", "masked", "reconstruction", "+ visible"])


def write_png(path: str, rgb: np.ndarray) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
    raise OSError(f"could not write {path}")
  return path


def draw_boxes(images: np.ndarray, boxes: np.ndarray, color=(0, 255, 0)) -> np.ndarray:
  """Draws normalised x0,y0,x1,y1 boxes on uint8 images [N, H, W, 3] (e.g. face boxes)."""
  out = images.copy()
  n, h, w, _ = images.shape
  for img, (x0, y0, x1, y1) in zip(out, boxes):
    cv2.rectangle(img, (int(x0 * (w - 1)), int(y0 * (h - 1))), (int(x1 * (w - 1)), int(y1 * (h - 1))),
                  color, 1)
  return out


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display on servers), imported lazily:
  training processes that draw nothing never load it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_curves(path: str, series: dict[str, tuple[Sequence[float], Sequence[float]]],
                title: str, ylabel: str, xlabel: str = "step") -> str:
  """Line chart of named (x, y) series, written as a PNG."""
  plt = pyplot()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  for name, (xs, ys) in series.items():
    ax.plot(xs, ys, label=name)
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
