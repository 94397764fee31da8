"""Our MAE training step against the official PyTorch MAE, side by side on the same CPU.

The same architecture and work on both sides: ViT encoder on the visible 25% of the patches,
decoder on all tokens, norm-pix loss on the masked ones, backward, AdamW (0.9, 0.95); fp32;
batch, image size and threads equal. Rows:

  torch               the official MAE model (benchmarks/torch_mae.py, timm blocks, eager)
                      in the torch environment (.venv-timm, set up here with `make timm-env`)
  jax model-only      our MAE, its loss, grads and optax AdamW on normalised float images,
                      jitted with donated state: the same inputs torch gets
  jax + image prep    the training loop's step itself (loop.compile_train_step): uint8
                      images, the random-resized-crop resample, flip and normalisation on the
                      device, the non-finite guard; torch's script has no image preparation

Each row runs in its own process, the rows alternate for --rounds rounds, and the table gives
the median step time over all rounds and the ratio images/s over torch's (>= 1: faster than
PyTorch). --xla_flags adds the JAX rows once per given flag set (XLA's CPU options, e.g.
"--xla_cpu_use_thunk_runtime=false"). The default shape is the performance issue's: ViT-Ti/16,
112 px, decoder 512 x 8, batch 32, 2 threads.

  python -m benchmarks.mae_vs_torch [--model Ti --image 112 --batch 32 --steps 10 --rounds 3]
  python -m benchmarks.mae_vs_torch --variant cpu --model mu --image 96 --batch 64
      [--xla_flags= --xla_flags=--xla_cpu_enable_fast_math=true]
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

  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top
  from ssfer_jax import results  # pylint: disable=g-import-not-at-top
  from ssfer_jax.input import device, pipeline, plan as plan_lib  # pylint: disable=g-import-not-at-top
  from ssfer_jax.models import mae  # pylint: disable=g-import-not-at-top
  from ssfer_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from ssfer_jax.trainers import loop, optim, pretrain  # pylint: disable=g-import-not-at-top

  c = pretrain_config.get_config(args.variant).unlock()
  c.model.size, c.model.dtype, c.batch_size = args.model, "float32", args.batch
  c.data.image_size, c.mesh.shape = args.image, (1, 1)
  mesh = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  plan = loop.RunPlan(mesh, plan_lib.TrainData(args.batch, args.batch * 100, 100, 10), 1000)
  rng = np.random.default_rng(0)
  parts = {}
  if args.worker == "jax_model":
    model = mae.MAE(**results.mae_kwargs(c))
    tx, _ = optim.make_optimizer(c.optim, args.batch, plan.total_steps, plan.steps_per_epoch)
    x = jnp.asarray(rng.standard_normal((args.batch, args.image, args.image, 3)), jnp.float32)
    params = nn.meta.unbox(model.init({"params": jax.random.key(0), "mask": jax.random.key(1)},
                                      x[:1], train=False)["params"])
    state = (params, tx.init(params))

    def step(state, images, key):
      params, opt_state = state
      loss_fn = lambda p: model.apply({"params": p}, images, train=True, rngs={"mask": key})[0]
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    step = jax.jit(step, donate_argnums=(0,))
    run = lambda state, i: step(state, x, jax.random.key(i))
    if args.parts:   # where the step's time goes: the forward alone, then with the backward
      loss_of = lambda p, k: model.apply({"params": p}, x, train=True, rngs={"mask": k})[0]
      for name, fn in (("forward", jax.jit(loss_of)),
                       ("forward_backward", jax.jit(jax.value_and_grad(loss_of)))):
        parts[name] = median_ms(lambda i, fn=fn: fn(params, jax.random.key(i)), args.steps)
  else:
    stage = pretrain.make_stage(c, plan, None)
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
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    state, out = run(state, i)
    jax.block_until_ready(out)
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  if args.worker == "jax_prep" and args.parts:   # the image preparation alone
    prep = jax.jit(lambda b: device.prepare_train_images(b, args.image, c.data.mean, c.data.std))
    parts["image_prep"] = median_ms(lambda i: prep(batch), args.steps)
  return {"step_ms": [round(1e3 * t, 2) for t in times], "jax": jax.__version__,
          "parts_ms": parts}


def median_ms(fn, steps: int) -> float:
  """Median milliseconds of fn(i) over `steps` calls after one to compile, synchronised."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(0))
  times = []
  for i in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(i))
    times.append(time.perf_counter() - t)
  return round(1e3 * statistics.median(times), 2)


