"""Stage 2: supervised fine-tuning with FaceMix (or Mixup, CutMix, no mixing) on the labeled few.

The classifier is a ViT whose encoder starts from a stage-1 MAE checkpoint or a timm / MAE
weight file (`init_from`), or from scratch; its position embeddings are learned from the
sin-cos table, as in MAE's fine-tuning. The stage keeps a weight EMA beside the params
(`TrainState.extra["ema"]`), evaluates raw and EMA weights on val, and its result
(`result.json`) names the better one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssfer_jax import errors, pytorch_weights, results
from ssfer_jax.input import device, leakage, pipeline, records
from ssfer_jax.methods import facemix
from ssfer_jax.models import flops, vit
from ssfer_jax.runtime import sharding
from ssfer_jax.trainers import classifier, loop, optim

STAGE = results.FINETUNE_STAGE
CLASS_WEIGHTINGS = ("none", "balanced", "sqrt")


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
  m = config.model
  return vit.vit_kwargs(
      m.size, patch_size=m.patch_size, pool=m.pool, pos_embed=m.pos_embed,
      head_init=m.head_init, drop_path_rate=m.drop_path_rate, dtype=jnp.dtype(m.dtype),
      remat=m.remat, remat_policy=m.get("remat_policy", "nothing"),
      attention_impl=m.attention_impl, stem=m.get("stem", "patch"))


def make_model(config: ml_collections.ConfigDict, num_classes: int) -> vit.ViT:
  return vit.ViT(num_classes=num_classes, **model_kwargs(config))


def class_weights(labels: np.ndarray | None, num_classes: int, kind: str) -> np.ndarray | None:
  """Loss weights per class: "balanced" ~ 1 / n_c, "sqrt" ~ 1 / sqrt(n_c), scaled so that the
  mean weight over the training records is 1 (the loss keeps its scale). Classes absent from
  the labeled list get weight 0. The weights multiply soft targets, so label smoothing's
  mass is re-weighted too."""
  if kind not in CLASS_WEIGHTINGS:
    raise errors.ConfigError(f"loss.class_weighting={kind!r}; use one of {CLASS_WEIGHTINGS}.")
  if kind == "none":
    return None
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  w = np.where(counts > 0, 1.0 / np.maximum(counts, 1) ** (1.0 if kind == "balanced" else 0.5), 0)
  return (w * counts.sum() / (w * counts).sum()).astype(np.float32)


def logit_offsets(labels: np.ndarray, num_classes: int, tau: float) -> np.ndarray | None:
  """tau * log(prior) per class, the prior from the training labels (`classifier.class_prior`).
  Added to the logits in the training loss only (Menon et al. 2021, "Long-tail learning via
  logit adjustment"): the classifier then learns margins that do not lean on the majority
  class, and its raw logits predict as they are."""
  if tau == 0:
    return None
  if tau < 0:
    raise errors.ConfigError(f"loss.logit_adjustment={tau}; use tau >= 0 (0 = off).")
  return (tau * np.log(classifier.class_prior(labels, num_classes))).astype(np.float32)


def check_mixing(config: ml_collections.ConfigDict, mesh) -> None:
  mix = config.mix
  for field, allowed in (("kind", facemix.MIXINGS), ("pairing", facemix.PAIRINGS),
                         ("kappa", facemix.KAPPAS), ("variant", facemix.VARIANTS),
                         ("lambda_mode", facemix.LAMBDA_MODES)):
    if mix[field] not in allowed:
      raise errors.ConfigError(f"mix.{field}={mix[field]!r}; use one of {allowed}.")
  per_shard = config.batch_size // sharding.num_batch_shards(mesh)
  if mix.kind != "none" and mix.pairing == "swap" and per_shard % 2:
    raise errors.ConfigError(
        f"mix.pairing='swap' pairs neighbouring rows within a device: batch_size="
        f"{config.batch_size} leaves {per_shard} rows per batch shard; make it even.")


def make_stage(config: ml_collections.ConfigDict, plan: loop.RunPlan,
               workdir: str | None) -> loop.Stage:
  if config.init_from:
    check_pretraining_data(config)
  manifest = records.load_manifest(config.data.dir)
  classes = list(manifest["classes"])
  kind, tau = config.loss.class_weighting, config.loss.get("logit_adjustment", 0.0)
  labels = None if kind == "none" and tau == 0 else classifier.train_labels(config)
  weights = class_weights(labels, len(classes), kind)
  if weights is not None:
    logging.info("class weights: %s", dict(zip(classes, np.round(weights, 3).tolist())))
  offsets = logit_offsets(labels, len(classes), tau)
  if offsets is not None:
    logging.info("training logit offsets (tau log prior): %s",
                 dict(zip(classes, np.round(offsets, 2).tolist())))
  stage = training_stage(config, plan, len(classes), weights, offsets)
  return dataclasses.replace(
      stage,
      warm_start=(lambda state: warm_start(config, plan.mesh, state)) if config.init_from else None,
      result_info=classifier.result_info(config, manifest, model_kwargs(config)),
      **classifier.val_evaluation(config, plan, make_model(config, len(classes)), classes))


def training_stage(config: ml_collections.ConfigDict, plan: loop.RunPlan, num_classes: int,
                   weights: np.ndarray | None = None,
                   offsets: np.ndarray | None = None) -> loop.Stage:
  """The stage's state, loss and optimiser alone: no data read (benchmarks, loading)."""
  size = config.data.image_size
  if size % config.model.patch_size:
    raise errors.ConfigError(f"data.image_size={size} is not divisible by "
                             f"model.patch_size={config.model.patch_size}.")
  check_mixing(config, plan.mesh)
  model = make_model(config, num_classes)
  tx, schedule = classifier.make_tx(config, model, plan.total_steps, plan.steps_per_epoch)
  ema_decay = config.ema_decay

  def update_extra(extra, params, _, step):
    del step
    return {"ema": optim.ema_update(extra["ema"], params, ema_decay)}

  passes = 2 if config.mix.kind == "facemix" else 1   # FaceMix also runs the real images
  return loop.Stage(
      name=STAGE, batch_kind="labeled", init=classifier.make_init(config, model, tx),
      loss_fn=make_loss(config, model, num_classes, weights, offsets), tx=tx, schedule=schedule,
      train_flops_per_example=passes * flops.vit_train_flops(
          dict(model_kwargs(config), num_classes=num_classes), size, 1),
      update_extra=update_extra if ema_decay > 0 else None)


def make_loss(config, model: vit.ViT, num_classes: int, weights: np.ndarray | None,
              offsets: np.ndarray | None = None):
  """The pure loss of one labeled batch under `config.mix`; see `ssfer_jax.methods.facemix`.
  `offsets` [C] (`logit_offsets`) are added to every logit the loss sees, never at prediction."""
  size, mix, smoothing = config.data.image_size, config.mix, config.loss.label_smoothing
  mean, std, dtype = config.data.mean, config.data.std, model.dtype
  w = None if weights is None else jnp.asarray(weights)
  offset = 0.0 if offsets is None else jnp.asarray(offsets)

  def targets(labels):
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)

  def loss_fn(params, extra, batch, rng):
    del extra
    drop_rng, lam_rng, pair_rng, cut_rng = jax.random.split(rng, 4)
    pixels = device.crop_resize_flip(batch["image"], batch["crop"], batch["flip"], size)
    x = device.normalize(pixels, mean, std)   # float32: mix first, cast once
    y = targets(batch["label"])
    n = x.shape[0]
    forward = lambda images, r: model.apply({"params": params}, images.astype(dtype),
                                            train=True, rngs={"dropout": r}) + offset
    if mix.kind == "none":
      return jnp.mean(facemix.soft_cross_entropy(forward(x, drop_rng), y, w)), {}
    partner = facemix.partner_fn(mix.pairing, n, pair_rng)
    lam = facemix.sample_lambda(lam_rng, mix.alpha, n, mix.lambda_mode)
    if mix.kind == "cutmix":
      masks, lam = facemix.cutmix_masks(cut_rng, lam, size, size)
      xm = x * (1 - masks) + partner(x) * masks
    else:
      xm = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * partner(x)
    ym = lam[:, None] * y + (1 - lam[:, None]) * partner(y)
    if mix.kind != "facemix":
      return jnp.mean(facemix.soft_cross_entropy(forward(xm, drop_rng), ym, w)), {}
    # FaceMix: mixed and real images in one pass, interleaved so rows stay on their device.
    logits = forward(facemix.interleave(xm, x), drop_rng).reshape(n, 2, -1)
    k = facemix.kappa(mix.kappa, batch["box"], partner(batch["box"]), pixels / 255.0,
                      partner(pixels) / 255.0)
    loss, parts = facemix.facemix_loss(logits[:, 0], logits[:, 1], y, ym, k, partner,
                                       mix.variant, w)
    q = jnp.quantile(k, jnp.array([0.1, 0.5, 0.9]))
    return loss, {"kappa_mean": jnp.mean(k), "kappa_p10": q[0], "kappa_p50": q[1],
                  "kappa_p90": q[2], "loss_virtual": jnp.mean(parts["loss_virtual"]),
                  "loss_real": jnp.mean(parts["loss_real"]), "kappa": k}

  return loss_fn


