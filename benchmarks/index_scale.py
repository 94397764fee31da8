"""The dataset index at the users' scale: split time, pipeline start-up and host memory.

Synthesises a build of N records (default 1.2M) whose records are real schema-2 records with
a 1-pixel JPEG (the index, not the pixels, is what is measured): shards, ids.txt and a
manifest with every per-record field a real build has (inputs_sha256, partitions). Then
times, each in a fresh process so caches and memory are its own:

  split     `data_prep split` (reads every record's label, assigns, writes the file)
  startup   what a training process does before its first batch: manifest, ids.txt, the
            split's lists -> indices, and the train iterator built (`make_train_iterator`)
  first     the first batch drawn after start-up

and reports each at N/4, N/2 and N (so growth worse than linear shows), with the peak RSS of
the start-up process. The goal of the performance issue: start-up under 10 s at 1.2M.
Not in CI (it writes ~0.3 GB per size); check free disk first.

  python -m benchmarks.index_scale [--records 1200000] [--dir /tmp/index_scale]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402

from data_prep import build  # noqa: E402
from ssfer_jax.input import records  # noqa: E402

CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger"]


def synthesise(out: str, n: int, shards: int = 64) -> None:
  """A build of `n` tiny records: 90% labeled over 7 classes, a dataset test partition of
  3%, ids like a face-recognition collection's (identity folders)."""
  os.makedirs(out)
  jpeg = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))[1].tobytes()
  rng = np.random.default_rng(0)
  labels = np.where(rng.random(n) < 0.9, rng.integers(0, 7, n), -1)
  ids = [f"faces/{i // 40:07d}/{i:09d}.jpg" for i in range(n)]
  manifest_shards, counts = [], {c: 0 for c in CLASSES + [build.UNLABELED_KEY]}
  for s in range(shards):
    lo, hi = build.shard_bounds(n, shards, s)
    name = records.shard_name(s, shards)
    w = ArrayRecordWriter(os.path.join(out, name), build.WRITER_OPTIONS)
    for i in range(lo, hi):
      w.write(records.encode(records.Record(jpeg, int(labels[i]), (0.1, 0.1, 0.9, 0.9), ids[i],
                                            "faces", True, ids[i].split("/")[1])))
      counts[CLASSES[labels[i]] if labels[i] >= 0 else build.UNLABELED_KEY] += 1
    w.close()
    manifest_shards.append({"file": name, "num_records": hi - lo, "sha256": ""})
  text = "".join(i + "\n" for i in ids)
  with open(os.path.join(out, records.IDS_FILE), "w") as f:
    f.write(text)
  test = [ids[i] for i in np.flatnonzero((rng.random(n) < 0.03) & (labels >= 0))]
  manifest = {
      "schema_version": records.SCHEMA_VERSION, "classes": CLASSES, "image_size": 8,
      "num_shards": shards, "num_records": n, "shards": manifest_shards, "counts": counts,
      "ids_sha256": hashlib.sha256(text.encode()).hexdigest(), "skipped": [], "flagged": [],
      "sources": {"faces": {"kind": "folder"}}, "partitions": {"test": test},
      "inputs_sha256": {i: hashlib.sha256(i.encode()).hexdigest() for i in ids}}
  manifest["manifest_sha256"] = records.manifest_digest(manifest)
  with open(os.path.join(out, records.MANIFEST), "w") as f:
    json.dump(manifest, f)


STARTUP = """
import resource, sys, time
t0 = time.perf_counter()
from ssfer_jax.input import pipeline, records
t1 = time.perf_counter()
it = pipeline.make_train_iterator(sys.argv[1], "p10", ["train_labeled", "train_unlabeled"],
                                  kind="unlabeled", global_batch_size=256, image_size=8,
                                  seed=0, process_index=0, process_count=1, num_threads=2)
t2 = time.perf_counter()
next(it)
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
"""


def timed(cmd: list[str]) -> tuple[float, str]:
  t = time.perf_counter()
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
  return time.perf_counter() - t, out.stdout


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--records", type=int, default=1_200_000)
  ap.add_argument("--dir", default="/tmp/index_scale")
  args = ap.parse_args()
  free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or ".").free
  if free < 3e9:
    sys.exit(f"{free / 1e9:.1f} GB free at {args.dir}; want 3 GB")
  rows = []
  for n in (args.records // 4, args.records // 2, args.records):
    data = os.path.join(args.dir, f"n{n}")
    shutil.rmtree(data, ignore_errors=True)
    t = time.perf_counter()
    synthesise(data, n)
    made = time.perf_counter() - t
    split_s, _ = timed([sys.executable, "-m", "data_prep", "split", "--data", data, "--name",
                        "p10", "--labeled-fraction", "0.1"])
    _, out = timed([sys.executable, "-c", STARTUP, data])
    imports, startup, first, rss = (float(v) for v in out.split())
    rows.append((n, made, split_s, imports, startup, first, rss))
    print(f"{n}: synthesised in {made:.0f} s, split {split_s:.1f} s, start-up {startup:.2f} s "
          f"(+ imports {imports:.1f} s), first batch {first:.2f} s, peak RSS {rss:.2f} GB",
          flush=True)
    shutil.rmtree(data)
  print(f"\nindex at scale; {datetime.date.today()}, {os.cpu_count()} CPUs")
  print(f"{'records':>9s} {'split s':>8s} {'start-up s':>10s} {'first batch s':>13s} "
        f"{'peak RSS GB':>11s} {'split us/rec':>12s} {'start-up us/rec':>15s}")
  for n, _, split_s, _, startup, first, rss in rows:
    print(f"{n:9d} {split_s:8.1f} {startup:10.2f} {first:13.2f} {rss:11.2f} "
          f"{1e6 * split_s / n:12.2f} {1e6 * startup / n:15.2f}")


if __name__ == "__main__":
  main()
