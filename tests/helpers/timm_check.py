"""Run inside the torch + timm environment (.venv-timm, `make timm-env`) by
test_timm_interop.py: our exports against timm's forward pass (and timm's standard
transforms), the README's timm block run as written, timm / PyTorch files read back by our
importer, the position table resampled as timm's loader does, damaged .pth files refused.

  .venv-timm/bin/python tests/helpers/timm_check.py EXPORT_DIR CASE.npz README_BLOCK.py

CASE.npz holds normalised images and the logits our JAX model gave for them (main env).
Prints one line per check; exits non-zero on the first mismatch.
"""

import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a local file only: never the network

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import timm.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ssfer_jax import export, pytorch_weights
from ssfer_jax.models import param_table, vit  # noqa: E402

torch.set_num_threads(2)


def close(ours, theirs, what):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  # float32 forward passes in two libraries: compare at the scale of the values.
  tol = 1e-4 * max(1.0, float(np.abs(ours).max()))
  err = float(np.abs(ours - theirs).max())
  print(f"{what}: max |ours - timm| = {err:.2e} (tolerance {tol:.1e})")
  if not err <= tol:
    sys.exit(f"MISMATCH: {what}")


def timm_forward(model, images_nhwc):
  model.eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()


def exported_run(export_dir, case):
  """The README's exact call, from the card, on the exported trained classifier."""
  with open(os.path.join(export_dir, export.CARD)) as f:
    card = json.load(f)
  model = eval(card["timm"]["call"], {"timm": timm})  # pylint: disable=eval-used
  data = np.load(case)
  close(data["logits"], timm_forward(model, data["images"]), "exported trained run, cls pool")
  assert model.pretrained_cfg["mean"] == tuple(card["mean"]), model.pretrained_cfg
  # timm's standard transforms, from the card's call alone: the model's size, its crop share,
  # bilinear; without those fields timm would feed 224 px to this 32 px model.
  size = card["image_size"]
  config = timm.data.resolve_data_config({}, model=model)
  assert (config["input_size"], config["crop_pct"], config["interpolation"]) == (
      (3, size, size), card["preprocessing"]["center_crop"], "bilinear"), config
  x = timm.data.create_transform(**config)(Image.new("RGB", (90, 110), (120, 90, 80)))
  assert tuple(x.shape) == (3, size, size) and model(x[None]).shape == (1, card["num_classes"])
  bare = eval(re.sub(r", input_size=.*interpolation='bilinear'", "", card["timm"]["call"]),
              {"timm": timm})  # pylint: disable=eval-used
  assert timm.data.resolve_data_config({}, model=bare)["input_size"] == (3, 224, 224)
  print(f"timm's transforms from the card: {config['input_size']}, crop_pct "
        f"{config['crop_pct']}, {config['interpolation']}")


def readme_block(block_path, tmp):
  """The README's timm block as written, on a ViT-B/16 file of timm's own initialisation at
  the block's path: the weights load (head kept) and its transforms feed 224 px, whole."""
  with open(block_path) as f:
    block = f.read()
  source = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=7).eval()
  weights = os.path.join(tmp, "readme", "exports", "ss", "model.safetensors")
  os.makedirs(os.path.dirname(weights))
  save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
  here = os.getcwd()
  os.chdir(os.path.join(tmp, "readme"))
  try:
    face = Image.fromarray(np.random.default_rng(0).integers(0, 255, (260, 230, 3), np.uint8))
    scope = {"face": face}
    with torch.no_grad():
      exec(block, scope)  # pylint: disable=exec-used
      x = scope["transform"](face)
      theirs = source(x[None]).numpy()
  finally:
    os.chdir(here)
  assert tuple(x.shape) == (3, 224, 224), x.shape
  config = timm.data.resolve_data_config({}, model=scope["model"])
  assert (config["crop_pct"], config["interpolation"]) == (1.0, "bilinear"), config
  close(scope["logits"].numpy(), theirs, "the README's timm block, ViT-B/16 224px")


def timm_resampling(tmp):
  """Our importer with resample="timm" against timm's own loader: one of our ViTs at 64 px
  (a 4x4 grid) loaded by the card's call at other sizes, where timm resamples its learned
  position table (checkpoint_filter_fn); MAE's resampling differs there."""
  kwargs = vit.vit_kwargs("mu", pool="cls", pos_embed="learned", patch_size=16)
  model = vit.ViT(num_classes=5, **kwargs)
  params = model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32), train=False)
  params = jax.tree.map(lambda p: np.asarray(p) + np.random.default_rng(3).normal(
      size=p.shape).astype(np.float32), params["params"])
  path = os.path.join(tmp, "grid4.safetensors")
  pytorch_weights.write_safetensors(path, param_table.to_state_dict(params, "vit"), {})
  for image_size in (32, 96, 112):
    spec = pytorch_weights.timm_model(kwargs, 5, image_size)
    theirs = eval(export.timm_call(spec["arch"], spec["kwargs"], path, (0.5,) * 3, (0.5,) * 3),
                  {"timm": timm}).pos_embed.detach().numpy()  # pylint: disable=eval-used
    template = jax.eval_shape(lambda s=image_size: nn.meta.unbox(model.init(
        jax.random.key(0), np.zeros((1, s, s, 3), np.float32), train=False)["params"]))
    ours = {m: pytorch_weights.load_encoder(path, template, resample=m)[0]["pos_embed"]
            for m in ("timm", "mae")}
    close(ours["timm"], theirs, f"pos_embed 4x4 -> {image_size // 16}x{image_size // 16}, "
          "resample='timm' vs timm's loader")
    assert np.abs(np.asarray(ours["mae"]) - theirs).max() > 1e-3, image_size


