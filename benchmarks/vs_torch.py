"""Our training steps against PyTorch's, side by side on the same CPU.

The same architecture and work on both sides, fp32, batch, image size and threads equal:
  --stage mae       the official PyTorch MAE: ViT encoder on the visible 25% of the patches,
                    decoder on all tokens, norm-pix loss on the masked ones;
  --stage finetune  timm's VisionTransformer with our classifier's head (the variant's pool),
                    cross-entropy;
then backward and AdamW (0.9, 0.95). Rows:

  torch               benchmarks/torch_steps.py (timm blocks, eager) in the torch environment
                      (.venv-timm, set up here with `make timm-env`)
  jax model-only      our model, its loss, grads and optax AdamW on normalised float images,
                      jitted with donated state: the same inputs torch gets
  jax + image prep    the training loop's step itself (loop.compile_train_step): uint8
                      images, the random-resized-crop resample, flip and normalisation on the
                      device, the non-finite guard (and for finetune the variant's mixing
                      unless --mix none); torch's script has no image preparation

Each row runs in its own process, the rows alternate for --rounds rounds, and the table gives
the median step time over all rounds and the ratio images/s over torch's (>= 1: faster than
PyTorch); its header names the processor and its vector extensions. --xla_flags adds the JAX
rows once per given flag set (XLA's CPU options, e.g. "--xla_cpu_use_thunk_runtime=false").
--parts adds where each step goes: the forward alone, forward + backward, and the optimiser
update alone (on fixed gradients); --profile the JAX step's time per kind of XLA op
(jax.profiler). The default shape is the performance issue's: ViT-Ti/16,
112 px, decoder 512 x 8, batch 32, 2 threads. The shapes of issue 20:

  python -m benchmarks.vs_torch [--stage finetune]                   # Ti/16 at 112 px
  python -m benchmarks.vs_torch --variant small --model mu --image 64 --patch 8 --batch 128
  python -m benchmarks.vs_torch --variant small --model mu --image 64 --patch 8 --batch 32 \
      --stage finetune                        # the CPU science recipe's stages 1 and 2
  python -m benchmarks.vs_torch --variant small --model mu --image 96 --patch 16 --batch 64
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_PYTHON = REPO / ".venv-timm" / "bin" / "python"


def jax_worker(args) -> dict:
  """Runs in a fresh process (XLA_FLAGS are read at import): one row's step times."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top
  from ssfer_jax import results  # pylint: disable=g-import-not-at-top
  from ssfer_jax.input import device, pipeline, plan as plan_lib  # pylint: disable=g-import-not-at-top
  from ssfer_jax.models import mae  # pylint: disable=g-import-not-at-top
  from ssfer_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from ssfer_jax.trainers import (  # pylint: disable=g-import-not-at-top
      classifier, finetune, loop, optim, pretrain)

  c = stage_config(args)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  plan = loop.RunPlan(mesh, plan_lib.TrainData(args.batch, args.batch * 100, 100, 10), 1000)
  rng = np.random.default_rng(0)
  parts = {}
  if args.worker == "jax_model":
    x = jnp.asarray(rng.standard_normal((args.batch, args.image, args.image, 3)), jnp.float32)
    if args.stage == "mae":
      model = mae.MAE(**results.mae_kwargs(c))
      tx, _ = optim.make_optimizer(c.optim, args.batch, plan.total_steps, plan.steps_per_epoch)
      loss_of = lambda p, k: model.apply({"params": p}, x, train=True, rngs={"mask": k})[0]
    else:
      model = finetune.make_model(c, step_throughput.NUM_CLASSES)
      tx, _ = classifier.make_tx(c, model, plan.total_steps, plan.steps_per_epoch)
      labels = jnp.asarray(rng.integers(0, step_throughput.NUM_CLASSES, args.batch))
      loss_of = lambda p, k: optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, x, train=True, rngs={"dropout": k}), labels).mean()
    params = nn.meta.unbox(model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                      x[:1], train=False)["params"])
    state = (params, tx.init(params))

    def step(state, key):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_of)(params, key)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=(0,))
    run = lambda state, i: step(state, jax.random.key(i))
    if args.parts:   # where the step's time goes: the forward, with the backward, the update
      for name, fn in (("forward", jax.jit(loss_of)),
                       ("forward_backward", jax.jit(jax.value_and_grad(loss_of)))):
        parts[name] = median_ms(lambda i, fn=fn: fn(params, jax.random.key(i)), args.steps)
      grads = jax.grad(loss_of)(params, jax.random.key(0))

      def update(state, _):
        p, o = state
        updates, o = tx.update(grads, o, p)
        p = optax.apply_updates(p, updates)
        return (p, o), p

      update = jax.jit(update, donate_argnums=(0,))
      parts["optimizer"] = median_ms(carried(update, jax.tree.map(jnp.copy, state)),
                                     args.steps)
  else:
    stage = (pretrain.make_stage(c, plan, None) if args.stage == "mae"
             else finetune.training_stage(c, plan, step_throughput.NUM_CLASSES))
    abstract, shardings = loop.state_layout(c, stage, mesh)
    state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(
        jax.random.key(0))
    spec = pipeline.batch_spec(stage.batch_kind, args.batch, args.image,
                               sharding.batch_sharding(mesh))
    batch = step_throughput.random_batch(spec, rng)
    batch["crop"] = np.stack([np.float32([0.1, 0.1, 0.9, 0.9]) + rng.uniform(-0.1, 0.1, 4)
                              for _ in range(args.batch)]).astype(np.float32)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    compiled = loop.compile_train_step(stage, 0, abstract, shardings, spec, mesh)
    run = lambda state, i: compiled(state, batch)[:2]
  step_once = carried(run, state)
  times = step_seconds(step_once, args.warmup, args.steps)
  if args.profile:
    parts["ops"] = op_profile(step_once, args.steps)
  if args.worker == "jax_prep" and args.parts:   # the image preparation alone
    prep = jax.jit(lambda b: device.prepare_train_images(b, args.image, c.data.mean, c.data.std))
    parts["image_prep"] = median_ms(lambda i: prep(batch), args.steps)
  return {"step_ms": [round(1e3 * t, 2) for t in times], "jax": jax.__version__,
          "parts_ms": parts}


