"""data_prep at scale: a ~100k-record build of real faces with given boxes (no detection), and
its time per core extrapolated to the users' 1.2M faces.

The shared facial_expressions photos (11.3k) are listed --repeat times under distinct paths
(symlinks; each copy is read, decoded, cropped and encoded again) in one CSV whose box columns
give each face as the central 80% of its photo, then built with `--crop face --detector
dataset` at --size px over --workers processes: reading, decoding, cropping, resizing, JPEG
encoding, shard writing and the manifest, as a real build does them. Reports wall time,
images/s, CPU seconds per image (this process and its workers) and the linear extrapolation to
1.2M images on 1, 16 and 64 cores. Not in CI: it writes ~0.5 GB; check free disk first.

  python -m benchmarks.build_scale [--repeat 9] [--size 112] [--workers 2] [--dir /tmp/build_scale]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import resource
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

import cv2  # noqa: E402

from benchmarks import machine  # noqa: E402
from data_prep import build, readers  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets" / "facial_expressions"
USERS_SCALE = 1_200_000


def inputs(root: pathlib.Path, repeat: int) -> pathlib.Path:
  """ROOT/images/K/NAME symlinks and ROOT/faces.csv with each photo's central 80% as its box."""
  with open(SHARED / "legend.csv") as f:
    rows = {r["image"]: r["emotion"].lower() for r in csv.DictReader(f)}
  sizes = {}
  for name in sorted(rows):
    image = cv2.imread(str(SHARED / "images" / name), cv2.IMREAD_UNCHANGED)
    if image is not None:
      sizes[name] = image.shape[:2]
  table = root / "faces.csv"
  with open(table, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "emotion", "x0", "y0", "x1", "y1"])
    for k in range(repeat):
      folder = root / "images" / f"{k:02d}"
      folder.mkdir(parents=True)
      for name, (h, wd) in sizes.items():
        (folder / name).symlink_to(SHARED / "images" / name)
        w.writerow([f"{k:02d}/{name}", rows[name], 0.1 * wd, 0.1 * h, 0.9 * wd, 0.9 * h])
  return table


def cpu_seconds() -> float:
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--repeat", type=int, default=9)
  ap.add_argument("--size", type=int, default=112)
  ap.add_argument("--workers", type=int, default=os.cpu_count())
  ap.add_argument("--shards", type=int, default=64)
  ap.add_argument("--dir", default="/tmp/build_scale")
  args = ap.parse_args()
  root = pathlib.Path(args.dir)
  if root.exists():
    shutil.rmtree(root)
  free = shutil.disk_usage(root.parent).free / 2**30
  if free < 2:
    sys.exit(f"{root.parent} has {free:.1f} GiB free; this benchmark writes ~0.5 GiB.")
  root.mkdir(parents=True)
  try:
    table = inputs(root, args.repeat)
    source = readers.CsvSource("faces", str(table), root=str(root / "images"),
                               box_cols=("x0", "y0", "x1", "y1"))
    cfg = build.Config(size=args.size, crop="face", detector="dataset", num_shards=args.shards)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    manifest = build.build([source], str(root / "data"), cfg, workers=args.workers, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    written = manifest["num_records"]
    out_bytes = sum(p.stat().st_size for p in (root / "data").iterdir())
  finally:
    shutil.rmtree(root, ignore_errors=True)
  per_image = cpu / written
  print(f"data_prep build at scale, {machine.cpu_model()}, {os.cpu_count()} cores, "
        f"{datetime.date.today()}: {written:,} records ({len(manifest['skipped'])} skipped) "
        f"at {args.size} px, crop face, given boxes, {args.workers} workers, {args.shards} shards")
  print(f"{'wall s':>8}{'images/s':>10}{'CPU ms/image':>14}{'images/s per core':>19}"
        f"{'output MB':>11}")
  print(f"{wall:>8.1f}{written / wall:>10.0f}{1000 * per_image:>14.2f}{1 / per_image:>19.0f}"
        f"{out_bytes / 2**20:>11.0f}")
  print("1.2M images, extrapolated linearly from CPU time per image: "
        + ", ".join(f"{c} cores {USERS_SCALE * per_image / c:.0f} s" for c in (1, 16, 64))
        + " (reading the inputs from storage not included)")


if __name__ == "__main__":
  main()
