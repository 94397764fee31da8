"""The stage-result contract: what a finished run leaves and how anything reads it back.

The loop writes `RUN/result.json` atomically at a stage's last step: the stage id, the chosen
checkpoint step and weights (raw or EMA, picked on val), the config, and for classifiers their
classes, preprocessing and model kwargs. Everything that uses a finished run (evaluate,
predict, export, the analyses, the job, stage 3's teacher) reads it through this module, so
no command depends on a trainer. A run is named as `RUN`, `RUN/result.json` or
`RUN/checkpoints/STEP` (that step instead of the result's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ssfer_jax import errors
from ssfer_jax.input import records
from ssfer_jax.models import mae, vit
from ssfer_jax.runtime import checkpointing, sharding, workdir

RESULT_FILE = "result.json"
# Stage ids as checkpoints and results store them (stable: old runs must still load).
MAE_STAGE = "pretrain_mae"
FINETUNE_STAGE = "finetune"
SEMISUP_STAGE = "semisup"
CLASSIFIER_STAGES = (FINETUNE_STAGE, SEMISUP_STAGE)   # the stages whose result is a classifier


def split_run_path(path: str) -> tuple[str, int | None]:
  """`RUN`, `RUN/result.json` or `RUN/checkpoints/STEP` -> (the run directory, STEP or None)."""
  path = os.path.abspath(path)
  if os.path.basename(path) == RESULT_FILE:
    return os.path.dirname(path), None
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == checkpointing.CHECKPOINT_DIR:
    return os.path.dirname(parent), int(os.path.basename(path))
  return path, None


def resolve_checkpoint(path: str, what: str) -> tuple[checkpointing.Checkpointer, int]:
  """A run's workdir (its latest step) or one step directory inside its checkpoints/."""
  path = os.path.abspath(path)
  workdir, step = split_run_path(path)
  if step is None and not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise errors.InitError(f"{what} {path}: not a run directory (no {checkpointing.CHECKPOINT_DIR}/ "
                           "inside) nor a checkpoint step directory (RUN/checkpoints/STEP).")
  ckpt = checkpointing.Checkpointer(workdir)
  steps = ckpt.all_steps()
  step = ckpt.latest_step() if step is None else step
  if step is None or step not in steps:
    ckpt.close()
    raise errors.InitError(f"{what} {path}: no checkpoint {'' if step is None else step} there "
                           f"(steps: {steps}); train that stage first.")
  return ckpt, step


def classifier_run(path: str) -> str:
  """`path` as `load_classifier` reads it. The one-command job's WORKDIR (no result of its own,
  classifier stages in sub-folders named by stage) becomes its last finished classifier stage,
  said in a log line; a job none of whose classifier stages finished is refused."""
  run_dir, step = split_run_path(path)
  if step is not None or os.path.exists(os.path.join(run_dir, RESULT_FILE)):
    return path
  stages = [s for s in CLASSIFIER_STAGES if os.path.isdir(os.path.join(run_dir, s))]
  if not stages:
    return path   # load_classifier names what is missing
  finished = [s for s in stages if os.path.exists(os.path.join(run_dir, s, RESULT_FILE))]
  unfinished = [f"{s}/" for s in stages if s not in finished]
  if not finished:
    raise errors.InitError(
        f"{path} is a job directory, but none of its classifier stages has finished "
        f"({', '.join(unfinished)} hold no {RESULT_FILE}): rerun the job's command to finish "
        f"{stages[0]}, then pass {path} or {os.path.join(path, stages[0])}.")
  chosen = os.path.join(run_dir, finished[-1])
  logging.info("%s is a job directory: using its last finished classifier stage, %s%s", path,
               chosen, f" ({', '.join(unfinished)} not finished)" if unfinished else "")
  return chosen


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Fine-tuned weights ready to apply, with what the result says about them."""
  apply: Any          # (params, normalised images) -> logits
  params: Any
  classes: list[str]
  preprocessing: Mapping[str, Any]
  step: int
  weights: str        # "raw" or "ema"
  model: vit.ViT      # the module `apply` runs (Grad-CAM and FGSM apply it with options)


def read_result(run_dir: str) -> dict:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    raise errors.InitError(f"{path} not found: {run_dir} is not a finished run (a stage writes "
                           "it at its last step); run the same training command again to "
                           "finish it.")
  with open(path) as f:
    result = json.load(f)
  if "config" in result:
    result["config"] = workdir.upgrade(result["config"])
  return result


def classifier_from_kwargs(kwargs: Mapping[str, Any], num_classes: int) -> vit.ViT:
  """A ViT from resolved model kwargs as results record them (dtype as a string or dtype)."""
  return vit.ViT(num_classes=num_classes, **{**kwargs, "dtype": jnp.dtype(kwargs["dtype"])})


def model_from_result(result: Mapping[str, Any]) -> vit.ViT:
  """The classifier a stage result describes."""
  return classifier_from_kwargs(result["model"], len(result["classes"]))


def abstract_params(model: vit.ViT | mae.MAE, image_size: int, mesh, rules) -> Any:
  """The model's parameter shapes, carrying their shardings on `mesh` under `rules`."""
  key = jax.random.key(0)
  boxed = jax.eval_shape(lambda: model.init(
      {"params": key, "mask": key}, jnp.zeros((1, image_size, image_size, 3)),
      train=False)["params"])
  return checkpointing.abstract_with_shardings(
      nn.meta.unbox(boxed), sharding.logical_shardings(boxed, mesh, rules))


