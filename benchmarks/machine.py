"""What the benchmark tables print in their headers about the machine they ran on."""

import platform

# The vector extensions that decide which matmul kernels a CPU gets (XLA's and PyTorch's MKL):
# AVX2/FMA everywhere x86-64 is recent, AVX-512 (with bf16 / VNNI) and AMX on newer Xeons.
VECTOR_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                     "amx_tile", "amx_bf16")


def cpu_model() -> str:
  """The CPU model and its vector extensions from /proc/cpuinfo (Linux), e.g. "AMD EPYC 7B13
  (avx2 fma)", else the architecture."""
  try:
    with open("/proc/cpuinfo") as f:
      first = f.read().split("\n\n", 1)[0]   # the first processor's block
  except OSError:
    return platform.machine()
  info = {key.strip(): value.strip()
          for key, _, value in (line.partition(":") for line in first.splitlines())}
  if "model name" not in info:
    return platform.machine()
  flags = set(info.get("flags", "").split())
  present = [f for f in VECTOR_EXTENSIONS if f in flags]
  return f"{info['model name']} ({' '.join(present) or 'no AVX2'})"
