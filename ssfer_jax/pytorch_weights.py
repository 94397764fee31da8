"""Weights in PyTorch's layout: reading safetensors and `.pth` files (the official MAE
checkpoints, timm ViTs), timm's architecture names, and warm starts from such files.

The tree <-> state-dict table itself is `models/param_table.py`. safetensors needs no torch;
a `.pth` is read with torch when it is installed (only then), weights only.
"""

from __future__ import annotations

import json
import logging
import os
import zipfile
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
  and DeiT's checkpoints) or {'state_dict': ...} is unwrapped. A truncated or foreign file and
  one holding NaN or Inf are refused in one line naming the file: a damaged download or a
  diverged run's weights must not become a run's starting point."""
  if not os.path.isfile(path):
    raise WeightsError(f"{path}: no such file.")
  if path.lower().endswith(".safetensors"):
    sd = _read_safetensors(path)
  else:
    sd = _read_torch(path)
  if not sd:
    raise WeightsError(f"{path}: holds no tensors; pass a ViT/MAE checkpoint's state dict.")
  sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
  bad = [k for k, v in sd.items() if not np.isfinite(v).all()]
  if bad:
    v = sd[bad[0]]
    raise WeightsError(
        f"{path}: tensor {bad[0]} holds {int(np.isnan(v).sum())} NaN and "
        f"{int(np.isinf(v).sum())} Inf of its {v.size} values ({len(bad)} of {len(sd)} tensors "
        "hold NaN or Inf): the weights of a diverged run, or a damaged file; start from "
        "another checkpoint.")
  return sd


def _damaged(path: str, what: str) -> WeightsError:
  return WeightsError(f"{path}: {what}; download, copy or export it again.")


def _error_line(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """safetensors' file: an 8-byte header length, a JSON header giving each tensor's byte
  range, the data. A file shorter than its header says is named truncated; any other damage
  is safetensors' own message on one line."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  cut = _truncation(path)
  if cut:
    raise _damaged(path, cut)
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except   (Rust's SafetensorError, numpy's)
    raise _damaged(path, f"not a readable safetensors file ({_error_line(e)})") from None


def _truncation(path: str) -> str | None:
  """How a safetensors file falls short of the bytes its header describes; None where it
  does not, or has no plausible header (safetensors caps one at 100 MB)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    n = int.from_bytes(head, "little")
    if len(head) < 8 or n > 100_000_000:
      return None
    raw = f.read(n)
  if len(raw) < n:
    return f"truncated inside its header: {size} bytes, the header alone {8 + n}"
  try:
    header = json.loads(raw)
    need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                       default=0)
  except (ValueError, TypeError, KeyError, IndexError, AttributeError):
    return None
  return f"truncated: {size} of the {need} bytes its header describes" if size < need else None


def _read_torch(path: str) -> dict[str, np.ndarray]:
  """A `torch.save` file, read with torch. Its container is checked first, without torch:
  torch.save writes a zip archive (before torch 1.6 a pickle), so a truncated or foreign file
  is named as such even where torch is not installed."""
  with open(path, "rb") as f:
    magic = f.read(2)
  if magic == b"PK":
    try:
      with zipfile.ZipFile(path):
        pass
    except (zipfile.BadZipFile, OSError, ValueError) as e:
      raise _damaged(path, f"a damaged zip archive, truncated or corrupt ({_error_line(e)})"
                     ) from None
  elif magic[:1] != b"\x80":
    raise WeightsError(f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive or a "
                       f"pickle; this file starts with {magic!r}); pass the file torch.save "
                       "wrote, or a .safetensors.")
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
                       f"({_error_line(e)}); download or copy it again if it is damaged, or "
                       "save its state dict alone (torch.save(ckpt['model'], 'w.pth')).") from None
  for key in ("model", "state_dict"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict; save "
                       "model.state_dict().")
  return {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}


def write_safetensors(path: str, sd: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
  """`sd` as a safetensors file, atomically. The bytes are written here rather than by
  `save_file`, which creates its file with mode 0600 whatever the umask: an export is
  meant to be shared."""
  from safetensors.numpy import save  # pylint: disable=g-import-not-at-top
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(save({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
                 metadata=dict(metadata)))
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


def load_encoder(path: str, template: Mapping[str, Any], *,
                 resample: str = "mae") -> tuple[dict, dict[str, list[str]]]:
  """The encoder of a ViT or MAE file (timm or MAE naming), as ViT 'params' entries fitting
  `template` (a ViT's params): patch embedding, cls token, blocks, its final norm when the
  template has one, and the position table when the template learns one (resampled to its
  grid: `resample` "mae" as MAE's fine-tuning, "timm" as timm's loader; the log says which).
  The head, fc_norm and MAE's decoder are never taken: a warm start gives the task its own.
  Returns (params, {"loaded", "fresh", "dropped"} key lists) for the log."""
  if resample not in param_table.POS_RESAMPLING:
    raise WeightsError(f"resample={resample!r}: the position table is resampled as "
                       f"{' or '.join(map(repr, param_table.POS_RESAMPLING))} does it.")
  return _encoder(read_state_dict(path), path, template, resample)


def _encoder(sd: Mapping[str, np.ndarray], path: str, template: Mapping[str, Any],
             resample: str = "mae"):
  """`load_encoder` on a state dict already read from `path`."""
  keys = [k for k in (*vit.ENCODER_KEYS, "pos_embed") if k in template]
  sub = _subtree(template, keys)
  _check_dims(sd, path, sub, "vit")
  flat = traverse_util.flatten_dict(nn.meta.unbox(sub))
  wanted = {e.theirs for e in param_table.param_table(flat, "vit")}
  missing = sorted(wanted - set(sd))
  if missing:
    raise WeightsError(f"{path} lacks the encoder's {missing[:6]}"
                       f"{' ...' if len(missing) > 6 else ''}"
                       f" ({len(missing)} keys): it is not a ViT/MAE of this architecture (timm or "
                       "MAE naming).")
  pos = {"pos_embed": sd["pos_embed"]} if "pos_embed" in sd and "pos_embed" not in wanted else {}
  try:
    params = param_table.from_state_dict({k: sd[k] for k in wanted} | pos, sub, "vit",
                                         resample=resample)
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
    _check_dims(sd, path, template, "mae")
    try:
      params = param_table.from_state_dict(sd, template, "mae")
    except (KeyError, ValueError) as e:
      raise WeightsError(f"{path} does not fit the MAE model: {e}") from None
    return params, {"loaded": sorted(sd), "fresh": [], "dropped": []}
  encoder, report = _encoder(sd, path, _subtree(template, vit.ENCODER_KEYS))
  report["fresh"] = sorted(set(template) - set(encoder))
  return {**template, **encoder}, report


def _dims(shapes: Mapping[str, tuple]) -> dict[str, int]:
  """The model dimensions a state dict's shapes show (timm / MAE naming)."""
  out = {}
  for dim, key, axis in (("width", "cls_token", -1), ("patch_size", "patch_embed.proj.weight", -1),
                         ("mlp_dim", "blocks.0.mlp.fc1.weight", 0),
                         ("decoder_width", "decoder_embed.weight", 0)):
    if key in shapes:
      out[dim] = shapes[key][axis]
  for dim, prefix in (("depth", "blocks."), ("decoder_depth", "decoder_blocks.")):
    blocks = {k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)}
    if blocks:
      out[dim] = len(blocks)
  return out


