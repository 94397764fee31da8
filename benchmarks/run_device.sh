#!/usr/bin/env bash
# The GPU checks in one call of at most ~5 minutes on a lent machine (its image has jax, flax,
# optax, orbax, opencv, torch and timm; grain, array-record, ml-collections and clu travel as
# wheels in .whl/, see benchmarks/README.md). Writes $OUT/device.json and $OUT/device.md
# (benchmarks/device_report.py: bf16 peak, MAE ViT-B/16 MFU with cuDNN and XLA attention, the
# official PyTorch MAE eager and compiled, the stage-2/3 steps, the memory limit, the input
# pipeline), and the full log.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench_out}; mkdir -p "$OUT"
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
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
  timeout 330 python3 -m benchmarks.device_report
} 2>&1 | tee "$OUT/bench.log"
