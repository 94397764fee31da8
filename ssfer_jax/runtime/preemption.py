"""Preemption: stop at a step every process agrees on, save, and exit cleanly.

Schedulers preempt with SIGTERM and a grace period (Ctrl-C sends SIGINT). On a multi-process
job JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any
host and agrees on a safe step across all of them: `multihost_utils.
reached_preemption_sync_point` turns true at the same step everywhere (orbax builds on the
same call). A single process has no such service, so this module catches SIGTERM and SIGINT
itself and stops at the next step boundary. Either way the loop then saves that step, waits
for the write, and raises `Preempted`; the command line exits 143 (SIGTERM) or 130 (SIGINT),
the shell's codes for those signals, with the checkpoint on disk. Rerunning the same
command resumes there.

The grace period must cover the rest of the current step, any evaluation due at it, and one
checkpoint write (`benchmarks/RESULTS.md` and docs/RELIABILITY.md give measured figures).
"""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(Exception):
  """Training stopped early on a preemption notice after saving `step`."""

  def __init__(self, step: int, signum: int, directory: str):
    self.step, self.signum = step, signum
    self.exit_code = EXIT_CODES.get(signum, 143)
    super().__init__(f"preempted ({signal.Signals(signum).name}) at step {step}: checkpoint "
                     f"saved in {directory}; rerun the same command to resume.")


class Watch:
  """Between `start()` and `stop()`: `reached(step)` says whether to save and stop after
  `step`."""

  def __init__(self):
    self.signum = None
    self._distributed = jax.process_count() > 1
    self._previous = {}

  def start(self) -> "Watch":
    if self._distributed:   # JAX's service owns SIGTERM on a multi-process job
      return self
    try:
      for s in EXIT_CODES:
        self._previous[s] = signal.signal(s, self._catch)
    except ValueError:   # not the main thread: signals cannot be caught here
      logging.warning("training outside the main thread: SIGTERM/SIGINT will not save")
    return self

  def _catch(self, signum, frame) -> None:
    del frame
    if self.signum is None:
      logging.warning("%s received: stopping after this step to save a checkpoint",
                      signal.Signals(signum).name)
    self.signum = signum

  def reached(self, step: int) -> bool:
    if not self._distributed:
      return self.signum is not None
    try:
      reached = multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:   # the preemption service is off (jax_enable_preemption_service)
      return False
    if reached:
      self.signum = signal.SIGTERM
    return reached

  def stop(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
