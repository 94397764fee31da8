"""Training-step throughput: images/s, step time and MFU on whatever devices are present, for
the MAE step (stage 1), the fine-tuning step (stage 2) with plain CE, Mixup and FaceMix, and
the semi-supervised step (stage 3: EMA teacher, FixMatch).

Times the compiled, sharded training step alone (the batch is already on device), so the
figure is the model's, not the input pipeline's (see input_pipeline.py for that).
MFU = analytic matmul FLOPs (attention matmuls included, backward = 2 x forward) /
(step time x peak); the FLOP count used is printed. Fine-tuning rows also give the cost
of a step relative to the plain-CE step measured in the same run (FaceMix's goal: <= 2.05x,
only the forward/backward over the real images is extra). Stage-3 rows run B labeled and
mu x B unlabeled images (weak and strong views, RandAugment on the device) and compare with
the plain-CE step at the same B: the cost per labeled image (the EMA teacher's goal at
mu = 1: <= 2.4x, ~7 against 3 forward-equivalents); images_per_s counts every image. The
options on top of it (`--teacher ema,leaf`, `ema,negative`) also give their cost relative to
the plain stage-3 (EMA) step of the same run (`x_stage3`): LEAF adds a second strong view,
trained, and its levels. Stage-3 rows name where the strong view is made (`--strong_view`,
`pipeline.strong_view_place`: "auto" is the host on a CPU backend); a host row also times
making its batch's strong views on the host, one thread (`host_ms`, `pipeline.strong_images`),
and gives the cost per labeled image with that added to the step (`x_ce_with_host`: the
bound where nothing overlaps it).

  python -m benchmarks.step_throughput                 # picks variants for the backend
  python -m benchmarks.step_throughput --stage mae --variant vit_b16 --batch 256
  python -m benchmarks.step_throughput --stage finetune --variant vit_b16 --peak_tflops 989
  python -m benchmarks.step_throughput --stage finetune --mix none --stage semisup \
      --teacher ema --strong_view device --strong_view host   # the strong view, both places
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from benchmarks import machine
from configs import semisup as semisup_config
from ssfer_jax.input import pipeline, plan as plan_lib, randaugment
from ssfer_jax.runtime import sharding
from ssfer_jax.trainers import finetune, loop, pretrain, semisup

# Dense bf16 peak per device, TFLOP/s (vendor figures; measure with --measure_peak).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
               "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0}


NUM_CLASSES = 8   # the paper's AffectNet-8; the head is a rounding error in the FLOPs


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


def make_config(stage: str, variant: str, mix: str | None):
  """`mix` is the stage-2 mixing, or for stage 3 the teacher ("ema", "student") with any
  config options after it ("ema,leaf")."""
  if stage == "mae":
    return pretrain_config.get_config(variant).unlock()
  if stage == "semisup":
    teacher, *options = mix.split(",")
    c = semisup_config.get_config(",".join([variant, *options])).unlock()
    c.teacher = teacher
    return c
  c = finetune_config.get_config(variant).unlock()
  c.mix.kind = mix
  return c


def random_batch(spec, rng) -> dict:
  """Host arrays for every field of a batch spec (nested for stage 3). The step resamples a
  crop window per image on device, as in training."""
  def field(path, s):
    n, name = s.shape[0], path[-1].key
    if name == "image":
      return rng.integers(0, 256, s.shape, dtype=np.uint8)
    if name in ("crop", "strong_crop"):
      return np.broadcast_to(np.float32([0.1, 0.1, 0.9, 0.9]), s.shape).copy()
    if name in ("flip", "strong_flip", "valid"):
      return rng.random(s.shape) < 0.5
    if name == "strong_image":
      return rng.integers(0, 256, s.shape, dtype=np.uint8)
    if name in ("index", "position"):
      return np.arange(n, dtype=np.int32)
    if name == "label":
      return rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    if name == "box":
      lo = rng.uniform(0.0, 0.4, (n, 2))
      return np.concatenate([lo, lo + rng.uniform(0.2, 0.6, (n, 2))], 1).astype(np.float32)
    return rng.random(s.shape).astype(s.dtype)   # strong_u: RandAugment's uniforms
  return jax.tree_util.tree_map_with_path(field, spec)


@dataclasses.dataclass
class Prepared:
  """One step compiled and warmed up: `timed(steps)` runs it (seconds a step), `result(dt)`
  is its table row at `dt` seconds a step."""
  row: dict
  timed: Callable[[int], float]
  flops_step: float
  peak: float
  images: int

  def result(self, dt: float) -> dict:
    return dict(self.row, step_ms=round(dt * 1e3, 2),
                images_per_s=round(self.images / dt, 1),
                tflops_per_s=round(self.flops_step / dt / 1e12, 3),
                mfu=round(self.flops_step / dt / self.peak, 4) if self.peak else None)


def prepare(stage_name: str, variant: str, mix: str | None, batch: int,
            image_size: int | None, peak_tflops: float, dtype: str | None, remat: bool,
            attention_impl: str | None, mu: int = 1, strong_view: str = "auto",
            host_repeats: int = 5) -> Prepared:
  config = make_config(stage_name, variant, mix)
  config.batch_size = batch
  config.model.remat = remat
  config.model.attention_impl = attention_impl
  if image_size:
    config.data.image_size = image_size
  if dtype:
    config.model.dtype = dtype
  mesh = sharding.make_mesh(config.mesh.shape, config.mesh.axes)
  sharding.check_batch_size(batch, mesh)
  ratio = mu if stage_name == "semisup" else 0
  views = config.data.strong_views if stage_name == "semisup" else 1
  plan = loop.RunPlan(mesh, plan_lib.TrainData(batch, batch * 100, 100, 10, batch * mu * 100, ratio,
                                                views), 1000)
  arch = config.model
  if stage_name == "mae":
    stage = pretrain.make_stage(config, plan, None)
  elif stage_name == "semisup":   # the model of the same variant's stage-2 config
    ft = make_config("finetune", variant, "none")
    kwargs = semisup.model_kwargs(config, {"model": finetune.model_kwargs(ft)})
    stage = semisup.training_stage(config, plan, kwargs, NUM_CLASSES)
    arch = ft.model
  else:
    stage = finetune.training_stage(config, plan, NUM_CLASSES)
  abstract, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(jax.random.key(0))
  s = config.data.image_size
  spec = pipeline.batch_spec(stage.batch_kind, batch, s, sharding.batch_sharding(mesh),
                             unlabeled_ratio=ratio, strong_views=views, strong_view=strong_view)
  host_batch = random_batch(spec, np.random.default_rng(0))
  batch_arr = jax.device_put(host_batch, sharding.batch_sharding(mesh))
  t = time.perf_counter()
  step = loop.compile_train_step(stage, 0, abstract, shardings, spec, mesh)
  compile_s = time.perf_counter() - t
  held = [state]

  def timed(steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
      held[0], out, _ = step(held[0], batch_arr)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / steps

  timed(3)
  place = pipeline.strong_view_place(strong_view) if stage_name == "semisup" else None
  host_ms = (host_strong_views_ms(host_batch["unlabeled"], views, config.data.mean,
                                  host_repeats) if place == "host" else None)
  name = ("mae" if stage_name == "mae" else f"ft:{mix}" if stage_name == "finetune"
          else f"ss:{mix.replace(',', '+')}:mu{mu}:{place}")
  row = dict(stage=name, variant=variant,
             model=arch.size, image=s, patch=arch.patch_size,
             dtype=config.model.dtype, remat=remat, attention=attention_impl or "xla",
             batch=batch, devices=mesh.devices.size,
             device_kind=jax.devices()[0].device_kind, compile_s=round(compile_s, 1),
             host_ms=host_ms, gflops_per_image=round(stage.train_flops_per_example / 1e9, 3))
  return Prepared(row, timed, stage.train_flops_per_example * batch,
                  peak_tflops * 1e12 * mesh.devices.size, plan.data.images_per_step)


def bench(stage_name: str, variant: str, mix: str | None, batch: int, image_size: int | None,
          steps: int, peak_tflops: float, dtype: str | None, remat: bool,
          attention_impl: str | None, mu: int = 1, strong_view: str = "auto") -> dict:
  """One step's row, timed alone over `steps` steps."""
  p = prepare(stage_name, variant, mix, batch, image_size, peak_tflops, dtype, remat,
              attention_impl, mu, strong_view, steps)
  return p.result(p.timed(steps))


