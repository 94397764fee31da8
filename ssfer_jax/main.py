"""Command line for the whole job and for every stage alone.

  python -m ssfer_jax.main --config configs/ssfer.py:cpu --workdir DIR   # the whole job
  python -m ssfer_jax.main --config configs/pretrain.py:cpu --workdir DIR \
      --config.data.dir=DATA_DIR [--config.batch_size=128 ...] [--mode figures]

A job config (configs/ssfer.py) runs data preparation, stages 1-3, the evaluation and the
report (ssfer_jax/job.py); a stage config runs that stage. Modes: `train` (resumes automatically from DIR's latest checkpoint) and `figures` (runs the
stage's figure/evaluation hooks once on the latest checkpoint). Multi-host: on SLURM, Open
MPI or a TPU pod the processes find each other on their own; elsewhere pass
--coordinator_address host:port --num_processes N --process_id I.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
import jax
from ml_collections import config_flags

from ssfer_jax import errors, job
from ssfer_jax.runtime import distributed, logs, preemption, workdir
from ssfer_jax.trainers import loop
from ssfer_jax.trainers.stages import STAGES

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file, with :VARIANT.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and figures go here.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "figures"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                     "Seconds to wait for all processes to join.")
_HEARTBEAT = flags.DEFINE_integer("distributed_heartbeat_s", 100,
                                  "Seconds after which a silent process counts as dead and the "
                                  "others stop (non-zero exit) instead of waiting for it.")
_ALLOW_SCHEDULE_CHANGE = flags.DEFINE_bool(
    "allow_schedule_change", False,
    "Resume although total_steps / num_epochs changed (the learning-rate schedule reshapes).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for a bad --config.* override (an unknown field, a
  value of the wrong type) instead of a traceback through ml_collections."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    cause = e.__context__ if isinstance(e, AttributeError) and e.__context__ else e
    sys.stderr.write(f"{argv[0]}: bad flag: {type(cause).__name__}: {cause}\n"
                     "  --config.FIELD=VALUE must name a field of the config file (see its "
                     "get_config) with a value of its type; --helpfull lists the flags.\n")
    sys.exit(2)


def setup(argv):
  """What every command built on these flags does first: join the other processes, make the
  workdir, route the logs; returns the config. (ssfer_jax.analysis.label_noise reuses it.)"""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _INIT_TIMEOUT.value, _HEARTBEAT.value)
    workdir.prepare(_WORKDIR.value)
  except errors.UserError as e:   # before the log file exists: to stderr alone
    sys.exit(errors.report(e))
  index = jax.process_index()
  log_file = logs.setup(_WORKDIR.value, "log.txt" if index == 0 else f"log.process{index}.txt")
  logging.info("library logs: %s", log_file)
  # Masking noise and dropout keys then shard instead of being replicated and sliced.
  jax.config.update("jax_threefry_partitionable", True)
  return _CONFIG.value


def main(argv):
  config = setup(argv)
  if job.is_job_config(config):
    if _MODE.value != "train":
      raise app.UsageError("--mode figures runs one stage's hooks: give that stage's config.")
    exit_on_errors(lambda: job.run(config, _WORKDIR.value))
    return
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage={config.stage!r}; known stages: {sorted(STAGES)}")
  if config.data.dir is None:
    raise app.UsageError("set --config.data.dir to a dataset built by `python -m data_prep build`.")
  make_stage = STAGES[config.stage]
  if _MODE.value == "train":
    exit_on_errors(lambda: loop.train(config, _WORKDIR.value, make_stage,
                                       allow_schedule_change=_ALLOW_SCHEDULE_CHANGE.value))
  else:
    step = exit_on_errors(lambda: loop.run_hooks(config, _WORKDIR.value, make_stage))
    logging.info("figures for step %d written under %s", step, _WORKDIR.value)


def exit_on_errors(fn):
  """Runs `fn`; a preemption exits with its code, a user's error with its one line (status 2)."""
  try:
    return fn()
  except preemption.Preempted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)
  except errors.UserError as e:
    sys.exit(errors.report(e, log=True))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
