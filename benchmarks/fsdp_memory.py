"""FSDP on paper: per-device memory of the MAE step, proven by compiling it for 8 devices.

Compiles (never runs) the real stage-1 train step (`loop.make_train_step` over
`pretrain.make_stage`, bf16 compute, fp32 params and AdamW state, donated) for ViT-B/16 and
ViT-L/16 at 224 px against 8 simulated CPU devices, with the mesh all data-parallel (8, 1)
and all FSDP (1, 8), and reads XLA's `memory_analysis()` per device: arguments (params,
optimiser state, batch), temporaries, and the peak estimate arguments + outputs - aliased +
temporaries. Then, FSDP only, it compiles three per-device batches with and without remat,
fits peak(b) = fixed + b x per_example by least squares (the largest residual is printed:
XLA's buffer assignment is not exactly linear in b), and solves for the largest per-device
batch under 80 GB (H100) and 141 GB (H200), with 10% kept free for the runtime.

Caveat: these are the CPU compiler's buffer assignments. A GPU compile fuses differently and
its temporaries differ; the GPU run of `run_device.sh` is what confirms the batch limits.

  python -m benchmarks.fsdp_memory [--sizes B,L] [--batches 4,8] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain as pretrain_config  # noqa: E402
from ssfer_jax.input import pipeline, plan as plan_lib  # noqa: E402
from ssfer_jax.runtime import sharding
from ssfer_jax.trainers import loop, pretrain  # noqa: E402

GB = 1e9
DEVICES = 8
CAPACITIES = {"H100 80 GB": 80 * GB, "H200 141 GB": 141 * GB}
HEADROOM = 0.9   # of the device memory, for the runtime, cuDNN workspaces, fragmentation


def compiled_memory(size: str, mesh_shape: tuple[int, int], per_device: int,
                    remat: bool) -> dict:
  c = pretrain_config.get_config("vit_b16").unlock()
  c.model.size, c.model.remat, c.mesh.shape = size, remat, mesh_shape
  c.batch_size = per_device * DEVICES
  mesh = sharding.make_mesh(c.mesh.shape, c.mesh.axes)
  plan = loop.RunPlan(mesh, plan_lib.TrainData(c.batch_size, c.batch_size * 100, 100, 10), 1000)
  stage = pretrain.make_stage(c, plan, None)
  abstract, shardings = loop.state_layout(c, stage, mesh)
  spec = pipeline.batch_spec(stage.batch_kind, c.batch_size, c.data.image_size,
                             sharding.batch_sharding(mesh))
  t = time.perf_counter()
  step = loop.compile_train_step(stage, 0, abstract, shardings, spec, mesh)
  m = step.memory_analysis()
  state_bytes = sum(math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
                    for s in jax.tree.leaves(abstract))
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return dict(model=f"ViT-{size}/16", mesh=f"{mesh_shape}", per_device_batch=per_device,
              remat=remat, compile_s=round(time.perf_counter() - t, 1),
              state_gb=state_bytes / GB, arguments_gb=m.argument_size_in_bytes / GB,
              temp_gb=m.temp_size_in_bytes / GB, peak_gb=peak / GB)


def fit(points: list[dict]) -> tuple[float, float, float]:
  """Least-squares peak(b) = fixed + b x per_example over the compiles, and the largest
  relative residual (how far the CPU compiler's buffer assignment is from a line)."""
  b = np.asarray([p["per_device_batch"] for p in points], float)
  y = np.asarray([p["peak_gb"] for p in points])
  slope, fixed = np.polyfit(b, y, 1)
  return float(fixed), float(slope), float(np.max(np.abs(fixed + slope * b - y) / y))


def largest_batch(fixed: float, slope: float, capacity: float) -> int:
  return int((HEADROOM * capacity / GB - fixed) // slope)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="B,L")
  ap.add_argument("--batches", default="4,8,16", help="per-device batches for the fit")
  ap.add_argument("--json")
  args = ap.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  rows, limits = [], []
  for size in args.sizes.split(","):
    replicated = compiled_memory(size, (DEVICES, 1), batches[0], False)
    rows.append(replicated)
    for remat in (False, True):
      points = [compiled_memory(size, (1, DEVICES), b, remat) for b in batches]
      rows += points
      if not remat:
        fsdp = points[0]   # the same per-device batch as the replicated compile
      fixed, slope, residual = fit(points)
      limits.append(dict(model=f"ViT-{size}/16", remat=remat, fixed_gb=fixed,
                         per_example_gb=slope, residual=residual,
                         **{cap: largest_batch(fixed, slope, v) for cap, v in CAPACITIES.items()}))
    print(f"ViT-{size}/16: state per device {fsdp['state_gb']:.3f} GB sharded (1, 8) vs "
          f"{replicated['state_gb']:.3f} GB replicated (8, 1): "
          f"{fsdp['state_gb'] / replicated['state_gb']:.3f}x", flush=True)
  print(f"\nMAE step memory per device, 224 px, bf16 compute, fp32 state, 8 simulated CPU "
        f"devices; {datetime.date.today()}")
  print(f"{'model':10s} {'mesh':8s} {'b/dev':>5s} {'remat':>5s} {'state GB':>9s} "
        f"{'args GB':>8s} {'temp GB':>8s} {'peak GB':>8s} {'compile s':>9s}")
  for r in rows:
    print(f"{r['model']:10s} {r['mesh']:8s} {r['per_device_batch']:5d} {str(r['remat']):>5s} "
          f"{r['state_gb']:9.3f} {r['arguments_gb']:8.3f} {r['temp_gb']:8.3f} "
          f"{r['peak_gb']:8.3f} {r['compile_s']:9.1f}")
  print(f"\nLargest per-device batch, FSDP (1, 8), {int(HEADROOM * 100)}% of memory "
        f"(least-squares line through the compiles at b = {args.batches}):")
  print(f"{'model':10s} {'remat':>5s} {'fixed GB':>8s} {'GB/example':>10s} {'max resid':>9s} "
        + " ".join(f"{c:>12s}" for c in CAPACITIES))
  for lim in limits:
    print(f"{lim['model']:10s} {str(lim['remat']):>5s} {lim['fixed_gb']:8.3f} "
          f"{lim['per_example_gb']:10.3f} {100 * lim['residual']:8.1f}% "
          + " ".join(f"{lim[c]:12d}" for c in CAPACITIES))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "limits": limits, "date": str(datetime.date.today())}, f,
                indent=1)


if __name__ == "__main__":
  main()
