"""Expressions of the faces in photos and videos: every face detected, framed as the model's
training images were, classified in jitted batches.

  python -m ssfer_jax.predict --model runs/ss INPUT... --out DIR [--annotate]
      [--detector haar|blazeface|yunet] [--every N] [--weights best|raw|ema] [--max-pixels N]

INPUT: image files, folders (searched recursively for images and videos, following symbolic
links; a folder reached twice, as by a link loop, is searched once and listed as skipped),
`.txt` files listing paths (one per line), video files (every Nth frame, `--every`). A file
named twice (by a folder and a list, say) is predicted once: inputs are told apart by their
real paths. `--model` is a classifier run (stage 2 or 3: its result.json), one checkpoint
RUN/checkpoints/STEP, or the one-command job's WORKDIR (its last finished classifier stage:
semisup, else finetune). Writes DIR/predictions.csv (one row per face: input, frame, face,
box in pixels, class, confidence, each class's probability; written as faces are classified),
DIR/predictions.json (the same, plus every input with no face and every unreadable one with
its reason; written even when the run stops early) and, with --annotate, DIR/annotated/.
An image whose header claims over --max-pixels pixels is skipped before it is decoded (a
631-byte JPEG can claim 40000x40000); a video that ends before the frame count its container
declares is listed with the frame where it ended.

How a face is framed follows the model's build (its result's preprocessing):
  crop face   a square of `margin` x the box's longer side around the detected box, as
              data_prep cut the training faces;
  crop align  the five landmarks (BlazeFace's or YuNet's) onto the template at the build's
              margin, as data_prep aligned them;
  crop none   the build stored whole, already cropped photos (e.g. the demo's). In them the
              face box spanned a median 1/F of the image side (F = `face_framing`, measured
              on the build when the model was trained): a wild photo's face is cut as a square
              of F x its box's longer side, so it fills the input as faces did in training.
The detector is the build's (haar, yunet, blazeface); a build with the dataset's own boxes
gets BlazeFace (it finds landmarks, which align needs), unless --detector says otherwise.

In Python: `Predictor("runs/ss").predict(image)` with a path or a BGR uint8 array.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import stat
import sys
import time
from typing import Any, Iterator, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from data_prep import faces, images
from ssfer_jax import errors, results
from ssfer_jax.input import augment, device
from ssfer_jax.runtime import logs, sharding
from ssfer_jax.trainers import loop


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
DEFAULT_MAX_PIXELS = images.DEFAULT_MAX_PIXELS
PROGRESS_EVERY_S = 10.0


class PredictError(errors.UserError, ValueError):
  """The model or the inputs cannot be used as given."""


@dataclasses.dataclass(frozen=True)
class Face:
  box: tuple[float, float, float, float]   # pixels in the input image, x0 y0 x1 y1
  label: str
  confidence: float
  probabilities: dict[str, float]


class Predictor:
  """A classifier run's weights with its framing and a detector; `predict` per image."""

  def __init__(self, model: str, *, weights: str = "best", detector: str | None = None,
               yunet_model: str | None = None, batch_size: int = 32):
    check_positive(batch_size=batch_size)
    try:
      self.run = results.classifier_run(model)
      self.classifier = results.load_classifier(self.run, weights=weights,
                                                mesh=sharding.single_device_mesh())
    except errors.InitError as e:
      raise PredictError(f"--model {model}: {e}") from None
    pre = self.classifier.preprocessing
    self.classes = list(self.classifier.classes)
    self.crop, self.margin = pre.get("crop") or "none", pre.get("margin") or 1.0
    self.stored_size, self.image_size = pre["stored_size"], pre["image_size"]
    self.center_crop = pre.get("center_crop", 1.0)
    self.framing = pre.get("face_framing")
    if self.crop == "none" and self.framing is None:
      logging.warning("%s: its build recorded no face framing (no face boxes, or a result from "
                      "before it was measured): faces are cut at their detected box (1.0).", model)
    self.framing = self.framing or 1.0
    self.detector_name = detector or (pre.get("detector") if pre.get("detector") in
                                      ("haar", "yunet", "blazeface") else "blazeface")
    if self.crop == "align" and self.detector_name == "haar":
      raise PredictError("the model was trained on landmark-aligned faces (crop align); the Haar "
                         "detector finds no landmarks: use --detector blazeface or yunet.")
    try:
      self._detector = faces.make(self.detector_name, yunet_model)
    except (FileNotFoundError, RuntimeError) as e:
      raise PredictError(str(e)) from None
    self.batch_size = batch_size
    apply, mean, std = self.classifier.apply, pre["mean"], pre["std"]
    self._probs = jax.jit(lambda p, x: jax.nn.softmax(
        apply(p, device.normalize(x, mean, std, jnp.float32)).astype(jnp.float32), axis=-1))

  def describe(self) -> str:
    how = {"face": f"square crop, margin {self.margin}",
           "align": f"aligned on 5 landmarks, margin {self.margin}",
           "none": f"square crop of {self.framing:.2f} x the face box (the build's framing)"}
    return (f"{self.run}: {len(self.classes)} classes {self.classes}; "
            f"faces by {self.detector_name}, "
            f"{how.get(self.crop, self.crop)}, {self.stored_size} px"
            + (f" (its centre {self.center_crop:g})" if self.center_crop < 1 else "")
            + f" -> {self.image_size} px; "
            f"weights {self.classifier.weights} of step {self.classifier.step}")

  def detect(self, image: np.ndarray) -> list[tuple[tuple, np.ndarray]]:
    """(box in pixels, the model's uint8 RGB input) for each face, largest first."""
    out = []
    for box, landmarks in self._detector.detect_all(image):
      if self.crop == "align":
        stored, _ = images.align(image, landmarks, box, self.margin, self.stored_size)
      elif self.crop == "face":
        stored, _ = images.frame(image, box, "face", self.margin, self.stored_size)
      else:
        stored, _ = images.frame(image, box, "face", self.framing, self.stored_size)
      stored = augment.center_crop(stored, self.center_crop)   # the model's closer look
      rgb = cv2.cvtColor(stored, cv2.COLOR_GRAY2RGB if stored.ndim == 2 else cv2.COLOR_BGR2RGB)
      if rgb.shape[0] != self.image_size:
        rgb = cv2.resize(rgb, (self.image_size, self.image_size),
                         interpolation=augment.INTERPOLATION)
      out.append((tuple(float(v) for v in box), rgb))
    return out

  def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
    """Class probabilities [N, C] of model inputs, in fixed-size batches (one compilation)."""
    out = []
    for i in range(0, len(crops), self.batch_size):
      chunk = np.stack(crops[i:i + self.batch_size])
      padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._probs(self.classifier.params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

  def _faces(self, boxes, probs) -> list[Face]:
    return [Face(box, self.classes[int(p.argmax())], float(p.max()),
                 {c: float(v) for c, v in zip(self.classes, p)}) for box, p in zip(boxes, probs)]

  def predict(self, image: str | np.ndarray) -> list[Face]:
    """Every face of one image (a path, or a BGR / grey uint8 array), largest first."""
    if isinstance(image, str):
      image = _read_image(image)
    found = self.detect(image)
    return self._faces([b for b, _ in found], self.classify([c for _, c in found]))

  def _detect_or_why(self, image: np.ndarray) -> list[tuple[tuple, np.ndarray]] | str:
    try:
      return self.detect(image)
    except cv2.error as e:   # one odd image must not end a run over thousands
      return f"face detection failed ({images.one_line(e)})"

  def predict_many(self, frames: Iterator[tuple[dict, np.ndarray | str]]
                   ) -> Iterator[tuple[dict, Any]]:
    """(where, image or error text) -> (where, [Face] or the error), faces of many images
    classified together in full batches."""
    pending, crops = [], []

    def flush():
      probs = self.classify(crops)
      k = 0
      for where, found in pending:
        if isinstance(found, str):
          yield where, found
          continue
        yield where, self._faces([b for b, _ in found], probs[k:k + len(found)])
        k += len(found)
      pending.clear()
      crops.clear()

    for where, image in frames:
      found = image if isinstance(image, str) else self._detect_or_why(image)
      pending.append((where, found))
      if not isinstance(found, str):
        crops.extend(c for _, c in found)
      if len(crops) >= self.batch_size:
        yield from flush()
    yield from flush()


def check_positive(**options: int) -> None:
  """PredictError naming the first option (as --batch-size etc.) that is below 1."""
  for name, value in options.items():
    if value < 1:
      raise PredictError(f"--{name.replace('_', '-')} {value}: must be 1 or more.")


def _not_regular(path: str) -> str | None:
  """Why `path` cannot be read as a file, or None. A FIFO named like an image would block the
  read forever, so only regular files are opened."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return ("a symbolic link to a missing file" if os.path.islink(path) else
            f"cannot read ({e.strerror})")
  if not stat.S_ISREG(mode):
    return ("not a regular file (a FIFO, device or socket named like an image or video); only "
            "regular files are read")
  return None


def _decode_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | str:
  """The image at `path` (BGR or grey uint8), or why it cannot be read: a file that is not a
  regular one, a header over `max_pixels`, or any error of the decoder."""
  why = _not_regular(path)
  if why:
    return why
  try:
    with open(path, "rb") as f:
      return images.decode_checked(f.read(), max_pixels=max_pixels)[0]
  except OSError as e:
    return f"cannot read ({e.strerror})"
  except images.ImageError as e:   # the header over max_pixels, the decoder's own failures
    return str(e)


def _read_image(path: str) -> np.ndarray:
  image = _decode_file(path)
  if isinstance(image, str):
    raise PredictError(f"{path}: {image}")
  return image


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[dict]]:
  """The image and video files named by `inputs` (folders searched, following links; .txt
  lists read), and the inputs that are none of these, each with its reason."""
  files, problems = [], []
  for item in inputs:
    if os.path.isdir(item):
      _search(item, files, problems)
    elif item.lower().endswith(".txt") and os.path.isfile(item):
      with open(item) as f:
        listed = [line.strip() for line in f if line.strip() and not line.startswith("#")]
      base = os.path.dirname(os.path.abspath(item))
      sub, bad = expand_inputs([p if os.path.isabs(p) else os.path.join(base, p) for p in listed])
      files += sub
      problems += bad
    elif os.path.lexists(item):   # a FIFO or a broken link: frames() says why it is not read
      files.append(item)
    else:
      problems.append({"input": item, "frame": None, "problem": "no such file or folder"})
  return files, problems


def _search(folder: str, files: list[str], problems: list[dict]) -> None:
  """Adds the images and videos under `folder`, following symbolic links; each folder is
  searched once by its real path, so a link loop ends (listed as skipped)."""
  first_seen = {os.path.realpath(folder): folder}
  skip = lambda path, why: problems.append({"input": path, "frame": None, "problem": why})
  unlisted = lambda e: skip(e.filename, f"cannot list ({e.strerror})")
  for root, dirs, names in os.walk(folder, followlinks=True, onerror=unlisted):
    for d in sorted(dirs):
      path = os.path.join(root, d)
      real = os.path.realpath(path)
      if real in first_seen:
        dirs.remove(d)
        skip(path, f"skipped: the same folder as {first_seen[real]}, searched there (a symbolic "
                   "link loop or a second link to it)")
      else:
        first_seen[real] = path
    dirs.sort()
    for n in sorted(names):
      if n.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS):
        files.append(os.path.join(root, n))
      else:
        skip(os.path.join(root, n), "skipped: not an image or video file by its extension ("
             + ", ".join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS) + ")")


def unique_files(files: Sequence[str]) -> tuple[list[str], int]:
  """`files` without those whose real path came earlier, and how many were dropped."""
  seen, out = set(), []
  for path in files:
    real = os.path.realpath(path)
    if real not in seen:
      seen.add(real)
      out.append(path)
  return out, len(files) - len(out)


def frames(files: Sequence[str], every: int,
           max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[tuple[dict, np.ndarray | str]]:
  """(where, BGR image) per image and per `every`-th video frame; (where, reason) when a file
  cannot be read, and (where its frames ended, reason) when a video ends before the frame
  count its container declares."""
  for path in files:
    if path.lower().endswith(VIDEO_EXTENSIONS):
      yield from _video_frames(path, every)
    else:
      yield {"input": path, "frame": None}, _decode_file(path, max_pixels)


def _video_frames(path: str, every: int) -> Iterator[tuple[dict, np.ndarray | str]]:
  why = _not_regular(path)
  if why:
    yield {"input": path, "frame": None}, why
    return
  video = cv2.VideoCapture(path)
  if not video.isOpened():
    yield {"input": path, "frame": None}, "cannot open as a video (codec or file damaged)"
    return
  declared = int(video.get(cv2.CAP_PROP_FRAME_COUNT))   # 0 or less when the container has none
  index, read = 0, 0
  while True:
    ok, image = video.read()
    if not ok:
      break
    if index % every == 0:
      read += 1
      yield {"input": path, "frame": index}, image
    index += 1
  video.release()
  if read == 0:
    yield {"input": path, "frame": None}, "no frame could be decoded"
  elif index < declared:
    why = (f"the video ended after {index} of the {declared} frames its container declares "
           f"(truncated or damaged): frames {index}-{declared - 1} were not predicted")
    logging.warning("%s: %s", path, why)
    yield {"input": path, "frame": index}, why


def annotate(image: np.ndarray, found: Sequence[Face]) -> np.ndarray:
  out = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR) if image.ndim == 2 else image.copy()
  thick = max(1, round(max(out.shape[:2]) / 300))
  for f in found:
    x0, y0, x1, y1 = (int(round(v)) for v in f.box)
    cv2.rectangle(out, (x0, y0), (x1, y1), (0, 220, 0), thick)
    cv2.putText(out, f"{f.label} {f.confidence:.2f}", (x0, max(12, y0 - 4)),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 220, 0), thick, cv2.LINE_AA)
  return out


class _Progress:
  """A log line every `every_s` seconds: the file reached of all, images (and video frames)
  per second, and the time left at the files' rate so far (the training loop's style)."""

  def __init__(self, total: int, every_s: float):
    self.total, self.every_s = total, every_s
    self.t0 = self.last = time.perf_counter()

  def update(self, files: int, images: int) -> None:
    now = time.perf_counter()
    if now - self.last < self.every_s or not files:
      return
    self.last, elapsed = now, now - self.t0
    logging.info("predict: file %d/%d (%.0f%%), %.1f images/s, ETA %s", files, self.total,
                 100 * files / self.total, images / elapsed,
                 loop.duration(elapsed / files * (self.total - files)))


def _write_annotated(path: str, image: np.ndarray, found: Sequence[Face]) -> str | None:
  """Why the annotated image could not be written to `path`, or None."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if cv2.imwrite(path, annotate(image, found)):
      return None
    return f"OpenCV could not write {path}"
  except (OSError, cv2.error) as e:
    return images.one_line(e)


