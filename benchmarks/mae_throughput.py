"""MAE step throughput: images/s, step time and MFU on whatever devices are present.

Times the compiled, sharded training step alone (the batch is already on device), so the
figure is the model's, not the input pipeline's (see input_pipeline.py for that).
MFU = analytic matmul FLOPs (attention matmuls included, backward = 2 x forward) /
(step time x peak); the FLOP count used is printed.

  python benchmarks/mae_throughput.py                 # picks variants for the backend
  python benchmarks/mae_throughput.py --variant vit_b16 --batch 256 --peak_tflops 989
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain_mae
from ssfer_jax import sharding
from ssfer_jax.input import pipeline
from ssfer_jax.trainers import loop, pretrain

# Dense bf16 peak per device, TFLOP/s (vendor figures; measure with --measure_peak).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


def peak_for(device) -> float:
  return next((v for k, v in PEAK_TFLOPS.items() if k in device.device_kind), 0.0)


def measured_matmul_tflops(n: int = 8192, reps: int = 20) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: (x @ x).astype(jnp.bfloat16))
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bench(variant: str, batch: int, image_size: int | None, steps: int, peak_tflops: float,
          dtype: str | None, remat: bool, attention_impl: str | None) -> dict:
  config = pretrain_mae.get_config("cpu" if variant == "cpu" else variant).unlock()
  config.batch_size = batch
  config.model.remat = remat
  config.model.attention_impl = attention_impl
  if image_size:
    config.data.image_size = image_size
  if dtype:
    config.model.dtype = dtype
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  sharding.check_batch_size(batch, mesh)
  plan = loop.RunPlan(mesh, batch * 100, 1000, 100)
  stage = pretrain.make_stage(config, plan, None)
  abstract, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(jax.random.key(0))
  s = config.data.image_size
  rng = np.random.default_rng(0)
  # The step resamples a crop window per image on device, as in training.
  host = {"image": rng.integers(0, 256, (batch, s, s, 3), dtype=np.uint8),
          "crop": np.tile(np.float32([0.1, 0.1, 0.9, 0.9]), (batch, 1)),
          "flip": rng.random(batch) < 0.5, "index": np.arange(batch, dtype=np.int32)}
  batch_arr = jax.device_put(host, sharding.batch_sharding(mesh))
  spec = pipeline.batch_spec(stage.batch_kind, batch, s, sharding.batch_sharding(mesh))
  t = time.perf_counter()
  step = jax.jit(loop.make_train_step(stage.loss_fn, stage.tx, stage.schedule, 0),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 donate_argnums=0).lower(abstract, spec).compile()
  compile_s = time.perf_counter() - t
  for _ in range(3):
    state, out, _ = step(state, batch_arr)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(steps):
    state, out, _ = step(state, batch_arr)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t) / steps
  flops_step = stage.train_flops_per_example * batch
  peak = peak_tflops * 1e12 * mesh.devices.size
  return dict(variant=variant, model=config.model.size, image=s, patch=config.model.patch_size,
              dtype=config.model.dtype, remat=remat, attention=attention_impl or "xla", batch=batch, devices=mesh.devices.size,
              device_kind=jax.devices()[0].device_kind, compile_s=round(compile_s, 1),
              step_ms=round(dt * 1e3, 2), images_per_s=round(batch / dt, 1),
              gflops_per_image=round(stage.train_flops_per_example / 1e9, 3),
              tflops_per_s=round(flops_step / dt / 1e12, 3),
              mfu=round(flops_step / dt / peak, 4) if peak else None)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", action="append", help="configs/pretrain_mae.py variant (repeatable)")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: per variant)")
  ap.add_argument("--image_size", type=int, default=0)
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--steps", type=int, default=0)
  ap.add_argument("--attention_impl", default=None, help="xla | cudnn (default: cudnn on GPU)")
  ap.add_argument("--peak_tflops", type=float, default=-1, help="per device; default: table/none")
  ap.add_argument("--measure_peak", action="store_true", help="time a bf16 matmul too")
  ap.add_argument("--json", default=None, help="append results as JSON lines here")
  args = ap.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  on_cpu = jax.default_backend() == "cpu"
  variants = args.variant or (["cpu"] if on_cpu else ["vit_b16", "vit_s16"])
  peak = args.peak_tflops if args.peak_tflops >= 0 else peak_for(jax.devices()[0])
  rows = []
  for v in variants:
    batch = args.batch or (64 if v == "cpu" else 8 if on_cpu else 256 * jax.device_count())
    steps = args.steps or (5 if on_cpu else 30)
    impl = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else None)
    rows.append(bench(v, batch, args.image_size or None, steps, peak, args.dtype, args.remat,
                      None if impl == "xla" else impl))
  head = ("variant", "model", "image", "dtype", "attention", "batch", "devices", "step_ms", "images_per_s",
          "gflops_per_image", "tflops_per_s", "mfu", "compile_s")
  print(f"# MAE step, {datetime.date.today()}, {platform.node()}, {jax.devices()[0].device_kind} "
        f"x{jax.device_count()}, jax {jax.__version__}, peak/device {peak or 'unknown'} TFLOP/s")
  print(" | ".join(head))
  for r in rows:
    print(" | ".join(str(r[h]) for h in head))
  if args.measure_peak and not on_cpu:
    print(f"measured bf16 matmul peak: {measured_matmul_tflops():.0f} TFLOP/s per device")
  if args.json:
    with open(args.json, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
