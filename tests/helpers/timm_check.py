"""Run inside the torch + timm environment (.venv-timm, `make timm-env`) by
test_timm_interop.py: our exports against timm's forward pass, and timm / PyTorch files read
back by our importer.

  .venv-timm/bin/python tests/helpers/timm_check.py EXPORT_DIR CASE.npz

CASE.npz holds normalised images and the logits our JAX model gave for them (main env).
Prints one line per check; exits non-zero on the first mismatch.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a local file only: never the network

import jax  # noqa: E402
import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

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
  pytorch_weights.write_safetensors(path, param_table.to_state_dict(params, "vit"), {"format": "pt"})
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
  export_dir, case = sys.argv[1:3]
  exported_run(export_dir, case)
  tmp = os.path.dirname(os.path.abspath(case))
  for size, pool, image_size in (("mu", "cls", 48), ("mu", "gap", 48), ("Ti", "cls", 32),
                                 ("Ti", "gap", 64)):
    ours_vs_timm(size, pool, image_size, tmp)
  print("all checks passed")


if __name__ == "__main__":
  main()
