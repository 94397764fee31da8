"""The sharded step (data 4 x fsdp 2) computes what the single-device step computes.

Compared where the comparison is well conditioned: losses; gradients, with a tolerance
scaled to their global norm (the sharded reduction adds in another order); and parameters
after SGD steps, whose update is linear in the gradient. AdamW's first steps are not
comparable elementwise: for a parameter whose gradient is ~0, `g / sqrt(v)` turns rounding
differences between the two reductions into +-lr.
"""

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import pretrain as pretrain_config
from ssfer_jax import results
from ssfer_jax.input import device
from ssfer_jax.models import mae
from ssfer_jax.runtime import sharding
from ssfer_jax.trainers import loop, pretrain


def real_faces(demo_data_dir, n, size):
  paths = sorted((demo_data_dir / "images").glob("*.jpg"))[:n]
  imgs = [cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)
          for p in paths]
  return np.stack(imgs).astype(np.uint8)


def mae_stage(config, tx):
  model = mae.MAE(**results.mae_kwargs(config))
  size = config.data.image_size

  def init(rng):
    p = model.init({"params": rng, "mask": rng}, jnp.zeros((1, size, size, 3)), train=False)["params"]
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  def loss_fn(params, extra, batch, rng):
    x = device.normalize(batch["image"], config.data.mean, config.data.std)
    return model.apply({"params": params}, x, train=True, rngs={"mask": rng})[0], {}

  return loop.Stage("t", "unlabeled", init, loss_fn, tx, optax.constant_schedule(0.0), 0.0)


def run(config, mesh, images, tx, steps=2):
  """Losses of `steps` steps, the first step's gradients, the final params, shardings."""
  stage = mae_stage(config, tx)
  _, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(jax.random.key(0))
  batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
  rng = jax.random.fold_in(jax.random.key(0), 0)
  grads = jax.jit(jax.grad(lambda p: stage.loss_fn(p, None, batch, rng)[0]),
                  out_shardings=shardings.params)(state.params)
  step = jax.jit(loop.make_train_step(stage.loss_fn, stage.tx, stage.schedule, seed=0),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
  losses = []
  for _ in range(steps):
    state, out, finite = step(state, batch)
    assert bool(finite)
    losses.append(float(out["loss"]))
  return losses, jax.device_get(grads), jax.device_get(state.params), shardings


def test_sharded_and_single_device_steps_agree(demo_data_dir):
  jax.config.update("jax_threefry_partitionable", True)
  config = pretrain_config.get_config("test")
  images = real_faces(demo_data_dir, 16, config.data.image_size)
  one = sharding.make_mesh((1, 1), devices=jax.devices()[:1])
  eight = sharding.make_mesh((4, 2))
  sgd = optax.sgd(0.5)
  l1, g1, p1, _ = run(config, one, images, sgd)
  l8, g8, p8, sh8 = run(config, eight, images, sgd)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(sh8.params))  # FSDP really on
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  gnorm = float(optax.global_norm(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * gnorm)
  # Two SGD steps move each parameter by lr x its gradients: differences stay that small.
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * gnorm)
  # The recipe's AdamW: the losses (which average over all parameters) still agree.
  adam = pretrain.optim.make_optimizer(config.optim, config.batch_size, 10, 5)[0]
  la1 = run(config, one, images, adam, steps=3)[0]
  la8 = run(config, eight, images, adam, steps=3)[0]
  np.testing.assert_allclose(la1, la8, rtol=1e-4)
