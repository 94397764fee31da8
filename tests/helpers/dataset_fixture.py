"""Writes small datasets in the `ssfer_jax.input.records` layout straight from real face images.

A stand-in for `python -m data_prep build` + `split` until that builder exists; tests and
`benchmarks/input_pipeline.py` call `write_dataset`, so swapping in the real builder is one
place. Images are centre-cropped to a square and resized to `size`; grey images stay grey.

Split lists are assigned round-robin by record order (by default, of every 10 records:
5 train_labeled, 2 train_unlabeled, 2 val, 1 test); train_unlabeled records carry label -1,
as unlabeled sources do. Boxes vary per record so tests can tell records apart by their box.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
from typing import Sequence

import cv2
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ssfer_jax.input import records

DEMO_DATA = pathlib.Path(__file__).resolve().parents[1] / "data_prep" / "demo_data"
SLOTS = ("train_labeled",) * 5 + ("train_unlabeled",) * 2 + ("val",) * 2 + ("test",)


def read_faces(images_dir=DEMO_DATA / "images", labels_csv=DEMO_DATA / "labels.csv",
               limit: int | None = None) -> list[tuple[pathlib.Path, str]]:
  """(image path, lower-cased label), one per image, sorted by name; `limit` spreads evenly."""
  labels = {}
  with open(labels_csv) as f:
    for row in csv.DictReader(f):
      labels.setdefault(row["image"], row["emotion"].strip().lower())
  faces = [(pathlib.Path(images_dir) / name, label) for name, label in sorted(labels.items())
           if (pathlib.Path(images_dir) / name).exists()]
  if limit is not None and limit < len(faces):
    faces = [faces[i] for i in np.linspace(0, len(faces) - 1, limit).astype(int)]
  return faces


def square_face(path, size: int) -> np.ndarray:
  image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
  h, w = image.shape[:2]
  s = min(h, w)
  image = image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
  return cv2.resize(image, (size, size),
                    interpolation=cv2.INTER_AREA if s > size else cv2.INTER_CUBIC)


def record_box(i: int) -> tuple[float, float, float, float]:
  m = 0.05 + 0.02 * (i % 8)
  return (m, 1.5 * m, 1.0 - m, 1.0 - 0.5 * m)


def write_dataset(out_dir, faces: list[tuple[pathlib.Path, str]], *, size: int,
                  num_shards: int = 3, quality: int = 90, slots: Sequence[str] = SLOTS) -> str:
  """Writes shards, ids.txt, manifest.json and splits/default.json; returns `out_dir`.

  Record i goes to list `slots[i % len(slots)]`.
  """
  out_dir = str(out_dir)
  os.makedirs(os.path.join(out_dir, records.SPLITS_DIR), exist_ok=True)
  classes = sorted({label for _, label in faces})
  ids = [f"demo/{path.name}" for path, _ in faces]
  lists = {name: [] for name in records.SPLIT_NAMES}
  bounds = np.linspace(0, len(faces), num_shards + 1).astype(int)
  for shard in range(num_shards):
    writer = ArrayRecordWriter(os.path.join(out_dir, records.shard_name(shard, num_shards)),
                               "group_size:1")
    for i in range(bounds[shard], bounds[shard + 1]):
      path, label = faces[i]
      split_list = slots[i % len(slots)]
      lists[split_list].append(ids[i])
      ok, jpeg = cv2.imencode(".jpg", square_face(path, size), [cv2.IMWRITE_JPEG_QUALITY, quality])
      assert ok, path
      writer.write(records.encode(records.Record(
          image=jpeg.tobytes(),
          label=records.UNLABELED if split_list == "train_unlabeled" else classes.index(label),
          box=record_box(i), id=ids[i], source="demo", face_found=True)))
    writer.close()
  with open(os.path.join(out_dir, records.IDS_FILE), "w") as f:
    f.write("\n".join(ids) + "\n")
  sha = hashlib.sha256("\n".join(ids + [str(size)]).encode()).hexdigest()
  manifest = {"schema_version": records.SCHEMA_VERSION, "num_shards": num_shards,
              "num_records": len(faces),
              "manifest_sha256": sha, "classes": classes, "image_size": size}
  with open(os.path.join(out_dir, records.MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  with open(os.path.join(out_dir, records.SPLITS_DIR, "default.json"), "w") as f:
    json.dump({"manifest_sha256": sha, "lists": lists}, f, indent=1)
  return out_dir
