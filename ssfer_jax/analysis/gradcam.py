"""Where the classifier looks: Grad-CAM over the ViT's patch tokens (the paper's Fig. 8).

The map is Grad-CAM's on the last block's input tokens, the residual stream entering it (the
last block's own output reaches a cls-token head only through its cls token; pytorch-grad-cam's
ViT recipe takes the same block's norm1 output, i.e. these tokens after one LayerNorm):
ReLU(sum_d w_d A_d) over patch tokens, w_d the patch-mean gradient of the target logit,
min-max normalised per image and upsampled bilinearly to the image. The target is the
predicted class. Values above 0.3 are the paper's "emotion focused regions" (`fgsm.py`).

  python -m ssfer_jax.analysis.gradcam --run RUN --data DATA [--lists test] [--count 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from ssfer_jax import errors, evaluate, results
from ssfer_jax.input import device, pipeline, records
from ssfer_jax.runtime import figures


THRESHOLD = 0.3   # the paper's: a normalised map above it is an emotion-focused region


def make_cam_fn(model, mean, std):
  """(params, images in [0, 1] [B, H, W, 3]) -> (maps in [0, 1] [B, H, W], logits [B, C])."""
  if model.depth < 2:
    raise ValueError("Grad-CAM reads the last block's input, the output of the one before: "
                     "the model needs at least 2 blocks.")
  before_last = f"block_{model.depth - 2:02d}"

  def cam(params, x01):
    b, h, w, _ = x01.shape
    gh, gw = h // model.patch_size, w // model.patch_size
    x = device.normalize(x01 * 255.0, mean, std, model.dtype)
    zeros = {"encoder": {"last_block_input": jnp.zeros((b, 1 + gh * gw, model.width),
                                                        model.dtype)}}

    def target_logit(pert):
      logits, state = model.apply(
          {"params": params, "perturbations": pert}, x, train=False,
          capture_intermediates=lambda mdl, _: mdl.name == before_last,
          mutable=["intermediates"])
      target = jnp.argmax(logits, axis=-1)
      return jnp.sum(jnp.take_along_axis(logits, target[:, None], 1)), (logits, state)

    grads, (logits, state) = jax.grad(target_logit, has_aux=True)(zeros)
    acts = state["intermediates"]["encoder"][before_last]["__call__"][0][:, 1:]
    g = grads["encoder"]["last_block_input"][:, 1:].astype(jnp.float32)
    weights = jnp.mean(g, axis=1)                                          # [B, D]
    maps = jax.nn.relu(jnp.einsum("bld,bd->bl", acts.astype(jnp.float32), weights))
    maps = maps.reshape(b, gh, gw)
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    maps = jnp.where(span > 0, (maps - lo) / jnp.where(span > 0, span, 1), 0.0)
    return jax.image.resize(maps, (b, h, w), "bilinear"), logits

  return cam


def overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
  """uint8 RGB image with the map in the jet colour map over it."""
  heat = cv2.applyColorMap(np.uint8(np.clip(cam, 0, 1) * 255), cv2.COLORMAP_JET)[..., ::-1]
  return np.uint8(0.5 * image + 0.5 * heat)


def figure(path: str, images: np.ndarray, cams: np.ndarray, labels: Sequence[str],
           predicted: Sequence[str]) -> str:
  """Rows of image | Grad-CAM | the focused region (map > 0.3, the rest black: Fig. 9's)."""
  focused = np.where((cams > THRESHOLD)[..., None], images, 0).astype(np.uint8)
  over = np.stack([overlay(i, c) for i, c in zip(images, cams)])
  for k, (img, true, pred) in enumerate(zip(over, labels, predicted)):
    cv2.putText(img, f"{true}>{pred}"[:18], (1, img.shape[0] - 3), cv2.FONT_HERSHEY_SIMPLEX,
                0.28, (255, 255, 255), 1, cv2.LINE_AA)
    over[k] = img
  return figures.write_png(path, figures.image_grid([images, over, focused],
                                                ["face", "Grad-CAM (true>pred)", "map > 0.3"]))


def first_batch(clf, data_dir: str, split: str | None, lists: Sequence[str], count: int):
  """`count` images of the lists (uint8 [N, S, S, 3]) and their model class indices."""
  cmap = evaluate.match_classes(clf.classes, records.load_manifest(data_dir)["classes"])
  it = pipeline.make_eval_iterator(data_dir, split, lists, global_batch_size=count,
                                   image_size=clf.preprocessing["image_size"],
                                   process_index=0, process_count=1,
                                   center_crop=clf.preprocessing.get("center_crop", 1.0))
  batch = next(iter(it))
  labels = cmap.model_labels(batch["label"])
  keep = batch["valid"] & (labels >= 0)
  return batch["image"][keep], labels[keep]


def analysis_parser(doc: str) -> argparse.ArgumentParser:
  """The arguments the analyses share: a classifier run and the lists of a build."""
  ap = argparse.ArgumentParser(description=doc,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--run", required=True, help="a stage-2/3 run (its result's weights)")
  ap.add_argument("--data", required=True)
  ap.add_argument("--split", default="default")
  ap.add_argument("--lists", default="test")
  ap.add_argument("--out", help="default RUN/analysis")
  return ap


def main(argv: Sequence[str] | None = None) -> int:
  ap = analysis_parser(__doc__)
  ap.add_argument("--count", type=int, default=16, help="faces in the figure")
  args = ap.parse_args(argv)
  out = args.out or os.path.join(args.run, "analysis")
  try:
    clf = results.load_classifier(args.run)
  except errors.UserError as e:
    return errors.report(e)
  images, labels = first_batch(clf, args.data, args.split, args.lists.split(","), args.count)
  cam = jax.jit(make_cam_fn(clf.model, clf.preprocessing["mean"], clf.preprocessing["std"]))
  maps, logits = cam(clf.params, images.astype(np.float32) / 255.0)
  pred = np.argmax(np.asarray(logits), -1)
  path = figure(os.path.join(out, "gradcam.png"), images, np.asarray(maps),
                [clf.classes[i] for i in labels], [clf.classes[i] for i in pred])
  print(f"Grad-CAM of {len(images)} faces: {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
