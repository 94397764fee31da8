"""Metric writers: console, a JSONL file and TensorBoard event files (tensorboardX, no TF).

Only process 0 writes; other processes get a writer that drops everything, so callers
need no `if jax.process_index() == 0` of their own. Every write happens on the caller's
thread and is flushed before it returns, so a full disk or an I/O error surfaces at the step
that met it (tensorboardX's own writer thread would die silently and then block the run once
its queue filled).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Mapping

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

METRICS_FILE = "metrics.jsonl"


def _fmt(v: float) -> str:
  if not math.isfinite(v):
    return str(v)
  return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"


class MetricWriter:
  """Writes scalars to every enabled sink.

  `resume_step`: the step the run starts after (0 for a fresh run). The rows a killed run
  logged past its last checkpoint (all of them, when it was killed before its first one) are
  dropped from the JSONL log, since this run logs those steps again: readers see one row per
  step and split."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, console: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    self._console = console
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._path = os.path.join(workdir, METRICS_FILE)
    if resume_step is not None and os.path.isfile(self._path):
      _truncate_after(self._path, resume_step)
    self._jsonl = open(self._path, "a")
    if tensorboard:
      self._tb_dir = os.path.join(workdir, "tensorboard")
      os.makedirs(self._tb_dir, exist_ok=True)
      self._tb = EventsWriter(os.path.join(self._tb_dir, "events"))

  def write_scalars(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._console:
      body = "  ".join(f"{k}={_fmt(v)}" for k, v in scalars.items())
      logging.info("[%s] step %d  %s", prefix, step, body)
    with _naming(self._path):
      self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      with _naming(self._tb_dir):
        for k, v in scalars.items():
          self._tb_write(step, tb_summary.scalar(f"{prefix}/{k}", v))
        self._tb.flush()

  def write_histograms(self, step: int, arrays: Mapping[str, np.ndarray],
                       prefix: str = "train") -> None:
    """TensorBoard histograms of per-example values (e.g. FaceMix's kappa)."""
    if self._tb is None:
      return
    with _naming(self._tb_dir):
      for k, v in arrays.items():
        self._tb_write(step, tb_summary.histogram(
            f"{prefix}/{k}", np.asarray(v, np.float64).ravel(), "auto"))
      self._tb.flush()

  def _tb_write(self, step: int, summary) -> None:
    self._tb.write_event(event_pb2.Event(summary=summary, step=step, wall_time=time.time()))

  def close(self) -> None:
    """Closes the files; every row was flushed when written, so a failure here (the disk that
    stopped the run) loses nothing and is only logged, never raised over the run's own error."""
    for f in (self._jsonl, self._tb):
      if f is not None:
        try:
          f.close()
        except OSError as e:
          logging.warning("closing the metric files: %s", e)
    self._jsonl = self._tb = None


@contextlib.contextmanager
def _naming(path: str):
  """Gives an OSError raised by a write (which names no file: a full disk) the file's name."""
  try:
    yield
  except OSError as e:
    if e.filename:
      raise
    raise OSError(e.errno, e.strerror, path) from e


def write_json(path: str, obj) -> str:
  """`obj` as JSON at `path`, atomically: a reader (or a rerun after a crash) sees the old file
  or the new one, never half of one."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)
  return path


def _truncate_after(path: str, step: int) -> None:
  """Rewrites the JSONL log without rows past `step` and without a torn last line (a disk
  that filled, or a kill, mid-write), atomically: a crash leaves either file."""
  with open(path) as f:
    lines = f.readlines()
  rows = [_parse(line) for line in lines]
  keep = [line for line, row in zip(lines, rows) if row is not None and row["step"] <= step]
  if len(keep) == len(lines):
    return
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)
  torn = sum(row is None for row in rows)
  logging.info("%s: dropped %d rows logged past step %d by the interrupted run%s", path,
               len(lines) - len(keep) - torn, step,
               f" and {torn} torn line(s)" if torn else "")


def _parse(line: str) -> dict | None:
  """A line's record, or None for a line that is blank or not whole JSON (the last line of a
  log whose write was cut short)."""
  try:
    return json.loads(line) if line.strip() else None
  except json.JSONDecodeError:
    return None


def read_metrics(workdir: str) -> list[dict]:
  """The JSONL log as a list of records (for tests, plots and notebooks); a torn line, which
  only a write cut short leaves, is skipped."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [row for row in map(_parse, f) if row is not None]
