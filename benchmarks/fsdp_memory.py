"""FSDP on paper: per-device memory of the MAE step, proven by compiling it for 8 devices.

Compiles (never runs) the real stage-1 train step (`loop.make_train_step` over
`pretrain.make_stage`, bf16 compute, fp32 params and AdamW state, donated) for ViT-B/16 and
ViT-L/16 at 224 px against 8 simulated CPU devices, with the mesh all data-parallel (8, 1)
and all FSDP (1, 8), and reads XLA's `memory_analysis()` per device: arguments (params,
optimiser state, batch), temporaries, and the peak estimate arguments + outputs - aliased +
temporaries. Then, FSDP only, it compiles each per-device batch without remat and with each
remat policy (`vit.REMAT_POLICIES`), fits temporaries(b) and peak(b) = fixed + b x
per_example by least squares (the slope of the temporaries is the activation memory of one
example; the largest residual is printed: XLA's buffer assignment is not exactly linear in
b), and solves for the largest per-device batch under 80 GB (H100) and 141 GB (H200), with
10% kept free for the runtime.

Caveat: these are the CPU compiler's buffer assignments. A GPU compile fuses differently and
its temporaries differ; the GPU run of `run_device.sh` is what confirms the batch limits.

  python -m benchmarks.fsdp_memory [--sizes B,L] [--batches 16,32,64]
      [--policies none,nothing,dots,dots_no_batch] [--json OUT]
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
from ssfer_jax.models import vit  # noqa: E402
from ssfer_jax.runtime import sharding  # noqa: E402
from ssfer_jax.trainers import loop, pretrain  # noqa: E402

GB = 1e9
DEVICES = 8
CAPACITIES = {"H100 80 GB": 80 * GB, "H200 141 GB": 141 * GB}
HEADROOM = 0.9   # of the device memory, for the runtime, cuDNN workspaces, fragmentation
NO_REMAT = "none"


def compiled_memory(size: str, mesh_shape: tuple[int, int], per_device: int,
                    policy: str) -> dict:
  """policy: a key of `vit.REMAT_POLICIES`, or NO_REMAT."""
  c = pretrain_config.get_config("vit_b16").unlock()
  c.model.size, c.mesh.shape = size, mesh_shape
  c.model.remat = policy != NO_REMAT
  c.model.remat_policy = policy if c.model.remat else c.model.remat_policy
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
  print(f"compiled ViT-{size}/16 {mesh_shape} b/dev {per_device} remat {policy}: temporaries "
        f"{m.temp_size_in_bytes / GB:.3f} GB", flush=True)
  return dict(model=f"ViT-{size}/16", mesh=f"{mesh_shape}", per_device_batch=per_device,
              remat=policy, compile_s=round(time.perf_counter() - t, 1),
              state_gb=state_bytes / GB, arguments_gb=m.argument_size_in_bytes / GB,
              temp_gb=m.temp_size_in_bytes / GB, peak_gb=peak / GB)


def fit(points: list[dict], key: str) -> tuple[float, float, float]:
  """Least-squares key(b) = fixed + b x per_example over the compiles, and the largest
  relative residual (how far the CPU compiler's buffer assignment is from a line)."""
  b = np.asarray([p["per_device_batch"] for p in points], float)
  y = np.asarray([p[key] for p in points])
  slope, fixed = np.polyfit(b, y, 1)
  return float(fixed), float(slope), float(np.max(np.abs(fixed + slope * b - y) / y))


def largest_batch(fixed: float, slope: float, capacity: float) -> int:
  return int((HEADROOM * capacity / GB - fixed) // slope)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="B,L")
  ap.add_argument("--batches", default="16,32,64", help="per-device batches for the fit")
  ap.add_argument("--policies", default=",".join([NO_REMAT, *vit.REMAT_POLICIES]),
                  help=f"{NO_REMAT} (remat off) and/or the remat policies "
                  f"({', '.join(vit.REMAT_POLICIES)})")
  ap.add_argument("--json")
  args = ap.parse_args()
  batches = [int(b) for b in args.batches.split(",")]
  policies = args.policies.split(",")
  unknown = sorted(set(policies) - {NO_REMAT, *vit.REMAT_POLICIES})
  if unknown:
    ap.error(f"--policies {','.join(unknown)}: choose from {NO_REMAT}, "
             f"{', '.join(vit.REMAT_POLICIES)}")
  rows, limits = [], []
  for size in args.sizes.split(","):
    replicated = compiled_memory(size, (DEVICES, 1), batches[0], NO_REMAT)
    rows.append(replicated)
    for policy in policies:
      points = [compiled_memory(size, (1, DEVICES), b, policy) for b in batches]
      rows += points
      temp_fixed, temp_slope, temp_residual = fit(points, "temp_gb")
      fixed, slope, residual = fit(points, "peak_gb")
      limits.append(dict(model=f"ViT-{size}/16", remat=policy, temp_fixed_gb=temp_fixed,
                         temp_per_example_gb=temp_slope, temp_residual=temp_residual,
                         fixed_gb=fixed, per_example_gb=slope, residual=residual,
                         **{cap: largest_batch(fixed, slope, v) for cap, v in CAPACITIES.items()}))
    fsdp = rows[-len(policies) * len(batches)]   # the first FSDP compile: the same batch
    print(f"ViT-{size}/16: state per device {fsdp['state_gb']:.3f} GB sharded (1, 8) vs "
          f"{replicated['state_gb']:.3f} GB replicated (8, 1): "
          f"{fsdp['state_gb'] / replicated['state_gb']:.3f}x", flush=True)
  print(f"\nMAE step memory per device, 224 px, bf16 compute, fp32 state, 8 simulated CPU "
        f"devices; {datetime.date.today()}")
  print(f"{'model':10s} {'mesh':8s} {'b/dev':>5s} {'remat':>13s} {'state GB':>9s} "
        f"{'args GB':>8s} {'temp GB':>8s} {'peak GB':>8s} {'compile s':>9s}")
  for r in rows:
    print(f"{r['model']:10s} {r['mesh']:8s} {r['per_device_batch']:5d} {r['remat']:>13s} "
          f"{r['state_gb']:9.3f} {r['arguments_gb']:8.3f} {r['temp_gb']:8.3f} "
          f"{r['peak_gb']:8.3f} {r['compile_s']:9.1f}")
  print(f"\nLeast-squares lines through the FSDP (1, 8) compiles at b = {args.batches} "
        f"(largest relative residual), and the largest per-device batch in "
        f"{int(HEADROOM * 100)}% of memory:")
  print(f"{'model':10s} {'remat':>13s} {'temp fixed':>10s} {'temp GB/ex':>10s} {'resid':>6s} "
        f"{'peak fixed':>10s} {'peak GB/ex':>10s} {'resid':>6s} "
        + " ".join(f"{c:>12s}" for c in CAPACITIES))
  for lim in limits:
    print(f"{lim['model']:10s} {lim['remat']:>13s} {lim['temp_fixed_gb']:10.3f} "
          f"{lim['temp_per_example_gb']:10.4f} {100 * lim['temp_residual']:5.1f}% "
          f"{lim['fixed_gb']:10.3f} {lim['per_example_gb']:10.4f} {100 * lim['residual']:5.1f}% "
          + " ".join(f"{lim[c]:12d}" for c in CAPACITIES))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "limits": limits, "date": str(datetime.date.today())}, f,
                indent=1)


if __name__ == "__main__":
  main()
