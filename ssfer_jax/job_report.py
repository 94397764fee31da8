"""The job's report: one Markdown file with PNGs, written from what the stages left behind
(metrics.jsonl, figures, eval reports), so it can be rebuilt at any time without a model.

WORKDIR/report.md links WORKDIR/report/*.png: the MAE reconstructions and loss, each
classifier stage's val accuracy and training curves, its test confusion matrix, stage 3's
per-class thresholds and mask rates, and the per-stage accuracy table.
"""

from __future__ import annotations

import datetime
import os
import shutil
from typing import Any, Mapping

from ssfer_jax import evaluate
from ssfer_jax.runtime import figures, writers

REPORT_FILE = "report.md"
FREQUENT = 15   # the mean-class column over classes with at least this many evaluated faces
FIGURES = "report"
HEADLINE = (("accuracy", "accuracy"), ("mean_class_accuracy", "mean-class"),
            ("frequent", f"mean-class (>= {FREQUENT} faces)"), ("macro_f1", "macro F1"))


def _pct(v) -> str:
  return "n/a" if v is None else f"{100 * v:.1f}"


def _value(row: Mapping[str, Any], key: str):
  if key == "frequent":   # rare classes (a handful of faces) make the plain mean a lottery
    return evaluate.subset_mean_class_accuracy(row, FREQUENT)
  return row[key]


def accuracy_table(evaluation: Mapping[str, Any]) -> str:
  """The console table: one row per stage on the evaluation lists."""
  count = evaluation["rows"][0]["count"]
  widths = [len(t) + 2 for _, t in HEADLINE]
  lines = [f"{'/'.join(evaluation['lists'])} lists of {evaluation['data']} ({count} faces):",
           f"{'':<40}" + "".join(f"{t:>{w}}" for (_, t), w in zip(HEADLINE, widths))]
  for r in evaluation["rows"]:
    lines.append(f"{r['name']:<40}" + "".join(f"{_pct(_value(r, k)):>{w}}"
                                              for (k, _), w in zip(HEADLINE, widths)))
  if evaluation.get("paper_accuracy") is not None:
    lines.append(f"{'the paper (SSFER, same budget)':<40}"
                 f"{evaluation['paper_accuracy']:>{widths[0]}.2f}")
  return "\n".join(lines)


def _markdown_table(evaluation: Mapping[str, Any]) -> list[str]:
  lines = ["| | " + " | ".join(title for _, title in HEADLINE) + " | weights |",
           "|---|" + "---:|" * len(HEADLINE) + "---|"]
  for r in evaluation["rows"]:
    weights = f"{r['weights']}, step {r['step']}" if r.get("stage") else ""
    lines.append(f"| {r['name']} | " + " | ".join(_pct(_value(r, k)) for k, _ in HEADLINE)
                 + f" | {weights} |")
  if evaluation.get("paper_accuracy") is not None:
    lines.append(f"| the paper (SSFER, same budget) | {evaluation['paper_accuracy']:.2f} |"
                 + " |" * len(HEADLINE))
  return lines


def _rows(run_dir: str, split: str) -> list[dict]:
  if not os.path.exists(os.path.join(run_dir, writers.METRICS_FILE)):
    return []
  return [r for r in writers.read_metrics(run_dir) if r.get("split") == split]


def _series(rows: list[dict], names: Mapping[str, str]) -> dict[str, tuple[list, list]]:
  """{legend label: (steps, values)} of each metric key in `names` the rows hold."""
  return {label: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r])
          for k, label in names.items() if any(k in r for r in rows)}


def train_panels(stage: str, rows: list[dict]) -> list[figures.Panel]:
  """A classifier stage's training curves: the losses, and stage 3's mask rate on its own
  axes (a share in [0, 1], not a loss)."""
  if stage != "semisup":
    return [figures.Panel(_series(rows, {"loss": "training loss"}),
                          "loss (cross-entropy)")]
  losses = {"loss": "total", "loss_x": "labeled (loss_x)",
            "loss_u": "pseudo-labeled (loss_u)"}
  return [figures.Panel(_series(rows, losses), "loss", "losses"),
          figures.Panel(_series(rows, {"mask_rate": "pseudo-labels passing the threshold"}),
                        "mask rate (share of unlabeled rows)", "mask rate", (-0.02, 1.02))]


def val_panels(rows: list[dict]) -> list[figures.Panel]:
  """A classifier stage's val accuracy, of the trained weights and of their EMA."""
  return [figures.Panel(_series(rows, {"raw_accuracy": "trained weights",
                                       "ema_accuracy": "EMA of the weights"}), "val accuracy")]


def _copy(src: str, out_dir: str, name: str) -> str | None:
  if not os.path.exists(src):
    return None
  shutil.copyfile(src, os.path.join(out_dir, name))
  return f"{FIGURES}/{name}"


def _image(lines: list[str], rel: str | None, caption: str) -> None:
  if rel:
    lines += [f"![{caption}]({rel})", ""]


