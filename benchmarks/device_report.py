"""Everything the GPU must confirm, in one call of about 5 minutes (the parts' limits add up
to 6.5; not yet run on a GPU: none has been lent to this project's tasks so far): writes
$OUT/device.json and $OUT/device.md (one Markdown table per part). `run_device.sh` runs it.

Parts, each in its own process with its own time limit (a part that fails or times out is
recorded as such; the others still run):
  peak       the measured bf16 matmul peak (8192^3), beside the spec peak (989 TFLOP/s dense
             bf16 on H100/H200)
  mae        the MAE ViT-B/16 step at 224 px, bf16, cuDNN and XLA attention: step time,
             images/s, MFU against the spec peak and against the measured one
  torch      the official MAE (benchmarks/torch_steps.py --stage mae) at the same shape, bf16 autocast,
             eager and torch.compile: our images/s over theirs
  stages     the stage-2 (FaceMix) and stage-3 (EMA teacher) ViT-B/16 steps
  memory     the largest MAE batch per device benchmarks/fsdp_memory.py estimated for this
             GPU's memory (B, no remat), run for real: fits or not, and the measured peak
  input      the input pipeline on the host's cores (benchmarks/input_pipeline.py)

  OUT=/tmp/out python -m benchmarks.device_report [--batch 256] [--skip torch]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC_PEAK = {"H100": 989.0, "H200": 989.0}   # dense bf16 TFLOP/s
# benchmarks/fsdp_memory.py's estimates (RESULTS.md): largest MAE ViT-B/16 batch per device
# without remat, for 80 GB and 141 GB.
MEMORY_ESTIMATE = {80: 458, 141: 810}

PEAK = r"""
import json, time, jax, jax.numpy as jnp
n, reps = 8192, 30
a = jnp.ones((n, n), jnp.bfloat16)
f = jax.jit(lambda x: x @ x)
f(a).block_until_ready()
t = time.perf_counter()
for _ in range(reps):
  out = f(a)
out.block_until_ready()
d = jax.devices()[0]
print(json.dumps({"device": d.device_kind, "tflops": 2 * n**3 * reps / (time.perf_counter() - t) / 1e12,
                  "memory_gb": d.memory_stats().get("bytes_limit", 0) / 1e9 if d.memory_stats() else None}))
"""

MEMORY = r"""
import json, sys, time
import jax
from benchmarks import step_throughput as st
batch = int(sys.argv[1])
try:
  r = st.bench("mae", "vit_b16", None, batch, None, 3, 0.0, "bfloat16", False, "cudnn")
  stats = jax.devices()[0].memory_stats() or {}
  print(json.dumps({"batch": batch, "fits": True, "step_ms": r["step_ms"],
                    "peak_gb": stats.get("peak_bytes_in_use", 0) / 1e9,
                    "limit_gb": stats.get("bytes_limit", 0) / 1e9}))
except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED
  print(json.dumps({"batch": batch, "fits": False, "error": str(e).splitlines()[0][:300]}))
