"""The one-command job (ssfer_jax/job.py, configs/ssfer.py): data preparation from raw photos,
stages 1-3, the evaluation and the report; resume between and inside stages; a changed
upstream config refused."""

import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from configs import ssfer
from experiments import job_seeds
from ssfer_jax import job, job_report, results
from ssfer_jax.runtime import preemption, writers
from ssfer_jax.trainers import loop
from tests.conftest import DEMO_DATA


def job_config(tmp_path, **fields):
  """The `test` job on the first 150 demo photos: its own build (Haar boxes) and split."""
  labels = tmp_path / "labels.csv"
  with open(DEMO_DATA / "labels.csv") as f:
    labels.write_text("".join(f.readlines()[:151]))
  c = ssfer.get_config("test").unlock()
  c.data.build = (f"--source csv {labels} root={{demo}}/images name=demo --crop none "
                  "--detector haar --size 32 --num-shards 2")
  c.data.split_args = "--labeled-fraction 0.5 --val-fraction 0.1 --test-fraction 0.1 --seed 0"
  for name in ssfer.STAGES:
    c[name].mesh.shape = (4, 2)
  for k, v in fields.items():
    section, _, field = k.rpartition(".")
    (c[section] if section else c)[field] = v
  return c


def steps_logged(run_dir, split="train"):
  return [r["step"] for r in writers.read_metrics(str(run_dir)) if r["split"] == split]


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
  """A job stopped inside stage 2 (after its step-3 checkpoint, as a preemption), then rerun."""
  tmp = tmp_path_factory.mktemp("job")
  workdir = str(tmp / "w")
  config = job_config(tmp)
  real_train = loop.train
  trained = []

  def preempted_in_finetune(c, run_dir, make_stage, **kw):
    trained.append(c.stage)
    if c.stage == "finetune":
      real_train(c, run_dir, make_stage, stop_at=3)
      raise preemption.Preempted(3, signal.SIGTERM, run_dir)
    return real_train(c, run_dir, make_stage, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop, "train", preempted_in_finetune)
    with pytest.raises(preemption.Preempted):
      job.run(config, workdir)
    first = list(trained)
    pretrain_log = open(os.path.join(workdir, "pretrain", writers.METRICS_FILE)).read()
    trained.clear()
    mp.setattr(loop, "train", lambda c, *a, **k: (trained.append(c.stage),
                                                   real_train(c, *a, **k))[1])
    evaluation = job.run(config, workdir)
  return workdir, config, first, list(trained), pretrain_log, evaluation


def test_job_resumes_inside_and_between_stages(interrupted_then_resumed, monkeypatch):
  workdir, _, first, second, pretrain_log, _ = interrupted_then_resumed
  assert first == ["pretrain_mae", "finetune"]
  # The rerun skipped the finished stage 1 (its log untouched) and resumed stage 2 at step 3.
  assert second == ["finetune", "semisup"]
  assert open(os.path.join(workdir, "pretrain", writers.METRICS_FILE)).read() == pretrain_log
  assert steps_logged(os.path.join(workdir, "finetune")) == [1, 2, 3, 4, 5, 6]
  for stage in ssfer.STAGES:
    with open(os.path.join(workdir, stage, results.RESULT_FILE)) as f:
      assert json.load(f)["step"] >= 1
  with open(os.path.join(workdir, "pretrain", results.RESULT_FILE)) as f:
    assert json.load(f)["step"] == 6   # stage 1's result is its last checkpoint
  # A third run has nothing left to train.
  trained = []
  monkeypatch.setattr(loop, "train", lambda c, *a, **k: trained.append(c.stage))
  job.run(interrupted_then_resumed[1], workdir)
  assert trained == []


def test_job_evaluation_and_report(interrupted_then_resumed):
  workdir, config, _, _, _, evaluation = interrupted_then_resumed
  names = [r["name"] for r in evaluation["rows"]]
  assert names == ["majority class (of train_labeled)", "floor: pixels + logistic regression",
                   "floor: hog + logistic regression", "stage 2: FaceMix",
                   "stage 3: EMA teacher"]
  with open(os.path.join(workdir, "data", "splits", "default.json")) as f:
    n_test = len(json.load(f)["lists"]["test"])
  for r in evaluation["rows"]:
    assert r["count"] == n_test and 0 <= r["accuracy"] <= 1
  assert evaluation["rows"][3]["run"] == os.path.join(workdir, "finetune")
  assert os.path.exists(os.path.join(workdir, "semisup", "eval", "test.json"))
  text = open(os.path.join(workdir, job_report.REPORT_FILE)).read()
  for heading in ("## Accuracy on the test lists", "## Stage 1: MAE pretraining",
                  "## Stage 2: supervised fine-tuning with FaceMix",
                  "## Stage 3: semi-supervised fine-tuning (EMA teacher)"):
    assert heading in text
  figures = [line.split("](")[1][:-1] for line in text.splitlines() if line.startswith("![")]
  assert {os.path.basename(f) for f in figures} == {
      "pretrain_loss.png", "reconstructions.png", "finetune_val.png", "finetune_train.png",
      "finetune_confusion.png", "semisup_val.png", "semisup_train.png",
      "semisup_thresholds.png", "semisup_confusion.png"}
  for f in figures:
    assert os.path.getsize(os.path.join(workdir, f)) > 1000
  table = job_report.accuracy_table(evaluation)
  for r in evaluation["rows"]:
    assert f"{100 * r['accuracy']:.1f}" in table.splitlines()[2 + names.index(r["name"])]


