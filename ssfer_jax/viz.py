"""Figures people look at: the MAE reconstruction grid (as the paper's Fig. 3)."""

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


def curve_plot(steps: Sequence[float], values: Sequence[float], title: str,
               size: tuple[int, int] = (640, 360)) -> np.ndarray:
  """A line chart as a uint8 RGB image (OpenCV only: no plotting stack to install)."""
  width, height = size
  left, right, top, bottom = 70, 20, 30, 40
  img = np.full((height, width, 3), 255, np.uint8)
  xs, ys = np.asarray(steps, float), np.asarray(values, float)
  x_lo, x_hi = xs.min(), max(xs.max(), xs.min() + 1)
  y_lo, y_hi = ys.min(), max(ys.max(), ys.min() + 1e-12)
  px = left + (xs - x_lo) / (x_hi - x_lo) * (width - left - right)
  py = height - bottom - (ys - y_lo) / (y_hi - y_lo) * (height - top - bottom)
  cv2.rectangle(img, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
  cv2.polylines(img, [np.stack([px, py], 1).astype(np.int32)], False, (200, 60, 20), 2, cv2.LINE_AA)
  font = cv2.FONT_HERSHEY_SIMPLEX
  cv2.putText(img, title, (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
  for v, y in ((y_hi, top), (y_lo, height - bottom)):
    cv2.putText(img, f"{v:.4g}", (4, int(y) + 4), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
  for v, x in ((x_lo, left), (x_hi, width - right)):
    cv2.putText(img, f"{v:.0f}", (int(x) - 10, height - bottom + 16), font, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
  cv2.putText(img, "step", (width // 2 - 15, height - 8), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
  return img
