"""Two local processes under jax.distributed train together and agree: MAE pretraining, and
fine-tuning whose sharded evaluation counts every val/test record once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ssfer_jax.input import records
from ssfer_jax.runtime import writers
from tests.conftest import build_demo_subset, train_losses

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


DEVICE_FLAG = "--xla_force_host_platform_device_count"


def xla_flags(devices: int) -> str:
  """This test process's XLA flags, with `devices` simulated devices (a worker's share)."""
  kept = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(DEVICE_FLAG)]
  return " ".join(kept + [f"{DEVICE_FLAG}={devices}"])


def run_two(tmp_path, data_dir, stage, processes=2, init_from=None):
  port, workdir = free_port(), str(tmp_path / stage)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
             SSFER_TEST_PROCESSES=str(processes), SSFER_TEST_INIT_FROM=init_from or "",
             XLA_FLAGS=xla_flags(8 // processes))
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "multiprocess_worker.py"),
                             str(port), str(i), data_dir, workdir, stage],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(processes)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{processes}-process run timed out")
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o["process"] for o in outs] == list(range(processes))
  assert all(o["processes"] == processes and o["devices"] == 8 and o["step"] == 6 for o in outs)
  assert len({o["checksum"] for o in outs}) == 1
  losses = [r["loss"] for r in writers.read_metrics(workdir) if r["split"] == "train"]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  return outs, workdir


def start_pretrain_job(data_dir, workdir, total_steps, heartbeat_s):
  """Two worker processes pretraining for `total_steps` (long: the test interrupts them)."""
  port = free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
             XLA_FLAGS=xla_flags(4))
  return [subprocess.Popen([sys.executable, os.path.join(HERE, "helpers", "multiprocess_worker.py"),
                            str(port), str(i), data_dir, workdir, "pretrain", str(total_steps),
                            str(heartbeat_s)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for i in range(2)]


def wait_for_rows(workdir, procs, rows):
  """Until the job has logged `rows` metric rows (all processes still alive)."""
  metrics = os.path.join(workdir, writers.METRICS_FILE)
  deadline = time.time() + 240
  while time.time() < deadline and not (os.path.exists(metrics)
                                         and len(open(metrics).read().splitlines()) >= rows):
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return build_demo_subset(tmp_path_factory.mktemp("mp"), rows=150, size=32)


@pytest.fixture(scope="module")
def pretrained_together(tmp_path_factory, data_dir):
  """Two processes pretraining 6 steps together (`run_two` checks that they agree): run once,
  read by the tests below."""
  return run_two(tmp_path_factory.mktemp("mp_pretrain"), data_dir, "pretrain")[1]


def test_two_processes_pretrain_together(pretrained_together):
  assert sorted(train_losses(pretrained_together)) == list(range(1, 7))


@pytest.mark.slow   # the default suite's two-process runs are stage 1's; every stage: below
def test_two_processes_finetune_and_evaluate_every_record_once(tmp_path, data_dir):
  outs, workdir = run_two(tmp_path, data_dir, "finetune")
  n = len(records.load_split(data_dir, "default", ["val", "test"]))
  assert n % 8                                  # a final partial batch of 8
  assert all(o["eval_count"] == o["eval_read"] == n for o in outs)
  assert outs[0]["eval_accuracy"] == outs[1]["eval_accuracy"]
  assert os.path.exists(os.path.join(workdir, "result.json"))


def test_a_two_process_checkpoint_resumes_in_one_process_on_the_same_stream(
    tmp_path, data_dir, pretrained_together):
  """Another process count: each process continues the global stream from the saved batch
  number (the rows of a global batch depend on it, not on the process count)."""
  import jax
  from configs import pretrain as pretrain_config
  from ssfer_jax.runtime import checkpointing
  from ssfer_jax.input import pipeline
  from ssfer_jax.trainers import loop, pretrain
  jax.config.update("jax_threefry_partitionable", True)
  workdir = str(tmp_path / "pretrain")   # 6 steps, 2 processes x 4 devices; continued here
  shutil.copytree(pretrained_together, workdir)
  config = pretrain_config.get_config("test").unlock()
  config.data.dir, config.mesh.shape, config.total_steps = data_dir, (-1, 2), 8
  kw = dict(kind="unlabeled", global_batch_size=config.batch_size, image_size=32,
            seed=config.seed, num_threads=1)
  lists = ("default", config.data.train_lists)
  it = pipeline.make_train_iterator(data_dir, *lists, process_index=0, process_count=1, **kw)
  plan = loop.plan_run(config)
  abstract, _ = loop.state_layout(config, pretrain.make_stage(config, plan, None), plan.mesh)
  ckpt = checkpointing.Checkpointer(workdir)
  ckpt.restore(6, abstract, it, pretrain.STAGE)
  ckpt.close()
  two = [pipeline.make_train_iterator(data_dir, *lists, process_index=p, process_count=2, **kw)
         for p in range(2)]
  for _ in range(6):
    [next(t) for t in two]
  want = sorted(np.concatenate([next(t)["index"] for t in two]).tolist())
  assert sorted(next(it)["index"].tolist()) == want   # global batch 7: the same records
  loop.train(config, workdir, pretrain.make_stage, allow_schedule_change=True)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, 9)) and np.all(np.isfinite(list(losses.values())))


def test_a_process_that_cannot_reach_the_coordinator_fails_clearly_in_time(tmp_path, data_dir):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  t = time.time()
  run = subprocess.run(
      [sys.executable, "-m", "ssfer_jax.main", "--config", "configs/pretrain.py:test",
       "--workdir", str(tmp_path / "run"), f"--config.data.dir={data_dir}",
       "--coordinator_address", f"localhost:{free_port()}", "--num_processes", "2",
       "--process_id", "1", "--distributed_timeout_s", "5"],
      cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=120, env=env)
  assert run.returncode == 2 and time.time() - t < 60
  assert "JoinError: process 1 of 2 could not reach the coordinator at localhost:" in run.stderr
  assert "Traceback" not in run.stderr


def test_a_checkpoint_restores_onto_fewer_devices(tmp_path, data_dir):
  """8 devices (mesh 4 x 2) to 4 (mesh 2 x 2) mid-run: the run ends as a straight one."""
  import jax
  from tests.conftest import small_config
  from configs import pretrain as pretrain_config
  from ssfer_jax.trainers import loop, pretrain
  jax.config.update("jax_threefry_partitionable", True)
  run = str(tmp_path / "run")
  loop.train(small_config(pretrain_config, data_dir), run, pretrain.make_stage, stop_at=3)
  script = ("import sys, jax; jax.config.update('jax_threefry_partitionable', True)\n"
            "from configs import pretrain as pretrain_config\nfrom ssfer_jax.trainers import loop, pretrain\n"
            "c = pretrain_config.get_config('test').unlock()\n"
            "c.data.dir, c.mesh.shape = sys.argv[1], (2, 2)\n"
            "assert jax.device_count() == 4\n"
            "print(int(loop.train(c, sys.argv[2], pretrain.make_stage).step))\n")
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]),
             XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", script, data_dir, run], cwd=os.path.dirname(HERE),
                       capture_output=True, text=True, timeout=300, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "6"
  loop.train(small_config(pretrain_config, data_dir), str(tmp_path / "straight"),
             pretrain.make_stage)
  got, want = train_losses(run), train_losses(tmp_path / "straight")
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)],
                             rtol=1e-5)


@pytest.mark.slow
def test_killing_one_process_stops_the_other_and_a_restart_resumes(tmp_path, data_dir):
  workdir = str(tmp_path / "job")
  procs = start_pretrain_job(data_dir, workdir, 100_000, heartbeat_s=10)
  wait_for_rows(workdir, procs, 7)
  procs[1].kill()
  t = time.time()
  try:
    procs[0].wait(timeout=90)   # heartbeat 10 s: the survivor must not hang
  except subprocess.TimeoutExpired:
    procs[0].kill()
    pytest.fail("the surviving process hung after its peer died")
  assert procs[0].returncode != 0 and time.time() - t < 90
  for p in procs:
    p.communicate()
  from ssfer_jax.runtime import checkpointing
  saved = checkpointing.Checkpointer(workdir).latest_step()
  assert saved is not None and saved >= 3
  # Restart both (a changed total: the test's way to end the job): they resume at `saved`.
  procs = start_pretrain_job(data_dir, workdir, saved + 3, heartbeat_s=10)
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:]
  assert [json.loads(o.strip().splitlines()[-1])["step"] for o, _ in outs] == [saved + 3] * 2


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 4])
def test_every_stage_runs_multi_process(tmp_path, data_dir, processes):
  """Stage 1 and stage 2 (evaluation counts each record once), then stage 3 from stage 2."""
  run_two(tmp_path, data_dir, "pretrain", processes=processes)
  outs, stage2 = run_two(tmp_path, data_dir, "finetune", processes=processes)
  n = len(records.load_split(data_dir, "default", ["val", "test"]))
  assert all(o["eval_count"] == o["eval_read"] == n for o in outs)
  _, stage3 = run_two(tmp_path, data_dir, "semisup", processes=processes, init_from=stage2)
  assert os.path.exists(os.path.join(stage3, "result.json"))


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_step_all_agree_on(tmp_path, data_dir):
  """JAX's preemption service: a SIGTERM to any process makes every process stop at the same
  step, save it once, and exit 143."""
  workdir = str(tmp_path / "job")
  procs = start_pretrain_job(data_dir, workdir, 100_000, heartbeat_s=30)
  wait_for_rows(workdir, procs, 5)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [143, 143], outs[0][1][-3000:]
  steps = {json.loads(o.strip().splitlines()[-1])["preempted_at"] for o, _ in outs}
  from ssfer_jax.runtime import checkpointing
  assert len(steps) == 1 and checkpointing.Checkpointer(workdir).latest_step() == steps.pop()
