#!/usr/bin/env bash
# Runs every benchmark in one call on a lent GPU machine (its image has jax, flax, optax,
# orbax and opencv; the rest travels as wheels in .whl/, see benchmarks/README.md).
# Results land in $OUT (or ./bench_out) as one log and JSON lines.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench_out}; mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
  python3 benchmarks/step_throughput.py --stage mae --variant vit_b16 --variant vit_s16 --measure_peak \
    --json "$out/steps.jsonl"
  python3 benchmarks/step_throughput.py --stage mae --variant vit_b16 --remat --json "$out/steps.jsonl"
  python3 benchmarks/step_throughput.py --stage finetune --stage semisup --variant vit_b16 \
    --mix none --mix facemix --teacher ema --teacher student --teacher ema,leaf \
    --json "$out/steps.jsonl"
  python3 benchmarks/input_pipeline.py --json "$out/input.json"
} 2>&1 | tee "$out/bench.log"
