"""Faults a training run must survive or refuse clearly (docs/RELIABILITY.md): a resume under
another config, two jobs on one workdir, a damaged latest checkpoint, rows logged past the
last checkpoint, bad command-line input."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from ssfer_jax import errors, results
from ssfer_jax.runtime import checkpointing, workdir, writers
from ssfer_jax.trainers import loop, pretrain
from tests.conftest import small_config, train_losses

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def partitionable_keys():
  jax.config.update("jax_threefry_partitionable", True)


def mae_config(data_dir, **overrides):
  return small_config(pretrain_config, data_dir, **overrides)


def train_rows(run):
  """(step -> loss, the logged steps in file order: a repeated step shows twice)."""
  steps = [r["step"] for r in writers.read_metrics(str(run)) if r["split"] == "train"]
  return train_losses(run), steps


def test_resume_under_another_config_is_refused_with_what_changed(small_dataset, tmp_path):
  run = tmp_path / "run"
  config = mae_config(small_dataset)
  loop.train(config, str(run), pretrain.make_stage, stop_at=3)
  saved_json = (run / "config.json").read_text()
  for field, value in (("batch_size", 8), ("seed", 1)):
    changed = mae_config(small_dataset, **{field: value})
    with pytest.raises(workdir.WorkdirError, match=rf"{field}: 16|{field}: 0"):
      loop.train(changed, str(run), pretrain.make_stage)
  changed = mae_config(small_dataset)
  changed.data.image_size = 48
  with pytest.raises(workdir.WorkdirError, match=r"data.image_size: 32 in the checkpoint, 48 now"):
    loop.train(changed, str(run), pretrain.make_stage)
  assert (run / "config.json").read_text() == saved_json   # a refused run writes nothing
  # The schedule's length only with the explicit permission.
  longer = mae_config(small_dataset, total_steps=8)
  with pytest.raises(workdir.WorkdirError, match="allow_schedule_change"):
    loop.train(longer, str(run), pretrain.make_stage)
  # Cadence may change freely; with permission the run goes on to its new length.
  longer.log_every = 2
  loop.train(longer, str(run), pretrain.make_stage, allow_schedule_change=True)
  assert checkpointing.Checkpointer(str(run)).latest_step() == 8
  assert json.loads((run / "config.json").read_text())["total_steps"] == 8


def test_config_diff_treats_tuples_as_lists_and_names_absent_fields():
  diff = workdir.config_diff({"a": {"b": (1, 2)}, "c": 1}, {"a": {"b": [1, 2]}, "d": 2})
  assert diff == [("c", 1, "<absent>"), ("d", "<absent>", 2)]
  # A field added since the checkpoint, at its neutral value, is no change; set, it is one.
  workdir.check_resume({"a": 1}, {"a": 1, "init_from": "", "leaf": {"enabled": False}}, "ckpt")
  with pytest.raises(workdir.WorkdirError, match="init_from: '<absent>' in the checkpoint"):
    workdir.check_resume({"a": 1}, {"a": 1, "init_from": "mae.pth"}, "ckpt")
  # A field added with another value than neutral passes at the value older runs had.
  workdir.check_resume({"data": {"dir": "d"}}, {"data": {"dir": "d", "crop_scale": (0.2, 1.0),
                                                         "center_crop": 1.0}}, "ckpt")
  with pytest.raises(workdir.WorkdirError, match="data.crop_scale: '<absent>'"):
    workdir.check_resume({"data": {"dir": "d"}}, {"data": {"dir": "d", "crop_scale": (0.6, 1.0)}},
                         "ckpt")


def test_a_run_written_under_a_renamed_field_still_resumes_and_loads(tmp_path):
  old = {"stage": "finetune", "data": {"dir": "d", "mix": ""}}
  new = {"stage": "finetune", "data": {"dir": "d", "blend": ""}}
  assert workdir.upgrade(old) == new and old["data"] == {"dir": "d", "mix": ""}
  workdir.check_resume(old, new, "ckpt")            # data.mix is data.blend now: no change
  with pytest.raises(workdir.WorkdirError, match="data.blend: 'x=1' in the checkpoint, '' now"):
    workdir.check_resume({"data": {"dir": "d", "mix": "x=1"}}, {"data": {"dir": "d", "blend": ""}},
                         "ckpt")
  (tmp_path / "result.json").write_text(json.dumps({"stage": "finetune", "step": 1,
                                                    "config": old}))
  assert results.read_result(str(tmp_path))["config"] == new


def test_a_second_job_on_a_workdir_is_refused_and_a_killed_holder_frees_it(small_dataset,
                                                                           tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from ssfer_jax.runtime import workdir; "
       "lock = workdir.Lock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)",
       str(run)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirError, match=rf"in use by another job \(pid {holder.pid}"):
      loop.train(mae_config(small_dataset), str(run), pretrain.make_stage)
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The OS released the dead holder's lock: the stale file blocks nothing.
  with workdir.Lock(str(run)):
    with pytest.raises(workdir.WorkdirError, match="in use by another job"):
      with workdir.Lock(str(run)):
        pass


def _damage(step_dir: pathlib.Path) -> None:
  """Truncates every data file of the step's train state to half its size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
  assert files, step_dir
  for p in files:
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def test_damaged_latest_checkpoint_falls_back_and_the_log_keeps_one_row_per_step(
    small_dataset, tmp_path, caplog):
  config = mae_config(small_dataset)   # saves at steps 3 and 6
  straight = tmp_path / "straight"
  loop.train(config, str(straight), pretrain.make_stage)
  run = tmp_path / "run"
  loop.train(config, str(run), pretrain.make_stage)
  ckpt = checkpointing.Checkpointer(str(run))
  assert ckpt.all_steps() == [3, 6]
  ckpt.close()
  _damage(run / "checkpoints" / "6")
  loop.train(config, str(run), pretrain.make_stage)   # restores 3, trains 4..6 again
  assert "checkpoints/6" in caplog.text and "damaged" in caplog.text
  assert len(list((run / "checkpoints_damaged").iterdir())) == 1
  want, _ = train_rows(straight)
  got, steps = train_rows(run)
  assert steps == list(range(1, 7))            # rows 4..6 of the first run were dropped
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-6)
  # Every step damaged: a clear error listing them, nothing trained.
  for step in (3, 6):
    _damage(run / "checkpoints" / str(step))
  with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint in .* restores"):
    loop.train(config, str(run), pretrain.make_stage)