def run(predictor: Predictor, inputs: Sequence[str], out_dir: str, *, every: int = 1,
        annotate_images: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
        progress_every_s: float = PROGRESS_EVERY_S) -> dict:
  """Predicts over `inputs`: predictions.csv gets each image's faces as they are classified
  (before its annotated image is drawn, whose failure is listed), predictions.json the summary
  at the end, also when the run stops early ("complete": false). Returns the summary."""
  check_positive(every=every, max_pixels=max_pixels)
  os.makedirs(out_dir, exist_ok=True)
  files, problems = expand_inputs(inputs)
  files, duplicates = unique_files(files)
  if duplicates:
    logging.info("inputs naming a file listed before (the same real path) dropped: %d; each "
                 "file is predicted once", duplicates)
  rows, no_face, not_annotated, images_seen, t0 = [], [], [], 0, time.perf_counter()
  annotated_dir = os.path.join(out_dir, "annotated")
  kept = {}
  progress = _Progress(len(files), progress_every_s)
  files_reached, last_input, complete = 0, None, False

  def remembered():   # the images themselves, only while annotating
    for where, image in frames(files, every, max_pixels):
      if annotate_images and not isinstance(image, str):
        kept[(where["input"], where["frame"])] = image
      yield where, image

  with open(os.path.join(out_dir, "predictions.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["input", "frame", "face", "x0", "y0", "x1", "y1", "label", "confidence",
                *predictor.classes])
    try:
      for where, found in predictor.predict_many(remembered()):
        if where["input"] != last_input:
          files_reached, last_input = files_reached + 1, where["input"]
        if isinstance(found, str):
          problems.append({"input": where["input"], "frame": where["frame"], "problem": found})
        else:
          images_seen += 1
          if not found:
            no_face.append(where)
          for k, face in enumerate(found):
            r = {**where, "face": k, "box": [round(v, 1) for v in face.box],
                 "label": face.label, "confidence": face.confidence,
                 "probabilities": face.probabilities}
            rows.append(r)
            w.writerow([r["input"], "" if r["frame"] is None else r["frame"], r["face"],
                        *r["box"], r["label"], f"{r['confidence']:.4f}",
                        *(f"{r['probabilities'][c]:.4f}" for c in predictor.classes)])
          f.flush()
          if annotate_images:   # numbered in input order: names never collide
            image = kept.pop((where["input"], where["frame"]))
            stem = f"{images_seen:06d}_{os.path.splitext(os.path.basename(where['input']))[0]}"
            name = f"{stem}.jpg" if where["frame"] is None else f"{stem}_f{where['frame']:06d}.jpg"
            why = _write_annotated(os.path.join(annotated_dir, name), image, found)
            if why:
              not_annotated.append({**where, "problem": why})
        progress.update(files_reached, images_seen)
      complete = True
    finally:
      seconds = time.perf_counter() - t0
      summary = {"model": predictor.describe(), "classes": predictor.classes,
                 "images": images_seen, "faces": len(rows), "no_face": no_face,
                 "unreadable": problems, "duplicates": duplicates, "not_annotated": not_annotated,
                 "complete": complete, "seconds": seconds,
                 "faces_per_s": len(rows) / seconds if seconds else None}
      with open(os.path.join(out_dir, "predictions.json"), "w") as j:
        json.dump({**summary, "predictions": rows}, j, indent=2)
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("inputs", nargs="+", help="images, folders, .txt lists, videos")
  ap.add_argument("--model", required=True,
                  help="a stage-2/3 run, RUN/checkpoints/STEP, or a job's WORKDIR")
  ap.add_argument("--out", required=True, help="where predictions go")
  ap.add_argument("--weights", choices=("best", "raw", "ema"), default="best")
  ap.add_argument("--detector", choices=("haar", "yunet", "blazeface"),
                  help="default: the model's build's (blazeface for dataset boxes)")
  ap.add_argument("--yunet-model", help="YuNet's ONNX file, for --detector yunet")
  ap.add_argument("--every", type=int, default=1, help="every Nth video frame (default 1)")
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                  help="skip images whose header claims more pixels (default %(default)s)")
  ap.add_argument("--annotate", action="store_true", help="also write annotated images")
  args = ap.parse_args(argv)
  logs.setup(args.out, "predict_log.txt")
  try:
    check_positive(batch_size=args.batch_size, every=args.every, max_pixels=args.max_pixels)
    predictor = Predictor(args.model, weights=args.weights, detector=args.detector,
                          yunet_model=args.yunet_model, batch_size=args.batch_size)
    print(predictor.describe(), file=sys.stderr)
    summary = run(predictor, args.inputs, args.out, every=args.every,
                  annotate_images=args.annotate, max_pixels=args.max_pixels)
  except errors.UserError as e:
    return errors.report(e)
  print(f"{summary['faces']} faces in {summary['images']} images/frames "
        f"({summary['faces_per_s'] or 0:.1f} faces/s); {len(summary['no_face'])} without a face; "
        f"{len(summary['unreadable'])} unreadable"
        + (f"; {summary['duplicates']} named again (the same real path), predicted once"
           if summary["duplicates"] else ""))
  for p in summary["unreadable"]:
    print(f"  unreadable: {p['input']}: {p['problem']}", file=sys.stderr)
  for p in summary["not_annotated"]:
    print(f"  not annotated: {p['input']}: {p['problem']}", file=sys.stderr)
  print(f"written: {os.path.join(args.out, 'predictions.csv')}, predictions.json"
        + (", annotated/" if args.annotate else ""))
  return 0 if summary["images"] or not summary["unreadable"] else 2


if __name__ == "__main__":
  logging.getLogger().setLevel(logging.INFO)
  sys.exit(main())