"""


def run(cmd: list[str], timeout: int) -> tuple[list[dict], str]:
  """JSON lines a part printed, and its error (or "")."""
  t = time.perf_counter()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
  except subprocess.TimeoutExpired:
    return [], f"timed out after {timeout} s"
  rows = []
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      rows.append(json.loads(line))
  err = "" if out.returncode == 0 else f"exit {out.returncode}: {out.stderr[-600:]}"
  sys.stderr.write(f"{' '.join(cmd[:3])}... {time.perf_counter() - t:.0f} s {err[:200]}\n")
  return rows, err


def steps(args, extra: list[str], out: str, timeout: int) -> tuple[list[dict], str]:
  path = os.path.join(out, "steps.jsonl")
  if os.path.exists(path):
    os.remove(path)
  _, err = run([sys.executable, "benchmarks/step_throughput.py", "--batch", str(args.batch),
                "--steps", "10", "--json", path, *extra], timeout)
  rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
  return rows, err


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=256)
  ap.add_argument("--skip", action="append", default=[])
  args = ap.parse_args()
  out = os.environ.get("OUT", "bench_out")
  os.makedirs(out, exist_ok=True)
  report = {"date": str(datetime.date.today()), "parts": {}}

  def part(name, fn):
    if name in args.skip:
      return
    t = time.perf_counter()
    rows, err = fn()
    report["parts"][name] = {"rows": rows, "error": err, "seconds": round(time.perf_counter() - t)}

  part("peak", lambda: run([sys.executable, "-c", PEAK], 30))
  peak_rows = report["parts"].get("peak", {}).get("rows") or [{}]
  device = peak_rows[0].get("device", "unknown")
  spec = next((v for k, v in SPEC_PEAK.items() if k in device), None)
  measured = peak_rows[0].get("tflops")
  part("mae", lambda: steps(args, ["--stage", "mae", "--variant", "vit_b16", "--dtype",
                                   "bfloat16", "--attention_impl", "cudnn"], out, 60))
  mae_xla, _ = ([], "") if "mae" in args.skip else steps(
      args, ["--stage", "mae", "--variant", "vit_b16", "--dtype", "bfloat16",
             "--attention_impl", "xla"], out, 45)
  if "mae" in report["parts"]:
    report["parts"]["mae"]["rows"] += mae_xla
  torch_cmd = [sys.executable, "benchmarks/torch_steps.py", "--width", "768", "--depth", "12",
               "--heads", "12", "--image", "224", "--batch", str(args.batch), "--steps", "10",
               "--device", "cuda", "--dtype", "bfloat16", "--threads", "8"]
  part("torch", lambda: _torch_parts(torch_cmd))
  part("stages", lambda: steps(args, ["--stage", "finetune", "--stage", "semisup", "--variant",
                                      "vit_b16", "--mix", "facemix", "--teacher", "ema",
                                      "--dtype", "bfloat16", "--attention_impl", "cudnn"], out, 70))
  memory_gb = peak_rows[0].get("memory_gb") or 0
  estimate = MEMORY_ESTIMATE[141] if memory_gb > 100 else MEMORY_ESTIMATE[80]
  part("memory", lambda: run([sys.executable, "-c", MEMORY, str(estimate)], 45))
  part("input", lambda: run([sys.executable, "benchmarks/input_pipeline.py", "--json",
                             os.path.join(out, "input.json")], 30))

  # The summary: MFU against both peaks, the ratio to torch.
  mae_rows = report["parts"].get("mae", {}).get("rows", [])
  torch_rows = report["parts"].get("torch", {}).get("rows", [])
  lines = [f"# Device report, {device}, {report['date']}", "",
           f"bf16 matmul: measured {measured or 0:.0f} TFLOP/s, spec {spec or 'unknown'}", "",
           "| step | attention | batch | step ms | images/s | MFU (spec) | MFU (measured) |",
           "|---|---|---:|---:|---:|---:|---:|"]
  for r in mae_rows + report["parts"].get("stages", {}).get("rows", []):
    tf = r["tflops_per_s"]
    lines.append(f"| {r['stage']} {r['variant']} | {r['attention']} | {r['batch']} | "
                 f"{r['step_ms']} | {r['images_per_s']} | "
                 f"{tf / spec if spec else float('nan'):.1%} | "
                 f"{tf / measured if measured else float('nan'):.1%} |")
  if torch_rows and mae_rows:
    best = max(r["images_per_s"] for r in mae_rows)
    lines += ["", "| PyTorch MAE | step ms | images/s | ours / theirs |", "|---|---:|---:|---:|"]
    for t in torch_rows:
      ips = args.batch / t["median_ms"] * 1e3
      lines.append(f"| {'torch.compile' if t['compile'] else 'eager'} bf16 | {t['median_ms']} | "
                   f"{ips:.0f} | {best / ips:.2f} |")
  mem = report["parts"].get("memory", {}).get("rows") or []
  if mem:
    lines += ["", f"memory: MAE B/16 batch {mem[0]['batch']} per device (the estimate for this "
              f"GPU) {'fits' if mem[0]['fits'] else 'does not fit'}"
              + (f", peak {mem[0]['peak_gb']:.1f} of {mem[0]['limit_gb']:.1f} GB"
                 if mem[0]["fits"] else f": {mem[0]['error']}")]
  for name, p in report["parts"].items():
    if p["error"]:
      lines.append(f"\n{name}: {p['error'][:300]}")
  with open(os.path.join(out, "device.json"), "w") as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out, "device.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def _torch_parts(cmd: list[str]) -> tuple[list[dict], str]:
  eager, e1 = run(cmd, 40)
  compiled, e2 = run(cmd + ["--compile"], 70)
  return eager + compiled, "; ".join(e for e in (e1, e2) if e)


if __name__ == "__main__":
  main()
