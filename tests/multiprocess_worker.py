"""One process of a two-process MAE run under jax.distributed on localhost (run by a test).

argv: coordinator_port process_id data_dir workdir. Prints one JSON line: this process's
view of the trained parameters (a global checksum) and of the mesh.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.experimental import multihost_utils

from configs import pretrain_mae
from ssfer_jax import distributed
from ssfer_jax.trainers import loop, pretrain


def main():
  port, pid, data_dir, workdir = sys.argv[1:]
  distributed.initialize(f"localhost:{port}", 2, int(pid), timeout_s=120)
  jax.config.update("jax_threefry_partitionable", True)
  config = pretrain_mae.get_config("test").unlock()
  config.data.dir = data_dir
  config.mesh.shape = (-1, 2)
  state = loop.train(config, workdir, pretrain.make_stage)
  leaves = [multihost_utils.process_allgather(x, tiled=True) for x in jax.tree.leaves(state.params)]
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "devices": jax.device_count(), "step": int(state.step),
                    "checksum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
