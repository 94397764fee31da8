"""Multi-host start-up: `jax.distributed.initialize` when the environment asks for it."""

from __future__ import annotations

import logging
import os

import jax

# Environment variables that mean "this process is one of several" to a cluster detector.
_CLUSTER_HINTS = {
    "SLURM": lambda e: int(e.get("SLURM_NTASKS", "1")) > 1,
    "Open MPI": lambda e: int(e.get("OMPI_COMM_WORLD_SIZE", "1")) > 1,
    "TPU pod": lambda e: len([h for h in e.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1,
    "Kubernetes JobSet": lambda e: "JOBSET_NAME" in e and "JAX_COORDINATOR_ADDRESS" in e,
}


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300) -> bool:
  """Joins the job's processes; returns whether `jax.distributed` was initialised.

  Explicit coordinator flags win; otherwise a recognised cluster environment triggers
  JAX's own auto-detection; a plain single process does nothing.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id as well.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  else:
    detected = [name for name, hint in _CLUSTER_HINTS.items() if hint(os.environ)]
    if not detected:
      return False
    logging.info("cluster environment detected (%s): auto-initialising jax.distributed", detected)
    jax.distributed.initialize(initialization_timeout=timeout_s)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
