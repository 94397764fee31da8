"""Pixel work of the builder: encoded bytes -> 8-bit image -> stored frame -> JPEG.

Decoding uses IMREAD_UNCHANGED so we see what a file really holds (grey, alpha, 16 bit)
and convert it ourselves; that flag also skips EXIF orientation, so we apply it by hand.
Grey images stay 1-channel (smaller JPEGs; readers decode with a colour flag).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import tempfile

import cv2
import numpy as np

# Padding outside the image and the background under transparent pixels: one value, so
# a model sees a single "no image here" colour. Black, because replicated borders smear
# skin texture into stripes that look like face.
PAD_VALUE = 0
CROPS = ("face", "none", "align")
# Five-point alignment template (ArcFace's, 112 px frame): the image's left eye, right eye,
# nose tip, left and right mouth corner. At --margin 1 the stored image is that frame; a
# larger margin zooms out about its centre, keeping more context.
TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                         [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(ValueError):
  """An input that cannot become a record; the message is the skip reason."""


# libjpeg reports data it had to guess ("Corrupt JPEG data: ...", "Premature end of JPEG
# file") only as a line on the process's stderr, naming no file, and decodes a smeared image.
CORRUPTION_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file")
_capture = None   # a scratch file for fd 2, one per process


def _decode_capturing_stderr(data: bytes):
  """cv2.imdecodeWithMetadata with fd 2 read around it: (its result, warnings it printed).
  Other lines pass on to the real stderr. Not thread-safe: build workers decode one image at
  a time per process."""
  global _capture
  if _capture is None:
    _capture = tempfile.TemporaryFile()
  _capture.seek(0)
  _capture.truncate()
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(_capture.fileno(), 2)
  try:
    out = cv2.imdecodeWithMetadata(np.frombuffer(data, np.uint8), flags=cv2.IMREAD_UNCHANGED)
  finally:
    os.dup2(saved, 2)
    os.close(saved)
  _capture.seek(0)
  lines = _capture.read().decode("utf-8", "replace").splitlines()
  warnings = [line for line in lines if line.startswith(CORRUPTION_WARNINGS)]
  others = [line for line in lines if line not in warnings]
  if others:
    sys.stderr.write("\n".join(others) + "\n")
  return out, warnings


def decode(data: bytes) -> np.ndarray:
  """Encoded file bytes -> uint8 HxW (grey) or HxWx3 (BGR), upright; ImageError if it cannot
  be decoded, or only by guessing (corrupt JPEG data)."""
  return decode_checked(data)[0]


def decode_checked(data: bytes, keep_corrupt: bool = False,
                   max_pixels: int | None = None) -> tuple[np.ndarray, str | None]:
  """`decode`, and libjpeg's corruption warnings (None for clean data); with `keep_corrupt`
  a corrupt image is returned with its warnings instead of raising. An image whose header
  claims more than `max_pixels` is refused before decoding (a 631-byte JPEG can claim
  40000x40000: gigabytes to decode); OpenCV's own failures become ImageError."""
  if not data:
    raise ImageError("empty file (0 bytes)")
  size = header_size(data)
  if max_pixels is not None and size is not None:
    check_pixels(*size, max_pixels, "its header says")
  try:
    (image, types, meta), warnings = _decode_capturing_stderr(data)
  except cv2.error as e:
    raise ImageError(f"not decodable: {one_line(e)}") from None
  except MemoryError:
    raise ImageError(f"not decodable: out of memory (header size {size or 'unknown'})") from None
  corrupt = "; ".join(dict.fromkeys(warnings)) or None
  if corrupt and not keep_corrupt:
    raise ImageError(f"corrupt JPEG data: libjpeg decoded it only by guessing ({corrupt}); "
                     "--keep-corrupt keeps such images, flagged in the manifest")
  if image is None or image.size == 0:
    raise ImageError("not a decodable image (corrupt, truncated, or not an image file)")
  orientation = 1
  for kind, blob in zip(types, meta):
    if kind == cv2.IMAGE_METADATA_EXIF:
      orientation = exif_orientation(np.asarray(blob).tobytes())
  return orient(to_uint8(image), orientation), corrupt


def check_pixels(width: int, height: int, max_pixels: int, said: str = "it is") -> None:
  """ImageError when width x height is over `max_pixels` (--max-pixels)."""
  if width * height > max_pixels:
    raise ImageError(f"too large: {said} {width}x{height} px ({width * height / 1e6:.0f} "
                     f"megapixels), over --max-pixels {max_pixels}")


