r"""Command line for the whole job and for every stage alone.

  python -m ssfer_jax.main --config configs/ssfer.py:cpu --workdir DIR   # the whole job
  python -m ssfer_jax.main --config configs/pretrain.py:cpu --workdir DIR \
      --config.data.dir=DATA_DIR [--config.batch_size=128 ...] [--mode figures]

A job config (configs/ssfer.py) runs data preparation, stages 1-3, the evaluation and the
report (ssfer_jax/job.py); a stage config runs that stage. Modes: `train` (resumes
automatically from DIR's latest checkpoint) and `figures` (runs the stage's
figure/evaluation hooks once on the latest checkpoint). Multi-host: on SLURM, Open MPI or a
TPU pod the processes find each other on their own; elsewhere pass
--coordinator_address host:port --num_processes N --process_id I.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import logging
import os
import sys
import textwrap

from absl import app, flags
import jax
from ml_collections import config_flags

import configs
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
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a one-line error for a bad --config.* override (an unknown field, a
  value of the wrong type) instead of a traceback through ml_collections."""
  if any(a in HELP_FLAGS for a in argv[1:]):
    sys.exit(print_help(argv))
  spec = _given(argv).get(_CONFIG.name)
  if spec:   # a missing file or an unknown variant: one line, not ml_collections' traceback
    try:
      load_config(spec)
    except errors.ConfigError as e:
      sys.exit(errors.report(e))
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    cause = e.__context__ if isinstance(e, AttributeError) and e.__context__ else e
    sys.stderr.write(f"{argv[0]}: bad flag: {type(cause).__name__}: {cause}\n"
                     "  --config.FIELD=VALUE must name a field of the config file (see its "
                     "get_config) with a value of its type; --helpfull lists the flags.\n")
    sys.exit(2)


def print_help(argv: list[str]) -> int:
  """--help: the usage, each config file's variants (from its docstring) and how to see and
  set fields; with --config FILE[:VARIANT] also that config's fields and values. Returns the
  exit status: 0 (absl's own help exits 1, as if it had failed), 2 for a bad --config."""
  spec = _given(argv).get(_CONFIG.name)
  usage = sys.modules["__main__"].__doc__ or __doc__   # label_noise's own, when it runs
  if "--helpfull" in argv:
    flag_help = flags.FLAGS.get_help()
  else:   # a command that reuses these flags lists its own, then these
    flag_help = flags.FLAGS.main_module_help() + (
        "" if __name__ == "__main__" else "\n" + flags.FLAGS.module_help(__name__))
  out = [usage.strip(), "", flag_help, "",
         "Config files (--config FILE:VARIANT) and their variants:"]
  for path in sorted(glob.glob(os.path.join(os.path.dirname(configs.__file__), "*.py"))):
    with open(path) as f:
      module = ast.parse(f.read())
    if not any(isinstance(n, ast.FunctionDef) and n.name == "get_config" for n in module.body):
      continue
    doc = (ast.get_docstring(module) or "").splitlines() or [""]
    start = next((i for i, line in enumerate(doc) if line.lstrip().startswith("Variants")), None)
    end = doc.index("", start) if start is not None and "" in doc[start:] else len(doc)
    out += ["", f"configs/{os.path.basename(path)}: {doc[0]}",
            *("  " + line for line in doc[start:end] if start is not None)]
  out += ["", textwrap.fill(
      "Fields: set any field of the chosen config with --config.FIELD=VALUE (e.g. "
      "--config.batch_size=64; in a job config --config.finetune.batch_size=64); an unknown "
      "field is an error. --config FILE:VARIANT --help lists that config's fields and their "
      "values" + (":" if spec else "."), 92), ""]
  print("\n".join(out), flush=True)
  if not spec:
    return 0
  try:
    config = load_config(spec)
  except errors.ConfigError as e:
    return errors.report(e)
  fields = workdir.flatten(config.to_dict())
  width = max(map(len, fields))
  print("\n".join([f"{spec}:", *(f"  {k:<{width}} {v!r}" for k, v in fields.items())]))
  return 0


def _given(argv: list[str]) -> dict[str, str]:
  """--name=value and --name value pairs of argv (enough to find --config before absl runs)."""
  out = {}
  for a, b in zip(argv[1:], argv[2:] + [""]):
    if a.startswith("--"):
      name, eq, value = a[2:].partition("=")
      out[name] = value if eq else b
  return out


def load_config(spec: str):
  """The config `--config FILE[:VARIANT]` names; ConfigError for a missing file or an unknown
  variant (the message lists the variants: `python -m ssfer_jax.main --help`)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.ConfigError(f"--config {spec}: no file {path}; `python -m ssfer_jax.main "
                             "--help` lists the config files and their variants.")
  try:
    return _load(path).get_config(*([variant] if variant else []))
  except ValueError as e:
    raise errors.ConfigError(f"--config {spec}: {e}") from None


def _load(path: str):
  """A config file as a module, as ml_collections loads it for --config."""
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def setup(argv):
  """What every command built on these flags does first: join the other processes, make the
  workdir, route the logs; returns the config. (ssfer_jax.analysis.label_noise reuses it.)"""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  logs.quiet_console()   # before JAX's first use logs its backend probe
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _INIT_TIMEOUT.value, _HEARTBEAT.value)
    workdir.prepare(_WORKDIR.value)
    workdir.check_free(_WORKDIR.value)   # a refused job must not write to the holder's log
  except errors.UserError as e:   # before the log file exists: to stderr alone
    sys.exit(errors.report(e))
  index = jax.process_index()
  log_file = logs.setup(_WORKDIR.value, "log.txt" if index == 0 else f"log.process{index}.txt")
  logging.info("library logs: %s", log_file)
  # Masking noise and dropout keys then shard instead of being replicated and sliced.
  jax.config.update("jax_threefry_partitionable", True)
  return _CONFIG.value


def main(argv):
  exit_on_errors(lambda: _main(argv))


def _main(argv):
  config = setup(argv)
  if job.is_job_config(config):
    if _MODE.value != "train":
      raise app.UsageError("--mode figures runs one stage's hooks: give that stage's config.")
    job.run(config, _WORKDIR.value)
    return
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage={config.stage!r}; known stages: {sorted(STAGES)}")
  if config.data.dir is None:
    raise app.UsageError("set --config.data.dir to a dataset built by `python -m data_prep build`.")
  make_stage = STAGES[config.stage]
  if _MODE.value == "train":
    loop.train(config, _WORKDIR.value, make_stage,
               allow_schedule_change=_ALLOW_SCHEDULE_CHANGE.value)
  else:
    step = loop.run_hooks(config, _WORKDIR.value, make_stage)
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
  except OSError as e:   # a full disk outside a stage's run (the log file, the job's files)
    if e.errno not in loop.DISK_FULL:
      raise
    sys.exit(errors.report(loop.DiskFullError(
        f"{e.strerror} writing {e.filename}: the command stopped; checkpoints already written "
        "are kept. Free space, then rerun the same command to resume."), log=True))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
