"""Host-side image transforms (numpy + cv2, uint8) that carry the face box along.

Every geometric transform also maps the face box (normalised x0, y0, x1, y1 in the frame of
its input image) into the frame of the image the model sees, exactly: FaceMix computes the
IoU of the boxes of the images the model sees. A box with no area left (cropped away) is
always `EMPTY_BOX`, so its IoU with anything is 0.

The work is split with the device. The host decodes, writes the image into its batch row as
stored and draws the geometry: the random-resized-crop window and the flip, which it returns
with the box mapped through them. `device.crop_resize_flip` then resamples the window inside
the jitted step: the bilinear resize cost ~37 us an image on the host, 0.30 of the decode
ceiling the pipeline is held to (benchmarks/input_pipeline.py), and could get no cheaper
there; on an accelerator it is two small matmuls an image.

Transforms are looked up by name in `TRANSFORMS` and share one signature,
`fn(image, box, u, out) -> View`: they write the image straight into `out`, a uint8
[S, S, 3] row of the batch (no intermediate images to allocate and copy), and return its
`View`: the box, the crop window normalised to `out`'s frame, the flip. They take grey
[H, W] or RGB [H, W, 3] images alike: grey JPEGs stay one channel through any resize (a
third of the pixel work) and become RGB last, in the row. The semi-supervised batch's strong
view is a second `weak_view` of the same row plus RandAugment (`input/randaugment.py`), both
applied on the device, or on a CPU backend here (`crop_resize_flip`, `pipeline.strong_images`).

Randomness is counter-based: `uniforms(seed, positions, draws)` hashes (seed, global stream
position, draw number) into the `u` of every example of a batch in a few numpy calls. An
example's crop and flip then depend only on the seed and its stream position (not on the
process count, the batch or the thread that made it), and no generator is built per example
(`np.random.default_rng` alone costs ~8 us, a tenth of decoding the JPEG).

Interpolation: bilinear, both for the crop on the device and here, where only images stored
at another size than the batch's are resized (`cv2.resize` maps pixel centres, so normalised
boxes and windows carry over unchanged). The MAE reference uses bicubic; bilinear vs bicubic
was within noise for this project's quality purposes, and on the device bicubic would cost
the same (its weights are dense matrices either way).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Sequence

import cv2
import numpy as np

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10
CROP_DRAWS = 2 * CROP_TRIES + 2  # an area and a log-ratio a try, then the two offsets
INTERPOLATION = cv2.INTER_LINEAR
EMPTY_BOX = np.zeros(4, np.float32)

# Threads of the input pipeline already run one batch each; cv2's own thread pool on top of
# them only adds contention.
cv2.setNumThreads(1)


class Window(NamedTuple):
  """A crop window in pixels: rows y..y+h, columns x..x+w."""
  y: int
  x: int
  h: int
  w: int


class View(NamedTuple):
  """What a transform tells the device and FaceMix about the image it wrote: the box in the
  frame the model sees, the window to resample (normalised y0, x0, y1, x1 of the written
  image: the array axis order `device.crop_resize_flip` works in) and the flip."""
  box: np.ndarray
  crop: tuple[float, float, float, float]
  flip: bool


FULL_CROP = (0.0, 0.0, 1.0, 1.0)


class Transform(NamedTuple):
  """`fn(image, box, u, out) -> View` with `draws` uniforms in `u`, its only randomness;
  `view(height, width, box, u) -> View` draws the same geometry without writing an image (the
  semi-supervised batch's strong views), None for a transform without randomness."""
  fn: Callable[[np.ndarray, Sequence[float], Sequence[float], np.ndarray], View]
  draws: int
  view: Callable[[int, int, Sequence[float], Sequence[float]], View] | None = None


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
  """splitmix64's output function (uint64 arrays wrap on overflow, as it needs)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def uniforms(seed: int, positions, draws: int) -> np.ndarray:
  """float64 [len(positions), draws] in [0, 1): row p is a splitmix64 stream keyed by
  (seed, positions[p]), so each value depends on nothing else."""
  key = _mix(np.array([seed % 2**64], np.uint64) * _GOLDEN + _GOLDEN)
  stream = _mix(key ^ (np.asarray(positions, np.uint64)[:, None] + np.uint64(1)) * _GOLDEN)
  bits = _mix(stream + np.arange(1, draws + 1, dtype=np.uint64) * _GOLDEN)
  return (bits >> np.uint64(11)) * 2.0**-53


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
  stay [H, W], so the transforms touch a third of the pixels and expand them last.
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


def sample_crop(u: Sequence[float], height: int, width: int,
                scale: tuple[float, float] = SCALE,
                ratio: tuple[float, float] = RATIO) -> Window:
  """The torchvision/timm RandomResizedCrop window from the first `CROP_DRAWS` uniforms of `u`:
  10 tries, then a centre crop.

  Plain Python arithmetic: per image that is a few microseconds, where numpy calls on
  10-element arrays cost ~15.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for t in range(CROP_TRIES):
    target = area * (scale[0] + (scale[1] - scale[0]) * u[t])
    aspect = math.exp(log_lo + (log_hi - log_lo) * u[CROP_TRIES + t])
    w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      dy, dx = u[2 * CROP_TRIES:CROP_DRAWS]
      return Window(int(dy * (height - h + 1)), int(dx * (width - w + 1)), h, w)
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


def _write_rgb(image: np.ndarray, out: np.ndarray):
  """Writes `image` into `out` as RGB, resized to `out`'s size only where it differs."""
  if image.shape[:2] != out.shape[:2]:
    if image.ndim == 3:
      cv2.resize(image, out.shape[1::-1], dst=out, interpolation=INTERPOLATION)
      return
    image = cv2.resize(image, out.shape[1::-1], interpolation=INTERPOLATION)
  if image.ndim == 2:
    cv2.cvtColor(image, cv2.COLOR_GRAY2RGB, dst=out)
  else:
    np.copyto(out, image)


WEAK_DRAWS = CROP_DRAWS + 1


def center_window(height: int, width: int, center: float) -> Window:
  """The centred window of `center` x each side: the part of a stored image a model sees. A
  build frames faces with a margin around the detected box (`data_prep build --margin`); a
  model may look closer (`data.center_crop`) without rebuilding, and predict frames the same."""
  h, w = max(1, round(height * center)), max(1, round(width * center))
  return Window((height - h) // 2, (width - w) // 2, h, w)


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
  """`image` cut to its `center_window` (a view, no copy); itself at fraction 1."""
  if fraction >= 1.0:
    return image
  y, x, h, w = center_window(*image.shape[:2], fraction)
  return image[y:y + h, x:x + w]


def weak_view(height: int, width: int, box, u: Sequence[float],
              scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
              center: float = 1.0) -> View:
  """The geometry of a weak view of a [height, width] image from `WEAK_DRAWS` uniforms: a
  random resized crop window (`scale` of the area, aspect in `ratio`, anywhere inside the
  image's `center_window`) and a flip (p=0.5), the box mapped through both. Nothing is
  written: the semi-supervised batch draws a second view of an image already in its row."""
  region = center_window(height, width, center)
  y, x, h, w = sample_crop(u, region.h, region.w, scale, ratio)
  y, x = y + region.y, x + region.x
  window = Window(y, x, h, w)
  flip = u[CROP_DRAWS] < 0.5
  return View(crop_box(box, window, height, width, flip),
              (y / height, x / width, (y + h) / height, (x + w) / width), flip)


def crop_resize_flip(image: np.ndarray, crop: Sequence[float], flip: bool,
                     out: np.ndarray) -> None:
  """`device.crop_resize_flip` of one uint8 [H, W, 3] image on the host, into `out` [S, S, 3]:
  one bilinear `cv2.warpAffine`, the flip folded into its map, pixel centres at +0.5 and the
  edge pixel repeated beyond the image as on the device. For the semi-supervised strong view
  made on the host, whose windows (inside the image, resized to the image's size) only ever
  upsample, so the device's antialiasing would change nothing. cv2 rounds sample positions to
  1/32 pixel and outputs to integers: within a grey level or two of the device."""
  height, width = image.shape[:2]
  size = out.shape[0]
  y0, x0, y1, x1 = (float(v) for v in crop)
  sy, sx = (y1 - y0) * height / size, (x1 - x0) * width / size   # input pixels per output
  # Output column X (centre X + 0.5) samples input centre x0 W + (X + 0.5) sx, i.e. index
  # that - 0.5; mirrored, column size - 1 - X.
  column = (-sx, x0 * width + (size - 0.5) * sx - 0.5) if flip else (sx, x0 * width
                                                                     + 0.5 * sx - 0.5)
  matrix = np.float64([[column[0], 0.0, column[1]], [0.0, sy, y0 * height + 0.5 * sy - 0.5]])
  cv2.warpAffine(image, matrix, (size, size), dst=out,
                 flags=INTERPOLATION | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)


def weak(image: np.ndarray, box, u: Sequence[float], out: np.ndarray,
         scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
         center: float = 1.0) -> View:
  """Random resized crop + horizontal flip: the image is written whole, the window and flip
  are drawn for the device to apply (`weak_view`)."""
  _write_rgb(image, out)
  return weak_view(*image.shape[:2], box, u, scale, ratio, center)


def resize(image: np.ndarray, box, u: Sequence[float], out: np.ndarray,
           center: float = 1.0) -> View:
  """The eval view: the image's `center_window` (all of it by default) in `out`, resized when
  its size differs; the box mapped into it."""
  del u  # no randomness
  if center >= 1.0:
    _write_rgb(image, out)
    return View(_canonical(*(float(v) for v in box)), FULL_CROP, False)
  height, width = image.shape[:2]
  _write_rgb(center_crop(image, center), out)
  return View(crop_box(box, center_window(height, width, center), height, width), FULL_CROP,
              False)


TRANSFORMS: dict[str, Transform] = {
    "weak": Transform(weak, WEAK_DRAWS, weak_view),
    "eval": Transform(resize, 0),
}


def check_crop(scale: Sequence[float], ratio: Sequence[float]) -> None:
  """Raises ValueError naming the fault when a crop's area or aspect range cannot be sampled."""
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    raise ValueError(f"crop scale {tuple(scale)}: need (lo, hi) with 0 < lo <= hi <= 1, the "
                     "share of the image's area a random crop keeps.")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"crop ratio {tuple(ratio)}: need (lo, hi) with 0 < lo <= hi, the range "
                     "of the crop's width / height.")


def check_center(fraction: float) -> None:
  if not 0 < fraction <= 1:
    raise ValueError(f"center crop {fraction!r}: need a share of the stored side in (0, 1].")


def transform(name: str, scale: Sequence[float] = SCALE, ratio: Sequence[float] = RATIO,
              center: float = 1.0) -> Transform:
  """The `TRANSFORMS` entry `name` seeing the stored image's `center_window` of `center`;
  "weak" with its crop's area `scale` and aspect `ratio` (of that window)."""
  t = TRANSFORMS[name]
  check_center(center)
  kwargs = {} if center == 1.0 else {"center": float(center)}
  if t.view is not None and (tuple(scale), tuple(ratio)) != (SCALE, RATIO):
    check_crop(scale, ratio)
    kwargs.update(scale=tuple(map(float, scale)), ratio=tuple(map(float, ratio)))
  if not kwargs:
    return t
  return Transform(functools.partial(t.fn, **kwargs), t.draws,
                   t.view and functools.partial(t.view, **kwargs))
