"""Mesh construction, config errors before compilation, weight-decay mask and schedule."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from ssfer_jax import errors, results
from ssfer_jax.models import mae
from ssfer_jax.runtime import sharding
from ssfer_jax.trainers import optim


def test_mesh_fills_the_rest_and_rejects_impossible_shapes():
  assert dict(sharding.make_mesh((-1, 2)).shape) == {"data": 4, "fsdp": 2}
  assert dict(sharding.make_mesh((1, -1)).shape) == {"data": 1, "fsdp": 8}
  with pytest.raises(errors.ConfigError, match="needs 6 devices"):
    sharding.make_mesh((3, 2))
  with pytest.raises(errors.ConfigError, match="not divisible by 3"):
    sharding.make_mesh((-1, 3))
  with pytest.raises(errors.ConfigError, match="at most one axis"):
    sharding.make_mesh((-1, -1))
  with pytest.raises(errors.ConfigError, match="lacks"):
    sharding.make_mesh((8,), ("data",))


def test_batch_must_divide_over_batch_axes():
  mesh = sharding.make_mesh((4, 2))
  sharding.check_batch_size(16, mesh)
  with pytest.raises(errors.ConfigError, match="batch_size=12 is not divisible by the 8"):
    sharding.check_batch_size(12, mesh)


def test_unknown_config_key_is_rejected():
  c = pretrain_config.get_config("test")
  with pytest.raises(AttributeError):
    c.optim.base_lrr = 1.0
  with pytest.raises(ValueError, match="unknown variant"):
    pretrain_config.get_config("vit_z")


def test_uneven_fsdp_split_is_reported_with_the_parameter():
  model = mae.MAE(**results.mae_kwargs(pretrain_config.get_config("test")))
  boxed = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.zeros((1, 32, 32, 3)),
      train=False)["params"])
  # width 64 splits 8 ways; a rule sending the MLP hidden (256) and 'patch' (768) is fine,
  # but 'qkv' (3) cannot be split 2 ways.
  with pytest.raises(errors.ConfigError, match="qkv|cannot be split"):
    sharding.logical_shardings(boxed, sharding.make_mesh((4, 2)), [("qkv", "fsdp")])
  shardings = sharding.logical_shardings(boxed, sharding.make_mesh((4, 2)), [("embed", "fsdp")])
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  assert any("fsdp" in str(s) for s in specs.values())


def test_weight_decay_mask_skips_biases_norms_and_tokens():
  model = mae.MAE(**results.mae_kwargs(pretrain_config.get_config("test")))
  params = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.zeros((1, 32, 32, 3)),
      train=False)["params"])
  mask = optim.decay_mask(params)
  flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = [k for k, m in flat.items() if m]
  kept = [k for k, m in flat.items() if not m]
  assert decayed and kept
  assert all("kernel" in k and "bias" not in k for k in decayed), decayed
  for name in ("bias", "scale", "'cls'", "'mask_token'"):
    assert any(name in k for k in kept), name
    assert not any(name in k for k in decayed), name


def test_schedule_warmup_cosine_and_linear_scaling():
  cfg = ml_collections.ConfigDict(dict(base_lr=1e-3, warmup_epochs=2.0, min_lr=1e-5, b1=0.9,
                                       b2=0.95, weight_decay=0.05, clip_grad_norm=1.0))
  schedule = optim.learning_rate_schedule(cfg, global_batch_size=512, total_steps=100,
                                          steps_per_epoch=10)
  peak = 1e-3 * 512 / 256
  assert float(schedule(0)) == pytest.approx(0.0)
  assert float(schedule(10)) == pytest.approx(peak / 2)
  assert float(schedule(20)) == pytest.approx(peak)
  assert float(schedule(60)) == pytest.approx(1e-5 + (peak - 1e-5) * 0.5 * (1 + np.cos(np.pi * 40 / 80)))
  assert float(schedule(100)) == pytest.approx(1e-5)
  tx, _ = optim.make_optimizer(cfg, 512, 100, 10)
  params = {"w": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  state = tx.init(params)
  huge = {"w": jnp.full((4, 4), 1e6), "bias": jnp.full((4,), 1e6)}
  updates, _ = tx.update(huge, state, params)   # clipped: finite and bounded
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