def _check_dims(sd: Mapping[str, np.ndarray], path: str, template: Mapping[str, Any],
                kind: str) -> None:
  """Refuses a file of another model size in one line: both models' dimensions, how many of
  the model's tensors differ (the first few), and the config setting that fits the file,
  rather than every tensor's shape."""
  shapes = param_table.state_dict_shapes(template, kind)
  ours = _dims(shapes)
  theirs = {k: v for k, v in _dims({k: v.shape for k, v in sd.items()}).items() if k in ours}
  diff = [k for k in theirs if theirs[k] != ours[k]]
  if not diff:
    return
  differ = [f"{k} {tuple(sd[k].shape)} in the file, {s} here" if k in sd else f"{k} not in the file"
            for k, s in shapes.items() if k != "pos_embed" and (k not in sd or sd[k].shape != s)]
  extra = [f"{k} not in the model" for k in sd
           if k.startswith(("blocks.", "decoder_blocks.")) and k not in shapes]
  examples = (differ + extra)[:3] + (["..."] if len(differ) + len(extra) > 3 else [])
  more = f" and {len(extra)} of the file's are not in the model" if extra else ""
  raise WeightsError(
      f"{path} holds a model of {_describe(theirs, diff)}, this one has {_describe(ours, diff)}: "
      f"{len(differ)} of the model's {len(shapes)} tensors differ in the file{more} "
      f"({'; '.join(examples)}); {_size_hint(theirs, diff)}.")


def _describe(dims: Mapping[str, int], keys: list[str]) -> str:
  return ", ".join(f"{k} {dims[k]}" for k in keys)


def _size_hint(theirs: Mapping[str, int], diff: list[str]) -> str:
  """The settings that give this model the file's dimensions."""
  sets = []
  if {"width", "depth", "mlp_dim"} & set(diff):
    names = [n for n, (w, d, _, m) in vit.VIT_SIZES.items()
             if (w, d, m) == tuple(theirs.get(k) for k in ("width", "depth", "mlp_dim"))]
    if not names:
      return (f"no model size has those dimensions (vit.VIT_SIZES: {', '.join(vit.VIT_SIZES)}); "
              "start from a file of one of them")
    sets.append(f"--config.model.size={names[0]}")
  sets += [f"--config.model.{k}={theirs[k]}" for k in ("patch_size", "decoder_width",
                                                       "decoder_depth") if k in diff]
  return "set " + " ".join(sets) + " to load it"


def log_report(path: str, report: Mapping[str, list[str]]) -> None:
  logging.info("warm start from %s: %d tensors loaded; fresh: %s; not used: %s", path,
               len(report["loaded"]), report["fresh"] or "none",
               (report["dropped"][:8] + (["..."] if len(report["dropped"]) > 8 else []))
               or "none")
