"""What the benchmark tables print in their headers about the machine they ran on."""

import platform


def cpu_model() -> str:
  """The CPU model from /proc/cpuinfo (Linux), else the architecture."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()
