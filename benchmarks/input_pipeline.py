"""Input pipeline throughput against its ceiling, as one table of images/s per core.

Rows, each with the stored image size equal to the output size (224 px by default):
  ceiling    read the record from ArrayRecord, parse it (records.decode), decode the JPEG to
             an RGB array (augment.decode: one cv2.imdecode, grey JPEGs as grey then
             expanded), nothing else; worker threads each loop over a part of a shuffled epoch;
  weak       the full labeled train pipeline's host part (make_train_iterator: epoch shuffle,
             read, decode, the random-resized-crop window and flip drawn and the box mapped
             through them, the image written whole into the batch, grain threads); the
             resample itself runs on the device (ssfer_jax/input/device.py), timed below;
  semisup    the semi-supervised batch (kind "semisup", mu = 1): B labeled rows as weak, B
             unlabeled rows each decoded once and given two views (a second window and flip,
             and RandAugment's draws, for the device); counts every decoded image;
  eval       the full eval pipeline (make_eval_iterator), fresh passes until the time is up;
  data_prep  `data_prep.build` of --prep-images facial_expressions images (Haar detection,
             face crop, JPEG encode, one shard) with 1 and N worker processes.
The pipeline rows run with 1 and with N worker threads (N = os.cpu_count() unless --threads).
"per core" is images per CPU second of this process (time.process_time: all its threads,
the consumer loop included), so it neither counts idle cores nor is lowered by other
processes taking the CPU; "images/s" is wall clock and "cores" the CPU seconds per wall
second it got. The machine is shared, and load from elsewhere still moves CPU time (caches,
memory bandwidth): each repeat measures ceiling, weak and eval back to back, the table gives
medians over --repeats, and "of ceiling" is the median of each repeat's ratio to the ceiling
measured beside it. The dataset is real faces (the shared facial_expressions images, else the
demo sample) resized to the output size and stored as JPEG quality 90.

A second table splits an image's cost into stages (one thread, median over rounds), the
measured alternatives included (the former host resample among them): it is what bounds the
weak row's ratio. A last line times that resample where it now runs, on the present JAX
backend: `device.crop_resize_flip` jitted on a batch of 64 host-drawn windows, after warm-up.
It moved off the host, it did not vanish; on a CPU backend it is the costliest stage by far.
So did the strong view: the same line times it (a second resample plus RandAugment).

  python -m benchmarks.input_pipeline [--records 2000] [--size 224] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import grain
import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

from benchmarks import machine  # noqa: E402
from ssfer_jax.input import augment, device, pipeline, randaugment, records  # noqa: E402
from tests.helpers import dataset_fixture  # noqa: E402

SHARED = REPO.parent / "shared" / "datasets" / "facial_expressions"


@dataclasses.dataclass
class Row:
  name: str
  threads: int  # worker processes for data_prep
  images_per_s: float  # wall clock
  cores: float  # CPU seconds per wall second, all threads (and for data_prep, processes)
  per_core: float  # images per CPU second
  of_ceiling: float | None = None


def _faces_source() -> tuple[pathlib.Path, pathlib.Path]:
  """(images folder, labels CSV): the shared dataset, else the committed demo sample."""
  if (SHARED / "legend.csv").exists():
    return SHARED / "images", SHARED / "legend.csv"
  return dataset_fixture.DEMO_DATA / "images", dataset_fixture.DEMO_DATA / "labels.csv"


def build_dataset(out_dir: str, num_records: int, size: int) -> str:
  faces = dataset_fixture.read_faces(*_faces_source(), num_records)
  # Every record labeled and in one list, so both pipelines read the whole dataset.
  return dataset_fixture.write_dataset(out_dir, faces, size=size, num_shards=4,
                                       slots=("train_labeled",))


def _timed(run) -> tuple[int, float, float]:
  """(images, wall s, CPU s of the whole process) of `run()`, which returns its image count."""
  wall, cpu = time.perf_counter(), time.process_time()
  images = run()
  return images, time.perf_counter() - wall, time.process_time() - cpu


def _source(data_dir) -> grain.sources.ArrayRecordDataSource:
  return grain.sources.ArrayRecordDataSource(
      records.shard_paths(data_dir, records.load_manifest(data_dir)))


def ceiling(data_dir, threads, seconds, size, batch) -> tuple[int, float, float]:
  """Read + parse + JPEG decode, in the shuffled order a train epoch reads."""
  del size, batch  # the stored size; nothing is batched
  source = _source(data_dir)
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


def semisup(data_dir, threads, seconds, size, batch):
  # The one list serves as both streams (their own permutations): the cost is the same.
  return _drain(lambda: pipeline.make_train_iterator(
      data_dir, "default", ["train_labeled"], kind="semisup", global_batch_size=batch,
      image_size=size, seed=0, unlabeled_names=["train_labeled"], unlabeled_ratio=1,
      num_threads=threads), 2 * batch, seconds)


def evaluate(data_dir, threads, seconds, size, batch):
  return _drain(lambda: pipeline.make_eval_iterator(
      data_dir, "default", ["train_labeled"], global_batch_size=batch, image_size=size,
      num_threads=threads), batch, seconds)


def stage_costs(data_dir, size, rounds: int = 7, n: int = 256) -> dict[str, float]:
  """Microseconds per image of each step of the weak pipeline, one thread, over n real
  records: the ceiling's three steps, what the weak transform adds, then (bracketed) the
  measured alternatives, the former host resample included."""
  source = _source(data_dir)
  keys = np.random.default_rng(0).permutation(len(source))[:n].tolist()
  raw = [source[k] for k in keys]
  jpegs = [records.decode(r)["image"] for r in raw]
  images = [augment.decode(j, rgb=False) for j in jpegs]
  u = augment.uniforms(0, np.arange(n), augment.TRANSFORMS["weak"].draws).tolist()
  windows = [augment.sample_crop(u[i], *images[i].shape[:2]) for i in range(n)]
  crops = [im[y:y + h, x:x + w] for im, (y, x, h, w) in zip(images, windows)]
  grey = np.empty((size, size), np.uint8)
  rows = np.empty((n, size, size, 3), np.uint8)

  def warp(i):  # crop + flip + resize as one affine map (timing only: centres not aligned)
    y, x, h, w = windows[i]
    m = np.array([[-size / w, 0, size * (x + w) / w], [0, size / h, -size * y / h]])
    cv2.warpAffine(images[i], m, (size, size), dst=grey, flags=cv2.INTER_LINEAR,
                   borderMode=cv2.BORDER_REPLICATE)

  stages = {
      "read (ArrayRecord)": lambda i: source[keys[i]],
      "parse (msgpack)": lambda i: records.decode(raw[i]),
      "decode (cv2.imdecode)": lambda i: augment.decode(jpegs[i], rgb=False),
      "crop window + box": lambda i: augment.crop_box(
          (0.1, 0.1, 0.9, 0.9), augment.sample_crop(u[i], *images[i].shape[:2]),
          *images[i].shape[:2], flip=True),
      "weak host: window+box+row": lambda i: augment.weak(images[i], (0.1, 0.1, 0.9, 0.9),
                                                          u[i], rows[i]),
      "(host resize bilinear)": lambda i: cv2.resize(crops[i], (size, size), dst=grey,
                                                     interpolation=cv2.INTER_LINEAR),
      "(host mirror in place)": lambda i: cv2.flip(grey, 1, dst=grey),
      "(host resize bicubic)": lambda i: cv2.resize(crops[i], (size, size), dst=grey,
                                                    interpolation=cv2.INTER_CUBIC),
      "(host warpAffine bilinear)": warp,
  }
  costs = {}
  for name, step in stages.items():
    times = []
    for _ in range(rounds):
      cpu = time.process_time()
      for i in range(n):
        step(i)
      times.append((time.process_time() - cpu) / n * 1e6)
    costs[name] = statistics.median(times)
  return costs


def device_resample_cost(size, batch: int = 64, rounds: int = 7) -> dict[str, float]:
  """Microseconds per image of `device.crop_resize_flip` (wall, and CPU seconds of this
  process, which on a CPU backend are XLA's threads) on the default backend: a batch of
  host-drawn windows at `size`, jitted, warmed up, median over rounds."""
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8)
  u = augment.uniforms(0, np.arange(batch), augment.TRANSFORMS["weak"].draws).tolist()
  crops = np.float32([(y / size, x / size, (y + h) / size, (x + w) / size)
                      for y, x, h, w in (augment.sample_crop(v, size, size) for v in u)])
  flips = np.array([v[augment.CROP_DRAWS] < 0.5 for v in u])
  args = jax.device_put((images, crops, flips))
  draws = jax.device_put(augment.uniforms(1, np.arange(batch), randaugment.DRAWS).astype(np.float32))
  fill = [round(255 * m) for m in (0.588, 0.459, 0.402)]
  weak_fn = lambda: device.crop_resize_flip(*args, size)
  strong_fn = lambda: randaugment.rand_augment(device.crop_resize_flip(*args, size), draws, fill)
  out = {"backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})", "batch": batch}
  for name, fn in (("weak", weak_fn), ("strong", strong_fn)):
    fn().block_until_ready()
    walls, cpus = [], []
    for _ in range(rounds):
      wall, cpu = time.perf_counter(), time.process_time()
      fn().block_until_ready()
      walls.append((time.perf_counter() - wall) / batch * 1e6)
      cpus.append((time.process_time() - cpu) / batch * 1e6)
    out[f"{name}_wall_us"], out[f"{name}_cpu_us"] = statistics.median(walls), statistics.median(cpus)
  return out


# Spawned build workers re-import the main module: a small `-c` main keeps this script's
# grain/JAX imports (~1.4 s a process) and its cv2 thread setting out of data_prep's figures.
_DATA_PREP_MAIN = """
import json, resource, sys, time
from data_prep import build, readers
csv_path, images, out, workers = sys.argv[1:]
def cpu():
  return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (
      resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
wall, start = time.perf_counter(), cpu()
manifest = build.build([readers.CsvSource("fe", csv_path, root=images)], out,
                       build.Config(size=224, crop="face", detector="haar", num_shards=1),
                       workers=int(workers), overwrite=True, progress=False)
print(json.dumps({"inputs": sum(s["read"] for s in manifest["sources"].values()),
                  "wall": time.perf_counter() - wall, "cpu": cpu() - start}))
"""


def data_prep_rows(args, worker_counts) -> list[Row]:
  """`data_prep.build` with Haar detection over --prep-images rows of the labels CSV (spread
  evenly), per worker count; per core counts the CPU of the build's process and its workers.

  With 1 worker the build runs in its own process, where OpenCV's threads use all cores.
  """
  images, labels = _faces_source()
  with open(labels, newline="") as f:
    table = list(csv.DictReader(f))
  picked = [table[i * len(table) // args.prep_images] for i in range(args.prep_images)]
  samples = {w: [] for w in worker_counts}
  with tempfile.TemporaryDirectory() as tmp:
    subset = os.path.join(tmp, "subset.csv")
    with open(subset, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=list(table[0]))
      writer.writeheader()
      writer.writerows(picked)
    for _ in range(args.repeats):
      for w in worker_counts:
        done = subprocess.run(
            [sys.executable, "-c", _DATA_PREP_MAIN, subset, str(images),
             os.path.join(tmp, "out"), str(w)],
            cwd=REPO, check=True, capture_output=True, text=True)
        samples[w].append(json.loads(done.stdout.splitlines()[-1]))
  return [Row("data_prep", w, statistics.median(s["inputs"] / s["wall"] for s in runs),
              statistics.median(s["cpu"] / s["wall"] for s in runs),
              statistics.median(s["inputs"] / s["cpu"] for s in runs))
          for w, runs in samples.items()]


def main(argv=None) -> list[Row]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=2000)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=2.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--prep-images", type=int, default=300)
  parser.add_argument("--json", help="also write the header, rows and stage costs here")
  args = parser.parse_args(argv)
  thread_counts = sorted({1, args.threads})
  kinds = {"ceiling": ceiling, "weak": weak, "semisup": semisup, "eval": evaluate}
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = build_dataset(tmp, args.records, args.size)
    samples = {(k, t): [] for t in thread_counts for k in kinds}
    for _ in range(args.repeats):  # each repeat: ceiling, weak, eval back to back
      for (kind, t), runs in samples.items():
        runs.append(kinds[kind](data_dir, t, args.seconds, args.size, args.batch))
    stages = stage_costs(data_dir, args.size)
  resample = device_resample_cost(args.size)
  rows = []
  for (kind, t), runs in samples.items():
    per_core = [images / cpu for images, _, cpu in runs]
    top = [images / cpu for images, _, cpu in samples["ceiling", t]]
    rows.append(Row(kind, t, statistics.median(images / wall for images, wall, _ in runs),
                    statistics.median(cpu / wall for _, wall, cpu in runs),
                    statistics.median(per_core),
                    statistics.median(a / b for a, b in zip(per_core, top))))
  rows += data_prep_rows(args, thread_counts)

  header = (f"input pipeline, {args.size} px stored = output, {args.records} real faces, batch "
            f"{args.batch}, weak = host part (bilinear crop resample on device); "
            f"{machine.cpu_model()}, {os.cpu_count()} CPU cores, "
            f"{datetime.date.today()}; medians of {args.repeats} x {args.seconds:g} s a row; "
            f"data_prep: {args.prep_images} images, Haar")
  print(header)
  print(f"{'row':<10}{'threads':>8}{'images/s':>10}{'cores':>7}{'per core':>10}{'of ceiling':>12}")
  for r in rows:
    share = "" if r.of_ceiling is None else f"{r.of_ceiling:.2f}"
    print(f"{r.name:<10}{r.threads:>8}{r.images_per_s:>10.0f}{r.cores:>7.2f}{r.per_core:>10.0f}"
          f"{share:>12}")
  print(f"\nper image, one thread ({args.size} px, mostly grey JPEGs; in brackets: alternatives)")
  for name, us in stages.items():
    print(f"  {name:<28}{us:>7.1f} us")
  print(f"\nmoved to the device (jit, batch {resample['batch']} at {args.size} px, "
        f"{resample['backend']}), per image:\n"
        f"  weak view (device.crop_resize_flip): {resample['weak_wall_us']:.1f} us wall, "
        f"{resample['weak_cpu_us']:.1f} us CPU\n"
        f"  strong view (+ randaugment.rand_augment): {resample['strong_wall_us']:.1f} us wall, "
        f"{resample['strong_cpu_us']:.1f} us CPU")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": [dataclasses.asdict(r) for r in rows],
                 "stages_us": stages, "device_resample": resample}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
