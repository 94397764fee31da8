"""What the two classifier stages (2: fine-tuning, 3: semi-supervised) share: the optimiser
with layer decay, the state init with its stage state, the evaluation on val (raw and EMA
weights, the better one wins) and what their result records to use the weights later."""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssfer_jax import evaluate
from ssfer_jax.input import records
from ssfer_jax.models import vit
from ssfer_jax.trainers import loop, optim


def val_evaluation(config: ml_collections.ConfigDict, plan: loop.RunPlan, model: vit.ViT,
                   classes) -> dict:
  """The `Stage` fields of a classifier stage's evaluation on val (none if switched off)."""
  if config.eval.every_steps < 0 or not config.data.eval_lists:
    return {"evaluate": None}
  return {"evaluate": ValEvaluation(config, plan.mesh, model, classes),
          "eval_every": config.eval.every_steps or config.eval.every_epochs * plan.steps_per_epoch}


def train_labels(config: ml_collections.ConfigDict) -> np.ndarray:
  """The labels of the stage's labeled training lists (class weights, priors)."""
  d = config.data
  return records.read_labels(d.dir, records.load_split(d.dir, d.split, d.train_lists), d.split)


def class_prior(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Class frequencies of `labels`, add-one smoothed: a class absent from them keeps a finite
  log (logit adjustment, the debias target)."""
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64) + 1
  return counts / counts.sum()


def make_tx(config, model: vit.ViT, total_steps: int, steps_per_epoch: int):
  scales = None
  if config.optim.layer_decay < 1.0:
    size = config.data.image_size
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)["params"]))
    scales = optim.layer_decay_scales(shapes, model.depth, config.optim.layer_decay)
  return optim.make_optimizer(config.optim, config.batch_size, total_steps, steps_per_epoch,
                              lr_scales=scales)


def make_init(config, model: vit.ViT, tx, make_extra=None):
  """The classifier's init; `make_extra(params)` gives the stage state (default: stage 2's
  weight EMA when `ema_decay` > 0)."""
  size = config.data.image_size
  if make_extra is None:
    make_extra = lambda params: {"ema": params} if config.ema_decay > 0 else {}

  def init(rng):
    params = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)["params"]
    return loop.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), extra=make_extra(params))

  return init


def result_info(config: ml_collections.ConfigDict, manifest: dict,
                model: Mapping[str, Any]) -> dict:
  """What predict/export/stage 3 need to use the weights: classes, preprocessing and the
  model's resolved kwargs (`model`)."""
  return {
      "classes": list(manifest["classes"]),
      "preprocessing": {
          "image_size": config.data.image_size, "mean": list(config.data.mean),
          "std": list(config.data.std), "stored_size": manifest["image_size"],
          "center_crop": config.data.center_crop,
          "crop": manifest.get("crop"), "margin": manifest.get("margin"),
          "detector": manifest.get("detector"),
          "detector_params": manifest.get("detector_params"),
          "face_framing": records.face_framing(config.data.dir)},
      "model": {k: (str(v) if k == "dtype" else v) for k, v in model.items()},
      "data": {"dir": os.path.abspath(config.data.dir), "split": config.data.split,
               "manifest_sha256": manifest["manifest_sha256"]},
  }


class ValEvaluation:
  """The in-training evaluator: raw and (when kept) EMA weights on val; the better one wins.
  In stage 3 these are the student and the EMA teacher."""

  def __init__(self, config, mesh, model: vit.ViT, classes):
    self._select = config.eval.select
    self._evaluator = evaluate.Evaluator(
        data_dir=config.data.dir, split=config.data.split, lists=config.data.eval_lists,
        model_classes=classes, image_size=config.data.image_size, mean=config.data.mean,
        std=config.data.std, dtype=model.dtype, batch_size=config.eval.batch_size, mesh=mesh,
        apply_fn=lambda p, x: model.apply({"params": p}, x, train=False),
        num_threads=config.data.num_threads, center_crop=config.data.center_crop)

  def __call__(self, state: loop.TrainState, step: int) -> loop.Evaluation:
    weights = {"raw": state.params}
    if state.extra and "ema" in state.extra:
      weights["ema"] = state.extra["ema"]
    reports = self._evaluator.reports(weights)
    value = lambda w: reports[w][self._select] or 0.0
    best = max(reports, key=value)
    metrics = {}
    for w, r in reports.items():
      metrics.update(evaluate.scalars(r, f"{w}_"))
    return loop.Evaluation(metrics=metrics, select=value(best),
                           report={"weights": best, "weights_kept": sorted(reports),
                                   "select_metric": self._select, "val": reports[best]})
