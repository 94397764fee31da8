"""Stage 3: semi-supervised fine-tuning with an EMA teacher and confident pseudo-labels.

Student and teacher both start from a stage-2 result (`init_from`: its chosen weights, its
model). Each step eats a "semisup" batch (`input/pipeline.py`): B labeled faces (weak view)
and mu x B unlabeled ones, each as a weak and a strong view of one stored image; the strong
view is another crop and flip plus RandAugment, applied here on the device (made by the host
on a CPU backend: `pipeline.strong_view_place`). The teacher
labels the weak view; pseudo-labels that clear the threshold policy (`ssfer_jax.methods.thresholds`)
supervise the student on the strong view:

  L = CE(student(labeled), y) + lambda_u * mean_u(mask * CE(student(strong), pseudo))
      [+ 0.01 * FreeMatch's fairness term]

with hard (argmax) or soft (teacher softmax at a temperature) pseudo-labels. The mean runs
over all unlabeled rows, masked ones included (the published code and USB).

Options on top (`configs/semisup.py`, ',leaf' and ',negative'):
  LEAF       semantic and instance levels in the model (`models/leaf_levels.py`); two strong
             views, each trained on ambiguous pseudo-labels (positive / negative sets,
             `ssfer_jax/methods/leaf.py`) instead of the cross entropy, plus their consistency (L_u,
             the category level), and a contrastive term over the rows the threshold
             rejected: L = 0.5 L_x + L_u + 0.1 L_supcon, as the public code.
  negative   the rejected rows' complementary classes (teacher probability < 0.05) pushed
             down with -log(1 - p_c) (`ssfer_jax/methods/negative_learning.py`).

Teachers (`config.teacher`):
  "ema"      SSFER: an EMA of the student (decay `ema_decay`, 0.999), updated after each
             optimiser step, applied without dropout and never differentiated. It lives in
             `TrainState.extra["ema"]`, so evaluation, `result.json` and loading call it the
             "ema" weights and the student the "raw" ones, as in stage 2.
  "student"  FixMatch (the paper's Table 12): the student labels its own weak view; one
             forward pass over labeled, weak and strong rows, the weak logits stop-gradient.

An epoch is a pass over the unlabeled list (the paper's 50 epochs): it sets the schedule,
evaluation and the per-epoch work of `EpochHook` (DTM's threshold update from a teacher pass
over train_labeled; per-class mask rates, thresholds and pseudo-label accuracy, LEAF's
positive sets and negative learning's errors, summed over the epoch in `extra["counts"]`;
their figure). Labels of "unlabeled" records (-1 where
unknown) reach only those counts, never the loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ssfer_jax import errors, evaluate, results
from ssfer_jax.input import device, randaugment, records
from ssfer_jax.methods import facemix, leaf, negative_learning, thresholds
from ssfer_jax.models import flops, leaf_levels, vit
from ssfer_jax.runtime import figures, sharding, writers
from ssfer_jax.trainers import classifier, loop, optim

STAGE = results.SEMISUP_STAGE
TEACHERS = ("ema", "student")
DEBIAS_TARGETS = ("uniform", "labeled")
PSEUDO_LABELS = ("hard", "soft")
FAIRNESS_WEIGHT = 0.01        # FreeMatch's (USB's ent_loss_ratio)
COUNTS = ("seen", "passed", "known", "correct", "known_all", "correct_all")
LEAF_COUNTS = ("positive_size", "positive_hit")
NEGATIVE_COUNTS = ("negative_rows", "negative_pairs", "negative_known", "negative_wrong")
FIGURE = os.path.join("figures", "thresholds.png")

InitError = errors.InitError


def policy(config: ml_collections.ConfigDict) -> thresholds.Policy:
  t = config.threshold
  try:
    return thresholds.Policy(kind=t.policy, tau=t.tau, p_cutoff=t.p_cutoff,
                             thresh_warmup=t.thresh_warmup, momentum=t.momentum, init=t.init)
  except ValueError as e:
    raise errors.ConfigError(f"threshold: {e}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
  for field, allowed in (("teacher", TEACHERS), ("pseudo_label", PSEUDO_LABELS)):
    if config[field] not in allowed:
      raise errors.ConfigError(f"{field}={config[field]!r}; use one of {allowed}.")
  if config.teacher == "ema" and not 0 < config.ema_decay < 1:
    raise errors.ConfigError(f"ema_decay={config.ema_decay}: the EMA teacher needs a decay "
                             "in (0, 1) (0.999 as SSFER); teacher='student' is FixMatch.")
  if not config.data.get("unlabeled_lists"):
    raise errors.ConfigError("data.unlabeled_lists is empty: stage 3 needs unlabeled faces "
                             "(e.g. ('train_unlabeled',)).")
  if config.leaf.enabled:
    if config.data.strong_views != 2:
      raise errors.ConfigError(
          f"data.strong_views={config.data.strong_views}: LEAF's consistency and contrastive "
          "terms compare two strong views; use the ',leaf' config option (e.g. "
          "configs/semisup.py:vit_b16,leaf), which also sets LEAF's lambda_u of 1.")
    if config.pseudo_label != "hard":
      raise errors.ConfigError(
          "pseudo_label='soft' with LEAF: its ambiguous pseudo-labels replace the soft targets "
          "(positive and negative sets from the teacher's probabilities); use 'hard'.")
    if not (0 < config.leaf.bound <= 1 and config.leaf.max_k >= 1 and config.leaf.experts >= 1):
      raise errors.ConfigError(
          f"leaf: bound={config.leaf.bound}, max_k={config.leaf.max_k}, experts="
          f"{config.leaf.experts}; use a bound in (0, 1], max_k >= 1 and experts >= 1.")
  d = config.get("debias")
  if d is not None and (d.strength < 0 or not 0 <= d.momentum < 1
                        or d.target not in DEBIAS_TARGETS):
    raise errors.ConfigError(
        f"debias: strength={d.strength}, momentum={d.momentum}, target={d.target!r}; use a "
        f"strength >= 0 (0 = off), a momentum in [0, 1) and a target in {DEBIAS_TARGETS}.")
  if config.negative.enabled and not 0 < config.negative.bound < 1:
    raise errors.ConfigError(f"negative.bound={config.negative.bound}: complementary classes "
                             "are those below a probability in (0, 1), e.g. 0.05.")


# ---- Where stage 3 starts: a stage-2 result, checked against this run's data. ----

def start_result(config: ml_collections.ConfigDict) -> dict:
  """The stage-2 result stage 3 starts from; InitError if `init_from` is not one."""
  if not config.init_from:
    raise InitError("init_from is empty: stage 3 starts from a stage-2 (finetune) run "
                    "directory; set --config.init_from=RUN_DIR.")
  if not os.path.isdir(config.init_from):
    raise InitError(f"init_from {config.init_from}: no such directory; pass the workdir of a "
                    "finished stage-2 (finetune) run.")
  result = results.read_result(config.init_from)
  if result.get("stage") != results.FINETUNE_STAGE:
    raise InitError(f"init_from {config.init_from}: its result is of stage "
                    f"'{result.get('stage')}'; stage 3 starts from a stage-2 ('{results.FINETUNE_STAGE}')"
                    " run.")
  return result


def check_data(config: ml_collections.ConfigDict, result: Mapping[str, Any],
               manifest: Mapping[str, Any]) -> None:
  """This run's data and preprocessing must be the stage-2 model's (and its labeled list the
  same one: the published code re-draws another, which we do not copy)."""
  where, start = config.data.dir, config.init_from
  if list(manifest["classes"]) != list(result["classes"]):
    raise errors.DatasetError(
        f"{where} has classes {list(manifest['classes'])}; the stage-2 model {start} was "
        f"trained on {result['classes']} (names and order must match).")
  pre = result["preprocessing"]
  if manifest["image_size"] != pre["stored_size"]:
    raise errors.DatasetError(
        f"{where} stores {manifest['image_size']} px images; the stage-2 model {start} was "
        f"trained on a build stored at {pre['stored_size']} px. Use that build.")
  for field in ("image_size", "mean", "std", "center_crop"):
    ours, theirs = config.data[field], pre.get(field, 1.0)   # center_crop: 1 before it existed
    if (list(ours) if field in ("mean", "std") else ours) != theirs:
      raise errors.ConfigError(
          f"data.{field}={ours}, but the stage-2 model {start} expects {theirs}; set "
          f"--config.data.{field} to it.")
  if manifest["manifest_sha256"] != result["data"]["manifest_sha256"] or \
      config.data.split != result["data"]["split"]:
    raise errors.DatasetError(
        f"{where} (split '{config.data.split}') is not the build and split the stage-2 model "
        f"{start} trained on ({result['data']['dir']}, split '{result['data']['split']}'): "
        "stage 3 must use the same labeled list. Point data.dir and data.split there.")


def model_kwargs(config: ml_collections.ConfigDict, result: Mapping[str, Any]) -> dict:
  """The stage-2 model's architecture with this stage's training-time settings (and LEAF's
  levels when on)."""
  m = config.model
  return {**result["model"], "drop_path_rate": m.drop_path_rate, "dtype": m.dtype,
          "remat": m.remat, "remat_policy": m.get("remat_policy", "nothing"),
          "attention_impl": m.attention_impl,
          **({"leaf_experts": config.leaf.experts} if config.leaf.enabled else {})}


# ---- The stage. ----

def make_stage(config: ml_collections.ConfigDict, plan: loop.RunPlan,
               workdir: str | None) -> loop.Stage:
  result = start_result(config)
  manifest = records.load_manifest(config.data.dir)
  check_data(config, result, manifest)   # same build: crop, margin and detector match too
  classes = list(result["classes"])
  kwargs = model_kwargs(config, result)
  target = None
  if debiased(config) and config.debias.target == "labeled":
    target = classifier.class_prior(classifier.train_labels(config), len(classes))
    logging.info("debias target (the labeled list's classes): %s",
                 dict(zip(classes, np.round(target, 3).tolist())))
  stage = training_stage(config, plan, kwargs, len(classes), target)
  model = results.classifier_from_kwargs(kwargs, len(classes))
  info = classifier.result_info(config, manifest, kwargs)
  info["init_from"] = os.path.abspath(config.init_from)
  hook = EpochHook(config, plan, model, classes, workdir)
  return dataclasses.replace(
      stage, warm_start=lambda state: warm_start(config, plan.mesh, state),
      hooks=(loop.Hook(plan.steps_per_epoch, hook, prefix="epoch"),), result_info=info,
      **classifier.val_evaluation(config, plan, model, classes))


def training_stage(config: ml_collections.ConfigDict, plan: loop.RunPlan, kwargs: dict,
                   num_classes: int, debias_target: np.ndarray | None = None) -> loop.Stage:
  """State, loss and optimiser alone (no data read, no stage-2 run): benchmarks, tests.
  `debias_target` [C]: the class marginal debiasing pulls the teacher to (None: uniform)."""
  check_config(config)
  if config.leaf.enabled and num_classes <= config.leaf.max_k:
    raise errors.ConfigError(
        f"leaf.max_k={config.leaf.max_k} with {num_classes} classes: a positive set of up to "
        "max_k classes must leave a negative class; lower leaf.max_k.")
  size = config.data.image_size
  rule = policy(config)
  names = count_names(config)
  model = results.classifier_from_kwargs(kwargs, num_classes)
  tx, schedule = classifier.make_tx(config, model, plan.total_steps, plan.steps_per_epoch)
  ema = config.teacher == "ema"
  decay = config.ema_decay

  def make_extra(params):
    extra = {"thresholds": thresholds.init_state(rule, num_classes, plan.data.unlabeled_records),
             "counts": _zero_counts(names, num_classes)}
    if ema:
      extra["ema"] = params
    if debiased(config):   # p_bar starts at the target: no correction before the teacher drifts
      extra["prior"] = (jnp.full((num_classes,), 1.0 / num_classes, jnp.float32)
                        if debias_target is None else jnp.asarray(debias_target, jnp.float32))
    return extra

  def update_extra(extra, params, new, step):
    del step
    out = {"thresholds": new["thresholds"],
           "counts": jax.tree.map(jnp.add, extra["counts"], new["counts"])}
    if "prior" in new:
      out["prior"] = new["prior"]
    if ema:
      out["ema"] = optim.ema_update(extra["ema"], params, decay)
    return out

  # Forward-equivalents per labeled row: labeled train (3) + mu x (each strong view trained
  # (3) and a teacher forward (1), or FixMatch's weak rows trained alongside (3)).
  train = flops.vit_train_flops(dict(kwargs, num_classes=num_classes), size, 1)
  per_unlabeled = train * (plan.data.strong_views + (1 / 3 if ema else 1))
  return loop.Stage(
      name=STAGE, batch_kind="semisup", init=classifier.make_init(config, model, tx, make_extra),
      loss_fn=make_loss(config, model, num_classes, rule, sharding.num_batch_shards(plan.mesh),
                        plan.data.strong_views, debias_target),
      tx=tx, schedule=schedule,
      train_flops_per_example=train + plan.data.unlabeled_ratio * per_unlabeled,
      update_extra=update_extra)


def debiased(config: ml_collections.ConfigDict) -> bool:
  return config.get("debias") is not None and config.debias.strength > 0


def debias_logits(teacher_logits: jax.Array, prior: jax.Array, strength: float,
                  momentum: float, log_target: jax.Array | float = 0.0
                  ) -> tuple[jax.Array, jax.Array]:
  """The teacher's logits less strength x (log p_bar - log target), where p_bar is an EMA of
  its mean softmax over the unlabeled rows (updated from this batch's raw softmax). A teacher
  that leans to a class more than the target does is pulled back before its labels and
  confidences are read, so pseudo-labels do not feed that lean back into the student. A
  uniform target (log_target constant) is DebiasPL's adaptive debiasing (Wang et al. 2022,
  "Debiased Learning from Naturally Imbalanced Pseudo-Labels"); the labeled classes'
  frequencies at strength 1 are ReMixMatch's distribution alignment (Berthelot et al. 2020).
  Returns (debiased logits, the new p_bar)."""
  batch_mean = jnp.mean(jax.nn.softmax(teacher_logits, axis=-1), axis=0)
  new_prior = momentum * prior + (1 - momentum) * batch_mean
  return teacher_logits - strength * (jnp.log(new_prior) - log_target), new_prior


def count_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The per-class counts this run keeps over an epoch (`_counts`)."""
  return (COUNTS + (LEAF_COUNTS if config.leaf.enabled else ())
          + (NEGATIVE_COUNTS if config.negative.enabled else ()))