def test_bad_command_lines_end_in_one_clear_line(small_dataset, tmp_path):
  def main(*args):
    return subprocess.run([sys.executable, "-m", "ssfer_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  out = main("--config", "configs/pretrain.py:test", "--workdir", str(tmp_path / "a"),
             "--config.foo=1")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "bad flag" in out.stderr and "foo" in out.stderr
  (tmp_path / "file").write_text("")
  out = main("--config", "configs/pretrain.py:test", "--workdir",
             str(tmp_path / "file" / "run"), f"--config.data.dir={small_dataset}")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "a file is in the way" in out.stderr
  with pytest.raises(errors.ConfigError, match="batch_size=0"):
    loop.plan_run(mae_config(small_dataset, batch_size=0))


LONG_RUN = dict(total_steps=5000, log_every=1, checkpoint_every=100_000)


def start_long_run(data_dir, run) -> subprocess.Popen:
  """A `python -m ssfer_jax.main` stage-1 run (`LONG_RUN`: no checkpoint before it is
  stopped), returned once it has logged 3 steps (or ended)."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "ssfer_jax.main", "--config", "configs/pretrain.py:test",
       "--workdir", str(run), f"--config.data.dir={data_dir}", "--config.mesh.shape=(4,2)"]
      + [f"--config.{k}={v}" for k, v in LONG_RUN.items()],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = run / writers.METRICS_FILE
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  return proc


def test_sigterm_saves_the_step_reached_and_the_run_resumes_exactly(small_dataset, tmp_path):
  run = tmp_path / "run"
  proc = start_long_run(small_dataset, run)
  assert proc.poll() is None, proc.stderr.read()
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  err = proc.communicate(timeout=120)[1]
  grace = time.time() - sent
  assert proc.returncode == 143, err[-2000:]
  assert "rerun the same command to resume" in err
  saved = checkpointing.Checkpointer(str(run)).latest_step()
  _, steps = train_rows(run)
  assert saved == steps[-1] >= 3 and grace < 60, (saved, steps[-1], grace)
  # The same run, resumed in this process, matches a straight one step for step.
  config = mae_config(small_dataset, **LONG_RUN)
  loop.train(config, str(run), pretrain.make_stage, stop_at=saved + 2)
  loop.train(config, str(tmp_path / "straight"), pretrain.make_stage, stop_at=saved + 2)
  got, steps = train_rows(run)
  want, _ = train_rows(tmp_path / "straight")
  assert steps == list(range(1, saved + 3))
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=1e-5)


@pytest.mark.parametrize("failures", [1, 100])
def test_failed_checkpoint_commit_is_retried_once_then_stops_clearly(small_dataset, tmp_path,
                                                                      monkeypatch, failures):
  """A commit that fails as on a full disk (orbax logs it and carries on) is retried by the
  next save; a second failure stops the run naming the last good checkpoint."""
  from orbax.checkpoint._src.path import async_path
  rename, calls = async_path.rename, []

  async def full_disk(src, dst):
    calls.append(dst)
    if len(calls) <= failures:
      raise OSError(28, "No space left on device", str(dst))
    return await rename(src, dst)

  monkeypatch.setattr(async_path, "rename", full_disk)
  config = mae_config(small_dataset)   # saves at steps 3 and 6
  run = str(tmp_path / "run")
  if failures == 1:
    loop.train(config, run, pretrain.make_stage)
    assert checkpointing.Checkpointer(run).all_steps()[-1] == 6
    assert not os.path.isdir(os.path.join(run, "checkpoints", "3"))   # lost, then retried at 6
  else:
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"saving step 3 failed and so did the retry at step 6 .* Last "
                             r"good checkpoint: none"):
      loop.train(config, run, pretrain.make_stage)


def test_a_damaged_shard_is_named_and_verify_finds_it(small_dataset, tmp_path):
  from data_prep import __main__ as data_prep_main
  from ssfer_jax.input import pipeline, records
  data = tmp_path / "data"
  shutil.copytree(small_dataset, data)
  assert data_prep_main.main(["verify", str(data)]) == 0
  manifest = records.load_manifest(str(data))
  shard = data / manifest["shards"][0]["file"]
  raw = shard.read_bytes()
  flipped = bytearray(raw)
  mid = len(raw) // 2
  flipped[mid:mid + 64] = bytes(255 - b for b in raw[mid:mid + 64])
  shard.write_bytes(bytes(flipped))   # inside a JPEG payload a read may not notice: verify does
  assert data_prep_main.main(["verify", str(data)]) == 2
  shard.write_bytes(raw[:len(raw) * 3 // 5])   # truncated: reads fail, and say where
  with pytest.raises(errors.DatasetError, match=rf"\['{shard}'\] cannot be opened.*data_prep verify"):
    pipeline.make_eval_iterator(str(data), None, (), global_batch_size=8, image_size=32,
                                num_threads=1, process_index=0, process_count=1)
  # A read that fails mid-shard names the shard file and the record's place in it.
  first = manifest["shards"][0]["num_records"]
  err = records.read_error(str(data), first + 2, RuntimeError("chunk hash mismatch"))
  second = data / manifest["shards"][1]["file"]
  assert f"record {first + 2} (2 of {second})" in str(err) and "chunk hash mismatch" in str(err)
