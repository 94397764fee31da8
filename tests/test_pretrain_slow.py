"""A short MAE pretraining run on real faces lowers the reconstruction loss clearly (slow)."""

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from ssfer_jax.runtime import writers
from ssfer_jax.trainers import loop, pretrain
from tests.conftest import build_demo_subset


@pytest.mark.slow
def test_short_pretraining_lowers_the_loss(tmp_path):
  jax.config.update("jax_threefry_partitionable", True)
  data_dir = build_demo_subset(tmp_path, rows=700, size=64)
  config = pretrain_config.get_config("cpu").unlock()
  config.data.dir = data_dir
  config.data.image_size = 64
  config.mesh.shape = (4, 2)
  config.batch_size = 32
  config.total_steps = 300
  config.optim.warmup_epochs = 1.0
  config.log_every = 10
  config.tensorboard = False
  loop.train(config, str(tmp_path / "run"), pretrain.make_stage)
  losses = [r["loss"] for r in writers.read_metrics(tmp_path / "run") if r["split"] == "train"]
  first, last = np.mean(losses[:2]), np.mean(losses[-3:])
  assert last < 0.75 * first, (first, last, losses)
