"""Stage 1: MAE pretraining on unlabeled faces (the loop is shared; this is the stage's part)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssfer_jax import errors, pytorch_weights, results
from ssfer_jax.input import device, pipeline
from ssfer_jax.models import flops, mae
from ssfer_jax.runtime import figures, sharding
from ssfer_jax.trainers import loop, optim

STAGE = results.MAE_STAGE
FIGURES_DIR = "figures"


def make_stage(config: ml_collections.ConfigDict, plan: loop.RunPlan,
               workdir: str | None) -> loop.Stage:
  """The MAE stage; without a workdir (benchmarks) it has no figure hook."""
  kwargs = results.mae_kwargs(config)
  size = config.data.image_size
  if size % config.model.patch_size:
    raise errors.ConfigError(f"data.image_size={size} is not divisible by "
                             f"model.patch_size={config.model.patch_size}.")
  model = mae.MAE(**kwargs)
  tx, schedule = optim.make_optimizer(config.optim, config.batch_size, plan.total_steps,
                                      plan.steps_per_epoch)
  prepare = lambda batch: device.prepare_train_images(batch, size, config.data.mean,
                                                      config.data.std, kwargs["dtype"])

  def init(rng):
    params_rng, mask_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, size, size, 3), jnp.float32)
    params = model.init({"params": params_rng, "mask": mask_rng}, dummy, train=False)["params"]
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  def loss_fn(params, extra, batch, rng):
    del extra  # MAE keeps no stage state
    mask_rng, drop_rng = jax.random.split(rng)
    loss, _ = model.apply({"params": params}, prepare(batch), train=True,
                          rngs={"mask": mask_rng, "dropout": drop_rng})
    return loss, {}

  hooks = [loop.Hook(config.viz_every, ReconstructionFigure(config, plan.mesh, model, workdir))
           ] if workdir else []
  return loop.Stage(
      name=STAGE, batch_kind="unlabeled", init=init, loss_fn=loss_fn, tx=tx, schedule=schedule,
      train_flops_per_example=flops.mae_train_flops(kwargs, size, 1), hooks=hooks,
      warm_start=(lambda state: warm_start(config.init_from, state))
      if config.get("init_from") else None)


def warm_start(path: str, state: loop.TrainState) -> loop.TrainState:
  """Fresh optimiser state around an official MAE checkpoint's weights (`pytorch_weights.load_mae`)."""
  try:
    params, report = pytorch_weights.load_mae(path, state.params)
  except pytorch_weights.WeightsError as e:
    raise errors.ConfigError(f"init_from: {e}") from None
  pytorch_weights.log_report(path, report)
  params = jax.tree.map(lambda s, t: jax.device_put(jnp.asarray(s, t.dtype), t.sharding),
                        params, state.params)
  return state.replace(params=params)


class ReconstructionFigure:
  """original / masked / reconstruction on a fixed set of real training faces.

  The faces, the mask and hence the figure depend only on the seed, so figures from
  different steps of a run are directly comparable. Pretraining never sees val/test,
  so the faces come from the training lists. They go through the train step's device
  preparation (whole-image crops, no flips), so the model sees them as it sees training.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh, model: mae.MAE, workdir: str):
    self._dir = os.path.join(workdir, FIGURES_DIR)
    self._patch = config.model.patch_size
    self._mean, self._std = config.data.mean, config.data.std
    size = config.data.image_size
    # A seeded shuffle with the eval transform: diverse faces, the same in every run.
    it = pipeline.make_train_iterator(
        config.data.dir, config.data.split, config.data.train_lists, kind="unlabeled",
        global_batch_size=config.viz_examples, image_size=size,
        seed=config.seed, transform="eval", process_index=0, process_count=1, num_threads=1,
        center_crop=config.data.get("center_crop", 1.0))
    batch = next(it)
    self._images = batch["image"]
    self._batch = jax.make_array_from_process_local_data(
        sharding.replicated(mesh), {k: batch[k] for k in ("image", "crop", "flip")})
    self._rng = jax.random.key(config.seed + 1)

    def reconstruct(params, batch, rng):
      x = device.prepare_train_images(batch, size, self._mean, self._std, model.dtype)
      loss, aux = model.apply({"params": params}, x, train=False, rngs={"mask": rng})
      views = mae.reconstruct_images(aux["pred"], x, aux["mask"], model.norm_pix_loss, self._patch)
      return loss, aux["mask"], device.denormalize(views["reconstruction"], self._mean, self._std)

    self._reconstruct = jax.jit(reconstruct)

  def __call__(self, state: loop.TrainState, step: int) -> dict:
    loss, mask, recon = self._reconstruct(state.params, self._batch, self._rng)
    if jax.process_index() == 0:
      grid = figures.reconstruction_figure(self._images, np.asarray(mask),
                                           np.asarray(recon), self._patch)
      figures.write_png(os.path.join(self._dir, f"reconstruction_{step:07d}.png"), grid)
    return {"figure_loss": float(loss)}