def _pretrain_section(run_dir: str, out_dir: str) -> list[str]:
  lines = ["## Stage 1: MAE pretraining", ""]
  train = _rows(run_dir, "train")
  if train:
    lines.append(f"Loss (masked patches) {train[0]['loss']:.3f} at step {train[0]['step']} -> "
                 f"{train[-1]['loss']:.3f} at step {train[-1]['step']}.")
    lines.append("")
    figures.plot_curves(os.path.join(out_dir, "pretrain_loss.png"),
                        _series(train, {"loss": "MAE loss"}), "stage 1: MAE loss",
                        "loss (masked patches)")
    _image(lines, f"{FIGURES}/pretrain_loss.png", "MAE loss")
  fig_dir = os.path.join(run_dir, "figures")
  recon = sorted(f for f in os.listdir(fig_dir) if f.startswith("reconstruction_")) \
      if os.path.isdir(fig_dir) else []
  if recon:
    lines.append(f"Reconstructions at step {int(recon[-1][15:22])} (original, masked, "
                 "reconstruction, reconstruction with the visible patches pasted), as the "
                 "paper's Fig. 3:")
    lines.append("")
    _image(lines, _copy(os.path.join(fig_dir, recon[-1]), out_dir, "reconstructions.png"),
           "reconstructions")
    lines += [figures.TINT_NOTE, ""]
  return lines


def _classifier_section(stage: str, title: str, run_dir: str, out_dir: str,
                        row: Mapping[str, Any] | None, lists: list[str]) -> list[str]:
  lines = [f"## {title}", ""]
  val = _rows(run_dir, "val")
  if val:
    figures.save(figures.curves_figure(val_panels(val), f"{title}: val accuracy"),
                 os.path.join(out_dir, f"{stage}_val.png"))
    _image(lines, f"{FIGURES}/{stage}_val.png", "val accuracy")
  train = _rows(run_dir, "train")
  if train:
    figures.save(figures.curves_figure(train_panels(stage, train), f"{title}: training"),
                 os.path.join(out_dir, f"{stage}_train.png"))
    _image(lines, f"{FIGURES}/{stage}_train.png", "training curves")
  if stage == "semisup":
    epochs = _rows(run_dir, "epoch")
    if epochs and not any(r["mask_rate"] > 0 for r in epochs):
      lines += ["**No pseudo-label passed the threshold** in any epoch (mask rate 0): the "
                "teacher was never confident enough, so stage 3 trained on the labeled faces "
                "alone and is stage 2 continued, not a semi-supervised result.", ""]
    if epochs:
      lines += ["| epoch end (step) | mask rate | pseudo-label accuracy |", "|---:|---:|---:|"]
      lines += [f"| {r['step']} | {r['mask_rate']:.3f} | "
                f"{_pct(r.get('pseudo_label_accuracy'))} |" for r in epochs]
      lines.append("")
    _image(lines, _copy(os.path.join(run_dir, "figures", "thresholds.png"), out_dir,
                        "semisup_thresholds.png"), "per-class thresholds and mask rates")
  if row is not None:
    lines.append(f"Test: accuracy {_pct(row['accuracy'])}%, mean-class "
                 f"{_pct(row['mean_class_accuracy'])}%, macro F1 {_pct(row['macro_f1'])}% "
                 f"({row['weights']} weights of step {row['step']}).")
    lines.append("")
    _image(lines, _copy(os.path.join(run_dir, "eval", f"{'_'.join(lists)}_confusion.png"),
                        out_dir, f"{stage}_confusion.png"),
           "confusion matrix on the evaluation lists")
  return lines


def write(workdir: str, job: Mapping[str, Any], evaluation: Mapping[str, Any]) -> str:
  """WORKDIR/report.md and its figures; returns the Markdown file's path."""
  out_dir = os.path.join(workdir, FIGURES)
  os.makedirs(out_dir, exist_ok=True)
  rows = {r["stage"]: r for r in evaluation["rows"] if r.get("stage")}
  lines = ["# SSFER job report", "",
           f"{workdir}, written {datetime.datetime.now().isoformat(timespec='seconds')}. "
           f"Stages: {', '.join(job['stages'])}; data {evaluation['data']}, split "
           f"'{evaluation['split']}'.", "",
           f"## Accuracy on the {'/'.join(evaluation['lists'])} lists "
           f"({evaluation['rows'][0]['count']} faces, %)", "",
           *_markdown_table(evaluation), ""]
  if "pretrain" in job["stages"]:
    lines += _pretrain_section(os.path.join(workdir, "pretrain"), out_dir)
  titles = {"finetune": "Stage 2: supervised fine-tuning with FaceMix",
            "semisup": "Stage 3: semi-supervised fine-tuning (EMA teacher)"}
  for stage in ("finetune", "semisup"):
    if stage in job["stages"]:
      lines += _classifier_section(stage, titles[stage], os.path.join(workdir, stage), out_dir,
                                   rows.get(stage), evaluation["lists"])
  lines += ["## Where the rest is", "",
            "Each stage's run directory holds its `config.json`, `metrics.jsonl`, TensorBoard "
            "events, checkpoints and `result.json`; `eval/` the full test reports (JSON, "
            "per-class precision and recall). `job.json` is the job's resolved config.", ""]
  path = os.path.join(workdir, REPORT_FILE)
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines))
  os.replace(path + ".tmp", path)
  return path
