"""Trained weights for other programs: safetensors in timm's ViT naming with a JSON model card
(for PyTorch users), and an orbax checkpoint of our own tree (for JAX users).

  python -m ssfer_jax.export --run runs/ss --out exports/ss [--weights best|raw|ema]
  python -m ssfer_jax.export --run runs/mae --out exports/mae [--format encoder|mae]

A classifier run (stage 2 or 3) exports the whole classifier; a stage-1 run its encoder (timm,
no head: `num_classes=0`) or, with --format mae, the whole MAE in the official MAE code's
naming. DIR/model.safetensors, DIR/model_card.json (architecture, timm's call, classes in
order, normalisation, image size, crop mode and margin, training data and metrics),
DIR/orbax/ (the params tree; `load(DIR)` gives the model and its params back).

In PyTorch (the card's `timm_call`, filled in; the README's block is tested to be it):
  model = timm.create_model('vit_base_patch16_224', pretrained=True, num_classes=7,
      img_size=224, global_pool='token', pretrained_cfg_overlay=dict(
          file='DIR/model.safetensors', num_classes=7, mean=MEAN, std=STD,
          input_size=(3, 224, 224), crop_pct=1.0, interpolation='bilinear'))
`num_classes` in the overlay keeps the head (timm drops it otherwise); `img_size` keeps the
position table at its grid (timm resamples it otherwise); `input_size`, `crop_pct` and
`interpolation` make timm's standard transforms feed the model as ours was fed. The files
are plain files (the umask's mode), shareable as written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ssfer_jax import errors, pytorch_weights, results
from ssfer_jax.input import records
from ssfer_jax.models import param_table, vit
from ssfer_jax.runtime import checkpointing, sharding, writers

CARD = "model_card.json"
WEIGHTS = "model.safetensors"
ORBAX = "orbax"
FORMAT = "ssfer-jax export 1"


class ExportError(errors.UserError, ValueError):
  pass


def timm_call(arch: str, kwargs: Mapping[str, Any], path: str, mean, std,
              crop_pct: float = 1.0) -> str:
  """timm.create_model(...) loading `path`, with the preprocessing timm's data config then
  reports: our normalisation, the model's centre share of the stored face (`crop_pct`: our
  `data.center_crop`; 1 = the whole image) at img_size, bilinear."""
  args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  size = kwargs["img_size"]
  overlay = (f"file={path!r}, num_classes={kwargs['num_classes']}, mean={tuple(mean)}, "
             f"std={tuple(std)}, input_size=(3, {size}, {size}), crop_pct={crop_pct!r}, "
             "interpolation='bilinear'")
  return (f"timm.create_model({arch!r}, pretrained=True, {args}, "
          f"pretrained_cfg_overlay=dict({overlay}))")


def _test_metrics(run_dir: str, step: int, weights: str) -> dict | None:
  """The run's test report (RUN/eval/test.json) when it scored these very weights."""
  path = os.path.join(run_dir, "eval", "test.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    r = json.load(f)
  if (r.get("step"), r.get("weights")) != (step, weights):
    return None
  return {k: r.get(k) for k in ("count", "accuracy", "mean_class_accuracy", "macro_f1", "data")}


def _data_summary(data: Mapping[str, Any] | None) -> dict | None:
  """The training build: sources, classes, crop, and the split's list sizes."""
  if not data or not os.path.exists(os.path.join(data["dir"], records.MANIFEST)):
    return data
  m = records.load_manifest(data["dir"])
  out = dict(data, num_records=m["num_records"], image_size=m["image_size"], crop=m.get("crop"),
             margin=m.get("margin"), detector=m.get("detector"), classes=m["classes"],
             sources={name: {k: v.get(k) for k in ("kind", "read", "written", "skipped")}
                      for name, v in m.get("sources", {}).items()}, counts=m.get("counts"))
  split = records.split_file_name(data["dir"], data.get("split") or "default")
  if os.path.exists(split):
    with open(split) as f:
      out["lists"] = {k: len(v) for k, v in json.load(f)["lists"].items()}
  return out


def _classifier(run_dir: str, result: dict, weights: str) -> tuple[dict, dict, dict]:
  clf = results.load_classifier(run_dir, weights=weights)
  kwargs = result["model"]
  val = result.get("val") or {}
  card = {"kind": "classifier", "classes": result["classes"], "step": clf.step,
          "weights": clf.weights, "preprocessing": result["preprocessing"],
          "training": {"stage": result["stage"], "data": _data_summary(result.get("data")),
                       "config": result["config"]},
          "metrics": {"val": {k: val.get(k) for k in ("count", "accuracy",
                                                      "mean_class_accuracy", "macro_f1")},
                      "test": _test_metrics(run_dir, clf.step, clf.weights)}}
  return jax.device_get(clf.params), kwargs, card


def load_mae_run(run_dir: str) -> tuple[dict, dict]:
  """A finished stage-1 run's MAE params (its result's step, on the host) and its resolved
  model kwargs."""
  result = results.read_result(run_dir)
  src = ml_collections.ConfigDict(result["config"])
  ckpt = checkpointing.Checkpointer(run_dir)
  try:
    params = results.restore_mae_params(ckpt, result["step"], src, sharding.single_device_mesh())
  finally:
    ckpt.close()
  kwargs = {k: (str(v) if k == "dtype" else v) for k, v in results.mae_kwargs(src).items()}
  return jax.device_get(params), kwargs


def export_run(run_dir: str, out_dir: str, *, weights: str = "best",
               fmt: str = "encoder") -> dict:
  """Writes DIR/model.safetensors, DIR/model_card.json and DIR/orbax/; returns the card."""
  result = results.read_result(run_dir)
  if result["stage"] in results.CLASSIFIER_STAGES:
    params, kwargs, card = _classifier(run_dir, result, weights)
    image_size = result["preprocessing"]["image_size"]
    num_classes, mean, std = len(result["classes"]), *(result["preprocessing"][k]
                                                       for k in ("mean", "std"))
    crop_pct = result["preprocessing"].get("center_crop", 1.0)
    sd_kind = "vit"
  elif result["stage"] == results.MAE_STAGE:
    mae_params, mae_kwargs = load_mae_run(run_dir)
    data = result["config"]["data"]
    image_size, mean, std, num_classes = data["image_size"], data["mean"], data["std"], 0
    crop_pct = data.get("center_crop", 1.0)
    card = {"kind": "mae" if fmt == "mae" else "encoder", "classes": [], "step": result["step"],
            "weights": "raw", "preprocessing": {"image_size": image_size, "mean": mean, "std": std,
                                                "center_crop": crop_pct},
            "training": {"stage": results.MAE_STAGE, "data": _data_summary(
                {"dir": data["dir"], "split": data["split"]}), "config": result["config"]},
            "metrics": {}}
    if fmt == "mae":
      params, kwargs, sd_kind = mae_params, mae_kwargs, "mae"
    else:
      params = vit.encoder_params_from_mae(mae_params, pool="cls")
      kwargs = {k: mae_kwargs[k] for k in ("width", "depth", "num_heads", "mlp_dim",
                                           "patch_size", "dtype")} | {"pool": "cls",
                                                                      "pos_embed": "sincos"}
      sd_kind = "vit"
  else:
    raise ExportError(f"{run_dir}: a '{result['stage']}' result; export stage 1, 2 or 3 runs.")

  os.makedirs(out_dir, exist_ok=True)
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  sd = param_table.to_state_dict(params, sd_kind, image_size=image_size)
  path = os.path.join(os.path.abspath(out_dir), WEIGHTS)
  pytorch_weights.write_safetensors(path, sd, {"format": "pt", "source": FORMAT})
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  card.update(format=FORMAT, source_run=os.path.abspath(run_dir), model=kwargs,
              num_classes=num_classes, image_size=image_size, mean=list(mean), std=list(std),
              files={"safetensors": WEIGHTS, "sha256": digest, "orbax": ORBAX})
  if sd_kind == "vit":
    timm = pytorch_weights.timm_model(kwargs, num_classes, image_size)
    card["timm"] = timm | {"call": timm_call(timm["arch"], timm["kwargs"], path, mean, std,
                                             crop_pct)}
  else:
    card["mae"] = {"code": "facebookresearch/mae models_mae.MaskedAutoencoderViT",
                   "note": "norm_pix_loss=%s" % kwargs.get("norm_pix_loss")}
  orbax_dir = os.path.join(os.path.abspath(out_dir), ORBAX)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(orbax_dir, params, force=True)
    ckptr.wait_until_finished()
  writers.write_json(os.path.join(out_dir, CARD), card)
  return card


def load(export_dir: str) -> tuple[vit.ViT, dict, dict]:
  """(model, params, card) of an exported classifier or encoder, from its orbax checkpoint."""
  with open(os.path.join(export_dir, CARD)) as f:
    card = json.load(f)
  if card.get("kind") == "mae":
    raise ExportError(f"{export_dir} holds a whole MAE; `load` returns ViTs (classifiers and "
                      "encoders).")
  model = vit.ViT(num_classes=card["num_classes"],
                  **{**card["model"], "dtype": jnp.dtype(card["model"]["dtype"])})
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(os.path.abspath(export_dir), ORBAX))
  return model, params, card


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="a finished stage-1, 2 or 3 run directory")
  ap.add_argument("--out", required=True, help="the export directory")
  ap.add_argument("--weights", choices=("best", "raw", "ema"), default="best",
                  help="classifiers: the result's choice, or raw / EMA weights of its step")
  ap.add_argument("--format", choices=("encoder", "mae"), default="encoder",
                  help="stage-1 runs: the encoder as a timm ViT, or the whole MAE (MAE naming)")
  args = ap.parse_args(argv)
  try:
    card = export_run(args.run, args.out, weights=args.weights, fmt=args.format)
  except errors.UserError as e:
    return errors.report(e)
  print(f"exported {card['kind']} of {args.run} (step {card['step']}, {card['weights']} weights) "
        f"to {args.out}: {WEIGHTS}, {CARD}, {ORBAX}/")
  if "timm" in card:
    print(f"PyTorch:\n  import timm\n  model = {card['timm']['call']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
