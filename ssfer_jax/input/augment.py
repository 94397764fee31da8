"""Host-side image transforms (numpy + cv2, uint8 in and out) that carry the face box along.

Every geometric transform also maps the face box (normalised x0, y0, x1, y1 in the frame of
its input image) into the frame of its output image, exactly: FaceMix computes the IoU of the
boxes of the images the model sees. A box with no area left (cropped away) is always
`EMPTY_BOX`, so its IoU with anything is 0.

Train transforms share one signature, `fn(image, box, rng, size) -> (image, box)`, and are
looked up by name in `TRANSFORMS`; the strong (RandAugment) view slots in there. Randomness
comes only from the `np.random.Generator` passed in (grain's `random_map` derives one per
element from the pipeline seed), so a seed fixes every crop and flip.

Transforms take grey [H, W] or RGB [H, W, 3] images alike: grey JPEGs stay one channel
through them (a third of the pixel work) and become RGB last (`to_rgb`, or the pipeline's
batching, which writes them into the batch as RGB).

Interpolation: bicubic, as the reference. Measured on this project's 2-core CPU machine
(benchmarks/input_pipeline.py, 224 px crops back to 224 px, one grey channel): bicubic ~46 us,
bilinear ~39 us, area ~40 us a resize, against ~100 us to decode the JPEG; over the whole weak
pipeline the difference was within run-to-run noise, so the cheaper filters buy too little to
trade quality for.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import cv2
import numpy as np

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
INTERPOLATION = cv2.INTER_CUBIC
EMPTY_BOX = np.zeros(4, np.float32)

# Threads of the input pipeline already run one image each; cv2's own thread pool on top of
# them only adds contention.
cv2.setNumThreads(1)


class Window(NamedTuple):
  """A crop window in pixels: rows y..y+h, columns x..x+w."""
  y: int
  x: int
  h: int
  w: int


# JPEG frame headers (SOF0..SOF15 but DHT, JPG and DAC) carry the number of components.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _components(jpeg: bytes) -> int:
  """Components in the JPEG frame header, walking the marker segments; 0 if not found."""
  i = 2  # past SOI
  while i + 9 < len(jpeg) and jpeg[i] == 0xFF:
    marker = jpeg[i + 1]
    if marker == 0xFF:  # fill byte
      i += 1
    elif marker in _SOF_MARKERS:
      return jpeg[i + 9]
    else:
      i += 2 + (jpeg[i + 2] << 8 | jpeg[i + 3])
  return 0


def decode(jpeg: bytes, rgb: bool = True) -> np.ndarray:
  """JPEG bytes -> uint8 RGB [H, W, 3].

  Grey JPEGs (one component in the frame header) decode as grey and are then expanded to 3
  equal channels: ~20% cheaper than libjpeg's own grey-to-RGB decode. With `rgb=False` they
  stay [H, W], so the transforms touch a third of the pixels (`to_rgb` expands them last).
  """
  grey = _components(jpeg) == 1
  image = cv2.imdecode(np.frombuffer(jpeg, np.uint8),
                       cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR_RGB)
  if image is None:
    raise ValueError(f"cannot decode image ({len(jpeg)} bytes, starts {bytes(jpeg[:4])!r}): "
                     "not a JPEG cv2 can read; rebuild the dataset with "
                     "`python -m data_prep build`.")
  return to_rgb(image) if rgb else image


def to_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W] grey -> [H, W, 3]; RGB passes through."""
  return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image


def sample_crop(rng: np.random.Generator, height: int, width: int,
                scale: tuple[float, float] = SCALE,
                ratio: tuple[float, float] = RATIO) -> Window:
  """The torchvision/timm RandomResizedCrop window: 10 tries, then a centre crop.

  Every uniform variate comes from one generator call and the arithmetic is plain Python:
  per image that is a few microseconds, where numpy calls on 10-element arrays cost ~15.
  """
  u = rng.random(22).tolist()  # 10 areas, 10 log-ratios, the two offsets
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for t in range(10):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[t])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[10 + t])
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      return Window(int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w)
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, round(width / min(ratio))
  elif in_ratio > max(ratio):
    w, h = round(height * max(ratio)), height
  else:
    w, h = width, height
  return Window((height - h) // 2, (width - w) // 2, h, w)


def _canonical(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
  """Clips to [0, 1]; a box without area (after rounding to float32) becomes `EMPTY_BOX`."""
  box = np.array([0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in (x0, y0, x1, y1)],
                 np.float32)
  x0, y0, x1, y1 = box.tolist()
  return box if x0 < x1 and y0 < y1 else EMPTY_BOX.copy()


def crop_box(box, window: Window, height: int, width: int, flip: bool = False) -> np.ndarray:
  """Maps a box from the frame of a [height, width] image into the frame of `window`, mirrored
  left-right after the crop if `flip`."""
  y, x, h, w = window
  x0, y0, x1, y1 = (float(v) for v in box)
  x0, x1 = (x0 * width - x) / w, (x1 * width - x) / w
  y0, y1 = (y0 * height - y) / h, (y1 * height - y) / h
  if flip:
    x0, x1 = 1.0 - x1, 1.0 - x0
  return _canonical(x0, y0, x1, y1)


def flip_box(box) -> np.ndarray:
  """The box of the left-right mirrored image."""
  return crop_box(box, Window(0, 0, 1, 1), 1, 1, flip=True)


def crop_flip_resize(image: np.ndarray, box, window: Window, flip: bool, size: int,
                     interpolation: int = INTERPOLATION) -> tuple[np.ndarray, np.ndarray]:
  """Crops `window`, mirrors if `flip`, resizes to size x size; the box follows."""
  crop = image[window.y:window.y + window.h, window.x:window.x + window.w]
  if flip:
    # Mirroring the crop before resizing touches fewer pixels than mirroring the output.
    crop = cv2.flip(crop, 1)
  return (cv2.resize(crop, (size, size), interpolation=interpolation),
          crop_box(box, window, *image.shape[:2], flip=flip))


def weak(image: np.ndarray, box, rng: np.random.Generator,
         size: int) -> tuple[np.ndarray, np.ndarray]:
  """Random resized crop + horizontal flip (p=0.5)."""
  window = sample_crop(rng, *image.shape[:2])
  return crop_flip_resize(image, box, window, bool(rng.random() < 0.5), size)


def eval_transform(image: np.ndarray, box, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Resize to size x size (nothing to do when stored at that size); normalised boxes keep."""
  if image.shape[:2] != (size, size):
    image = cv2.resize(image, (size, size), interpolation=INTERPOLATION)
  return image, _canonical(*(float(v) for v in box))


TRANSFORMS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {"weak": weak}
