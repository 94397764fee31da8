"""The shared loop on MAE pretraining: resume, the NaN guard, figures, metrics."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from ssfer_jax import errors
from ssfer_jax.runtime import checkpointing, writers
from ssfer_jax.trainers import loop, pretrain
from tests.conftest import small_config, train_losses as losses


@pytest.fixture
def data_dir(small_dataset):
  return small_dataset


def make_config(data_dir, **overrides):
  return small_config(pretrain_config, data_dir, **overrides)


def test_resume_continues_with_the_same_losses(data_dir, tmp_path):
  jax.config.update("jax_threefry_partitionable", True)
  config = make_config(data_dir)
  loop.train(config, str(tmp_path / "straight"), pretrain.make_stage)
  loop.train(config, str(tmp_path / "resumed"), pretrain.make_stage, stop_at=3)
  assert checkpointing.Checkpointer(str(tmp_path / "resumed")).latest_step() == 3
  loop.train(config, str(tmp_path / "resumed"), pretrain.make_stage)
  straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
  assert sorted(straight) == sorted(resumed) == list(range(1, 7))
  np.testing.assert_allclose([resumed[s] for s in range(1, 7)],
                             [straight[s] for s in range(1, 7)], rtol=1e-6)
  assert all(np.isfinite(list(straight.values())))
  # The run leaves its resolved config, a reconstruction figure and TensorBoard-free logs.
  assert os.path.exists(tmp_path / "straight" / "config.json")
  figs = os.listdir(tmp_path / "straight" / pretrain.FIGURES_DIR)
  assert figs == ["reconstruction_0000006.png"]
  # --mode figures: the hooks run again on the latest checkpoint.
  os.remove(tmp_path / "straight" / pretrain.FIGURES_DIR / figs[0])
  assert loop.run_hooks(config, str(tmp_path / "straight"), pretrain.make_stage) == 6
  assert os.listdir(tmp_path / "straight" / pretrain.FIGURES_DIR) == figs
  record = writers.read_metrics(tmp_path / "straight")[0]
  for key in ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_s", "compute_s"):
    assert key in record


def nan_stage(config, plan, workdir):
  stage = pretrain.make_stage(config, plan, workdir)
  poisoned = lambda p, e, b, r: (stage.loss_fn(p, e, b, r)[0] * jnp.nan, {})
  return loop.Stage(stage.name, stage.batch_kind, stage.init, poisoned, stage.tx,
                    stage.schedule, stage.train_flops_per_example)


def test_nan_guard_stops_and_names_the_last_good_checkpoint(data_dir, tmp_path):
  config = make_config(data_dir)
  workdir = str(tmp_path / "run")
  loop.train(config, workdir, pretrain.make_stage, stop_at=3)
  with pytest.raises(loop.NonFiniteError, match=r"at step 4;.*Last good checkpoint: step 3"):
    loop.train(config, workdir, nan_stage)
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.latest_step() == 3
  plan = loop.plan_run(config)
  abstract, _ = loop.state_layout(config, pretrain.make_stage(config, plan, None), plan.mesh)
  state = ckpt.restore(3, abstract, None, pretrain.STAGE)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(jax.device_get(state.params)))


def test_nan_before_any_checkpoint_still_leaves_a_loadable_one(data_dir, tmp_path):
  config = make_config(data_dir)
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteError, match="at step 1;"):
    loop.train(config, workdir, nan_stage)
  ckpt = checkpointing.Checkpointer(workdir)
  step = ckpt.latest_step()
  assert step is not None
  plan = loop.plan_run(config)
  stage = pretrain.make_stage(config, plan, None)
  abstract, _ = loop.state_layout(config, stage, plan.mesh)
  restored = jax.device_get(ckpt.restore(step, abstract, None, pretrain.STAGE).params)
  fresh = jax.device_get(jax.jit(lambda r: nn.meta.unbox(stage.init(r)))(
      jax.random.key(config.seed)).params)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(fresh)):   # the update was skipped
    np.testing.assert_array_equal(a, b)


def test_config_errors_come_before_compilation(data_dir, tmp_path):
  with pytest.raises(errors.ConfigError, match="batch_size=12"):
    loop.train(make_config(data_dir, batch_size=12), str(tmp_path), pretrain.make_stage)
  with pytest.raises(errors.ConfigError, match="fewer than batch_size"):
    loop.train(make_config(data_dir, batch_size=4096), str(tmp_path), pretrain.make_stage)


def test_checkpoint_of_another_stage_is_refused(data_dir, tmp_path):
  config = make_config(data_dir)
  loop.train(config, str(tmp_path), pretrain.make_stage, stop_at=1)

  def other(config, plan, workdir):
    s = pretrain.make_stage(config, plan, workdir)
    return loop.Stage("finetune", s.batch_kind, s.init, s.loss_fn, s.tx, s.schedule, 0.0)

  with pytest.raises(checkpointing.CheckpointError, match="'pretrain_mae' checkpoint"):
    loop.train(config, str(tmp_path), other)
