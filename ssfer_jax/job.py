"""The whole SSFER job from one command: data preparation, MAE pretraining, FaceMix
fine-tuning, semi-supervised fine-tuning, the test evaluation and a report.

  python -m ssfer_jax.main --config configs/ssfer.py:VARIANT --workdir DIR [--config.F=V]

WORKDIR/
  job.json          the job's resolved config: each stage's section as that stage ran it
  data/             the build and split (unless data.dir names another build)
  pretrain/ finetune/ semisup/    one stage run each: checkpoints, metrics, figures, result.json
  evaluation.json   the test table: the majority class, the classical floor (linear models on
                    pixels and HOG) and each classifier stage
  report.md         with report/*.png

A stage is done when its result.json exists (the loop writes it atomically at its last step).
A rerun skips the done stages and resumes the first unfinished one at its last checkpoint
(the loop's own resume), so an interruption anywhere (Ctrl-C, SIGKILL, preemption) costs at
most the steps since that checkpoint. A section of the config may change only until its stage
has started: afterwards the rerun is refused with the fields that changed, since the stages
after it were (or are being) built on what it produced; so is training a stage while a later
one has started (its directory was removed to redo it, but not theirs). The evaluation is
redone whenever the stage results it read (by sha256) or its lists change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ssfer_jax import errors, evaluate, job_report, results
from ssfer_jax.analysis import classical
from ssfer_jax.input import records
from ssfer_jax.runtime import sharding, workdir as workdir_lib, writers
from ssfer_jax.trainers import loop
from ssfer_jax.trainers.stages import STAGES

JOB_FILE = "job.json"
EVALUATION_FILE = "evaluation.json"
DATA = "data"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACEHOLDERS = {"demo": os.path.join(REPO, "data_prep", "demo_data")}
# Job fields that may change after their section started: they change nothing computed.
SAFE_FIELDS = ("data.raw", "evaluate.batch_size")


class JobError(errors.UserError, RuntimeError):
  """The job cannot run as configured (a bad stage list, missing data, a changed upstream)."""


def is_job_config(config: ml_collections.ConfigDict) -> bool:
  return "stages" in config


def data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return os.path.abspath(config.data.dir or os.path.join(workdir, DATA))


def stage_configs(config: ml_collections.ConfigDict, workdir: str) -> dict[str, ml_collections.ConfigDict]:
  """Each stage's own config, with the job's data and the previous stage's run filled in."""
  stages = tuple(config.stages)
  order = [s for s in ("pretrain", "finetune", "semisup") if s in stages]
  if not stages or list(stages) != order or len(set(stages)) != len(stages):
    raise JobError(f"stages={list(stages)}: list some of pretrain, finetune, semisup, in that "
                   "order, each once.")
  out = {}
  for name in stages:
    c = config[name].copy_and_resolve_references().unlock()
    c.data.dir = data_dir(config, workdir)
    c.data.split = config.data.split
    previous = {"finetune": "pretrain", "semisup": "finetune"}.get(name)
    if previous in stages:
      if c.init_from:
        raise JobError(f"{name}.init_from={c.init_from!r}, but {previous} is in the stages and "
                       f"{name} starts from its run: drop {previous} from the stages to start "
                       "from another one, or unset init_from.")
      c.init_from = os.path.join(os.path.abspath(workdir), previous)
    elif name == "semisup" and not c.init_from:
      raise JobError("stages has semisup without finetune: set --config.semisup.init_from to a "
                     "finished stage-2 run, or add finetune to the stages.")
    c.lock()
    out[name] = c
  return out


def resolved(config: ml_collections.ConfigDict,
             configs: Mapping[str, ml_collections.ConfigDict]) -> dict[str, Any]:
  """The job as JSON, each stage's section as that stage runs it (`configs`: stage_configs)."""
  out = json.loads(config.to_json_best_effort())
  for name, c in configs.items():
    out[name] = json.loads(c.to_json_best_effort())
  return out


def _started(workdir: str, section: str, ddir: str) -> bool:
  if section == DATA:
    return os.path.exists(os.path.join(ddir, records.MANIFEST))
  return os.path.exists(os.path.join(workdir, section, "config.json"))


