"""The main job end to end on the embedded demo data (`make demo`).

1. builds the demo dataset (face detection, crops, ArrayRecord shards) unless it exists;
2. writes an identity-grouped split (25% of labels per class, 10% val, 10% test);
3. pulls a few sharded batches and draws them with their face boxes;
4. pretrains MAE (configs/pretrain_mae.py:cpu) on the training lists, resuming if stopped,
   and plots the loss curve next to the reconstruction figures;
5. fine-tunes with FaceMix (configs/finetune.py:cpu) twice, from scratch and from the MAE
   encoder, selects each on val;
6. continues the MAE + FaceMix run semi-supervised (configs/semisup.py:cpu: EMA teacher,
   pseudo-labels on train_unlabeled) and ends with the test-list table against the majority
   class.

  python -m ssfer_jax.demo --workdir workdirs/demo [-- --config.num_epochs=5 ...]
(the extra flags go to the pretraining run).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys

import numpy as np

from ssfer_jax import evaluate, sharding, viz, writers
from ssfer_jax.input import device, pipeline, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "data_prep", "demo_data")
IMAGE_SIZE = 96
IDENTITY = r"^(.*)_\d+\.\w+$"


def run(cmd: list[str]) -> None:
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=REPO)


def build_data(data_dir: str) -> None:
  if os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    print(f"reusing the demo dataset in {data_dir}")
  else:
    # The demo photos are already tight face crops: keep the whole image, detect the box.
    run([sys.executable, "-m", "data_prep", "build", "--out", data_dir, "--source", "csv",
         os.path.join(DEMO, "labels.csv"), f"root={os.path.join(DEMO, 'images')}", "name=demo",
         "--crop", "none", "--detector", "haar", "--size", str(IMAGE_SIZE), "--num-shards", "4"])
  if not os.path.exists(os.path.join(data_dir, records.SPLITS_DIR, "default.json")):
    run([sys.executable, "-m", "data_prep", "split", "--data", data_dir, "--name", "default",
         "--labeled-fraction", "0.25", "--val-fraction", "0.1", "--test-fraction", "0.1",
         "--group-by", IDENTITY, "--seed", "0"])
  manifest = records.load_manifest(data_dir)
  with open(os.path.join(data_dir, records.SPLITS_DIR, "default.json")) as f:
    lists = json.load(f)["lists"]
  print(f"\ndataset: {manifest['num_records']} records of {manifest['image_size']} px, "
        f"{len(manifest['skipped'])} inputs skipped, classes {manifest['classes']}")
  print("split 'default': " + ", ".join(f"{k} {len(v)}" for k, v in lists.items()))


def look_at_batches(data_dir: str, figures: str) -> None:
  mesh = sharding.make_mesh((-1, 1))
  it = pipeline.make_train_iterator(data_dir, "default", ("train_labeled",), kind="labeled",
                                    global_batch_size=16, image_size=IMAGE_SIZE, seed=0,
                                    num_threads=2)
  classes = records.load_manifest(data_dir)["classes"]
  for i in range(3):
    batch = next(it)
    arrays = pipeline.to_global(batch, mesh)
    counts = collections.Counter(classes[j] for j in batch["label"])
    print(f"batch {i}: " + ", ".join(f"{k} {tuple(v.shape)} {v.dtype}" for k, v in arrays.items())
          + f"; labels {dict(counts)}")
  # What the model sees: the device resamples the host's crop windows and flips.
  seen = device.crop_resize_flip(batch["image"], batch["crop"], batch["flip"], IMAGE_SIZE)
  seen = np.clip(np.round(np.asarray(seen)), 0, 255).astype(np.uint8)
  drawn = viz.draw_boxes(seen, batch["box"])
  grid = viz.image_grid([drawn[i::4] for i in range(4)], ["weak aug + face box", "", "", ""])
  print("a batch with its face boxes:", viz.write_png(os.path.join(figures, "batch.png"), grid))


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", default="workdirs/demo")
  ap.add_argument("overrides", nargs="*", help="extra flags for ssfer_jax.main, after --")
  args = ap.parse_args()
  workdir = os.path.abspath(args.workdir)
  data_dir = os.path.join(workdir, "data")
  build_data(data_dir)
  look_at_batches(data_dir, os.path.join(workdir, "figures"))

  run_dir = os.path.join(workdir, "pretrain_mae")
  run([sys.executable, "-m", "ssfer_jax.main", "--config", "configs/pretrain_mae.py:cpu",
       "--workdir", run_dir, f"--config.data.dir={data_dir}", *args.overrides])
  log = [r for r in writers.read_metrics(run_dir) if r["split"] == "train"]
  steps, losses = [r["step"] for r in log], [r["loss"] for r in log]
  curve = viz.plot_curves(os.path.join(run_dir, "figures", "loss.png"), {"train": (steps, losses)},
                          "MAE pretraining", "loss (masked patches, norm-pix)")
  figs = sorted(f for f in os.listdir(os.path.join(run_dir, "figures")) if f.startswith("recon"))
  print(f"\nMAE pretraining: loss {losses[0]:.3f} (step {steps[0]}) -> {losses[-1]:.3f} "
        f"(step {steps[-1]}), {np.mean([r['images_per_s'] for r in log[1:]] or [0]):.0f} images/s")
  print(f"loss curve: {curve}\nreconstructions: {os.path.join(run_dir, 'figures', figs[-1])}")
  print(f"metrics: {os.path.join(run_dir, writers.METRICS_FILE)}, TensorBoard: "
        f"{os.path.join(run_dir, 'tensorboard')}, checkpoints: {os.path.join(run_dir, 'checkpoints')}")

  rows = [("majority class", evaluate.majority_report(data_dir, "default"))]
  for name, init_from in (("from scratch", ""), ("from the MAE encoder", run_dir)):
    ft_dir = os.path.join(workdir, "finetune_" + ("mae" if init_from else "scratch"))
    print(f"\n== stage 2, FaceMix, {name} ==", flush=True)
    run([sys.executable, "-m", "ssfer_jax.main", "--config", "configs/finetune.py:cpu",
         "--workdir", ft_dir, f"--config.data.dir={data_dir}", f"--config.init_from={init_from}"])
    run([sys.executable, "-m", "ssfer_jax.evaluate", "--run", ft_dir, "--data", data_dir,
         "--lists", "test"])
    with open(os.path.join(ft_dir, "eval", "test.json")) as f:
      rows.append((f"FaceMix, {name}", json.load(f)))
  ss_dir = os.path.join(workdir, "semisup")
  print("\n== stage 3, EMA teacher, from FaceMix on the MAE encoder ==", flush=True)
  run([sys.executable, "-m", "ssfer_jax.main", "--config", "configs/semisup.py:cpu",
       "--workdir", ss_dir, f"--config.data.dir={data_dir}",
       f"--config.init_from={os.path.join(workdir, 'finetune_mae')}"])
  run([sys.executable, "-m", "ssfer_jax.evaluate", "--run", ss_dir, "--data", data_dir,
       "--lists", "test"])
  with open(os.path.join(ss_dir, "eval", "test.json")) as f:
    rows.append(("+ EMA teacher (stage 3)", json.load(f)))
  curves = {}
  print(f"\ntest list of {data_dir} ({rows[0][1]['count']} faces):")
  print(f"{'':<34}{'accuracy':>10}{'mean-class':>12}{'macro F1':>10}")
  for name, r in rows:
    print(f"{name:<34}" + "".join(f"{100 * (r[k] or 0):>{w}.1f}" for k, w in (
        ("accuracy", 10), ("mean_class_accuracy", 12), ("macro_f1", 10))))
  for name in ("scratch", "mae"):
    val = [r for r in writers.read_metrics(os.path.join(workdir, f"finetune_{name}"))
           if r["split"] == "val"]
    curves[f"{name}, raw"] = ([r["step"] for r in val], [r["raw_accuracy"] for r in val])
    curves[f"{name}, EMA"] = ([r["step"] for r in val], [r["ema_accuracy"] for r in val])
  plot = viz.plot_curves(os.path.join(workdir, "figures", "finetune_val.png"), curves,
                         "stage 2 (FaceMix): val accuracy", "accuracy")
  epochs = [r for r in writers.read_metrics(ss_dir) if r["split"] == "epoch"]
  print("stage 3, pseudo-labels per epoch: " + "; ".join(
      f"mask rate {r['mask_rate']:.2f}" + (f", accuracy {r['pseudo_label_accuracy']:.2f}"
                                           if "pseudo_label_accuracy" in r else "")
      for r in epochs))
  print(f"val curves: {plot}\nthresholds and mask rates: {os.path.join(ss_dir, 'figures')}"
        f"\nconfusion matrices and per-class plots: {workdir}/{{finetune_*,semisup}}/eval/")


if __name__ == "__main__":
  main()