def carried(run, state):
  """fn(i) = run(state, i)'s output, each call on the state the last one returned (the steps
  donate their state)."""
  held = [state]

  def fn(i):
    held[0], out = run(held[0], i)
    return out

  return fn


def op_profile(run, steps: int) -> dict:
  """Milliseconds per step of each kind of XLA:CPU op (the op's name without its ".N"
  suffix: "ynn_fusion" the library matmuls, "copy_bitcast_fusion" transposes, ...), summed over
  the threads that ran them, from a `jax.profiler` trace of `steps` steps; "ops" counts the
  distinct ops of a step."""
  import collections  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for i in range(steps):
        jax.block_until_ready(run(i))
    trace = next(pathlib.Path(d).rglob("*.xplane.pb"))
    data = jax.profiler.ProfileData.from_file(str(trace))
  kinds, names = collections.Counter(), set()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):   # XLA:CPU's worker threads
        continue
      for ev in line.events:
        if "Thunk" in ev.name or "ThreadPool" in ev.name:   # the executor, not an op
          continue
        names.add(ev.name)
        kinds[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns
  out = {k: round(ns / 1e6 / steps, 3) for k, ns in kinds.most_common()}
  return {"ops": len(names), **out}


def stage_config(args):
  """The variant's config of the stage at the benchmark's shape (fp32, one device)."""
  from configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  module = pretrain_config if args.stage == "mae" else finetune_config
  c = module.get_config(args.variant).unlock()
  c.model.size, c.model.patch_size, c.model.dtype = args.model, args.patch, "float32"
  c.batch_size, c.data.image_size, c.mesh.shape = args.batch, args.image, (1, 1)
  if args.stage == "finetune":
    c.mix.kind = args.mix or c.mix.kind
    c.optim.b2 = 0.95   # torch_steps.py's AdamW
  return c


def step_seconds(fn, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls fn(i), synchronised, after `warmup` untimed ones."""
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for i in range(warmup + steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(i))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return times


def median_ms(fn, steps: int) -> float:
  """Median milliseconds of fn(i) over `steps` calls after one to compile."""
  return round(1e3 * statistics.median(step_seconds(fn, 1, steps)), 2)


def shape_flags(args) -> list[str]:
  """The flags both sides' workers take for the benchmark's shape and length."""
  return ["--stage", args.stage, "--image", str(args.image), "--patch", str(args.patch),
          "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]


def torch_row(args) -> dict:
  from ssfer_jax.models import vit  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  width, depth, heads, _ = vit.VIT_SIZES[args.model]
  dec = pretrain_config.get_config(args.variant).model
  cmd = [str(TORCH_PYTHON), str(REPO / "benchmarks" / "torch_steps.py"), *shape_flags(args),
         "--width", str(width), "--depth", str(depth), "--heads", str(heads),
         "--decoder_width", str(dec.decoder_width), "--decoder_depth", str(dec.decoder_depth),
         "--decoder_heads", str(dec.decoder_heads), "--threads", str(args.threads),
         *(["--pool", stage_config(args).model.pool] if args.stage == "finetune" else []),
         *(["--parts"] if args.parts else [])]
  out = subprocess.run(cmd, capture_output=True, text=True, env=_env(""))
  if out.returncode:
    raise RuntimeError(f"torch_steps.py failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def _env(xla_flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="2")
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def jax_row(args, worker: str, xla_flags: str, profile: bool = False) -> dict:
  """One JAX row's times in its own process under `xla_flags`."""
  cmd = [sys.executable, "-m", "benchmarks.vs_torch", "--worker", worker, *shape_flags(args),
         "--variant", args.variant, "--model", args.model,
         *(["--mix", args.mix] if args.mix else []),
         *(["--parts"] if args.parts else []),
         *(["--profile"] if profile and worker == "jax_model" else [])]
  out = subprocess.run(cmd, capture_output=True, text=True, env=_env(xla_flags), cwd=REPO)
  if out.returncode:
    raise RuntimeError(f"{worker} with XLA_FLAGS={xla_flags!r} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--stage", default="mae", choices=("mae", "finetune"))
  ap.add_argument("--variant", default="vit_b16", choices=("vit_b16", "small", "cpu"),
                  help="the stage's config variant: its MAE decoder (vit_b16: 512 x 8; small "
                  "and cpu: 64 x 1), its classifier's pool (vit_b16: cls; small: flatten) and "
                  "its mixing (the jax + image prep row)")
  ap.add_argument("--model", default="Ti")
  ap.add_argument("--image", type=int, default=112)
  ap.add_argument("--patch", type=int, default=16)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--mix", choices=("none", "mixup", "cutmix", "facemix"),
                  help="finetune's mixing in the jax + image prep row (default: the variant's)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--xla_flags", action="append", help="a flag set for the JAX rows (repeatable)")
  ap.add_argument("--parts", action="store_true",
                  help="also time the forward alone, forward + backward, the optimiser update "
                  "alone and the image preparation (rows below the table)")
  ap.add_argument("--profile", action="store_true",
                  help="also profile the jax model-only step per op kind (jax.profiler; the "
                  "table's first round, the first flag set)")
  ap.add_argument("--worker", choices=("jax_model", "jax_prep"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(jax_worker(args)))
    return
  subprocess.run(["make", "-s", "timm-env", f"PY={sys.executable}"], cwd=REPO, check=True)
  flag_sets = args.xla_flags or [""]
  torch_name = f"torch ({'official MAE' if args.stage == 'mae' else 'timm ViT'}, eager)"
  rows = {torch_name: []}
  for flags in flag_sets:
    for worker in ("jax_model", "jax_prep"):
      rows[(worker, flags)] = []
  torch_version = jax_version = ""
  parts = {}   # (framework, part) -> ms per round
  profile = None   # op kind -> ms per step
  for r in range(args.rounds):
    t = torch_row(args)
    torch_version = t["framework"]
    rows[torch_name] += t["step_ms"]
    for name, ms in t.get("parts_ms", {}).items():
      parts.setdefault(("torch", name), []).append(ms)
    for flags in flag_sets:
      for worker in ("jax_model", "jax_prep"):
        j = jax_row(args, worker, flags, args.profile and r == 0 and flags == flag_sets[0])
        jax_version = j["jax"]
        rows[(worker, flags)] += j["step_ms"]
        ops = j.get("parts_ms", {}).pop("ops", None)
        profile = ops or profile
        for name, ms in j.get("parts_ms", {}).items():
          if flags == flag_sets[0]:
            parts.setdefault(("jax", name), []).append(ms)
    print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
  from benchmarks import machine  # pylint: disable=g-import-not-at-top
  torch_ms = statistics.median(rows[torch_name])
  c = stage_config(args)
  what = (f"MAE training step, decoder {c.model.decoder_width} x {c.model.decoder_depth}"
          if args.stage == "mae" else
          f"fine-tuning step, pool {c.model.pool}, jax + image prep with mix {c.mix.kind}")
  print(f"{what}; ViT-{args.model}/{args.patch} at {args.image} px, batch {args.batch}, fp32, "
        f"{args.threads} threads; {machine.cpu_model()}, {datetime.date.today()}; "
        f"{torch_version} vs jax {jax_version}; median of {args.rounds} x {args.steps} steps, "
        f"rows alternating")
  print(f"{'row':<58}{'step ms':>9}{'images/s':>10}{'x torch':>9}")
  for key, times in rows.items():
    name = key if isinstance(key, str) else (
        {"jax_model": "jax model-only", "jax_prep": "jax + image prep"}[key[0]]
        + (f" [{key[1]}]" if key[1] else ""))
    ms = statistics.median(times)
    print(f"{name[:57]:<58}{ms:>9.1f}{1e3 * args.batch / ms:>10.1f}{torch_ms / ms:>9.2f}")
  if parts:
    print(f"\nwhere the step goes (ms, median; the first flag set){'':<7}{'torch':>9}{'jax':>9}")
    get = lambda fw, k: statistics.median(parts[(fw, k)]) if (fw, k) in parts else float("nan")
    for label, fn in (
        ("forward (loss)", lambda fw: get(fw, "forward")),
        ("backward (forward + backward - forward)",
         lambda fw: get(fw, "forward_backward") - get(fw, "forward")),
        ("optimiser update alone", lambda fw: get(fw, "optimizer")),
        ("image preparation (jax only)", lambda fw: get(fw, "image_prep"))):
      print(f"{label:<58}{fn('torch'):>9.1f}{fn('jax'):>9.1f}")
  if profile:
    count = profile.pop("ops")
    total = sum(profile.values())
    print(f"\njax model-only per op kind ({count} ops a step; ms a step summed over XLA's "
          f"threads, {total:.1f} in all; traced)")
    for kind, ms in list(profile.items())[:12]:
      print(f"{kind[:48]:<50}{ms:>8.2f}{100 * ms / total:>7.1f}%")


if __name__ == "__main__":
  main()
