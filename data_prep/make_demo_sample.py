"""Regenerates the embedded demo sample `data_prep/demo_data/` from the shared dataset.

Stratified with a floor per class (rare classes whole), identity-grouped (a person's
photos are taken together, so identity-grouped splits stay meaningful), images shrunk to
at most 96 px. The labels keep the source's mess (mixed case, repeated rows) on purpose:
the demo exercises the same cleaning a real run does.

  python -m data_prep.make_demo_sample [--src ../shared/datasets/facial_expressions]
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import random
import re
import shutil

import cv2

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "demo_data")
IDENTITY = re.compile(r"^(.*)_\d+\.\w+$")
ATTRIBUTION = """\
# Demo data (embedded sample)

{n} face photographs with expression labels, sampled from the public repository
`muxspace/facial_expressions` (Apache License 2.0; most images are from Labeled Faces in
the Wild). Regenerate with `python -m data_prep.make_demo_sample`: stratified by class with
a floor of {floor} images (rarer classes whole), whole identities where possible, longer
side at most {max_side} px (INTER_AREA), JPEG quality {quality}. `labels.csv` keeps the
source's columns and its mess (mixed-case labels, repeated rows).

Class counts (lower-cased labels, unique images): {counts}
"""


def identity(name: str) -> str:
  m = IDENTITY.match(name)
  return m.group(1) if m else name


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", default=os.path.join(HERE, "..", "..", "shared", "datasets", "facial_expressions"))
  ap.add_argument("--total", type=int, default=1000, help="proportional share before the floor")
  ap.add_argument("--floor", type=int, default=80)
  ap.add_argument("--max-side", type=int, default=96)
  ap.add_argument("--quality", type=int, default=85)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()

  with open(os.path.join(args.src, "legend.csv"), newline="") as f:
    rows = [r for r in csv.DictReader(f)]
  label_of = collections.defaultdict(set)
  for r in rows:
    label_of[r["image"]].add(r["emotion"].strip().lower())
  clean = {img: next(iter(ls)) for img, ls in label_of.items()
           if len(ls) == 1 and os.path.exists(os.path.join(args.src, "images", img))}
  per_class = collections.Counter(clean.values())
  n = sum(per_class.values())
  target = {c: min(k, max(args.floor, round(args.total * k / n))) for c, k in per_class.items()}

  groups = collections.defaultdict(list)
  for img in sorted(clean):
    groups[identity(img)].append(img)
  order = sorted(groups)
  random.Random(args.seed).shuffle(order)
  taken, have = set(), collections.Counter()
  for g in order:
    for img in groups[g]:
      c = clean[img]
      if have[c] < target[c]:
        taken.add(img)
        have[c] += 1

  if os.path.exists(OUT):
    shutil.rmtree(OUT)
  os.makedirs(os.path.join(OUT, "images"))
  for img in sorted(taken):
    im = cv2.imread(os.path.join(args.src, "images", img), cv2.IMREAD_UNCHANGED)
    scale = args.max_side / max(im.shape[:2])
    if scale < 1:
      im = cv2.resize(im, (max(1, round(im.shape[1] * scale)), max(1, round(im.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
    assert ok, img
    with open(os.path.join(OUT, "images", img), "wb") as f:
      f.write(buf.tobytes())
  with open(os.path.join(OUT, "labels.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(r for r in rows if r["image"] in taken)
  with open(os.path.join(OUT, "README.md"), "w") as f:
    f.write(ATTRIBUTION.format(n=len(taken), floor=args.floor, max_side=args.max_side,
                               quality=args.quality, counts=dict(sorted(have.items()))))
  print(f"wrote {len(taken)} images to {OUT}: {dict(sorted(have.items()))}")


if __name__ == "__main__":
  main()
