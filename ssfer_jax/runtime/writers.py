"""Metric writers: console, a JSONL file and TensorBoard event files (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that drops everything, so callers
need no `if jax.process_index() == 0` of their own.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Mapping

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"


def _fmt(v: float) -> str:
  if not math.isfinite(v):
    return str(v)
  return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


class MetricWriter:
  """Writes scalars to every enabled sink.

  `resume_step`: the step a resumed run restarts after. The rows a killed run logged past its
  last checkpoint are dropped from the JSONL log (the resumed run logs those steps again), so
  readers see one row per step and split."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, console: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    self._console = console
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None and os.path.exists(path):
      _truncate_after(path, resume_step)
    self._jsonl = open(path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._console:
      body = "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
      logging.info("[%s] step %d  %s", prefix, step, body)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def write_histograms(self, step: int, arrays: Mapping[str, np.ndarray],
                       prefix: str = "train") -> None:
    """TensorBoard histograms of per-example values (e.g. FaceMix's kappa)."""
    if self._tb is None:
      return
    for k, v in arrays.items():
      self._tb.add_histogram(f"{prefix}/{k}", np.asarray(v, np.float64).ravel(), step)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def write_json(path: str, obj) -> str:
  """`obj` as JSON at `path`, atomically: a reader (or a rerun after a crash) sees the old file
  or the new one, never half of one."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def _truncate_after(path: str, step: int) -> None:
  """Rewrites the JSONL log without rows past `step` (atomically: a crash leaves either)."""
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  keep = [line for line in lines if json.loads(line)["step"] <= step]
  if len(keep) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
  logging.info("%s: dropped %d rows logged past step %d by the interrupted run", path,
               len(lines) - len(keep), step)


def read_metrics(workdir: str) -> list[dict]:
  """The JSONL log as a list of records (for tests, plots and notebooks)."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
