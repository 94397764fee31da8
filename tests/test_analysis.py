"""The paper's section 4.8 tools on a trained tiny model: Grad-CAM maps, FGSM restricted to the
focused / unfocused regions (Table 7), and the label-noise driver (Table 8)."""

import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import ablations, logit_adjustment
from ssfer_jax import evaluate, results
from ssfer_jax.analysis import fgsm, gradcam, label_noise
from ssfer_jax.input import records
from ssfer_jax.runtime import sharding

from tests.test_job import job_config


@pytest.fixture
def run(finetuned_run):
  return finetuned_run


def test_gradcam_maps_and_their_gradient_point(run, small_dataset):
  clf = results.load_classifier(run)
  model = results.model_from_result(results.read_result(run))
  pre = clf.preprocessing
  images, labels = gradcam.first_batch(clf, small_dataset, "default", ["test"], 8)
  x01 = images.astype(np.float32) / 255
  maps, logits = jax.jit(gradcam.make_cam_fn(model, pre["mean"], pre["std"]))(clf.params, x01)
  maps = np.asarray(maps)
  assert maps.shape == images.shape[:3] and maps.min() >= 0 and maps.max() <= 1 + 1e-6
  assert np.allclose(maps.reshape(len(maps), -1).max(1), 1, atol=1e-5)   # min-max normalised
  np.testing.assert_allclose(logits, clf.apply(clf.params, (x01 - np.array(
      pre["mean"])) / np.array(pre["std"])), atol=1e-5)
  # The perturbation sits on the forward path: its gradient is the logit's finite difference.
  x = jnp.asarray((x01[:1] - np.array(pre["mean"])) / np.array(pre["std"]), jnp.float32)
  n = 1 + (x.shape[1] // model.patch_size) ** 2
  logit = lambda e: model.apply({"params": clf.params, "perturbations": {"encoder": {
      "last_block_input": e}}}, x, train=False)[0, 0]
  zeros = jnp.zeros((1, n, model.width))
  g = jax.grad(logit)(zeros)
  direction = jax.random.normal(jax.random.key(0), zeros.shape)
  h = 1e-2
  fd = (logit(h * direction) - logit(-h * direction)) / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(g * direction)), float(fd), rtol=2e-2,
                             atol=1e-3 * float(jnp.abs(g).sum()) * h)
  assert float(jnp.abs(g[0, 1:]).sum()) > 0   # patch tokens do reach a cls head


def test_fgsm_table_starts_at_clean_accuracy(run, small_dataset):
  result = fgsm.run(run, small_dataset, "default", ["test"], eps=(0.0, 0.05, 0.5), batch_size=16)
  clf = results.load_classifier(run)
  clean = evaluate.Evaluator.for_classifier(clf, data_dir=small_dataset, split="default",
                                            lists=("test",), mesh=sharding.make_mesh((-1, 1)),
                                            batch_size=16)(clf.params)
  assert result["count"] == clean["count"]
  for accs in result["accuracy"].values():
    assert accs[0] == pytest.approx(100 * clean["accuracy"])
    assert all(0 <= a <= 100 for a in accs)
  # Each attack moves only its own region's pixels, by at most eps, within [0, 1].
  clf_model = results.model_from_result(results.read_result(run))
  pre = clf.preprocessing
  images, labels = gradcam.first_batch(clf, small_dataset, "default", ["test"], 8)
  x01 = jnp.asarray(images, jnp.float32) / 255
  focused, direction = jax.jit(fgsm.make_regions_fn(clf_model, pre["mean"], pre["std"]))(
      clf.params, x01, labels)
  assert 0 < float(focused.mean()) < 1
  for region in (focused, ~focused):
    moved = np.asarray(fgsm.perturb(x01, direction, region, 0.1) - x01)
    assert not moved[np.broadcast_to(~np.asarray(region), moved.shape)].any()
    assert np.abs(moved).max() <= 0.1 + 1e-6 and np.abs(moved).max() > 0.05
  text = fgsm.table(result)
  assert text.splitlines()[0].split()[-3:] == ["Eps=0", "Eps=0.05", "Eps=0.5"]
  assert len(text.splitlines()) == 3


@pytest.mark.slow   # a driver of whole jobs, one per rate; the job is tested in test_job.py
def test_label_noise_driver_trains_each_rate_on_its_noisy_split(tmp_path):
  config = job_config(tmp_path, stages=("pretrain", "finetune"))   # stage 3 adds no path here
  result = label_noise.run_rates(config, str(tmp_path / "w"), [0.0, 0.5])
  data = str(tmp_path / "w" / "data")
  clean = records.load_label_noise(data, "default_noise00")
  noisy = records.load_label_noise(data, "default_noise50")
  with open(records.split_path(data, "default_noise50")) as f:
    n = len(json.load(f)["lists"]["train_labeled"])
  assert not clean and len(noisy) == round(0.5 * n) == round(0.5 * result["labels"])
  # Stage 1 ran once; the second rate's stage 2 started from it.
  assert not (tmp_path / "w" / "noise50" / "pretrain").exists()
  with open(tmp_path / "w" / "noise50" / "finetune" / "result.json") as f:
    assert json.load(f)["config"]["init_from"] == str(tmp_path / "w" / "noise00" / "pretrain")
  assert list(result["stages"]) == ["majority class (of train_labeled)",
                                    "floor: pixels + logistic regression",
                                    "floor: hog + logistic regression", "stage 2: FaceMix"]
  lines = label_noise.table(result, "demo").splitlines()
  assert lines[0].split()[-3:] == ["0", "50", "Decline"] and len(lines) == 5
  accs = result["stages"]["stage 2: FaceMix"]
  assert float(lines[4].split()[-1]) == pytest.approx(accs[0] - accs[1], abs=0.01)
  with pytest.raises(label_noise.job.JobError, match="ascending"):
    label_noise.run_rates(config, str(tmp_path / "w"), [0.3, 0.1])


