"""FaceMix kappa (1 - IoU of the two faces' boxes) as training sees it, per dataset: one table.

FaceMix weights the loss on the two real images of a mixup pair by kappa (SSFER section 3.4,
ssfer_jax/methods/facemix.py). On tight face crops the face box is nearly the whole image, and every
random-resized-crop window lies inside it, so both boxes of a pair become ~the whole view:
kappa ~ 0 and FaceMix degenerates to mixup. A looser crop margin (data_prep build --margin)
leaves the face room to move. This measures how much, to choose the margin.

Per dataset, two rows over the same pairs (the weak and eval streams share the seeded epoch
order, so row i is the same record in both):
  weak    the boxes FaceMix uses: `make_train_iterator(kind="labeled", transform="weak")`,
          i.e. mapped through the random-resized-crop (scale 0.2-1) and flip;
  stored  the un-augmented boxes (transform "eval": the box as stored), which isolates the
          crop margin's own effect from the random crop's.
Pairs are the default "swap" pairing (rows 2k, 2k+1); kappa via `facemix.box_iou`, so a box
cropped away (empty) counts as kappa 1, as in training. Columns: pairs, kappa mean and
percentiles, the share of pairs with kappa < 0.05 (FaceMix ~ mixup there), the median
longer side of the face box as a fraction of the image (stored row: of the stored image,
so face px = that x the stored size; weak row: of the model's view), and the share of pairs
where either image had no face detected (its box is then the whole image or padded square).

  python -m experiments.facemix_kappa --data /work/builds/fe96_m1.25 --data /work/builds/fe96_m2.0
      [--split default] [--lists train_labeled] [--batches 20] [--batch 64] [--seed 0]
      [--plot kappa.png] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

import grain
import numpy as np

from benchmarks import machine
from ssfer_jax.input import pipeline, records
from ssfer_jax.methods import facemix
from ssfer_jax.runtime import figures

PERCENTILES = (10, 25, 50, 75, 90)
SMALL = 0.05  # kappa below this: the real-image loss is all but switched off


@dataclasses.dataclass
class Row:
  data: str
  crop: str
  margin: float | None  # None for crop "none" (the manifest still records the default)
  boxes: str  # "weak" or "stored"
  pairs: int
  mean: float
  percentiles: dict[int, float]
  below: float  # share of pairs with kappa < SMALL
  face_side: float  # median longer side of the box, fraction of the image
  no_face: float  # share of pairs with an image where no face was detected
  kappa: list[float] = dataclasses.field(repr=False)


def draw(data_dir: str, split: str, lists, transform: str, batches: int, batch: int,
         seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(boxes [n, 4], record indices [n]) of `batches` labeled batches of one process."""
  manifest = records.load_manifest(data_dir)
  it = pipeline.make_train_iterator(
      data_dir, split, lists, kind="labeled", global_batch_size=batch,
      image_size=manifest["image_size"], seed=seed, transform=transform, process_index=0,
      process_count=1, num_threads=1, prefetch_batches=1)
  got = [next(it) for _ in range(batches)]
  return (np.concatenate([b["box"] for b in got]), np.concatenate([b["index"] for b in got]))


def measure(data_dir: str, split: str, lists, batches: int, batch: int, seed: int) -> list[Row]:
  manifest = records.load_manifest(data_dir)
  source = grain.sources.ArrayRecordDataSource(records.shard_paths(data_dir, manifest))
  crop = manifest["crop"]
  margin = manifest["margin"] if crop == "face" else None
  rows, order = [], None
  for name, transform in (("weak", "weak"), ("stored", "eval")):
    boxes, index = draw(data_dir, split, lists, transform, batches, batch, seed)
    if order is None:
      order = index
      found = np.array([records.decode(source[int(i)])["face_found"] for i in index])
    elif not np.array_equal(order, index):  # the pairing must be the same in both rows
      raise RuntimeError(f"{data_dir}: the weak and eval streams drew different records")
    kappa = 1.0 - np.asarray(facemix.box_iou(boxes[0::2], boxes[1::2]), np.float64)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    rows.append(Row(
        os.path.basename(os.path.normpath(data_dir)), crop, margin, name, len(kappa),
        float(kappa.mean()), {p: float(np.percentile(kappa, p)) for p in PERCENTILES},
        float((kappa < SMALL).mean()), float(np.median(side)),
        float((~(found[0::2] & found[1::2])).mean()), kappa.tolist()))
  return rows


def plot(rows: list[Row], path: str):
  """Histograms of kappa, one line per dataset: weak boxes left, stored boxes right."""
  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  bins = np.linspace(0, 1, 41)
  for ax, which in zip(axes, ("weak", "stored")):
    for r in rows:
      if r.boxes == which:
        label = f"{r.data} ({r.crop}{'' if r.margin is None else f' x{r.margin:g}'})"
        ax.hist(r.kappa, bins=bins, histtype="step", linewidth=1.5, density=True, label=label)
    ax.set_title(f"kappa = 1 - IoU, {which} boxes"
                 + (" (random-resized-crop + flip)" if which == "weak" else " (un-augmented)"))
    ax.set_xlabel("kappa")
  axes[0].set_ylabel("density")
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None) -> list[Row]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", action="append", required=True,
                      help="a built dataset directory (repeatable)")
  parser.add_argument("--split", default="default", help="split name in DATA/splits/")
  parser.add_argument("--lists", default="train_labeled", help="comma-separated split lists")
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot", help="write a histogram PNG here")
  parser.add_argument("--json", help="also write the header and rows here")
  args = parser.parse_args(argv)
  if args.batch % 2:
    parser.error("--batch must be even (swap pairing)")
  lists = args.lists.split(",")
  rows = [r for d in args.data
          for r in measure(d, args.split, lists, args.batches, args.batch, args.seed)]

  header = (f"FaceMix kappa = 1 - IoU, swap pairs, split {args.split!r} {lists}, "
            f"{args.batches} x {args.batch} weak-augmented batches (scale 0.2-1, flip), seed "
            f"{args.seed}; {machine.cpu_model()}, {os.cpu_count()} CPU cores, {datetime.date.today()}")
  print(header)
  cols = ["data", "crop", "margin", "boxes", "pairs", "mean"] + [f"p{p}" for p in PERCENTILES]
  cols += [f"<{SMALL:g}", "face side", "no face"]
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  for r in rows:
    cells = [r.data, r.crop, "-" if r.margin is None else f"{r.margin:g}", r.boxes,
             str(r.pairs), f"{r.mean:.3f}"] + [f"{r.percentiles[p]:.3f}" for p in PERCENTILES]
    cells += [f"{r.below:.2f}", f"{r.face_side:.2f}", f"{r.no_face:.2f}"]
    print("| " + " | ".join(cells) + " |")
  if args.plot:
    plot(rows, args.plot)
    print(f"histogram: {args.plot}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
