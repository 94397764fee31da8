"""One process of a two-process run under jax.distributed on localhost (run by a test).

argv: coordinator_port process_id data_dir workdir stage. Prints one JSON line: this
process's view of the trained parameters (a global checksum) and of the mesh; for the
fine-tuning stage also its evaluation of the val and test lists.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.experimental import multihost_utils

from configs import finetune as finetune_config
from configs import pretrain_mae
from ssfer_jax import distributed, evaluate
from ssfer_jax.input import records
from ssfer_jax.trainers import finetune, loop, pretrain


def main():
  port, pid, data_dir, workdir, stage = sys.argv[1:]
  distributed.initialize(f"localhost:{port}", 2, int(pid), timeout_s=120)
  jax.config.update("jax_threefry_partitionable", True)
  module, make_stage = {"pretrain": (pretrain_mae, pretrain.make_stage),
                        "finetune": (finetune_config, finetune.make_stage)}[stage]
  config = module.get_config("test").unlock()
  config.data.dir = data_dir
  config.mesh.shape = (-1, 2)
  state = loop.train(config, workdir, make_stage)
  leaves = [multihost_utils.process_allgather(x, tiled=True) for x in jax.tree.leaves(state.params)]
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "devices": jax.device_count(), "step": int(state.step),
         "checksum": float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in leaves))}
  if stage == "finetune":
    plan = loop.plan_run(config)
    model = finetune.make_model(config, len(records.load_manifest(data_dir)["classes"]))
    ev = evaluate.Evaluator(
        data_dir=data_dir, split="default", lists=("val", "test"),
        model_classes=records.load_manifest(data_dir)["classes"], image_size=32,
        mean=config.data.mean, std=config.data.std, dtype=np.float32, batch_size=8,
        mesh=plan.mesh, apply_fn=lambda p, x: model.apply({"params": p}, x, train=False),
        num_threads=1)
    report = ev(state.params)
    out.update(eval_count=report["count"], eval_read=report["records_read"],
               eval_accuracy=report["accuracy"])
  print(json.dumps(out))
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
