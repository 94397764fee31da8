"""Prediction throughput on the CPU: faces/s end to end (decode, detect, frame, classify), and
the two parts alone, for a trained classifier run.

Photos are built from the shared facial_expressions faces (or the demo sample): each a 480x300
scene holding two real faces at 1x and 2x, as `tests/test_predict.py` builds them, written as
JPEGs. Rows: detection per photo (the run's detector), classification per face (jitted,
fixed-size batches; --batch-size), and `predict.run` over the folder end to end (reading and
writing the CSV/JSON included).

  python -m benchmarks.predict_throughput [--model workdirs/demo/semisup] [--photos 200]
      [--batch-size 32] [--repeats 3] [--detector blazeface]

The default model is the demo's (`make demo` first).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import time

import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

from benchmarks import machine  # noqa: E402
from ssfer_jax import predict, results

FACES = [REPO.parent / "shared" / "datasets" / "facial_expressions" / "images",
         REPO / "data_prep" / "demo_data" / "images"]


def photos(out: pathlib.Path, count: int) -> list[str]:
  folder = next(f for f in FACES if f.is_dir())
  names = sorted(folder.iterdir())[:2 * count]
  paths = []
  for k in range(count):
    canvas = np.full((300, 480, 3), (90, 120, 140), np.uint8)
    x = 20
    for scale, name in ((1, names[2 * k]), (2, names[2 * k + 1])):
      face = cv2.imread(str(name))
      face = cv2.resize(face, None, fx=scale * 100 / max(face.shape[:2]),
                        fy=scale * 100 / max(face.shape[:2]), interpolation=cv2.INTER_CUBIC)
      canvas[40:40 + face.shape[0], x:x + face.shape[1]] = face
      x += face.shape[1] + 40
    path = str(out / f"photo_{k:04d}.jpg")
    cv2.imwrite(path, canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])
    paths.append(path)
  return paths


def best_of(repeats: int, fn) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default=str(REPO / "workdirs" / "demo" / "semisup"))
  ap.add_argument("--photos", type=int, default=200)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--detector", choices=("haar", "yunet", "blazeface"),
                  help="default: the model's build's")
  args = ap.parse_args()
  if not os.path.exists(os.path.join(args.model, results.RESULT_FILE)):
    sys.exit(f"{args.model} has no result.json: run `make demo` first, or pass --model RUN.")
  p = predict.Predictor(args.model, batch_size=args.batch_size, detector=args.detector)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    paths = photos(tmp, args.photos)
    decoded = [predict._read_image(q) for q in paths]  # pylint: disable=protected-access
    found = [f for image in decoded for f in p.detect(image)]
    crops = [c for _, c in found]
    p.classify(crops[:args.batch_size])   # compile
    t_detect = best_of(args.repeats, lambda: [p.detect(i) for i in decoded])
    t_classify = best_of(args.repeats, lambda: p.classify(crops))
    t_all = best_of(args.repeats, lambda: predict.run(p, [str(tmp)], str(tmp / "out")))
  n, f = len(paths), len(found)
  print(f"predict throughput, {machine.cpu_model()}, {os.cpu_count()} cores, "
        f"{datetime.date.today()}; model {args.model}: {p.describe()}")
  print(f"{n} photos of 480x300 px with 2 real faces each; {f} faces found; batch "
        f"{args.batch_size}; best of {args.repeats}")
  print(f"{'part':<34}{'seconds':>10}{'per photo ms':>14}{'faces/s':>10}")
  for name, t in ((f"detect + frame ({p.detector_name})", t_detect),
                  ("classify (jitted batches)", t_classify),
                  ("end to end (predict.run)", t_all)):
    print(f"{name:<34}{t:>10.2f}{1000 * t / n:>14.1f}{f / t:>10.0f}")


if __name__ == "__main__":
  main()
