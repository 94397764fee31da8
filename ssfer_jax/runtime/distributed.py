"""Multi-host start-up: `jax.distributed.initialize` when the environment asks for it."""

from __future__ import annotations

import logging
import os
import socket
import time

import jax

from ssfer_jax import errors

# Environment variables that mean "this process is one of several" to a cluster detector.
_CLUSTER_HINTS = {
    "SLURM": lambda e: int(e.get("SLURM_NTASKS", "1")) > 1,
    "Open MPI": lambda e: int(e.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
    "TPU pod": lambda e: len([h for h in e.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1,
    "Kubernetes JobSet": lambda e: "JOBSET_NAME" in e and "JAX_COORDINATOR_ADDRESS" in e,
}


class JoinError(errors.UserError, RuntimeError):
  """This process could not join the multi-process job."""


def _wait_for_coordinator(address: str, num_processes: int, process_id: int,
                          timeout_s: int) -> None:
  """Returns once process 0's coordination service accepts connections; JoinError, naming
  the address and the fix, if it does not within `timeout_s`."""
  host, _, port = address.rpartition(":")
  deadline, error = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
      return
    except (OSError, ValueError) as e:
      error = e
      time.sleep(0.5)
  raise JoinError(
      f"process {process_id} of {num_processes} could not reach the coordinator at {address} "
      f"within {timeout_s}s ({error}). Check that the address is process 0's host and port, "
      "reachable from here, and that process 0 was started (--distributed_timeout_s sets "
      "the wait).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> bool:
  """Joins the job's processes; returns whether `jax.distributed` was initialised.

  Explicit coordinator flags win; otherwise a recognised cluster environment triggers
  JAX's own auto-detection; a plain single process does nothing. When a process dies, JAX's
  coordination service notices within `heartbeat_timeout_s` and terminates the others
  (non-zero exit) instead of leaving them blocked in a collective; rerunning the job resumes.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id as well.")
    if process_id != 0:   # JAX aborts the process (no Python error) when it cannot connect
      _wait_for_coordinator(coordinator_address, num_processes, process_id, timeout_s)
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    detected = [name for name, hint in _CLUSTER_HINTS.items() if hint(os.environ)]
    if not detected:
      return False
    logging.info("cluster environment detected (%s): auto-initialising jax.distributed", detected)
    jax.distributed.initialize(initialization_timeout=timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