def torch_row(args) -> dict:
  from ssfer_jax.models import vit  # pylint: disable=g-import-not-at-top
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  width, depth, heads, _ = vit.VIT_SIZES[args.model]
  dec = pretrain_config.get_config(args.variant).model
  cmd = [str(TORCH_PYTHON), str(REPO / "benchmarks" / "torch_mae.py"), "--width", str(width),
         "--depth", str(depth), "--heads", str(heads), "--decoder_width", str(dec.decoder_width),
         "--decoder_depth", str(dec.decoder_depth), "--decoder_heads", str(dec.decoder_heads),
         "--image", str(args.image), "--batch",
         str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
         str(args.threads), *(["--parts"] if args.parts else [])]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=_env(""))
  return json.loads(out.stdout.strip().splitlines()[-1])


def _env(xla_flags: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="2")
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  return env


def jax_row(args, worker: str, xla_flags: str) -> dict:
  cmd = [sys.executable, __file__, "--worker", worker, "--variant", args.variant, "--model",
         args.model, "--image",
         str(args.image), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
         str(args.warmup), *(["--parts"] if args.parts else [])]
  out = subprocess.run(cmd, capture_output=True, text=True, env=_env(xla_flags))
  if out.returncode:
    raise RuntimeError(f"{worker} with XLA_FLAGS={xla_flags!r} failed:\n{out.stderr[-2000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--variant", default="vit_b16", choices=("vit_b16", "cpu"),
                  help="the pretrain.py variant whose decoder is used: vit_b16 (512 x 8) or "
                  "cpu (the science grid's CPU model: 64 x 1; with --model mu --image 96 "
                  "--batch 64)")
  ap.add_argument("--model", default="Ti")
  ap.add_argument("--image", type=int, default=112)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--xla_flags", action="append", help="a flag set for the JAX rows (repeatable)")
  ap.add_argument("--parts", action="store_true",
                  help="also time the forward alone, forward + backward and the image preparation "
                  "(rows below the table; the optimiser is the step minus forward + backward)")
  ap.add_argument("--worker", choices=("jax_model", "jax_prep"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    print(json.dumps(jax_worker(args)))
    return
  subprocess.run(["make", "-s", "timm-env", f"PY={sys.executable}"], cwd=REPO, check=True)
  flag_sets = args.xla_flags or [""]
  rows = {"torch (official MAE, eager)": []}
  for flags in flag_sets:
    for worker in ("jax_model", "jax_prep"):
      rows[(worker, flags)] = []
  torch_version = jax_version = ""
  parts = {}   # (framework, part) -> ms per round
  for r in range(args.rounds):
    t = torch_row(args)
    torch_version = t["framework"]
    rows["torch (official MAE, eager)"] += t["step_ms"]
    for name, ms in t.get("parts_ms", {}).items():
      parts.setdefault(("torch", name), []).append(ms)
    for flags in flag_sets:
      for worker in ("jax_model", "jax_prep"):
        j = jax_row(args, worker, flags)
        jax_version = j["jax"]
        rows[(worker, flags)] += j["step_ms"]
        for name, ms in j.get("parts_ms", {}).items():
          if not flags:
            parts.setdefault(("jax", name), []).append(ms)
    print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
  from benchmarks import machine  # pylint: disable=g-import-not-at-top
  torch_ms = statistics.median(rows["torch (official MAE, eager)"])
  from configs import pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  dec = pretrain_config.get_config(args.variant).model
  print(f"MAE training step, ViT-{args.model}/16 at {args.image} px, decoder "
        f"{dec.decoder_width} x {dec.decoder_depth}, batch "
        f"{args.batch}, fp32, {args.threads} threads; {machine.cpu_model()}, "
        f"{datetime.date.today()}; {torch_version} vs jax {jax_version}; median of "
        f"{args.rounds} x {args.steps} steps, rows alternating")
  print(f"{'row':<58}{'step ms':>9}{'images/s':>10}{'x torch':>9}")
  for key, times in rows.items():
    name = key if isinstance(key, str) else (
        {"jax_model": "jax model-only", "jax_prep": "jax + image prep"}[key[0]]
        + (f" [{key[1]}]" if key[1] else ""))
    ms = statistics.median(times)
    print(f"{name[:57]:<58}{ms:>9.1f}{1e3 * args.batch / ms:>10.1f}{torch_ms / ms:>9.2f}")
  if parts:
    step = {"torch": torch_ms, "jax": statistics.median(rows[("jax_model", flag_sets[0])])}
    print(f"\nwhere the step goes (ms, median; default flags){'':<13}{'torch':>9}{'jax':>9}")
    get = lambda fw, k: statistics.median(parts[(fw, k)]) if (fw, k) in parts else float("nan")
    for label, fn in (
        ("forward (loss)", lambda fw: get(fw, "forward")),
        ("backward", lambda fw: get(fw, "forward_backward") - get(fw, "forward")),
        ("optimiser and the rest of the step", lambda fw: step[fw] - get(fw, "forward_backward")),
        ("image preparation (jax only)", lambda fw: get(fw, "image_prep"))):
      print(f"{label:<58}{fn('torch'):>9.1f}{fn('jax'):>9.1f}")


if __name__ == "__main__":
  main()