def host_strong_views_ms(unlabeled: dict, views: int, mean, repeats: int) -> float:
  """ms (median of `repeats`) to make a batch's strong views on the host, one thread, from the
  benchmark's windows and flips and fresh uniform draws (so ops and magnitudes are drawn as in
  training)."""
  images = unlabeled["image"]
  n = len(images)
  rng = np.random.default_rng(1)
  crop = np.broadcast_to(np.float32([0.1, 0.1, 0.9, 0.9]), (n, 4))
  out = np.empty_like(images)
  times = []
  for _ in range(repeats):
    flip, u = rng.random(n) < 0.5, rng.random((n, randaugment.DRAWS)).astype(np.float32)
    t = time.perf_counter()
    for _ in range(views):
      pipeline.strong_images(images, crop, flip, u, randaugment.fill_colour(mean), out)
    times.append(time.perf_counter() - t)
  return round(float(np.median(times)) * 1e3, 2)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stage", action="append", choices=("mae", "finetune", "semisup"),
                  help="which steps (repeatable; default all three)")
  ap.add_argument("--variant", action="append",
                  help="a variant of both configs: cpu, test, vit_b16 (repeatable)")
  ap.add_argument("--mix", action="append", choices=("none", "mixup", "cutmix", "facemix"),
                  help="fine-tuning mixings (repeatable; default none, mixup, facemix)")
  ap.add_argument("--teacher", action="append",
                  choices=("ema", "student", "ema,leaf", "ema,negative"),
                  help="stage-3 teachers, with options (repeatable; default all four)")
  ap.add_argument("--strong_view", action="append", choices=pipeline.STRONG_VIEW_PLACES,
                  help="stage 3: where the strong view is made (repeatable; default auto)")
  ap.add_argument("--mu", type=int, default=1, help="stage 3: unlabeled rows per labeled row")
  ap.add_argument("--batch", type=int, default=0, help="global batch (default: per variant)")
  ap.add_argument("--image_size", type=int, default=0)
  ap.add_argument("--dtype", default=None)
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--steps", type=int, default=0, help="steps a round (default 5 on CPU, else 30)")
  ap.add_argument("--rounds", type=int, default=3,
                  help="rounds over all steps; times and ratios are medians over rounds")
  ap.add_argument("--attention_impl", default=None, help="xla | cudnn (default: cudnn on GPU)")
  ap.add_argument("--peak_tflops", type=float, default=-1, help="per device; default: table/none")
  ap.add_argument("--measure_peak", action="store_true", help="time a bf16 matmul too")
  ap.add_argument("--json", default=None, help="append results as JSON lines here")
  args = ap.parse_args()
  jax.config.update("jax_threefry_partitionable", True)
  on_cpu = jax.default_backend() == "cpu"
  variants = args.variant or (["cpu"] if on_cpu else ["vit_b16", "vit_s16"])
  peak = args.peak_tflops if args.peak_tflops >= 0 else peak_for(jax.devices()[0])
  impl = args.attention_impl or ("cudnn" if jax.default_backend() == "gpu" else None)
  steps = args.steps or (5 if on_cpu else 30)
  prepared = []   # (variant, stage, mix, Prepared): all compiled before any is timed
  for v in variants:
    for stage in args.stage or ("mae", "finetune", "semisup"):
      default_batch = {"cpu": 64, "test": 16}.get(v, 8 if on_cpu else 256 * jax.device_count())
      mixes = {"mae": [None], "finetune": args.mix or ["none", "mixup", "facemix"],
               "semisup": args.teacher or ["ema", "student", "ema,leaf", "ema,negative"]}[stage]
      places = (args.strong_view or ["auto"]) if stage == "semisup" else ["auto"]
      for mix, place in ((m, p) for m in mixes for p in places):
        prepared.append((v, stage, mix, prepare(
            stage, v, mix, args.batch or default_batch, args.image_size or None, peak,
            args.dtype, args.remat, None if impl == "xla" else impl, args.mu, place, steps)))
  # Rounds: every step timed once a round, so drift in the machine's load reaches all alike;
  # the medians over rounds of each time and of each ratio to its base are reported.
  times = [[p.timed(steps) for *_, p in prepared] for _ in range(args.rounds)]
  median = lambda xs: float(np.median(xs))
  rows = []
  for i, (v, stage, mix, p) in enumerate(prepared):
    r = p.result(median([t[i] for t in times]))
    # The plain-CE and plain stage-3 steps of this variant, when measured.
    base = next((j for j, (v2, s2, m2, _) in enumerate(prepared)
                 if v2 == v and s2 == "finetune" and m2 == "none"), None)
    base3 = next((j for j, (v2, s2, m2, _) in enumerate(prepared)
                  if v2 == v and s2 == "semisup" and m2 == "ema"), None)
    ratio = lambda j: round(median([t[i] / t[j] for t in times]), 2)
    r["x_plain_ce"] = ratio(base) if base is not None and stage != "mae" else None
    if r["x_plain_ce"] is not None and args.rounds > 1 and i != base:
      spread = sorted(t[i] / t[base] for t in times)
      r["x_plain_ce_rounds"] = f"{spread[0]:.2f}-{spread[-1]:.2f}"
    r["x_ce_with_host"] = (round(median([(t[i] + r["host_ms"] / 1e3) / t[base] for t in times]),
                                 2) if base is not None and r["host_ms"] is not None else None)
    r["x_stage3"] = ratio(base3) if base3 is not None and stage == "semisup" else None
    rows.append(r)
  head = ("stage", "variant", "model", "image", "dtype", "attention", "batch", "devices",
          "step_ms", "host_ms", "images_per_s", "x_plain_ce", "x_ce_with_host", "x_stage3",
          "gflops_per_image", "tflops_per_s", "mfu", "compile_s")
  print(f"# training steps, {datetime.date.today()}, {platform.node()} ({machine.cpu_model()}), "
        f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, "
        f"peak/device {peak or 'unknown'} TFLOP/s")
  print(" | ".join(head))
  for r in rows:
    print(" | ".join(str(r[h]) for h in head))
  for r in rows:
    if "x_plain_ce_rounds" in r:
      print(f"# {r['stage']}: x_plain_ce over {args.rounds} rounds {r['x_plain_ce_rounds']}, "
            f"median {r['x_plain_ce']}")
  if args.measure_peak and not on_cpu:
    print(f"measured bf16 matmul peak: {measured_matmul_tflops():.0f} TFLOP/s per device")
  if args.json:
    with open(args.json, "a") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
