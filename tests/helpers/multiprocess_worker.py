"""One process of a two-process run under jax.distributed on localhost (run by a test).

argv: coordinator_port process_id data_dir workdir stage [total_steps heartbeat_s].
Prints one JSON line: this
process's view of the trained parameters (a global checksum) and of the mesh; for the
fine-tuning stage also its evaluation of the val and test lists.
"""

import json
import os
import sys

# SSFER_TEST_PROCESSES processes (default 2) share 8 simulated devices (XLA_FLAGS, set by the
# test, gives this one its share); stage "semisup" starts from the stage-2 run in
# SSFER_TEST_INIT_FROM.
PROCESSES = int(os.environ.get("SSFER_TEST_PROCESSES", "2"))
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from jax.experimental import multihost_utils

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from configs import semisup as semisup_config
from ssfer_jax import evaluate
from ssfer_jax.input import records
from ssfer_jax.runtime import distributed, preemption
from ssfer_jax.trainers import finetune, loop, pretrain, semisup


def main():
  port, pid, data_dir, workdir, stage = sys.argv[1:6]
  total_steps, heartbeat = (int(a) for a in (sys.argv[6:8] or (0, 100)))
  distributed.initialize(f"localhost:{port}", PROCESSES, int(pid), timeout_s=120,
                         heartbeat_timeout_s=heartbeat)
  jax.config.update("jax_threefry_partitionable", True)
  module, make_stage = {"pretrain": (pretrain_config, pretrain.make_stage),
                        "finetune": (finetune_config, finetune.make_stage),
                        "semisup": (semisup_config, semisup.make_stage)}[stage]
  config = module.get_config("test").unlock()
  config.data.dir = data_dir
  if stage == "semisup":
    config.init_from = os.environ["SSFER_TEST_INIT_FROM"]
    config.batch_size = 8
  config.mesh.shape = (-1, 2)
  if total_steps:
    config.total_steps = total_steps
  try:
    state = loop.train(config, workdir, make_stage, allow_schedule_change=bool(total_steps))
  except preemption.Preempted as e:
    print(json.dumps({"process": jax.process_index(), "preempted_at": e.step}), flush=True)
    sys.exit(e.exit_code)
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