def _zero_counts(names: Sequence[str], num_classes: int) -> dict[str, jax.Array]:
  return {k: jnp.zeros((num_classes,), jnp.int32) for k in names}


def concat_rows(arrays: Sequence[jax.Array], shards: int) -> jax.Array:
  """Row blocks -> one batch whose every batch shard holds its own rows of each block, so the
  concatenation moves nothing between devices (a plain concatenate of sharded blocks would)."""
  parts = [a.reshape(shards, a.shape[0] // shards, *a.shape[1:]) for a in arrays]
  joined = jnp.concatenate(parts, axis=1)
  return joined.reshape(-1, *joined.shape[2:])


def split_rows(x: jax.Array, sizes: Sequence[int], shards: int) -> list[jax.Array]:
  """The inverse of `concat_rows`."""
  x = x.reshape(shards, x.shape[0] // shards, *x.shape[1:])
  bounds = np.cumsum([0] + [s // shards for s in sizes])
  return [x[:, a:b].reshape(-1, *x.shape[2:]) for a, b in zip(bounds[:-1], bounds[1:])]


def strong_view(unlabeled: Mapping[str, jax.Array], size: int, fill: Sequence[float],
                view: int = 0) -> jax.Array:
  """Strong view `view` of a semisup batch's unlabeled rows: its own crop and flip of the
  stored image, then RandAugment; float32 [N, size, size, 3] in 0..255. Made here, or taken
  as the host made it (`pipeline.strong_view_place`: the host on a CPU backend)."""
  if "strong_image" in unlabeled:
    return unlabeled["strong_image"][:, view].astype(jnp.float32)
  return randaugment.rand_augment(
      device.crop_resize_flip(unlabeled["image"], unlabeled["strong_crop"][:, view],
                              unlabeled["strong_flip"][:, view], size),
      unlabeled["strong_u"][:, view], fill)


def unlabeled_loss(student_logits: jax.Array, teacher_logits: jax.Array, mask: jax.Array,
                   hard: bool = True, temperature: float = 1.0) -> jax.Array:
  """mean over all rows of mask x CE(student, pseudo-label): the teacher's argmax (hard) or
  its softmax at `temperature` (soft). No gradient reaches the teacher."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  targets = (jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1]) if hard
             else jax.nn.softmax(teacher_logits / temperature, axis=-1))
  return jnp.mean(facemix.soft_cross_entropy(student_logits, targets) * mask)


def make_loss(config, model: vit.ViT, num_classes: int, rule: thresholds.Policy, shards: int,
              strong_views: int = 1, debias_target: np.ndarray | None = None):
  """The pure loss of one semisup batch; its aux carries the threshold state after the batch
  and this batch's per-class pseudo-label counts (`aux["extra"]`).

  Each strong view is trained on the teacher's pseudo-labels (their losses averaged). LEAF
  replaces the cross entropy by the ambiguous-label loss and adds the two views'
  consistency to it (L_u), adds the contrastive term over the rows the threshold rejected
  (as the public code: those rows get no label to learn from), and weighs L_x by
  `leaf.weight_x`. Negative learning adds -log(1 - p_c) on those rows' complementary classes.
  """
  size, mean, std, dtype = config.data.image_size, config.data.mean, config.data.std, model.dtype
  fill = randaugment.fill_colour(mean)
  ema, hard, temperature = config.teacher == "ema", config.pseudo_label == "hard", config.temperature
  lambda_u, smoothing = config.lambda_u, config.loss.label_smoothing
  fairness = FAIRNESS_WEIGHT if rule.kind == "freematch" else 0.0
  lf, neg = config.leaf, config.negative
  weight_x = lf.weight_x if lf.enabled else 1.0
  debias = config.debias if debiased(config) else None
  log_target = 0.0 if debias_target is None else jnp.log(jnp.asarray(debias_target, jnp.float32))

  def loss_fn(params, extra, batch, rng):
    lab, unl = batch["labeled"], batch["unlabeled"]
    x = device.prepare_train_images(lab, size, mean, std)
    weak = device.prepare_train_images(unl, size, mean, std)
    strong = [device.normalize(strong_view(unl, size, fill, v), mean, std)
              for v in range(strong_views)]
    rows = [x.shape[0]] + [weak.shape[0]] * (strong_views + (0 if ema else 1))
    logits, out = model.apply({"params": params}, concat_rows(
        [x] + ([] if ema else [weak]) + strong, shards).astype(dtype), train=True,
        features=True, rngs={"dropout": rng})
    parts = split_rows(logits, rows, shards)
    logits_x, logits_s = parts[0], parts[-strong_views:]
    if ema:
      teacher_logits = model.apply({"params": extra["ema"]}, weak.astype(dtype), train=False)
    else:
      teacher_logits = parts[1]
    teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    new_extra = {}
    if debias is not None:
      teacher_logits, new_extra["prior"] = debias_logits(
          teacher_logits, extra["prior"], debias.strength, debias.momentum, log_target)
    probs = jax.nn.softmax(teacher_logits, axis=-1)
    mask, taus, state = thresholds.mask_and_update(rule, extra["thresholds"], probs,
                                                   unl["position"])
    pseudo = jnp.argmax(probs, axis=-1)
    y = optax.smooth_labels(jax.nn.one_hot(lab["label"], num_classes), smoothing)
    loss_x = jnp.mean(facemix.soft_cross_entropy(logits_x, y))
    over_views = lambda f: sum(f(z) for z in logits_s) / strong_views
    aux = {"loss_x": loss_x, "mask_rate": jnp.mean(mask),
           "confidence": jnp.mean(jnp.max(probs, axis=-1)), "threshold_mean": jnp.mean(taus)}
    positive = negative = None
    if lf.enabled:   # L_u: the category level, ambiguous labels on both views + consistency
      positive = leaf.positive_sets(probs, lf.bound, lf.max_k)
      loss_a = over_views(lambda z: jnp.mean(mask * leaf.ambiguous_loss(z, positive)))
      loss_c = jnp.mean(leaf.consistency_loss(*logits_s))
      loss_u = loss_a + lf.weight_consistency * loss_c
      features = split_rows(out["feature"], rows, shards)[-strong_views:]
      loss_supcon = leaf.contrastive_loss(features, mask <= 0, lf.supcon_temperature)
      loss = weight_x * loss_x + lambda_u * loss_u + lf.weight_supcon * loss_supcon
      aux.update(loss_ambiguous=loss_a, loss_consistency=loss_c, loss_supcon=loss_supcon,
                 positive_set_size=jnp.mean(jnp.sum(positive, axis=-1)),
                 **{f"gate_entropy_{k}": leaf_levels.gate_entropy(g)
                    for k, g in out["gates"].items()})
    else:
      loss_u = over_views(lambda z: unlabeled_loss(z, teacher_logits, mask, hard, temperature))
      loss = weight_x * loss_x + lambda_u * loss_u
    aux["loss_u"] = loss_u
    if neg.enabled:
      negative = negative_learning.negative_classes(probs, mask, neg.bound)
      loss_n = over_views(lambda z: jnp.mean(negative_learning.negative_loss(z, negative)))
      loss = loss + neg.weight * loss_n
      taking_part = jnp.any(negative, axis=-1)
      aux.update(loss_negative=loss_n, negative_rows=jnp.mean(taking_part),
                 negative_classes_per_row=jnp.sum(negative) / jnp.maximum(
                     jnp.sum(taking_part), 1))
    counts = _counts(pseudo, mask, unl["label"], num_classes, positive, negative)
    if fairness:
      loss_f = thresholds.freematch_fairness_loss(
          state, over_views(lambda z: jax.nn.softmax(z, axis=-1)), mask)
      loss = loss + fairness * loss_f
      aux["loss_fairness"] = loss_f
    aux["extra"] = {"thresholds": state, "counts": counts, **new_extra}
    return loss, aux

  return loss_fn


def _total(a: jax.Array) -> jax.Array:
  return jnp.sum(a.astype(jnp.int32), axis=0)


def _counts(pseudo: jax.Array, mask: jax.Array, label: jax.Array, num_classes: int,
            positive: jax.Array | None = None,
            negative: jax.Array | None = None) -> dict[str, jax.Array]:
  """Per pseudo-label class: rows, rows passing the threshold, and (where the record's true
  label is known) how many of those, and of all rows, the teacher got right. With LEAF's
  positive sets: their sizes, and how many rows with a known label hold it in theirs. With
  negative learning's classes: the rows taking part; by negated class, the pairs, those whose
  row has a known label, and those that negate the true label."""
  one = jax.nn.one_hot(pseudo, num_classes, dtype=jnp.int32)
  passed = one * (mask > 0)[:, None]
  known, right = (label >= 0)[:, None], (label == pseudo)[:, None]
  out = {"seen": _total(one), "passed": _total(passed), "known": _total(passed * known),
         "correct": _total(passed * right), "known_all": _total(one * known),
         "correct_all": _total(one * right)}
  if positive is not None:
    hit = jnp.take_along_axis(positive, jnp.maximum(label, 0)[:, None], axis=-1) & known
    out["positive_size"] = _total(one * jnp.sum(positive, axis=-1)[:, None])
    out["positive_hit"] = _total(one * hit)
  if negative is not None:
    true = jax.nn.one_hot(label, num_classes, dtype=bool)   # all False where label is -1
    out.update(negative_rows=_total(one * jnp.any(negative, axis=-1)[:, None]),
               negative_pairs=_total(negative), negative_known=_total(negative & known),
               negative_wrong=_total(negative & true))
  return out


# ---- Start and per-epoch work. ----

def warm_start(config, mesh, state: loop.TrainState) -> loop.TrainState:
  """Student and (EMA) teacher from the stage-2 result's chosen weights; what stage 2 did not
  have (LEAF's levels) keeps its fresh init."""
  clf = results.load_classifier(config.init_from, mesh=mesh)
  fresh = {"leaf"} if config.leaf.enabled else set()
  if set(clf.params) != set(state.params) - fresh:
    raise InitError(
        f"init_from {config.init_from}: its model has parameters {sorted(clf.params)}, this "
        f"stage's has {sorted(state.params)} (of which {sorted(fresh)} start fresh); start from "
        "a stage-2 classifier run.")
  loaded = {k: jax.tree.map(lambda s, t: jax.device_put(s, t.sharding), v, state.params[k])
            for k, v in clf.params.items()}
  params = {**state.params, **loaded}
  logging.info("warm start: stage-2 %s weights of %s step %d%s", clf.weights, config.init_from,
               clf.step, "".join(f"; {k} freshly initialised" for k in sorted(fresh)))
  extra = dict(state.extra)
  if "ema" in extra:   # its own buffers: the step donates the state
    extra["ema"] = jax.tree.map(jnp.copy, params)
  return state.replace(params=params, extra=extra)


class EpochHook:
  """Once an epoch: DTM's threshold update, the epoch's pseudo-label diagnostics, the figure.

  DTM runs the teacher over train_labeled (the eval view, every record once) and moves each
  class's threshold by its mean confidence where it is right (`thresholds.dtm_epoch_update`).
  The diagnostics come from `extra["counts"]`, summed in the step since the last epoch and
  reset here: per class (by pseudo-label) the mask rate, the threshold, the pseudo-label
  accuracy of the masked rows whose true label is known, and overall the same plus the
  teacher's accuracy on every unlabeled row with a known label; with LEAF the mean positive
  set and how often it holds the true label; with negative learning the share of rows taking
  part, their negative classes, and how often (overall and per class) a class pushed down
  was the true label (`diagnostics`).
  """

  def __init__(self, config, plan: loop.RunPlan, model: vit.ViT, classes: Sequence[str],
               workdir: str | None):
    self._rule, self._classes, self._workdir = policy(config), list(classes), workdir
    self._counts = count_names(config)
    self._ema = config.teacher == "ema"
    self._labeled = None
    if self._rule.kind == "dtm":
      self._labeled = evaluate.Evaluator(
          data_dir=config.data.dir, split=config.data.split, lists=config.data.train_lists,
          model_classes=classes, image_size=config.data.image_size, mean=config.data.mean,
          std=config.data.std, dtype=model.dtype, batch_size=config.eval.batch_size,
          mesh=plan.mesh, apply_fn=lambda p, x: model.apply({"params": p}, x, train=False),
          num_threads=config.data.num_threads, center_crop=config.data.center_crop)

  def __call__(self, state: loop.TrainState, step: int) -> loop.StateUpdate:
    extra = dict(state.extra)
    counts = {k: np.asarray(v, np.int64) for k, v in jax.device_get(extra["counts"]).items()}
    if self._labeled is not None:
      probs, target = self._labeled.probabilities(extra["ema"] if self._ema else state.params)
      extra["thresholds"] = jax.tree.map(
          lambda new, old: jax.device_put(new, old.sharding),
          thresholds.dtm_epoch_update(jax.device_get(extra["thresholds"]), probs, target),
          extra["thresholds"])
    extra["counts"] = jax.tree.map(lambda z, old: jax.device_put(z, old.sharding),
                                   _zero_counts(self._counts, len(self._classes)),
                                   extra["counts"])
    taus = np.asarray(thresholds.class_thresholds(
        self._rule, jax.device_get(extra["thresholds"]), len(self._classes)))
    metrics = diagnostics(counts, taus, self._classes)
    if self._workdir is not None and jax.process_index() == 0:
      plot_thresholds(self._workdir, step, metrics, self._classes)
    return loop.StateUpdate(state.replace(extra=extra), metrics)


def _ratio(num, den) -> float:
  return float(num) / float(den) if den else math.nan


def diagnostics(counts: Mapping[str, np.ndarray], taus: np.ndarray,
                classes: Sequence[str]) -> dict[str, float]:
  """The epoch's pseudo-label figures from its summed counts; a ratio with nothing to count
  (0/0: no row of that class, no known label) is left out."""
  s = {k: np.asarray(v) for k, v in counts.items()}
  out = {"mask_rate": _ratio(s["passed"].sum(), s["seen"].sum()),
         "pseudo_labels": float(s["passed"].sum()),
         "pseudo_label_accuracy": _ratio(s["correct"].sum(), s["known"].sum()),
         "teacher_accuracy_unlabeled": _ratio(s["correct_all"].sum(), s["known_all"].sum())}
  if "positive_size" in s:   # LEAF: positive sets of every unlabeled row
    out["positive_set_size"] = _ratio(s["positive_size"].sum(), s["seen"].sum())
    out["positive_set_accuracy"] = _ratio(s["positive_hit"].sum(), s["known_all"].sum())
  if "negative_rows" in s:   # negative learning on the rows the threshold rejected
    out["negative_rows"] = _ratio(s["negative_rows"].sum(), s["seen"].sum())
    out["negative_classes_per_row"] = _ratio(s["negative_pairs"].sum(), s["negative_rows"].sum())
    out["negative_label_error"] = _ratio(s["negative_wrong"].sum(), s["negative_known"].sum())
  for c, name in enumerate(classes):
    out[f"threshold/{name}"] = float(taus[c])
    out[f"mask_rate/{name}"] = _ratio(s["passed"][c], s["seen"][c])
    out[f"pseudo_label_accuracy/{name}"] = _ratio(s["correct"][c], s["known"][c])
    if "negative_rows" in s:
      out[f"negative_label_error/{name}"] = _ratio(s["negative_wrong"][c], s["negative_known"][c])
  return {k: v for k, v in out.items() if not math.isnan(v)}


def plot_thresholds(workdir: str, step: int, current: Mapping[str, float],
                    classes: Sequence[str]) -> str:
  """Per-class thresholds and mask rates over training (every epoch logged so far)."""
  rows = [r for r in writers.read_metrics(workdir) if r.get("split") == "epoch"
          and r["step"] < step] + [{"step": step, **current}]
  return figures.save(thresholds_figure(rows, classes), os.path.join(workdir, FIGURE), dpi=110)


def thresholds_figure(rows: Sequence[Mapping[str, float]], classes: Sequence[str]):
  """The epochs' per-class thresholds and mask rates, a line (and legend entry) per class; a
  fixed policy's classes share one line, named by all of them."""
  def panel(what: str, ylabel: str, title: str) -> figures.Panel:
    series = {}
    for name in classes:   # a class no row was pseudo-labelled as has no mask rate
      pts = [(r["step"], r[f"{what}/{name}"]) for r in rows if f"{what}/{name}" in r]
      if pts:
        series[name] = tuple(zip(*pts))
    return figures.Panel(series, ylabel, title, (-0.02, 1.02))

  return figures.curves_figure(
      [panel("threshold", "threshold (teacher confidence)", "per-class threshold"),
       panel("mask_rate", "mask rate (share passing)", "mask rate (by pseudo-label)")],
      "stage 3: pseudo-label thresholds by class")
