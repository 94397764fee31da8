"""Input pipeline throughput against its ceiling, as one table of images/s per core.

Rows, each with the stored image size equal to the output size (224 px by default):
  ceiling  read the record from ArrayRecord, parse it (records.decode), decode the JPEG to an
           RGB array (augment.decode: one cv2.imdecode, grey JPEGs as grey then expanded),
           nothing else; worker threads each loop over a part of a shuffled epoch;
  weak     the full labeled train pipeline (make_train_iterator: epoch shuffle, read, decode,
           random resized crop + flip with the box, batches, grain threads);
  eval     the full eval pipeline (make_eval_iterator), fresh passes until the time is up.
Each row runs with 1 and with N worker threads (N = os.cpu_count() unless --threads).
"per core" is images per CPU second of this process (time.process_time: all its threads,
the consumer loop included), so it neither counts idle cores nor is lowered by other
processes taking the CPU; "images/s" is wall clock and "cores" the CPU seconds per wall
second it got. Rows are measured in turn, --repeats times, and summed over the repeats. The
dataset is real faces (the shared facial_expressions images, else the demo sample) resized
to the output size and stored as JPEG quality 90.

  python benchmarks/input_pipeline.py [--records 2000] [--size 224] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import tempfile
import time

import cv2
import grain
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the dataset writer, until data_prep builds them

import dataset_fixture  # noqa: E402
from ssfer_jax.input import augment, pipeline, records  # noqa: E402

INTERPOLATIONS = {cv2.INTER_LINEAR: "bilinear", cv2.INTER_CUBIC: "bicubic", cv2.INTER_AREA: "area"}
SHARED = REPO.parent / "shared" / "datasets" / "facial_expressions"


@dataclasses.dataclass
class Row:
  name: str
  threads: int
  images_per_s: float  # wall clock
  cores: float  # CPU seconds of this process per wall second, all its threads
  per_core: float  # images per CPU second
  of_ceiling: float | None = None


def build_dataset(out_dir: str, num_records: int, size: int) -> str:
  if (SHARED / "legend.csv").exists():
    faces = dataset_fixture.read_faces(SHARED / "images", SHARED / "legend.csv", num_records)
  else:
    faces = dataset_fixture.read_faces(limit=num_records)
  # Every record labeled and in one list, so both pipelines read the whole dataset.
  return dataset_fixture.write_dataset(out_dir, faces, size=size, num_shards=4,
                                       slots=("train_labeled",))


def _timed(run) -> tuple[int, float, float]:
  """(images, wall s, CPU s of the whole process) of `run()`, which returns its image count."""
  wall, cpu = time.perf_counter(), time.process_time()
  images = run()
  return images, time.perf_counter() - wall, time.process_time() - cpu


def ceiling(data_dir, threads, seconds, size, batch) -> tuple[int, float, float]:
  """Read + parse + JPEG decode, in the shuffled order a train epoch reads."""
  del size, batch  # the stored size; nothing is batched
  source = grain.sources.ArrayRecordDataSource(
      records.shard_paths(data_dir, records.load_manifest(data_dir)))
  order = np.random.default_rng(0).permutation(len(source))

  def work(part: int, seconds: float) -> int:
    mine, done, end = order[part::threads], 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
      augment.decode(records.decode(source[int(mine[done % len(mine)])])["image"])
      done += 1
    return done

  work(0, 0.5)  # warm up: open the readers, page in the shards
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return _timed(lambda: sum(pool.map(work, range(threads), [seconds] * threads)))


def _drain(make_iterator, batch: int, seconds: float) -> tuple[int, float, float]:
  """Times batches; the full prefetch buffer at the start offsets the one left at the end."""
  it = make_iterator()
  for _ in range(3):  # warm up: threads started, buffer filled
    next(it)

  def run():
    nonlocal it
    done, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
      try:
        next(it)
      except StopIteration:
        it.close()
        it = make_iterator()
        continue
      done += batch
    return done

  result = _timed(run)
  it.close()
  return result


def weak(data_dir, threads, seconds, size, batch):
  return _drain(lambda: pipeline.make_train_iterator(
      data_dir, "default", ["train_labeled"], kind="labeled", global_batch_size=batch,
      image_size=size, seed=0, num_threads=threads), batch, seconds)


def evaluate(data_dir, threads, seconds, size, batch):
  return _drain(lambda: pipeline.make_eval_iterator(
      data_dir, "default", ["train_labeled"], global_batch_size=batch, image_size=size,
      num_threads=threads), batch, seconds)


def data_prep_rows(args, thread_counts) -> list[Row]:
  """Hook for the lead: rows for `python -m data_prep build` images/s with Haar detection.

  data_prep is being written; until then this adds no rows. Return one Row per worker count,
  `of_ceiling` left None (a different job from the ceiling's).
  """
  del args, thread_counts
  return []


def main(argv=None) -> list[Row]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=2000)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=4.0)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args(argv)
  thread_counts = sorted({1, args.threads})
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = build_dataset(tmp, args.records, args.size)
    kinds = {"ceiling": ceiling, "weak": weak, "eval": evaluate}
    samples = {(k, t): [] for t in thread_counts for k in kinds}
    for _ in range(args.repeats):
      for (kind, t), runs in samples.items():
        runs.append(kinds[kind](data_dir, t, args.seconds, args.size, args.batch))
  rows = []
  for (kind, t), runs in samples.items():
    images, wall, cpu = (sum(x) for x in zip(*runs))
    rows.append(Row(kind, t, images / wall, cpu / wall, images / cpu))
  for row in rows:
    top = next(r for r in rows if r.name == "ceiling" and r.threads == row.threads)
    row.of_ceiling = row.per_core / top.per_core
  rows += data_prep_rows(args, thread_counts)

  print(f"input pipeline, {args.size} px stored = output, {args.records} real faces, batch "
        f"{args.batch}, resize {INTERPOLATIONS[augment.INTERPOLATION]}; {os.cpu_count()} CPU "
        f"cores, {datetime.date.today()}; {args.repeats} x {args.seconds:.0f} s a row")
  print(f"{'row':<10}{'threads':>8}{'images/s':>10}{'cores':>7}{'per core':>10}{'of ceiling':>12}")
  for r in rows:
    share = "" if r.of_ceiling is None else f"{r.of_ceiling:.2f}"
    print(f"{r.name:<10}{r.threads:>8}{r.images_per_s:>10.0f}{r.cores:>7.2f}{r.per_core:>10.0f}"
          f"{share:>12}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  return rows


if __name__ == "__main__":
  main()
