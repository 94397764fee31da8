"""Two local processes under jax.distributed train MAE together and agree."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import build_demo_subset
from ssfer_jax import writers

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
  data_dir = build_demo_subset(tmp_path, rows=150, size=32)
  port, workdir = free_port(), str(tmp_path / "run")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multiprocess_worker.py"),
                             str(port), str(i), data_dir, workdir],
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
