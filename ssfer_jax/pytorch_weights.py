"""Weights in PyTorch's layout: reading safetensors and `.pth` files (the official MAE
checkpoints, timm ViTs), timm's architecture names, and warm starts from such files.

The tree <-> state-dict table itself is `models/param_table.py`. safetensors needs no torch;
a `.pth` is read with torch when it is installed (only then), weights only.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from ssfer_jax import errors
from ssfer_jax.models import param_table, vit

WEIGHT_FILES = (".safetensors", ".pth", ".pt", ".bin")
# timm's names for the standard widths: (width, depth, heads) -> the name's size part.
TIMM_SIZES = {(192, 12, 3): "tiny", (384, 12, 6): "small", (768, 12, 12): "base",
              (1024, 24, 16): "large"}


class WeightsError(errors.UserError, ValueError):
  """A weight file cannot be read or does not fit the model."""


def is_weight_file(path: str) -> bool:
  """A weight file by its extension (whether it exists is `read_state_dict`'s to say)."""
  return path.lower().endswith(WEIGHT_FILES)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A torch-layout state dict as float32 numpy arrays. A `.pth` holding {'model': ...} (MAE's
  and DeiT's checkpoints) or {'state_dict': ...} is unwrapped."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file.")
  if path.lower().endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    sd = load_file(path)
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise WeightsError(
          f"{path}: reading a PyTorch checkpoint needs torch (`pip install torch`, CPU build "
          "suffices), or convert it to safetensors where torch is installed "
          "(safetensors.torch.save_file(state_dict, 'model.safetensors')).") from None
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except   (torch's unpickler raises many)
      raise WeightsError(f"{path}: not a loadable PyTorch checkpoint of tensors "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    for key in ("model", "state_dict"):
      if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
        obj = obj[key]
    sd = {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def write_safetensors(path: str, sd: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, tmp,
            metadata=dict(metadata))
  os.replace(tmp, path)


def timm_model(kwargs: Mapping[str, Any], num_classes: int, image_size: int) -> dict:
  """timm's `create_model` name and keyword arguments for one of our ViTs."""
  if kwargs.get("leaf_experts"):
    raise WeightsError("a LEAF model's expert levels have no timm counterpart; export its "
                       "stage-2 model, or use the orbax export for JAX.")
  if kwargs.get("stem", "patch") != "patch" or kwargs["pool"] not in ("cls", "gap"):
    raise WeightsError("a conv-stem ViT (model.stem='conv') or a flattened head (model.pool="
                       "'flatten') has no timm counterpart; use the orbax export for JAX.")
  width, depth, heads, mlp = (kwargs[k] for k in ("width", "depth", "num_heads", "mlp_dim"))
  # timm registers vit_{tiny,small,base,large}_patch16_224; other shapes take the base one
  # with every dimension given.
  size = TIMM_SIZES.get((width, depth, heads)) if kwargs["patch_size"] == 16 else None
  arch = f"vit_{size or 'base'}_patch16_224"
  timm_kwargs = {"num_classes": num_classes, "img_size": image_size,
                 "global_pool": "token" if kwargs["pool"] == "cls" else "avg"}
  if size is None or mlp != 4 * width:
    timm_kwargs.update(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp / width)
  if size is None:
    timm_kwargs["patch_size"] = kwargs["patch_size"]
  return {"arch": arch, "kwargs": timm_kwargs}


def _subtree(params: Mapping[str, Any], keys) -> dict:
  return {k: params[k] for k in keys if k in params}


def load_encoder(path: str, template: Mapping[str, Any]) -> tuple[dict, dict[str, list[str]]]:
  """The encoder of a ViT or MAE file (timm or MAE naming), as ViT 'params' entries fitting
  `template` (a ViT's params): patch embedding, cls token, blocks, its final norm when the
  template has one, and the position table when the template learns one (resampled to its
  grid). The head, fc_norm and MAE's decoder are never taken: a warm start gives the task
  its own. Returns (params, {"loaded", "fresh", "dropped"} key lists) for the log."""
  return _encoder(read_state_dict(path), path, template)


def _encoder(sd: Mapping[str, np.ndarray], path: str, template: Mapping[str, Any]):
  """`load_encoder` on a state dict already read from `path`."""
  keys = [k for k in (*vit.ENCODER_KEYS, "pos_embed") if k in template]
  sub = _subtree(template, keys)
  flat = traverse_util.flatten_dict(nn.meta.unbox(sub))
  wanted = {e.theirs for e in param_table.param_table(flat, "vit")}
  missing = sorted(wanted - set(sd))
  if missing:
    raise WeightsError(f"{path} lacks the encoder's {missing[:6]}{' ...' if len(missing) > 6 else ''}"
                       f" ({len(missing)} keys): it is not a ViT/MAE of this architecture (timm or "
                       "MAE naming).")
  pos = {"pos_embed": sd["pos_embed"]} if "pos_embed" in sd and "pos_embed" not in wanted else {}
  try:
    params = param_table.from_state_dict({k: sd[k] for k in wanted} | pos, sub, "vit")
  except (KeyError, ValueError) as e:
    raise WeightsError(f"{path} does not fit the model: {e}") from None
  report = {"loaded": sorted(wanted | set(pos)), "fresh": sorted(set(template) - set(keys)),
            "dropped": sorted(set(sd) - wanted - set(pos))}
  return params, report


def load_mae(path: str, template: Mapping[str, Any]) -> tuple[dict, dict[str, list[str]]]:
  """An MAE's 'params' from an official MAE checkpoint: the whole model when the file has the
  decoder (the `*_full.pth` / `mae_visualize_*` files), else the encoder with the decoder
  left as `template` has it (the `mae_pretrain_*` files are encoder-only)."""
  sd = read_state_dict(path)
  if "mask_token" in sd:
    try:
      params = param_table.from_state_dict(sd, template, "mae")
    except (KeyError, ValueError) as e:
      raise WeightsError(f"{path} does not fit the MAE model: {e}") from None
    return params, {"loaded": sorted(sd), "fresh": [], "dropped": []}
  encoder, report = _encoder(sd, path, _subtree(template, vit.ENCODER_KEYS))
  report["fresh"] = sorted(set(template) - set(encoder))
  return {**template, **encoder}, report


def log_report(path: str, report: Mapping[str, list[str]]) -> None:
  logging.info("warm start from %s: %d tensors loaded; fresh: %s; not used: %s", path,
               len(report["loaded"]), report["fresh"] or "none",
               (report["dropped"][:8] + (["..."] if len(report["dropped"]) > 8 else []))
               or "none")