def frozen_features(config: ml_collections.ConfigDict, lists: Sequence[str],
                    mesh) -> tuple[np.ndarray, np.ndarray]:
  """The pooled features [N, D] (the head's input) of the encoder this config starts from (its
  init_from's, else a random one), frozen, on `lists` of its split, with their labels: what a
  probe of pretraining reads, independently of any fine-tuning."""
  stage = make_stage(config, loop.plan_run(config), None)
  _, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(
      jax.random.key(config.seed))
  if stage.warm_start:
    state = stage.warm_start(state)
  params = {k: v for k, v in state.params.items() if k != "head"}
  model = make_model(config, 0)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  feats, labels = [], []
  for b in pipeline.make_eval_iterator(config.data.dir, config.data.split, lists,
                                       global_batch_size=64, image_size=config.data.image_size,
                                       num_threads=config.data.num_threads,
                                       center_crop=config.data.center_crop):
    x = device.normalize(b["image"], config.data.mean, config.data.std)
    feats.append(np.asarray(apply(params, x))[b["valid"]])
    labels.append(b["label"][b["valid"]])
  return np.concatenate(feats), np.concatenate(labels)


# ---- The warm start: a stage-1 MAE encoder or a timm / MAE weight file. ----

def check_pretraining_data(config: ml_collections.ConfigDict) -> None:
  """Refuses (before compiling) a stage-1 run that saw images of this split's val or test."""
  if pytorch_weights.is_weight_file(config.init_from):
    logging.warning("init_from %s is a weight file: whether its pretraining saw images of this "
                    "split's val or test lists cannot be checked.", config.init_from)
    return
  ckpt, step = results.resolve_checkpoint(config.init_from, "init_from")
  try:
    src = ckpt.read_config(step)
  finally:
    ckpt.close()
  if src.get("stage") == results.MAE_STAGE:
    leakage.check(src["data"], config.data.dir, config.data.split,
                  f"init_from {config.init_from} (stage 1)")


