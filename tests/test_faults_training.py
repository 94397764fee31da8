"""Faults of a training run, round two (docs/RELIABILITY.md): a full disk, non-finite numbers
that would be saved as "good", a resume on rebuilt data at the same path, a SIGKILL before the
first checkpoint, and bytes flipped inside a committed checkpoint."""

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_prep import split
from ssfer_jax import errors, results
from ssfer_jax.runtime import checkpointing, workdir, writers
from ssfer_jax.trainers import loop, pretrain
from tests.test_reliability import mae_config, start_long_run   # the first round's runs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def partitionable_keys():
  jax.config.update("jax_threefry_partitionable", True)


def logged_steps(run) -> list[int]:
  return [r["step"] for r in writers.read_metrics(str(run)) if r["split"] == "train"]


def test_a_full_disk_stops_the_run_in_one_line_and_a_torn_log_line_does_not_block_the_resume(
    small_dataset, tmp_path):
  run = tmp_path / "run"
  config = mae_config(small_dataset, log_every=1)
  loop.train(config, str(run), pretrain.make_stage, stop_at=3)
  metrics = run / writers.METRICS_FILE
  kept = metrics.read_text()
  # /dev/full fails every write with ENOSPC, as a full disk does.
  metrics.unlink()
  metrics.symlink_to("/dev/full")
  with pytest.raises(loop.DiskFullError, match=r"No space left on device writing .*metrics"
                     r"\.jsonl: the run stopped\. Last good checkpoint: step 3 in .*checkpoints"):
    loop.train(config, str(run), pretrain.make_stage)
  assert isinstance(loop.DiskFullError("x"), errors.UserError)   # one line, exit 2
  # Space freed; the interrupted write left half a row at the end of the log.
  metrics.unlink()
  metrics.write_text(kept + '{"step": 4, "split": "tra')
  loop.train(config, str(run), pretrain.make_stage)
  assert logged_steps(run) == list(range(1, 7))


def test_the_step_guard_rejects_an_update_that_makes_the_params_non_finite():
  """A finite loss and gradient times a NaN learning rate: the update must not be kept."""
  params = {"w": jnp.ones((3,))}
  loss_fn = lambda p, extra, batch, rng: (jnp.sum((p["w"] - batch["x"]) ** 2), {})
  state = loop.TrainState(step=jnp.array(0), params=params, opt_state=None)
  for lr in (jnp.nan, jnp.inf):
    tx = optax.sgd(lr)
    step = jax.jit(loop.make_train_step(loss_fn, tx, optax.constant_schedule(lr), seed=0))
    new, outputs, finite = step(state.replace(opt_state=tx.init(params)), {"x": jnp.zeros(3)})
    assert np.isfinite(outputs["loss"]) and np.isfinite(outputs["grad_norm"])
    assert not bool(finite)
    np.testing.assert_array_equal(new.params["w"], params["w"])


def test_non_finite_or_non_positive_config_numbers_are_refused(small_dataset):
  for field, value, match in (("base_lr", float("nan"), r"optim.base_lr=nan"),
                              ("base_lr", float("inf"), r"optim.base_lr=inf"),
                              ("base_lr", 0.0, r"optim.base_lr=0.0; use a number > 0"),
                              ("weight_decay", -0.1, r"optim.weight_decay=-0.1"),
                              ("b2", 1.0, r"optim.b2=1.0; use a number in \[0, 1\)")):
    config = mae_config(small_dataset)
    config.optim[field] = value
    with pytest.raises(errors.ConfigError, match=match):
      loop.plan_run(config)


def test_a_non_finite_initial_state_is_never_trained_or_saved(small_dataset, tmp_path):
  def nan_start(config, plan, wd):
    stage = pretrain.make_stage(config, plan, wd)
    poison = lambda state: state.replace(
        params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    return dataclasses.replace(stage, warm_start=poison)

  run = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError, match="initial state holds NaN"):
    loop.train(mae_config(small_dataset), str(run), nan_start)
  assert checkpointing.last_committed(str(run / "checkpoints")) == "none"


