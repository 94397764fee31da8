"""The sharded step (data 4 x fsdp 2) computes what the single-device step computes."""

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import pretrain_mae
from ssfer_jax import optim, sharding
from ssfer_jax.input import device
from ssfer_jax.models import mae
from ssfer_jax.trainers import loop, pretrain


def real_faces(demo_data_dir, n, size):
  paths = sorted((demo_data_dir / "images").glob("*.jpg"))[:n]
  imgs = [cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)
          for p in paths]
  return np.stack(imgs).astype(np.uint8)


def mae_stage(config):
  model = mae.MAE(**pretrain.model_kwargs(config))
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, 10, 5)
  size = config.data.image_size

  def init(rng):
    p = model.init({"params": rng, "mask": rng}, jnp.zeros((1, size, size, 3)), train=False)["params"]
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p))

  def loss_fn(params, batch, rng):
    x = device.normalize(batch["image"], config.data.mean, config.data.std)
    return model.apply({"params": params}, x, train=True, rngs={"mask": rng})[0], {}

  return loop.Stage("t", "unlabeled", init, loss_fn, tx, schedule, 0.0)


def two_steps(config, mesh, images):
  stage = mae_stage(config)
  _, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(jax.random.key(0))
  batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
  step = jax.jit(loop.make_train_step(stage.loss_fn, stage.tx, stage.schedule, seed=0),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
  losses = []
  for _ in range(2):
    state, out, finite = step(state, batch)
    assert bool(finite)
    losses.append(float(out["loss"]))
  return losses, jax.device_get(state.params), shardings


def test_sharded_and_single_device_steps_agree(demo_data_dir):
  jax.config.update("jax_threefry_partitionable", True)
  config = pretrain_mae.get_config("test")
  images = real_faces(demo_data_dir, 16, config.data.image_size)
  l1, p1, _ = two_steps(config, sharding.make_mesh((1, 1), devices=jax.devices()[:1]), images)
  l8, p8, sh8 = two_steps(config, sharding.make_mesh((4, 2)), images)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(sh8.params))  # FSDP really on
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
