"""Figures from small synthetic metrics, checked on the matplotlib objects: every axis
labelled (never "value"), a legend naming every series, no series drawn exactly like or under
another; the reconstruction grid's caption and the cause of the tint it explains."""

import json
import os

import numpy as np

from configs import common
from ssfer_jax import evaluate, job_report
from ssfer_jax.input import device
from ssfer_jax.models import mae
from ssfer_jax.runtime import figures
from ssfer_jax.trainers import semisup

CLASSES = ("anger", "contempt", "disgust", "fear", "happiness", "neutral", "sadness", "surprise")


def _legend_names(ax) -> list[str]:
  """The series a legend names; a merged entry ("a, b (identical)") names each of its own."""
  legend = ax.get_legend()
  assert legend is not None, ax.get_title()
  names = []
  for text in legend.get_texts():
    label = " ".join(text.get_text().split())
    names += label.removesuffix(" (identical)").split(", ")
  return names


def _check(fig, expected: list[list[str]]) -> None:
  """Per axes: labelled axes, a legend naming exactly `expected`, lines told apart by their
  style, and no two lines with the same points (one would hide the other)."""
  try:
    fig.savefig(os.devnull, format="png")   # what figures.save does, minus the file
    assert len(fig.axes) == len(expected)
    for ax, names in zip(fig.axes, expected):
      assert ax.get_xlabel() == "step"
      assert ax.get_ylabel() and ax.get_ylabel().lower() != "value", ax.get_title()
      assert sorted(_legend_names(ax)) == sorted(names)
      lines = ax.get_lines()
      assert len(lines) == len(ax.get_legend().get_texts())
      styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
      points = {(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in lines}
      assert len(styles) == len(points) == len(lines)
  finally:
    figures.pyplot().close(fig)


def _semisup_rows(n: int, *, unlabeled_from: int) -> list[dict]:
  """Stage-3 train rows: nothing passes the threshold (loss == loss_x, loss_u == mask rate ==
  0) before step `unlabeled_from`."""
  rows = []
  for step in range(1, n + 1):
    on = step >= unlabeled_from
    loss_x, loss_u = 2.0 - 0.05 * step, (0.8 - 0.02 * step) if on else 0.0
    rows.append({"step": step, "split": "train", "loss_x": loss_x, "loss_u": loss_u,
                 "loss": loss_x + 5 * loss_u, "mask_rate": 0.1 * step if on else 0.0})
  return rows


def test_stage3_training_curves_show_all_four_series():
  # The reported fault: loss hid under loss_x and loss_u under mask_rate on one "value" axis.
  rows = _semisup_rows(12, unlabeled_from=6)
  _check(figures.curves_figure(job_report.train_panels("semisup", rows), "stage 3"),
         [["total", "labeled (loss_x)", "pseudo-labeled (loss_u)"],
          ["pseudo-labels passing the threshold"]])
  # All along nothing passed: total and loss_x coincide, drawn once under both names.
  rows = _semisup_rows(12, unlabeled_from=99)
  fig = figures.curves_figure(job_report.train_panels("semisup", rows), "stage 3")
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert labels[0] == "total, labeled (loss_x) (identical)"
  _check(fig, [["total", "labeled (loss_x)", "pseudo-labeled (loss_u)"],
               ["pseudo-labels passing the threshold"]])


def test_finetune_and_val_curves_name_their_axes_and_series():
  rows = [{"step": s, "split": "train", "loss": 2.0 / s} for s in range(1, 9)]
  fig = figures.curves_figure(job_report.train_panels("finetune", rows), "stage 2")
  assert fig.axes[0].get_ylabel() == "loss (cross-entropy)"
  _check(fig, [["training loss"]])
  val = [{"step": s, "split": "val", "raw_accuracy": 0.1 * s, "ema_accuracy": 0.09 * s}
         for s in (2, 4, 6)]
  _check(figures.curves_figure(job_report.val_panels(val), "stage 2: val"),
         [["trained weights", "EMA of the weights"]])


def test_threshold_panels_name_every_class():
  # A per-class policy moves two classes; the other six stay at tau (one line, six names).
  # Mask rates: contempt and fear never pseudo-labelled (no entry), two classes identical.
  rows = []
  for epoch, step in enumerate((10, 20, 30)):
    row = {"step": step, "split": "epoch"}
    for c, name in enumerate(CLASSES):
      row[f"threshold/{name}"] = 0.7 - (0.1 * epoch * (c + 1) / 8 if c < 2 else 0.0)
      if name not in ("contempt", "fear"):
        row[f"mask_rate/{name}"] = 0.05 * epoch if name in ("anger", "disgust") else \
            0.1 + 0.02 * c * epoch
    rows.append(row)
  fig = semisup.thresholds_figure(rows, CLASSES)
  assert len(fig.axes[0].get_lines()) == 3
  _check(fig, [list(CLASSES), [c for c in CLASSES if c not in ("contempt", "fear")]])


def _metrics(run_dir, rows) -> None:
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)


