"""The job at several label-noise rates (the paper's Table 8).

  python -m ssfer_jax.analysis.label_noise --config configs/ssfer.py:rafdb,p5 --workdir runs/noise \
      --rates 0,0.1,0.2,0.3 [--pretrained runs/rafdb/pretrain] [--dataset RAF-DB] \
      [--config.FIELD=V ...]

Rate R trains on the split SPLIT_noiseNN: the job's split arguments plus `--label-noise R`
(data_prep: exactly round(R x n) train_labeled records given another class, uniformly and
seeded; the lists themselves, val and test stay as at rate 0). Each rate is its own job in
WORKDIR/noiseNN over one shared build (WORKDIR/data unless data.dir names one). Stage 1 reads
no labels, so it runs once: in the first rate's job, or not at all with --pretrained. Stages 2
and 3 and the evaluation run at every rate; the table shows each classifier stage's test
accuracy per rate and its decline from the first rate to the last. Interrupted, the same
command resumes (every rate's job resumes as the job does). Multi-host, errors and preemption
as `ssfer_jax.main`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

from absl import app, flags
import jax
import ml_collections

from ssfer_jax import job
from ssfer_jax.input import records
from ssfer_jax.runtime import writers

RESULT_FILE = "label_noise.json"


def tag(rate: float) -> str:
  return f"noise{round(100 * rate):02d}"


def rate_config(config: ml_collections.ConfigDict, workdir: str, rate: float,
                pretrained: str | None) -> ml_collections.ConfigDict:
  c = config.copy_and_resolve_references().unlock()
  c.data.dir = job.data_dir(config, workdir)
  c.data.split = f"{config.data.split}_{tag(rate)}"
  c.data.split_args = f"{config.data.split_args} --label-noise {rate:g}"
  if pretrained:
    c.stages = tuple(s for s in config.stages if s != "pretrain")
    c.finetune.init_from = os.path.abspath(pretrained)
  return c.lock()


def run_rates(config: ml_collections.ConfigDict, workdir: str, rates: Sequence[float],
              pretrained: str | None = None) -> dict:
  if list(rates) != sorted(set(rates)) or not all(0 <= r < 1 for r in rates):
    raise job.JobError(f"rates {list(rates)}: give distinct rates in [0, 1), ascending.")
  if "finetune" not in config.stages:
    raise job.JobError("label noise acts through the labeled list: the stages need finetune.")
  out = {"rates": list(rates), "stages": {}, "labels": None, "workdir": os.path.abspath(workdir)}
  for rate in rates:
    c = rate_config(config, workdir, rate, pretrained)
    logging.info("== label noise %.0f%%: %s ==", 100 * rate, os.path.join(workdir, tag(rate)))
    evaluation = job.run(c, os.path.join(workdir, tag(rate)))
    if pretrained is None and "pretrain" in config.stages:
      pretrained = os.path.join(workdir, tag(rate), "pretrain")
    with open(records.split_path(c.data.dir, c.data.split)) as f:
      out["labels"] = len(json.load(f)["lists"]["train_labeled"])
    for row in evaluation["rows"]:
      out["stages"].setdefault(row["name"], []).append(100 * row["accuracy"])
  return out


def table(result: dict, dataset: str = "") -> str:
  """The paper's Table 8 layout: accuracy (%) per noise rate, and the decline."""
  rates = result["rates"]
  lines = [f"{'Dataset':<10}{'Method':<36}{'Labels':>8}" + "".join(
      f"{round(100 * r):>8d}" for r in rates) + f"{'Decline':>10}"]
  for name, accs in result["stages"].items():
    lines.append(f"{dataset[:9]:<10}{name[:35]:<36}{result['labels']:>8}"
                 + "".join(f"{a:>8.2f}" for a in accs) + f"{accs[0] - accs[-1]:>10.2f}")
  return "\n".join(lines)


def main(argv):
  from ssfer_jax import main as cli  # pylint: disable=g-import-not-at-top   (its flags)
  config = cli.setup(argv)
  f = flags.FLAGS
  rates = [float(r) for r in f.rates.split(",")]
  result = cli.exit_on_errors(lambda: run_rates(config, f.workdir, rates, f.pretrained))
  if jax.process_index() == 0:
    writers.write_json(os.path.join(f.workdir, RESULT_FILE), result)
    print(table(result, f.dataset))


if __name__ == "__main__":
  from ssfer_jax import main as cli  # pylint: disable=g-import-not-at-top   (--config, --workdir)
  flags.DEFINE_string("rates", "0,0.1,0.2,0.3", "Comma-separated label-noise rates.")
  flags.DEFINE_string("pretrained", None, "A finished stage-1 run to start every rate from.")
  flags.DEFINE_string("dataset", "", "The Dataset column of the table.")
  app.run(main, flags_parser=cli.parse_flags)
