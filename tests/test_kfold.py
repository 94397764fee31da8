"""The k-fold driver trains one run per fold file and summarises their test metrics."""

import json
import os

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from data_prep import split as split_lib
from ssfer_jax.analysis import kfold
from ssfer_jax.input import records
from tests.conftest import small_config


@pytest.mark.slow   # a driver of whole stage-2 runs, one per fold; a fold's run is stage 2's
def test_kfold_trains_every_fold_and_summarises(small_dataset, tmp_path):
  jax.config.update("jax_threefry_partitionable", True)
  split_lib.kfold(small_dataset, "cv", split_lib.FoldOptions(folds=3, seed=0), overwrite=True)
  c = small_config(finetune_config, small_dataset, total_steps=2)
  c.eval.every_steps = 2
  result = kfold.run_folds(c, str(tmp_path), "cv")
  assert [f["fold"] for f in result["folds"]] == [0, 1, 2]
  tested = sum(f["count"] for f in result["folds"])
  labeled = sum(len(records.load_split(small_dataset, f"cv_fold{k}", ["test"])) for k in range(3))
  assert tested == labeled                      # each fold's whole test list, once
  acc = [f["accuracy"] for f in result["folds"]]
  np.testing.assert_allclose(result["summary"]["accuracy"]["mean"], np.mean(acc))
  np.testing.assert_allclose(result["summary"]["accuracy"]["std"], np.std(acc, ddof=1))
  for k in range(3):
    assert os.path.exists(tmp_path / f"fold{k}" / "result.json")
    assert json.load(open(tmp_path / f"fold{k}" / "eval" / "test.json"))["count"] > 0
  assert "+-" in kfold.format_summary(result)