def damaged_pth(tmp):
  """torch.save files cut short (zip and legacy pickle), holding NaN, or a web page: one
  WeightsError line each, naming the file."""
  sd = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).state_dict()
  cases = {}
  for name, legacy in (("zip", False), ("legacy", True)):
    whole = os.path.join(tmp, f"whole_{name}.pth")
    torch.save({"model": sd}, whole, _use_new_zipfile_serialization=not legacy)
    with open(whole, "rb") as f:
      data = f.read()
    cases[f"cut_{name}.pth"] = (data[:len(data) // 2], "a damaged zip archive" if not legacy
                                else "not a loadable PyTorch checkpoint of tensors")
  bad = dict(sd)
  bad["blocks.3.mlp.fc2.bias"] = torch.full_like(sd["blocks.3.mlp.fc2.bias"], float("nan"))
  torch.save(bad, os.path.join(tmp, "nan.pth"))
  cases["page.pth"] = (b"<html><body>Access denied</body></html>\n", "not a PyTorch checkpoint")
  for name, (data, _) in cases.items():
    with open(os.path.join(tmp, name), "wb") as f:
      f.write(data)
  cases["nan.pth"] = (None, "tensor blocks.3.mlp.fc2.bias holds 192 NaN")
  for name, (_, want) in cases.items():
    path = os.path.join(tmp, name)
    try:
      pytorch_weights.read_state_dict(path)
      sys.exit(f"MISMATCH: {name} was read")
    except pytorch_weights.WeightsError as e:
      line = str(e)
    if not (line.startswith(path) and want in line and "\n" not in line):
      sys.exit(f"MISMATCH: {name}: {line}")
    print(f"{name}: {line[len(path) + 2:]}")


def ours_vs_timm(size, pool, image_size, tmp):
  """Random non-trivial weights of one of our ViTs, written as our export writes them, loaded by
  timm with the card's call; then the other way: timm's own weights imported by us."""
  kwargs = vit.vit_kwargs(size, pool=pool, pos_embed="learned", patch_size=16)
  model = vit.ViT(num_classes=5, **kwargs)
  x = jax.random.normal(jax.random.key(1), (3, image_size, image_size, 3))
  params = model.init(jax.random.key(0), x, train=False)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in
                                      zip(leaves, keys)])
  path = os.path.join(tmp, f"{size}_{pool}.safetensors")
  pytorch_weights.write_safetensors(path, param_table.to_state_dict(params, "vit"),
                                    {"format": "pt"})
  spec = pytorch_weights.timm_model(kwargs, 5, image_size)
  call = export.timm_call(spec["arch"], spec["kwargs"], path, (0.5,) * 3, (0.5,) * 3)
  theirs = eval(call, {"timm": timm})  # pylint: disable=eval-used
  ours = model.apply({"params": params}, x, train=False)
  close(ours, timm_forward(theirs, np.asarray(x)), f"{spec['arch']} {size} {pool} {image_size}px")

  # timm's own initialisation -> safetensors / .pth -> our importer -> same logits.
  fresh = timm.create_model(spec["arch"], pretrained=False, **spec["kwargs"])
  sd = {k: v.detach().numpy() for k, v in fresh.state_dict().items()}
  pth = os.path.join(tmp, f"{size}_{pool}.pth")
  torch.save({"model": fresh.state_dict(), "epoch": 3}, pth)
  read = pytorch_weights.read_state_dict(pth)
  assert read.keys() == sd.keys() and all(np.array_equal(read[k], sd[k]) for k in sd)
  imported = param_table.from_state_dict(read, params, "vit")
  close(model.apply({"params": imported}, x, train=False), timm_forward(fresh, np.asarray(x)),
        f"timm's weights imported from .pth, {size} {pool}")
  # Stage 2's warm start from the same file takes exactly these encoder tensors.
  encoder, report = pytorch_weights.load_encoder(pth, params)
  assert report["fresh"] == sorted(set(params) - set(encoder)) and "head" in report["fresh"]
  for (k, a), (_, b) in zip(sorted(jax.tree_util.tree_leaves_with_path(encoder), key=str),
                            sorted(jax.tree_util.tree_leaves_with_path(
                                {k: imported[k] for k in encoder}), key=str)):
    assert np.array_equal(np.asarray(a), np.asarray(b)), k


def main():
  export_dir, case, block = sys.argv[1:4]
  exported_run(export_dir, case)
  tmp = os.path.dirname(os.path.abspath(case))
  readme_block(block, tmp)
  for size, pool, image_size in (("mu", "cls", 48), ("mu", "gap", 48), ("Ti", "cls", 32),
                                 ("Ti", "gap", 64)):
    ours_vs_timm(size, pool, image_size, tmp)
  timm_resampling(tmp)
  damaged_pth(tmp)
  print("all checks passed")


if __name__ == "__main__":
  main()