def warm_start(config, mesh, state: loop.TrainState) -> loop.TrainState:
  """Puts a pretrained encoder into a fresh classifier state (and its EMA): a stage-1 run's
  MAE, or a timm / MAE weight file (`pytorch_weights.load_encoder`)."""
  if pytorch_weights.is_weight_file(config.init_from):
    try:
      encoder, report = pytorch_weights.load_encoder(
          config.init_from, state.params, resample=config.get("init_resample", "mae"))
    except pytorch_weights.WeightsError as e:
      raise errors.InitError(f"init_from: {e}") from None
    pytorch_weights.log_report(config.init_from, report)
  else:
    encoder = _encoder_from_run(config, mesh)
  target = {k: state.params[k] for k in encoder}
  encoder = jax.tree.map(lambda s, t: jax.device_put(s, t.sharding), encoder, target)
  params = {**state.params, **encoder}
  # Its own buffers: the step donates the state, and a buffer may be donated only once.
  extra = {"ema": jax.tree.map(jnp.copy, params)} if state.extra else state.extra
  return state.replace(params=params, extra=extra)


def _encoder_from_run(config, mesh) -> dict:
  """The MAE encoder of a stage-1 run's checkpoint, as ViT params."""
  ckpt, step = results.resolve_checkpoint(config.init_from, "init_from")
  try:
    meta = ckpt.read_meta(step)
    if meta.get("stage") != results.MAE_STAGE:
      raise errors.InitError(f"init_from {config.init_from}: step {step} is a '{meta.get('stage')}' "
                             f"checkpoint; stage 2 starts from a '{results.MAE_STAGE}' (stage 1) run.")
    src = ml_collections.ConfigDict(ckpt.read_config(step))
    ours, theirs = model_kwargs(config), results.mae_kwargs(src)
    diff = {k: (theirs[k], ours[k]) for k in ("width", "depth", "num_heads", "mlp_dim",
                                               "patch_size", "stem") if theirs[k] != ours[k]}
    if diff:
      differences = ", ".join(f"{k} ({a} there, {b} here)" for k, (a, b) in diff.items())
      raise errors.InitError(f"init_from {config.init_from}: the pretrained encoder differs from "
                             f"this model in {differences}; set --config.model.size/patch_size/"
                             "stem to the pretrained model's.")
    mae_params = results.restore_mae_params(ckpt, step, src, mesh)
  finally:
    ckpt.close()
  encoder = vit.encoder_params_from_mae(mae_params, pool=config.model.pool)
  logging.info("warm start: MAE encoder (%s) from %s step %d",
               ", ".join(sorted(encoder)), ckpt.directory, step)
  return encoder
