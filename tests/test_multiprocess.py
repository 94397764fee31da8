"""Two local processes under jax.distributed train together and agree: MAE pretraining, and
fine-tuning whose sharded evaluation counts every val/test record once."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import build_demo_subset
from ssfer_jax import writers
from ssfer_jax.input import records

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two(tmp_path, data_dir, stage):
  port, workdir = free_port(), str(tmp_path / stage)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
                             str(port), str(i), data_dir, workdir, stage],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("two-process run timed out")
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o["process"] for o in outs] == [0, 1]
  assert all(o["processes"] == 2 and o["devices"] == 8 and o["step"] == 6 for o in outs)
  assert outs[0]["checksum"] == outs[1]["checksum"]
  losses = [r["loss"] for r in writers.read_metrics(workdir) if r["split"] == "train"]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  return outs, workdir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return build_demo_subset(tmp_path_factory.mktemp("mp"), rows=150, size=32)


def test_two_processes_pretrain_together(tmp_path, data_dir):
  run_two(tmp_path, data_dir, "pretrain")


def test_two_processes_finetune_and_evaluate_every_record_once(tmp_path, data_dir):
  outs, workdir = run_two(tmp_path, data_dir, "finetune")
  n = len(records.load_split(data_dir, "default", ["val", "test"]))
  assert n % 8                                  # a final partial batch of 8
  assert all(o["eval_count"] == o["eval_read"] == n for o in outs)
  assert outs[0]["eval_accuracy"] == outs[1]["eval_accuracy"]
  assert os.path.exists(os.path.join(workdir, "result.json"))