def test_a_resume_on_a_re_split_build_at_the_same_path_is_refused(small_dataset, tmp_path):
  data = tmp_path / "data"
  shutil.copytree(small_dataset, data)
  run = tmp_path / "run"
  config = mae_config(str(data))
  loop.train(config, str(run), pretrain.make_stage, stop_at=3)
  split.split(str(data), "default", split.Options(labeled_fraction=0.5, val_fraction=0.1,
                                                  test_fraction=0.1, seed=7), overwrite=True)
  with pytest.raises(workdir.WorkdirError,
                     match=r"trained on other data at the same path.*\n  .*data split: "
                           r"[0-9a-f]{12} in the checkpoint, [0-9a-f]{12} now"):
    loop.train(config, str(run), pretrain.make_stage)


def test_a_sigkill_before_the_first_checkpoint_leaves_no_duplicate_rows(small_dataset,
                                                                         tmp_path):
  run = tmp_path / "run"
  proc = start_long_run(small_dataset, run)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert logged_steps(run)[:3] == [1, 2, 3]
  assert checkpointing.last_committed(str(run / "checkpoints")) == "none"
  loop.train(mae_config(small_dataset, log_every=1), str(run), pretrain.make_stage)
  assert logged_steps(run) == list(range(1, 7))


def _flip_bytes(step_dir: pathlib.Path) -> None:
  """Flips a few bytes in the middle of the largest file of the step's train state."""
  path = max((p for p in (step_dir / "state").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  data = bytearray(path.read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 4):
    data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_found_on_restore(small_dataset, finetuned_run,
                                                            tmp_path, caplog):
  caplog.set_level(logging.INFO)
  # A resume: the flipped step restores without an error from orbax, but not as saved.
  run = tmp_path / "run"
  config = mae_config(small_dataset)   # saves at steps 3 and 6
  loop.train(config, str(run), pretrain.make_stage)
  _flip_bytes(run / "checkpoints" / "6")
  loop.train(config, str(run), pretrain.make_stage)   # restores 3, trains 4..6 again
  assert "checkpoints/6: 1 array(s) differ from what was saved (digest mismatch" in caplog.text
  assert logged_steps(run) == list(range(1, 7))
  assert "result: step 6 -> " in caplog.text   # stage 1 names no weights: no empty "()"
  # A finished run's best checkpoint cut short: what predict, evaluate and export load it with
  # says so in one line (a UserError), instead of tensorstore's traceback.
  copy = tmp_path / "finetuned"
  shutil.copytree(finetuned_run, copy)
  best = json.loads((copy / results.RESULT_FILE).read_text())["step"]
  for path in (copy / "checkpoints" / str(best) / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 64:
      path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  with pytest.raises(checkpointing.DamagedCheckpointError,
                     match=rf"checkpoints/{best} cannot be read .* damaged or incomplete; "
                           "restore the run from a copy"):
    results.load_classifier(str(copy))


def _main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "ssfer_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})


def test_command_line_faults_end_in_one_line_and_touch_no_log(small_dataset, tmp_path):
  # The log file on a full disk: one line for it, one for the stop, no logging tracebacks.
  run = tmp_path / "run"
  run.mkdir()
  (run / "log.txt").symlink_to("/dev/full")
  out = _main("--config", "configs/pretrain.py:test", "--workdir", str(run),
              f"--config.data.dir={small_dataset}", "--config.mesh.shape=(4,2)")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and "Logging error" not in out.stderr, out.stderr
  assert f"{run}/log.txt: No space left on device; no more lines are written" in out.stderr
  assert "DiskFullError: No space left on device writing" in out.stderr
  # A job refused on a busy workdir leaves the holder's log file alone.
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "log.txt").write_text("the holder's log\n")
  with workdir.Lock(str(busy)):
    out = _main("--config", "configs/pretrain.py:test", "--workdir", str(busy),
                f"--config.data.dir={small_dataset}")
  assert out.returncode == 2 and "in use by another job" in out.stderr
  assert (busy / "log.txt").read_text() == "the holder's log\n"
  # An unknown variant or config file: one line each.
  for spec, said in (("configs/pretrain.py:bogus", "unknown variant 'bogus'"),
                     ("configs/nope.py", "no file configs/nope.py")):
    out = _main("--config", spec, "--workdir", str(tmp_path / "x"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith(f"ConfigError: --config {spec}: ") and said in out.stderr