def one_line(error: BaseException) -> str:
  """An exception as one line: its type and its words (OpenCV's span several lines)."""
  kind = type(error)
  name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
  return f"{name}: {' '.join(str(error).split())}"


# Images larger than this are skipped by default (data_prep build and predict), judged by
# their header before any decoding (a small file can claim 40000x40000 px): 100 megapixels
# decode to 300 MB.
DEFAULT_MAX_PIXELS = 100_000_000
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4, C8, CC are not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def header_size(data: bytes) -> tuple[int, int] | None:
  """(width, height) an image's header claims, read without decoding any pixel: a PNG's IHDR
  or a JPEG's start-of-frame, other formats through PIL's lazy open when it is installed;
  None when no header says (the decoder then judges the file)."""
  if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR" and len(data) >= 24:
    width, height = struct.unpack(">II", data[16:24])
    return width, height
  if data.startswith(b"\xff\xd8"):
    return _jpeg_size(data)
  return _pil_size(data)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
  """The first start-of-frame's (width, height), walking the marker segments before it."""
  i, n = 2, len(data)
  while i + 4 <= n and data[i] == 0xFF:
    marker = data[i + 1]
    if marker == 0xFF:                                 # fill byte
      i += 1
    elif marker == 0x01 or 0xD0 <= marker <= 0xD7:     # standalone: TEM, RSTn
      i += 2
    elif marker in (0xD9, 0xDA):                       # end of image, start of scan: no frame
      return None
    elif marker in _JPEG_SOF:
      if i + 9 > n:
        return None
      height, width = struct.unpack(">HH", data[i + 5:i + 9])
      return width, height
    else:
      i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
  return None


def _pil_size(data: bytes) -> tuple[int, int] | None:
  """PIL's header-only reading of the formats it knows (BMP, TIFF, WebP, GIF, ...)."""
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top   (optional; matplotlib's)
  except ImportError:
    return None
  # PIL refuses some big headers itself; lift that so --max-pixels decides, with the size.
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.size
  except Exception:  # pylint: disable=broad-except   (PIL cannot read it: OpenCV may)
    return None
  finally:
    Image.MAX_IMAGE_PIXELS = limit


def from_array(array: np.ndarray) -> np.ndarray:
  """An RGB(A)/grey array (as TFDS decodes images) -> the same form `decode` returns."""
  if array.ndim == 3 and array.shape[2] in (3, 4):
    array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
  return to_uint8(array)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """16 bit -> 8 bit (full range scaled), alpha composited over PAD_VALUE."""
  if image.dtype == np.uint16:
    image = np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise ImageError(f"unsupported pixel type {image.dtype} (want 8 or 16 bit)")
  if image.ndim == 3 and image.shape[2] == 1:
    image = image[:, :, 0]
  if image.ndim == 3 and image.shape[2] == 4:
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    image = np.round(image[:, :, :3] * alpha + PAD_VALUE * (1.0 - alpha)).astype(np.uint8)
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
    raise ImageError(f"unsupported channel layout {image.shape}")
  return np.ascontiguousarray(image)


def exif_orientation(exif: bytes) -> int:
  """The TIFF orientation tag (1..8) of an EXIF block; 1 when absent or unreadable."""
  if exif.startswith(b"Exif\0\0"):
    exif = exif[6:]
  if exif[:2] not in (b"II", b"MM"):
    return 1
  order = "<" if exif[:2] == b"II" else ">"
  try:
    (ifd,) = struct.unpack_from(order + "I", exif, 4)
    (count,) = struct.unpack_from(order + "H", exif, ifd)
    for k in range(count):
      tag, _, _, value = struct.unpack_from(order + "HHIH", exif, ifd + 2 + 12 * k)
      if tag == _EXIF_ORIENTATION_TAG:
        return value if 1 <= value <= 8 else 1
  except struct.error:
    pass
  return 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
  """Applies an EXIF orientation the way OpenCV's own reader does."""
  if orientation >= 5:
    image = cv2.transpose(image)
  flip = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}.get(orientation)
  return image if flip is None else cv2.flip(image, flip)


