"""data_prep throughput per benchmark reader, without detection, as images/s per core.

Writes --images real faces (the shared facial_expressions photos) in each dataset's own
on-disk format (RAF-DB aligned and original, FERPlus's CSVs, AffectNet's CSV + folders, a
labels=identity folder tree), then times `data_prep.build` of each with one worker process
(in-process: listing, reading, decoding, cropping or aligning, resizing, JPEG encoding and
writing the shard). "per core" is images per CPU second of this process; the goal of the
datasets issue is >= 500 at 112 px for readers without detection. Rows:

  rafdb aligned    --crop none of the 100 px aligned JPEGs
  rafdb original   --crop align on the dataset's five landmarks (original photos)
  ferplus          48x48 pixels parsed from the CSV, --crop none
  affectnet face   --crop face around the CSV's box (--detector dataset)
  affectnet align  --crop align on the CSV's 68 landmarks reduced to five
  identity folders labels=identity, --crop none
  folders+blazeface  the same with --crop align --detector blazeface (detection included:
                   the keypoint detector's cost, not a reader's)

  python -m benchmarks.data_prep_readers [--images 600] [--size 112] [--repeats 3]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import pathlib
import statistics
import tempfile
import time

import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

from data_prep import build, readers  # noqa: E402
from tests.helpers import paper_datasets  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets" / "facial_expressions" / "images"


def faces(n: int) -> list[np.ndarray]:
  folder = SHARED if SHARED.is_dir() else REPO / "data_prep" / "demo_data" / "images"
  files = sorted(os.listdir(folder))
  picks = [files[i] for i in np.linspace(0, len(files) - 1, n).astype(int)]
  return [cv2.imread(str(folder / f), cv2.IMREAD_COLOR) for f in picks]


def write_all(root: pathlib.Path, imgs: list[np.ndarray]) -> dict[str, tuple[list, build.Config]]:
  """Each format at scale; returns row name -> (sources, build options)."""
  raf = root / "rafdb"
  for d in ("EmoLabel", "Image/aligned", "Image/original", "Annotation/boxes", "Annotation/manual"):
    (raf / d).mkdir(parents=True, exist_ok=True)
  fer = root / "ferplus"
  fer.mkdir()
  aff = root / "affectnet"
  casia = root / "casia"
  lines, pixel_rows, vote_rows, aff_rows = [], [], [], []
  for i, face in enumerate(imgs):
    h, w = face.shape[:2]
    stem = f"train_{i + 1:05d}"
    lines.append(f"{stem}.jpg {1 + i % 7}")
    cv2.imwrite(str(raf / "Image/original" / f"{stem}.jpg"), face)
    cv2.imwrite(str(raf / "Image/aligned" / f"{stem}_aligned.jpg"),
                cv2.resize(face, (100, 100), interpolation=cv2.INTER_AREA))
    (raf / "Annotation/boxes" / f"{stem}_boundingbox.txt").write_text(
        f"{0.1 * w} {0.1 * h} {0.9 * w} {0.9 * h}\n")
    (raf / "Annotation/manual" / f"{stem}_manu_attri.txt").write_text(
        "".join(f"{x}\t{y}\n" for x, y in paper_datasets.face_landmarks(face)) + "1\n0\n2\n")
    grey = cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48), interpolation=cv2.INTER_AREA)
    pixel_rows.append([0, " ".join(map(str, grey.ravel().tolist())), "Training"])
    votes = [0] * 10
    votes[i % 8] = 10
    vote_rows.append(["Training", f"fer{i:07d}.png"] + votes)
    rel = f"{i % 50}/img{i:05d}.jpg"
    (aff / "Manually_Annotated_Images" / str(i % 50)).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(aff / "Manually_Annotated_Images" / rel), face)
    marks = ";".join(f"{v:.2f}" for v in paper_datasets.landmarks_68(face).ravel())
    aff_rows.append([rel, int(0.1 * w), int(0.1 * h), int(0.8 * w), int(0.8 * h), marks, i % 8,
                     0, 0])
    (casia / f"{i % 40:07d}").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(casia / f"{i % 40:07d}" / f"{i:03d}.jpg"), face)
  (raf / "EmoLabel/list_patition_label.txt").write_text("\n".join(lines) + "\n")
  with open(fer / "fer2013.csv", "w", newline="") as f:
    csv.writer(f).writerows([["emotion", "pixels", "Usage"]] + pixel_rows)
  with open(fer / "fer2013new.csv", "w", newline="") as f:
    csv.writer(f).writerows([paper_datasets.FERPLUS_HEADER] + vote_rows)
  with open(aff / "training.csv", "w", newline="") as f:
    csv.writer(f).writerows([paper_datasets.AFFECTNET_HEADER] + aff_rows)
  with open(aff / "validation.csv", "w", newline="") as f:
    csv.writer(f).writerows([paper_datasets.AFFECTNET_HEADER] + aff_rows[:1])
  p = lambda *tokens: readers.parse([str(t) for t in tokens])  # noqa: E731
  return {
      "rafdb aligned": ([p("rafdb", raf)], dict(crop="none", detector="none")),
      "rafdb original": ([p("rafdb", raf, "images=original")],
                         dict(crop="align", detector="dataset")),
      "ferplus": ([p("ferplus", fer)], dict(crop="none", detector="none")),
      "affectnet face": ([p("affectnet", aff)], dict(crop="face", detector="dataset")),
      "affectnet align": ([p("affectnet", aff)], dict(crop="align", detector="dataset")),
      "identity folders": ([p("folder", casia, "labels=identity")],
                           dict(crop="none", detector="none")),
      "folders+blazeface": ([p("folder", casia, "labels=identity")],
                            dict(crop="align", detector="blazeface")),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=600)
  ap.add_argument("--size", type=int, default=112)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    rows = write_all(root, faces(args.images))
    print(f"data_prep readers, {args.images} real faces, {args.size} px, 1 worker, "
          f"median of {args.repeats}; {datetime.date.today()}, {os.cpu_count()} CPUs")
    print(f"{'reader':18s} {'records':>8s} {'images/s':>9s} {'per core':>9s}")
    for name, (srcs, opts) in rows.items():
      walls, cpus, n = [], [], 0
      for k in range(args.repeats):
        out = root / f"out-{name.replace(' ', '_')}-{k}"
        t0, c0 = time.perf_counter(), time.process_time()
        manifest = build.build(srcs, str(out), build.Config(size=args.size, **opts), workers=1,
                               progress=False)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        n = manifest["num_records"]
      read = sum(s["read"] for s in manifest["sources"].values())
      print(f"{name:18s} {n:8d} {read / statistics.median(walls):9.0f} "
            f"{read / statistics.median(cpus):9.0f}")


if __name__ == "__main__":
  main()