def load_classifier(run: str, *, step: int | None = None, weights: str = "best",
                    mesh=None) -> Classifier:
  """The weights of a fine-tuning run (stage 2 or 3; `run` as `split_run_path` reads it): its
  result's choice, or `weights` ("raw" or "ema") at `step`. Only those weights are read."""
  run_dir, run_step = split_run_path(run)
  step = run_step if step is None else step
  result = read_result(run_dir)
  if result.get("stage") not in CLASSIFIER_STAGES:
    raise errors.InitError(f"{run_dir}: its result is of stage '{result.get('stage')}', not a "
                           f"classifier's ({', '.join(CLASSIFIER_STAGES)}).")
  step = result["step"] if step is None else step
  which = result["weights"] if weights == "best" else weights
  if which not in ("raw", "ema"):
    raise errors.InitError(f"weights={which!r}; use 'best', 'raw' or 'ema'.")
  kept = result.get("weights_kept") or (   # results written before "weights_kept": stage 2's
      ["raw", "ema"] if result["config"].get("ema_decay", 0) > 0 else ["raw"])
  if which not in kept:
    raise errors.InitError(f"{run_dir} kept no {which} weights (it kept {kept}); use --weights raw.")
  mesh = mesh or sharding.make_mesh((-1, 1))
  model = model_from_result(result)
  abstract = abstract_params(model, result["preprocessing"]["image_size"], mesh,
                             result["config"]["sharding_rules"])
  where = {"params": abstract} if which == "raw" else {"extra": {"ema": abstract}}
  ckpt = checkpointing.Checkpointer(run_dir)
  try:
    if step not in ckpt.all_steps():
      raise errors.InitError(f"{run_dir}: no checkpoint {step} (steps: {ckpt.all_steps()}).")
    restored = ckpt.restore_subtree(step, where, result["stage"])
  finally:
    ckpt.close()
  params = restored["params"] if which == "raw" else restored["extra"]["ema"]
  return Classifier(lambda p, x: model.apply({"params": p}, x, train=False), params,
                    result["classes"], result["preprocessing"], step, which, model)


def check_preprocessing(expected: Mapping[str, Any], data_dir: str) -> list[str]:
  """Differences between how a model's training data and `data_dir` were prepared (warned)."""
  manifest = records.load_manifest(data_dir)
  diffs = [f"{k}: {manifest.get(k)} here, {expected.get(k)} for the model"
           for k in ("crop", "margin", "detector") if manifest.get(k) != expected.get(k)]
  if manifest["image_size"] != expected.get("stored_size"):
    diffs.append(f"stored size {manifest['image_size']} px here, {expected.get('stored_size')} "
                 "px for the model (images are resized to the model's size)")
  for d in diffs:
    logging.warning("%s prepared differently from the model's training data: %s", data_dir, d)
  return diffs


def mae_kwargs(config: ml_collections.ConfigDict) -> dict:
  """The MAE a stage-1 config describes (its own, or as its checkpoint or result records it)."""
  m = config.model
  return vit.vit_kwargs(
      m.size, patch_size=m.patch_size, decoder_width=m.decoder_width,
      decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, mask_ratio=m.mask_ratio,
      norm_pix_loss=m.norm_pix_loss, dtype=jnp.dtype(m.dtype), remat=m.remat,
      remat_policy=m.get("remat_policy", "nothing"),
      attention_impl=m.attention_impl, stem=m.get("stem", "patch"))


def restore_mae_params(ckpt: checkpointing.Checkpointer, step: int,
                       config: ml_collections.ConfigDict, mesh) -> dict:
  """A stage-1 checkpoint's MAE params alone (no optimiser state), laid out on `mesh`;
  `config` is the run's own."""
  abstract = abstract_params(mae.MAE(**mae_kwargs(config)), config.data.image_size, mesh,
                             config.sharding_rules)
  return ckpt.restore_subtree(step, {"params": abstract}, MAE_STAGE)["params"]
