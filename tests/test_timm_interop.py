"""Our exports in timm, and timm's weights in our model: the forward passes agree within
float32 tolerance (cls and average pooling, our tiny and ViT-Ti shapes, a trained run through
the card's exact call and timm's transforms, the README's timm block as written); position
tables resampled as timm's loader does; damaged .pth files refused. torch and timm live in
their own environment (.venv-timm), which this test sets up with `make timm-env` (about 1.5
min and 6.5 GB the first time): never in the main lock. Slow: `make test-slow` (and CI) runs it."""

import os
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from ssfer_jax import export, results
from ssfer_jax.trainers import finetune, loop
from tests.conftest import DEMO_DATA, REPO, small_config
from tests.test_readme_snippets import readme_timm_block

pytestmark = pytest.mark.slow
TIMM_PYTHON = REPO / ".venv-timm" / "bin" / "python"


@pytest.fixture(scope="module")
def timm_env():
  subprocess.run(["make", "-s", "timm-env", f"PY={sys.executable}"], cwd=REPO, check=True)
  return str(TIMM_PYTHON)


def test_exports_match_timm_and_timm_weights_import(timm_env, small_dataset, tmp_path):
  jax.config.update("jax_threefry_partitionable", True)
  run = str(tmp_path / "ft")
  loop.train(small_config(finetune_config, small_dataset), run, finetune.make_stage)
  card = export.export_run(run, str(tmp_path / "export"))
  clf = results.load_classifier(run)
  size = card["image_size"]
  faces = [cv2.resize(cv2.imread(str(p))[..., ::-1], (size, size), interpolation=cv2.INTER_AREA)
           for p in sorted((DEMO_DATA / "images").iterdir())[:6]]
  images = ((np.stack(faces) / 255.0 - np.array(card["mean"])) / np.array(card["std"]))
  images = images.astype(np.float32)
  np.savez(tmp_path / "case.npz", images=images, logits=np.asarray(clf.apply(clf.params, images)))
  (tmp_path / "readme_block.py").write_text(readme_timm_block())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
  out = subprocess.run([timm_env, str(REPO / "tests" / "helpers" / "timm_check.py"),
                        str(tmp_path / "export"), str(tmp_path / "case.npz"),
                        str(tmp_path / "readme_block.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  print(out.stdout)
  assert out.returncode == 0, out.stdout + out.stderr
  assert "all checks passed" in out.stdout
  assert out.stdout.count("max |ours - timm|") == 13
  for name in ("cut_zip.pth", "cut_legacy.pth", "nan.pth", "page.pth"):
    assert f"\n{name}: " in out.stdout, name   # refused, in one line
