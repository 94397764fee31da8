"""Figures people look at: the MAE reconstruction grid (as the paper's Fig. 3), curves.

Every curve names its axes and has a legend; series that coincide (a total loss equal to its
labeled part while nothing passes the threshold, every class at a fixed threshold) are drawn
once under all their names, and the others each get their own colour, dash and marker, so no
series hides under another.
"""

from __future__ import annotations

import dataclasses
import os
import textwrap
from typing import Mapping, Sequence

import cv2
import numpy as np

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]   # name -> (xs, ys)
DASHES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
# Why grey faces come back coloured (ReconstructionFigure; the report repeats it).
TINT_NOTE = ("Colour on grey faces is the model's error, not the display's: it sees each channel "
             "normalised by the face mean and std (grey is not grey to it), and norm-pix targets "
             "standardise each patch over its three channels together, so in a flat grey patch "
             "the channel offsets are most of the target and an error in them returns as colour. "
             "Visible patches carry no loss, so the reconstruction column is noisier there.")


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
               pad: int = 4, footer: str = "") -> np.ndarray:
  """Rows = examples, columns = views; uint8 RGB [H', W', 3] with a title row and `footer`
  wrapped under the grid."""
  n, h, w, _ = columns[0].shape
  h, w = h * scale, w * scale
  header = 22
  width = len(columns) * (w + pad) + pad
  (text_w, line_h), _ = cv2.getTextSize(footer or "n", cv2.FONT_HERSHEY_SIMPLEX, 0.35, 1)
  notes = textwrap.wrap(footer, max(20, int((width - 2 * pad) * len(footer or "n") / text_w)))
  body = header + n * (h + pad) + pad
  grid = np.full((body + len(notes) * (line_h + 6), width, 3), 255, np.uint8)
  for i, line in enumerate(notes):
    cv2.putText(grid, line, (pad, body + (i + 1) * (line_h + 6) - 4), cv2.FONT_HERSHEY_SIMPLEX,
                0.35, (0, 0, 0), 1, cv2.LINE_AA)
  for j, (col, title) in enumerate(zip(columns, titles)):
    x = pad + j * (w + pad)
    cv2.putText(grid, title, (x + 2, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    for i in range(n):
      y = header + pad + i * (h + pad)
      grid[y:y + h, x:x + w] = cv2.resize(col[i], (w, h), interpolation=cv2.INTER_NEAREST)
  return grid


def reconstruction_figure(original: np.ndarray, mask: np.ndarray, reconstruction: np.ndarray,
                          patch: int) -> np.ndarray:
  """original | masked | reconstruction | reconstruction with the visible patches pasted,
  captioned with why grey faces come back tinted (`TINT_NOTE`)."""
  m = mask.reshape(mask.shape[0], original.shape[1] // patch, original.shape[2] // patch)
  m = np.repeat(np.repeat(m, patch, axis=1), patch, axis=2)[..., None].astype(bool)
  pasted = np.where(m, reconstruction, original)
  return image_grid([original, mask_patches(original, mask, patch), reconstruction, pasted],
                    ["original", "masked", "reconstruction", "+ visible"], footer=TINT_NOTE)


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
    cv2.rectangle(img, (int(x0 * (w - 1)), int(y0 * (h - 1))),
                  (int(x1 * (w - 1)), int(y1 * (h - 1))), color, 1)
  return out


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend (no display on servers), imported lazily:
  training processes that draw nothing never load it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


@dataclasses.dataclass(frozen=True)
class Panel:
  """One axes of a curves figure: its series, y-axis label, title and optional y range."""
  series: Series
  ylabel: str
  title: str = ""
  ylim: tuple[float, float] | None = None


def merge_identical(series: Series) -> dict[str, tuple[list, list]]:
  """Series with the same points as one, named by all of them: drawn apart, one would hide
  exactly under the other."""
  merged: dict[tuple, list[str]] = {}
  for name, (xs, ys) in series.items():
    merged.setdefault((tuple(xs), tuple(ys)), []).append(name)
  return {textwrap.fill(", ".join(names) + (" (identical)" if len(names) > 1 else ""), 44):
          (list(xs), list(ys)) for (xs, ys), names in merged.items()}


def curves_figure(panels: Sequence[Panel], title: str, xlabel: str = "step"):
  """Side-by-side line charts sharing the x axis, each with a legend; returns the Figure."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 5.4 * len(panels), 3.8),
                           sharex=True, squeeze=False)
  for ax, panel in zip(axes[0], panels):
    lines = merge_identical(panel.series)
    for i, (name, (xs, ys)) in enumerate(lines.items()):
      every = max(1, len(xs) // 8)   # markers spaced, offset per series
      ax.plot(xs, ys, label=name, color=f"C{i % 10}", linestyle=DASHES[i % len(DASHES)],
              marker=MARKERS[i % len(MARKERS)], markevery=(i % every, every), markersize=4)
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)
    if panel.ylim:
      ax.set_ylim(*panel.ylim)
    ax.grid(alpha=0.3)
    if lines:   # many entries go under the axes, where they cover no curve
      ax.legend(fontsize=7, **({"loc": "best"} if len(lines) <= 4 else
                               {"loc": "upper center", "bbox_to_anchor": (0.5, -0.24),
                                "ncol": 2}))
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  return fig


def save(fig, path: str, dpi: int = 120) -> str:
  """Writes a matplotlib Figure as a PNG (legends below the axes included) and closes it."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  pyplot().close(fig)
  return path


def plot_curves(path: str, series: Series, title: str, ylabel: str, xlabel: str = "step") -> str:
  """One line chart of named (x, y) series, written as a PNG."""
  return save(curves_figure([Panel(series, ylabel)], title, xlabel), path)
