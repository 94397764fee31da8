"""FGSM on the regions the model focuses on, and on the rest (the paper's Table 7).

Each face's focused region is where its normalised Grad-CAM map exceeds 0.3 (`gradcam.py`);
FGSM perturbs only that region (or only its complement) by eps * sign(grad of the cross
entropy with the true label), in [0, 1] pixel units before normalisation, clipped to [0, 1].
An attack on what the model relies on should cost more accuracy than one on the rest.

  python -m ssfer_jax.analysis.fgsm --run RUN --data DATA [--lists test] [--eps 0,0.02,...,0.10]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssfer_jax import errors, evaluate, results
from ssfer_jax.analysis import gradcam
from ssfer_jax.input import device, pipeline, records


EPS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10)
REGIONS = ("emotion focused regions", "emotion unfocused regions")


def make_regions_fn(model, mean, std):
  """(params, images in [0, 1], labels) -> (focused [B, H, W, 1] bool, FGSM's direction
  sign(d CE / d image) [B, H, W, 3]); a label of -1 takes class 0's direction."""
  cam_fn = gradcam.make_cam_fn(model, mean, std)

  def regions(params, x01, labels):
    cams, _ = cam_fn(params, x01)
    loss = lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits(model, params, x, mean, std), jnp.maximum(labels, 0)))
    return (cams > gradcam.THRESHOLD)[..., None], jnp.sign(jax.grad(loss)(x01))

  return regions


def logits(model, params, x01, mean, std):
  return model.apply({"params": params}, device.normalize(x01 * 255.0, mean, std, model.dtype),
                     train=False).astype(jnp.float32)


def perturb(x01, direction, region, eps):
  """The attacked image: eps x direction inside `region` only, clipped to [0, 1]."""
  return jnp.clip(x01 + eps * direction * region, 0.0, 1.0)


def make_attack_fn(model, mean, std, eps: Sequence[float]):
  """(params, uint8 images, labels) -> correct counts [2 regions, len(eps)]; a label of -1
  is never counted correct."""
  regions_fn = make_regions_fn(model, mean, std)

  def attack(params, images, labels):
    x01 = images.astype(jnp.float32) / 255.0
    focused, direction = regions_fn(params, x01, labels)
    return jnp.stack([jnp.stack([jnp.sum(jnp.argmax(logits(
        model, params, perturb(x01, direction, region, e), mean, std), -1) == labels)
                                 for e in eps]) for region in (focused, ~focused)])

  return attack


def run(run_dir: str, data_dir: str, split: str | None, lists: Sequence[str],
        eps: Sequence[float] = EPS, batch_size: int = 64) -> dict:
  """Accuracy (%) under each attack over the lists' labeled records of the model's classes."""
  clf = results.load_classifier(run_dir)
  model = clf.model
  pre = clf.preprocessing
  cmap = evaluate.match_classes(clf.classes, records.load_manifest(data_dir)["classes"])
  attack = jax.jit(make_attack_fn(model, pre["mean"], pre["std"], tuple(eps)))
  correct, count = np.zeros((2, len(eps)), np.int64), 0
  for batch in pipeline.make_eval_iterator(data_dir, split, lists, global_batch_size=batch_size,
                                           image_size=pre["image_size"], process_index=0,
                                           process_count=1,
                                           center_crop=pre.get("center_crop", 1.0)):
    target = cmap.model_labels(batch["label"])
    keep = batch["valid"] & (target >= 0)
    # Rows not scored (padding, unknown classes) carry label -1, which no prediction matches.
    correct += np.asarray(attack(clf.params, batch["image"], np.where(keep, target, -1)))
    count += int(keep.sum())
  return {"run": os.path.abspath(run_dir), "data": data_dir, "lists": list(lists), "count": count,
          "eps": list(eps), "accuracy": {r: (100.0 * correct[i] / max(count, 1)).tolist()
                                         for i, r in enumerate(REGIONS)}}


def table(result: dict, name: str = "SSFER") -> str:
  """The paper's Table 7 layout."""
  head = f"{'Attack regions':<27}{'Method':<16}" + "".join(f"{'Eps=' + format(e, 'g'):>10}"
                                                            for e in result["eps"])
  lines = [head]
  for region, accs in result["accuracy"].items():
    lines.append(f"{region:<27}{name[:15]:<16}" + "".join(f"{a:>10.2f}" for a in accs))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  ap = gradcam.analysis_parser(__doc__)
  ap.add_argument("--eps", default=",".join(format(e, "g") for e in EPS))
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--name", default="SSFER", help="the Method column")
  args = ap.parse_args(argv)
  try:
    result = run(args.run, args.data, args.split, args.lists.split(","),
                 [float(e) for e in args.eps.split(",")], args.batch_size)
  except errors.UserError as e:
    return errors.report(e)
  out = args.out or os.path.join(args.run, "analysis")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "fgsm.json"), "w") as f:
    json.dump(result, f, indent=2)
  print(f"FGSM on {result['count']} faces of {args.data} ({','.join(result['lists'])}), "
        "accuracy (%):")
  print(table(result, args.name))
  return 0


if __name__ == "__main__":
  sys.exit(main())
