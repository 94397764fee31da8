"""Step cost against batch size and image size, with the analytic FLOPs beside it.

For each stage's step (the loop's compiled step, `step_throughput.bench`) over a grid of
global batch sizes and image sizes: step time, images/s, analytic training GFLOPs per step
(matmuls incl. attention, backward = 2 x forward: models/flops.py) and the achieved GFLOP/s.
A step that is cheap for its FLOPs is one where something other than the matmuls dominates.

  python -m benchmarks.step_scaling [--stage mae --stage finetune] [--variant cpu]
      [--batches 16,32,64] [--images 64,96,128] [--steps 5]
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax

from benchmarks import machine, step_throughput


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stage", action="append", choices=("mae", "finetune", "semisup"))
  ap.add_argument("--variant", default="cpu")
  ap.add_argument("--batches", default="16,32,64")
  ap.add_argument("--images", default="64,96,128")
  ap.add_argument("--steps", type=int, default=5)
  args = ap.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  mixes = {"mae": None, "finetune": "facemix", "semisup": "ema"}
  print(f"step cost vs batch and image size, {machine.cpu_model()}, {os.cpu_count()} cores, "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, {datetime.date.today()}, "
        f"variant {args.variant}")
  print(f"{'stage':<14}{'batch':>6}{'image':>6}{'step ms':>10}{'images/s':>10}"
        f"{'GFLOP/step':>12}{'GFLOP/s':>9}{'ms/GFLOP':>10}")
  for stage in args.stage or ("mae", "finetune"):
    for image in (int(v) for v in args.images.split(",")):
      for batch in (int(v) for v in args.batches.split(",")):
        r = step_throughput.bench(stage, args.variant, mixes[stage], batch, image, args.steps,
                                  0.0, None, False, None)
        gflop = r["gflops_per_image"] * batch
        print(f"{r['stage']:<14}{batch:>6}{image:>6}{r['step_ms']:>10.1f}"
              f"{r['images_per_s']:>10.1f}{gflop:>12.2f}{gflop / r['step_ms'] * 1e3:>9.1f}"
              f"{r['step_ms'] / gflop:>10.2f}", flush=True)


if __name__ == "__main__":
  main()
