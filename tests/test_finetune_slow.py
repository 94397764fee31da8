"""A short fine-tune on real in-the-wild faces beats the majority class on held-out faces by
more than two binomial standard errors (slow: builds the shared dataset, ~3 minutes)."""

import jax
import numpy as np
import pytest

from conftest import SHARED_DATASET
from configs import finetune as finetune_config
from data_prep import build, sources, split
from ssfer_jax import evaluate, sharding
from ssfer_jax.trainers import finetune, loop

LISTS = ("val", "test")


@pytest.mark.slow
def test_short_finetune_beats_the_majority_class(tmp_path):
  if not (SHARED_DATASET / "legend.csv").exists():
    pytest.skip(f"{SHARED_DATASET} (the shared facial_expressions set) is not beside this clone")
  jax.config.update("jax_threefry_partitionable", True)
  data = str(tmp_path / "data")
  build.build([sources.CsvSource("fe", str(SHARED_DATASET / "legend.csv"),
                                 root=str(SHARED_DATASET / "images"))], data,
              build.Config(size=96, crop="face", margin=1.6, detector="haar", num_shards=4),
              workers=2, progress=False)
  split.split(data, "default", split.Options(labeled_fraction=0.25, val_fraction=0.1,
                                             test_fraction=0.1, group_by=r"^(.*)_\d+\.\w+$"))
  c = finetune_config.get_config("cpu").unlock()
  c.data.dir = data
  c.mesh.shape = (-1, 1)
  c.batch_size = 64
  c.num_epochs = c.few_labels_epochs = 30
  c.mix.kind = "none"
  c.eval.every_epochs = 5
  c.tensorboard = False
  run = str(tmp_path / "run")
  loop.train(c, run, finetune.make_stage)
  mesh = sharding.make_mesh((-1, 1))
  clf = finetune.load_classifier(run, mesh=mesh)
  report = evaluate.Evaluator.for_classifier(clf, data_dir=data, split="default", lists=LISTS,
                                             mesh=mesh, num_threads=2)(clf.params)
  base = evaluate.majority_report(data, "default", LISTS)
  n, p0 = report["count"], base["accuracy"]
  assert n == base["count"] > 2000
  se = np.sqrt(p0 * (1 - p0) / n)
  print(f"accuracy {report['accuracy']:.4f} on {n} faces; majority {p0:.4f}, 2 SE {2 * se:.4f}")
  assert report["accuracy"] > p0 + 2 * se, (report["accuracy"], p0, se)