def frame(image: np.ndarray, box: tuple[float, float, float, float] | None, crop: str,
          margin: float, size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """The stored size x size image and the face box normalised to it.

  `box` is the face in pixels (x0, y0, x1, y1) or None (no face: the whole image is the box).
  crop "face": a square of side margin x the box's longer side, centred on the box, padded
  with PAD_VALUE past the borders (without a face: the image padded to a square).
  crop "none": the whole image resized to a square (for pre-aligned datasets).
  crop "align" is `align` (it needs landmarks).
  """
  h, w = image.shape[:2]
  face = (0.0, 0.0, float(w), float(h)) if box is None else box
  if crop == "none":
    x0, y0, x1, y1 = face
    return resize(image, size), _clip01((x0 / w, y0 / h, x1 / w, y1 / h))
  if crop != "face":
    raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
  side, left, top = square(face, 1.0 if box is None else margin)
  x0, y0, x1, y1 = face
  norm = ((x0 - left) / side, (y0 - top) / side, (x1 - left) / side, (y1 - top) / side)
  return resize(padded_crop(image, left, top, side), size), _clip01(norm)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking points `src`
  to `dst` (Umeyama's closed form: deterministic, unlike OpenCV's RANSAC estimators)."""
  mu_s, mu_d = src.mean(0), dst.mean(0)
  s, d = src - mu_s, dst - mu_d
  u, sig, vt = np.linalg.svd(d.T @ s / len(src))
  sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
  rot = u @ sign @ vt
  scale = np.trace(np.diag(sig) @ sign) / s.var(0).sum()
  return np.hstack([scale * rot, (mu_d - scale * rot @ mu_s)[:, None]])


def template(margin: float, size: int, points: int = 5) -> np.ndarray:
  """TEMPLATE_112 in a size x size image at `margin` (1 = ArcFace's 112 px framing); with
  4 points (BlazeFace's eyes, nose and mouth centre) the mouth corners become their mean."""
  t = TEMPLATE_112 if points == 5 else np.vstack([TEMPLATE_112[:3], TEMPLATE_112[3:].mean(0)])
  return ((t / 112.0 - 0.5) / margin + 0.5) * size


def align(image: np.ndarray, landmarks, box, margin: float,
          size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
  """The size x size image whose five landmarks sit on the template, and the face box in it
  (the dataset's box mapped through the warp and bounded; without one, the template's
  margin-1 frame). `landmarks`: 5 points, or BlazeFace's 4 (the mouth centre for the
  corners). Shrinks with INTER_AREA first when the warp would shrink by over 2x,
  so small faces in big photos do not alias."""
  src = np.asarray(landmarks, np.float64).reshape(-1, 2)
  if len(src) not in (4, 5):
    raise ValueError(f"align wants 5 landmarks (eyes, nose, mouth corners) or 4 (eyes, nose, "
                     f"mouth centre), got {len(src)}")
  m = similarity(src, template(margin, size, len(src)))
  scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
  if scale < 0.5:
    h, w = image.shape[:2]
    f = 2 * scale
    small = cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))),
                       interpolation=cv2.INTER_AREA)
    fx, fy = small.shape[1] / w, small.shape[0] / h
    src = src * (fx, fy)
    box = None if box is None else (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    image, m = small, similarity(src, template(margin, size, len(src)))
  out = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_VALUE,) * 4)
  if box is None:
    lo, hi = 0.5 - 0.5 / margin, 0.5 + 0.5 / margin
    return out, _clip01((lo, lo, hi, hi))
  corners = np.array([[box[0], box[1], 1], [box[2], box[1], 1], [box[0], box[3], 1],
                      [box[2], box[3], 1]]) @ m.T
  (x0, y0), (x1, y1) = corners.min(0) / size, corners.max(0) / size
  return out, _clip01((x0, y0, x1, y1))


def square(box: tuple[float, float, float, float], margin: float) -> tuple[int, int, int]:
  """(side, left, top) in whole pixels of the square crop around `box`."""
  x0, y0, x1, y1 = box
  side = max(1, int(round(margin * max(x1 - x0, y1 - y0))))
  return side, int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2))


def padded_crop(image: np.ndarray, left: int, top: int, side: int) -> np.ndarray:
  """The side x side window at (left, top), PAD_VALUE where it leaves the image."""
  h, w = image.shape[:2]
  y0, y1 = min(h, max(0, top)), max(0, min(h, top + side))
  x0, x1 = min(w, max(0, left)), max(0, min(w, left + side))
  if y1 <= y0 or x1 <= x0:
    return np.full((side, side) + image.shape[2:], PAD_VALUE, image.dtype)
  return cv2.copyMakeBorder(image[y0:y1, x0:x1], y0 - top, top + side - y1, x0 - left,
                            left + side - x1, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 4)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """To size x size: INTER_AREA when shrinking both sides (no aliasing), cubic otherwise."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  shrink = size <= h and size <= w
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  if not ok:
    raise ImageError(f"JPEG encoding failed for an image of shape {image.shape}")
  return buf.tobytes()


def _clip01(box) -> tuple[float, float, float, float]:
  return tuple(float(min(1.0, max(0.0, v))) for v in box)