def test_job_refuses_a_changed_upstream_config(interrupted_then_resumed):
  workdir, config, *_ = interrupted_then_resumed
  changed = config.copy_and_resolve_references().unlock()
  changed.finetune.mix.kind = "mixup"
  changed.data.split_args = "--labeled-fraction 0.25 --seed 0"
  with pytest.raises(job.JobError) as e:
    job.run(changed, workdir)
  assert "finetune.mix.kind: 'facemix' when it ran, 'mixup' now" in str(e.value)
  assert "data.split_args" in str(e.value)
  # Cadence a stage may change on resume is not a change of what it computed.
  cadence = config.copy_and_resolve_references().unlock()
  cadence.finetune.log_every = 2
  job.run(cadence, workdir)


def test_stage_configs_and_paper_variants(tmp_path):
  c = job_config(tmp_path)
  configs = job.stage_configs(c, str(tmp_path / "w"))
  assert configs["finetune"].init_from == str(tmp_path / "w" / "pretrain")
  assert configs["semisup"].init_from == str(tmp_path / "w" / "finetune")
  assert {k: v.data.dir for k, v in configs.items()} == {
      k: str(tmp_path / "w" / "data") for k in ssfer.STAGES}
  c.stages = ("finetune", "pretrain")
  with pytest.raises(job.JobError, match="in that order"):
    job.stage_configs(c, str(tmp_path))
  c.stages = ("semisup",)
  with pytest.raises(job.JobError, match="semisup.init_from"):
    job.stage_configs(c, str(tmp_path))
  c.stages = ("finetune", "semisup")   # stage 2 from scratch: its own init_from (empty)
  assert job.stage_configs(c, str(tmp_path))["finetune"].init_from == ""
  c.stages = ssfer.STAGES
  c.finetune.init_from = "mae.pth"     # never silently replaced by the job's stage-1 run
  with pytest.raises(job.JobError, match="drop pretrain from the stages"):
    job.stage_configs(c, str(tmp_path))

  raf = ssfer.get_config("rafdb,p10")
  assert raf.data.split == "p10" and raf.paper_accuracy == 85.07
  assert raf.data.split_args == "--labeled-fraction 0.1 --seed 0"
  assert raf.finetune.model.size == "B" and raf.finetune.data.image_size == 224
  assert "--merge-val" in ssfer.get_config("ferplus,n1000").data.split_args
  assert ssfer.get_config("affectnet7,l25").data.split_args.startswith("--labels-per-class 25")
  assert ssfer.get_config("affectnet8,p3").paper_accuracy is None   # not a budget it reports
  with pytest.raises(ValueError, match="unknown budget"):
    ssfer.get_config("rafdb,q5")
  with pytest.raises(ValueError, match="DATASET,BUDGET"):
    ssfer.get_config("casia,p5")
  with pytest.raises(job.JobError, match="data.raw"):
    job.prepare_data(raf, str(tmp_path / "raf"))


def test_job_stage_changes_and_an_upstream_redo(interrupted_then_resumed, monkeypatch):
  """Last in this file: it changes the shared workdir. Dropping or adding a finished stage is
  no config change, and the evaluation follows the stages; redoing stage 2 while stage 3 has
  started is refused, naming what to remove."""
  workdir, config, *_ = interrupted_then_resumed
  trained = []
  monkeypatch.setattr(loop, "train", lambda c, *a, **k: trained.append(c.stage))
  fewer = config.copy_and_resolve_references().unlock()
  fewer.stages = ("pretrain", "finetune")
  assert [r["stage"] for r in job.run(fewer, workdir)["rows"]] == [None] * 3 + ["finetune"]
  assert [r["stage"] for r in job.run(config, workdir)["rows"]] == [None] * 3 + ["finetune",
                                                                             "semisup"]
  assert trained == []
  shutil.rmtree(os.path.join(workdir, "finetune"))
  with pytest.raises(job.JobError, match=re.escape(f"{workdir}/semisup started from its earlier")):
    job.run(config, workdir)
  assert trained == []


@pytest.mark.parametrize("rates,said", [((0.0, 0.0), True), ((0.0, 0.2), False)])
def test_report_says_when_stage3_admitted_no_pseudo_label(tmp_path, rates, said):
  run = tmp_path / "semisup"
  run.mkdir()
  with open(run / "metrics.jsonl", "w") as f:
    for step, rate in zip((10, 20), rates):
      f.write(json.dumps({"split": "epoch", "step": step, "mask_rate": rate}) + "\n")
  text = "\n".join(job_report._classifier_section("semisup", "Stage 3", str(run), str(tmp_path),
                                              None, ["test"]))
  assert ("No pseudo-label passed the threshold" in text) == said
  assert "| 20 | %.3f |" % rates[1] in text


def test_job_seeds_averages_each_row_over_paired_jobs(tmp_path):
  def row(name, acc, recalls):
    per_class = {c: {"support": s, "recall": r} for c, (s, r) in recalls.items()}
    return {"name": name, "accuracy": acc, "macro_f1": acc / 2, "per_class": per_class}

  for seed, acc in enumerate((0.70, 0.80)):
    (tmp_path / f"s{seed}").mkdir()
    (tmp_path / f"s{seed}" / job.EVALUATION_FILE).write_text(json.dumps({
        "lists": ["test"], "rows": [row("stage 2", acc, {"a": (20, acc), "b": (5, 0.0)})]}))
  names, values = job_seeds.load([str(tmp_path / "s0"), str(tmp_path / "s1")])
  assert names == ["stage 2"]
  np.testing.assert_allclose(values["accuracy"], [[70.0, 80.0]])
  np.testing.assert_allclose(values["mean-class (>= 15)"], [[70.0, 80.0]])   # "b" has < 15
  assert "75.0 +-  7.1" in job_seeds.table(names, values)