def test_analysis_commands_write_their_figure_and_table(run, small_dataset, tmp_path, capsys):
  assert gradcam.main(["--run", run, "--data", small_dataset, "--count", "6",
                       "--out", str(tmp_path)]) == 0
  figure = cv2.imread(str(tmp_path / "gradcam.png"))
  assert figure is not None and figure.shape[1] > 3 * 32   # face | Grad-CAM | map > 0.3
  assert fgsm.main(["--run", run, "--data", small_dataset, "--eps", "0,0.1",
                    "--out", str(tmp_path)]) == 0
  saved = json.loads((tmp_path / "fgsm.json").read_text())
  assert saved["eps"] == [0.0, 0.1] and set(saved["accuracy"]) == set(fgsm.REGIONS)
  assert "emotion focused regions" in capsys.readouterr().out


def test_logit_adjustment_trades_frequent_classes_for_rare_ones(run, small_dataset, tmp_path,
                                                                capsys):
  classes = [f"c{i}" for i in range(3)]
  probs = np.array([[0.7, 0.2, 0.1]] * 20 + [[0.5, 0.1, 0.4]] * 20)
  targets = np.array([0] * 20 + [2] * 20)
  log_prior = np.log(np.array([0.8, 0.1, 0.1]))
  assert logit_adjustment.metrics(probs, targets, log_prior, 0.0, classes) == (50.0, 50.0)
  # tau 0.5 divides by the prior's square root: class 2 overtakes class 0 on its own rows
  # (0.4 / 0.32 against 0.5 / 0.89), class 0 keeps its (0.7 / 0.89 against 0.2 / 0.32)
  np.testing.assert_allclose(
      logit_adjustment.metrics(probs, targets, log_prior, 0.5, classes), (100.0, 100.0))
  # tau 1 over-corrects: class 1 (0.2 / 0.1) takes class 0's rows (0.7 / 0.8)
  np.testing.assert_allclose(
      logit_adjustment.metrics(probs, targets, log_prior, 1.0, classes), (50.0, 50.0))
  assert logit_adjustment.main([run, "--data", small_dataset, "--taus", "0,0.5",
                                "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "chosen on val" in out and (tmp_path / "logit_adjustment.png").stat().st_size > 0


def test_ablation_tables_line_up_and_stage3_from_refuses_missing_runs(tmp_path, capsys):
  classes = ["neutral", "happiness"]
  report = evaluate.metrics_from_confusion(np.array([[15, 5], [5, 15]]), classes)
  summary = ablations.summarise(report)
  floor = dict(report, name="floor: pixels + logistic regression", C=0.01, val_accuracy=0.7)
  baseline = dict(report, majority_class="neutral")
  stage3 = ablations.print_stage3_table(
      [{"arm": "ema_fixed", "seed": 0, "weights": "raw", "val_select": 0.8, "test": summary,
        "mask_rate": 0.6, "pseudo_label_accuracy": 0.9, "seconds": 60.0}],
      [{"val_select": 0.78, "test": summary}], baseline, [floor])
  stage2 = ablations.print_table(
      [{"init": "mae", "mix": "facemix", "seed": 0, "extra": "", "val_select": 0.78,
        "test": summary, "seconds": 60.0}], baseline, [floor])
  for table in (stage3, stage2):   # every row has its header's columns, the floor among them
    rows = table.splitlines()
    assert {row.count("|") for row in rows} == {rows[0].count("|")}
    assert "| majority (neutral) |" in table and "| floor: pixels" in table
  assert "| floor: pixels + logistic regression (C 0.01) | - | 75.0 |" in stage3   # accuracy
  assert "| stage 2 alone (MAE + FaceMix) | 1 | 75.0 +- 0.0 |" in stage3
  for pattern, why in ((str(tmp_path / "s{seed}"), "no finished stage-2 run"),
                       (str(tmp_path / "s0"), "put '{seed}' in the path")):
    with pytest.raises(SystemExit):
      ablations.main(["--data", str(tmp_path), "--out", str(tmp_path / "out"),
                      "--stage3-from", pattern])
    assert why in capsys.readouterr().err
  assert not (tmp_path / "out").exists()   # refused before writing anything