def test_report_writes_every_figure_and_captions_the_reconstructions(tmp_path):
  workdir = str(tmp_path)
  classes = list(CLASSES[:3])
  _metrics(os.path.join(workdir, "pretrain"),
           [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 7)])
  faces = np.full((2, 32, 32, 3), 128, np.uint8)
  figures.write_png(os.path.join(workdir, "pretrain", "figures", "reconstruction_0000006.png"),
                    figures.reconstruction_figure(faces, np.ones((2, 16)), faces, 8))
  val = [{"step": s, "split": "val", "raw_accuracy": 0.3, "ema_accuracy": 0.4} for s in (3, 6)]
  _metrics(os.path.join(workdir, "finetune"),
           [{"step": s, "split": "train", "loss": 2.0 - 0.1 * s} for s in range(1, 7)] + val)
  epochs = [{"step": s, "split": "epoch", "mask_rate": 0.2, "pseudo_label_accuracy": 0.6,
             **{f"threshold/{c}": 0.7 for c in classes}} for s in (3, 6)]
  run = os.path.join(workdir, "semisup")
  _metrics(run, _semisup_rows(6, unlabeled_from=3) + val + epochs[:1])
  semisup.plot_thresholds(run, 6, epochs[1], classes)   # as the epoch hook draws it
  cm = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 3]])
  rows = [{"name": "majority class", "stage": None, **evaluate.metrics_from_confusion(cm, classes)}]
  rows += [{"name": f"stage {stage}", "stage": stage, "weights": "ema", "step": 6,
            **evaluate.metrics_from_confusion(cm, classes)} for stage in ("finetune", "semisup")]
  evaluation = {"lists": ["test"], "data": "d", "split": "default", "rows": rows,
                "paper_accuracy": None}
  path = job_report.write(workdir, {"stages": ["pretrain", "finetune", "semisup"]}, evaluation)
  written = sorted(os.listdir(os.path.join(workdir, job_report.FIGURES)))
  assert written == ["finetune_train.png", "finetune_val.png", "pretrain_loss.png",
                     "reconstructions.png", "semisup_thresholds.png", "semisup_train.png",
                     "semisup_val.png"]
  with open(path) as f:
    report = f.read()
  assert f"![reconstructions](report/reconstructions.png)\n\n{figures.TINT_NOTE}\n" in report
  # The grid carries the caption too, under the faces.
  plain = figures.image_grid([faces] * 4, ["a"] * 4)
  assert figures.reconstruction_figure(faces, np.ones((2, 16)), faces, 8).shape[0] > \
      plain.shape[0] + 3 * 10


def test_grey_faces_come_back_tinted_by_the_models_error_not_the_display():
  """What TINT_NOTE says, through the code that draws the figure (mae, device)."""
  mean, std, p = common.FACE_MEAN, common.FACE_STD, 8
  grey = np.full((1, 16, 16, 3), 100, np.uint8)        # flat grey: no structure at all
  x = device.normalize(grey, mean, std)
  assert np.ptp(np.asarray(x)[0, 0, 0]) > 0.5          # grey is not grey to the model
  target = mae.patch_targets(x, p, norm_pix_loss=True)
  assert np.abs(np.asarray(target)).max() > 1.0        # the channel offsets are the target
  mask = np.ones((1, 4), np.float32)

  def shown(pred):
    views = mae.reconstruct_images(pred, x, mask, True, p)
    return np.asarray(device.denormalize(views["reconstruction"], mean, std))

  np.testing.assert_allclose(shown(target), grey, atol=1)   # the display itself is exact
  channels = shown(0.5 * target)[0].reshape(-1, 3).mean(0)   # a half-learnt prediction
  assert np.ptp(channels) > 10, channels                    # comes back coloured