def check_unchanged(saved: Mapping[str, Any], current: Mapping[str, Any], workdir: str,
                    ddir: str) -> None:
  """Refuses a config that changes a section whose stage has started (fields a stage may
  change on resume, such as logging cadence or threads, excepted). The evaluation is not
  guarded: it is redone whenever its lists or the results it read change."""
  changed = []
  for section in (DATA, *current["stages"]):
    if section not in saved or not _started(workdir, section, ddir):
      continue
    for field, old, new in workdir_lib.config_diff(saved[section], current[section]):
      if (field not in workdir_lib.SAFE_FIELDS and f"{section}.{field}" not in SAFE_FIELDS
          and not workdir_lib.added_as_before(field, old, new)):
        changed.append(f"  {section}.{field}: {old!r} when it ran, {new!r} now")
  if changed:
    raise JobError(
        f"{workdir} holds a job that already ran these stages under another config:\n"
        + "\n".join(changed) + "\nSet them back, or remove the stage's directory (and those "
        "after it) to redo it, or use another --workdir.")


def _placeholders(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Values for {demo} and {raw} in data.build / split_args, quoted for the shell split."""
  return {k: shlex.quote(v) for k, v in {**PLACEHOLDERS, "raw": config.data.raw or "{raw}"}.items()}


def _args(text: str, config: ml_collections.ConfigDict, what: str) -> list[str]:
  args = shlex.split(text.format(**_placeholders(config)))
  if any("{raw}" in a for a in args):
    raise JobError(f"data.{what} reads the raw dataset: set --config.data.raw to its folder.")
  return args


def prepare_data(config: ml_collections.ConfigDict, ddir: str) -> None:
  """Builds the dataset and writes the split unless they exist (on process 0; the others wait)."""
  from data_prep import __main__ as data_prep  # pylint: disable=g-import-not-at-top

  manifest = os.path.join(ddir, records.MANIFEST)
  split = records.split_file_name(ddir, config.data.split)
  if jax.process_index() == 0:
    if not os.path.exists(manifest):
      if not config.data.build:
        raise JobError(f"data.dir {ddir} holds no build ({manifest} missing) and data.build is "
                       "empty: point data.dir at a `data_prep build` output or set data.build.")
      argv = ["build", "--out", ddir, *_args(config.data.build, config, "build")]
      logging.info("data: python -m data_prep %s", shlex.join(argv))
      if data_prep.main(argv):
        raise JobError(f"building {ddir} failed (see the error above); fix data.build.")
    if not os.path.exists(split):
      if not config.data.split_args:
        raise JobError(f"{split} missing and data.split_args empty: set the split's arguments "
                       "or name an existing split with data.split.")
      argv = ["split", "--data", ddir, "--name", config.data.split,
              *_args(config.data.split_args, config, "split_args")]
      logging.info("data: python -m data_prep %s", shlex.join(argv))
      if data_prep.main(argv):
        raise JobError(f"splitting {ddir} failed (see the error above); fix data.split_args.")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("ssfer_jax.job: data ready")
  with open(records.split_path(ddir, config.data.split)) as f:
    lists = json.load(f)["lists"]
  m = records.load_manifest(ddir)
  logging.info("data: %d records at %d px (%s), %d classes; split %s: %s", m["num_records"],
               m["image_size"], m.get("crop"), len(m["classes"]), config.data.split,
               ", ".join(f"{k} {len(v)}" for k, v in lists.items()))


def _write_json(path: str, obj: Any) -> None:
  if jax.process_index() == 0:
    writers.write_json(path, obj)


def _agreed(flag: bool) -> bool:
  """Process 0's view of a file-system fact, on every process: each deciding alone from a
  shared file system (with its caches) could send the processes down different paths."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _done(run_dir: str) -> dict | None:
  path = os.path.join(run_dir, results.RESULT_FILE)
  if not _agreed(os.path.exists(path)):
    return None
  with open(path) as f:
    return json.load(f)


def _results_digest(config: ml_collections.ConfigDict, workdir: str) -> dict[str, str]:
  """sha256 of each classifier stage's result.json: what the evaluation was computed from."""
  out = {}
  for stage in (s for s in config.stages if s in results.CLASSIFIER_STAGES):
    with open(os.path.join(workdir, stage, results.RESULT_FILE), "rb") as f:
      out[stage] = hashlib.sha256(f.read()).hexdigest()
  return out


def check_order(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to train a stage while a later one has already started: that one was built on
  the earlier stage's old result (e.g. an upstream directory removed to redo it)."""
  stages = list(config.stages)
  for i, name in enumerate(stages):
    if _done(os.path.join(workdir, name)) is not None:
      continue
    later = [os.path.join(workdir, s) for s in stages[i + 1:]
             if os.path.exists(os.path.join(workdir, s, "config.json"))]
    if _agreed(bool(later)):
      raise JobError(f"{name} is to be trained, but {', '.join(later)} started from its earlier "
                     "result; remove those directories too (they are redone after it).")
    return


def evaluate_stages(config: ml_collections.ConfigDict, workdir: str, ddir: str) -> dict:
  """The majority class, the classical floor and every classifier stage's result on the
  evaluation lists."""
  lists = tuple(config.evaluate.lists)
  mesh = sharding.make_mesh((-1, 1))
  rows = [{"name": "majority class (of train_labeled)", "stage": None,
           **evaluate.majority_report(ddir, config.data.split, lists)}]
  # The classical floor: what a linear model of the same crops reaches (classical.py).
  rows += [{**r, "stage": None} for r in classical.floor_reports(ddir, config.data.split, lists,
                                                                 log=logging.info)]
  names = {"finetune": "stage 2: FaceMix", "semisup": "stage 3: EMA teacher"}
  for stage in (s for s in config.stages if s in results.CLASSIFIER_STAGES):
    run_dir = os.path.join(workdir, stage)
    rows.append({"name": names[stage], "stage": stage,
                 **evaluate.evaluate_result(run_dir, data_dir=ddir, split=config.data.split,
                                            lists=lists, mesh=mesh,
                                            batch_size=config.evaluate.batch_size)})
  return {"lists": list(lists), "data": ddir, "split": config.data.split, "rows": rows,
          "paper_accuracy": config.paper_accuracy}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the job in `workdir`; returns the evaluation."""
  workdir = os.path.abspath(workdir)
  workdir_lib.prepare(workdir)
  with workdir_lib.Lock(workdir):
    return _run(config, workdir)


def _run(config, workdir) -> dict:
  t_job = time.perf_counter()
  ddir = data_dir(config, workdir)
  configs = stage_configs(config, workdir)
  current = resolved(config, configs)
  job_file = os.path.join(workdir, JOB_FILE)
  saved = {}
  if os.path.exists(job_file):
    with open(job_file) as f:
      saved = json.load(f)
    check_unchanged(saved, current, workdir, ddir)
  # A stage left out of this run keeps the section it ran with, for when it is listed again.
  kept = {s: saved[s] for s in ("pretrain", "finetune", "semisup")
          if s in saved and s not in config.stages}
  _write_json(job_file, {**current, **kept})
  check_order(config, workdir)
  steps = " -> ".join(["data", *config.stages, "evaluate", "report"])
  total = len(config.stages) + 3
  banner = lambda i, name, what: logging.info("== job %d/%d %s: %s (job time so far %s) ==",
                                              i, total, name, what,
                                              loop.duration(time.perf_counter() - t_job))
  logging.info("job %s: %s", workdir, steps)
  banner(1, "data", "building" if not _started(workdir, DATA, ddir) else "reusing " + ddir)
  prepare_data(config, ddir)
  for i, name in enumerate(config.stages, start=2):
    run_dir = os.path.join(workdir, name)
    result = _done(run_dir)
    if result is not None:
      banner(i, name, f"done (result at step {result['step']}), skipped")
      continue
    c = configs[name]
    plan = loop.plan_run(c)
    banner(i, name, f"{plan.total_steps} steps in {run_dir}"
           + (" (resuming)" if _started(workdir, name, ddir) else ""))
    t = time.perf_counter()
    loop.train(c, run_dir, STAGES[c.stage])
    logging.info("%s finished in %s", name, loop.duration(time.perf_counter() - t))

  evaluation_file = os.path.join(workdir, EVALUATION_FILE)
  digest = _results_digest(config, workdir)
  evaluation = None
  if _agreed(os.path.exists(evaluation_file)):
    with open(evaluation_file) as f:
      evaluation = json.load(f)
  if evaluation is not None and evaluation.get("results") == digest and \
      evaluation["lists"] == list(config.evaluate.lists):
    banner(total - 1, "evaluate", f"done, {evaluation_file}")
  else:   # none yet, or of other stages' results (a stage added or redone since)
    banner(total - 1, "evaluate", f"lists {list(config.evaluate.lists)}")
    evaluation = evaluate_stages(config, workdir, ddir) | {"results": digest}
    _write_json(evaluation_file, evaluation)
  banner(total, "report", "writing")
  if jax.process_index() == 0:
    path = job_report.write(workdir, current, evaluation)
    print(job_report.accuracy_table(evaluation), flush=True)
    print(f"report: {path}", file=sys.stderr, flush=True)
  logging.info("job done in %s", loop.duration(time.perf_counter() - t_job))
  return evaluation
