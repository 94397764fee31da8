"""Every test runs on CPU with 8 simulated devices (set before JAX is imported). Compiling is
most of what a test costs: the tests' programs are small and run a few steps. So the default
suite compiles without LLVM's optimisation passes (in ~25% less time; the numerics are XLA's
either way; `-m slow` runs, which train for minutes, keep them: `pytest_configure`). Tests
share compiled programs through JAX's persistent compilation cache, one temporary directory
per test process (JAX writes its entries without a lock between processes; one directory
shared by both workers with JAX's file lock made the suite slower, 24 min against 16),
removed at exit; subprocesses a test starts inherit their test's directory and flags."""
import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A directory set by a user is kept; the one inherited from pytest's controller process is not.
if os.environ.get("JAX_COMPILATION_CACHE_DIR", "") == os.environ.get("SSFER_TEST_CACHE", ""):
  _CACHE = tempfile.mkdtemp(prefix="ssfer-jax-test-compilation-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SSFER_TEST_CACHE"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pathlib

import pytest


def pytest_configure(config):
  """Runs before any test module imports JAX. A run that selects the slow tests (long training
  runs, where the compiled code's speed matters) keeps LLVM's optimisation passes; every
  other run compiles without them."""
  selects_slow = "slow" in (config.option.markexpr or "").replace("not slow", "")
  if not selects_slow and FAST_COMPILE not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += FAST_COMPILE


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "facial_expressions"
DEMO_DATA = REPO / "data_prep" / "demo_data"


def train_losses(workdir) -> dict:
  """step -> loss of the train rows a run logged in `workdir`."""
  from ssfer_jax.runtime import writers  # pylint: disable=g-import-not-at-top   (after XLA_FLAGS)
  return {r["step"]: r["loss"] for r in writers.read_metrics(str(workdir))
          if r["split"] == "train"}


def small_config(config_module, data_dir, variant="test", **overrides):
  """A stage config's `test` variant (with any options, e.g. "test,leaf") on `data_dir` over
  the 8 simulated devices as data 4 x fsdp 2, with top-level `overrides`."""
  c = config_module.get_config(variant).unlock()
  c.data.dir = data_dir
  c.mesh.shape = (4, 2)
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="session")
def demo_data_dir():
  """The committed demo sample (images/ + labels.csv): real faces, present on every clone."""
  if not (DEMO_DATA / "labels.csv").exists():
    pytest.fail(f"{DEMO_DATA}/labels.csv missing: regenerate with `python -m data_prep.make_demo_sample`.")
  return DEMO_DATA


def build_demo_subset(out_dir, *, rows: int, size: int, seed: int = 0) -> str:
  """A real `data_prep` build (Haar boxes, crop none) + split of the first `rows` demo faces."""
  import csv

  from data_prep import build, readers, split

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with open(DEMO_DATA / "labels.csv") as f:
    lines = list(csv.reader(f))
  subset = out_dir / "labels.csv"
  with open(subset, "w", newline="") as f:
    csv.writer(f).writerows(lines[:rows + 1])
  data = str(out_dir / "data")
  build.build([readers.CsvSource("demo", str(subset), root=str(DEMO_DATA / "images"))], data,
              build.Config(size=size, crop="none", detector="haar", num_shards=2), workers=1,
              progress=False)
  split.split(data, "default", split.Options(labeled_fraction=0.5, val_fraction=0.1,
                                             test_fraction=0.1, seed=seed))
  return data


def _trained(stage: str, data_dir, workdir) -> str:
  """A finished 6-step run of a stage's `test` config on `data_dir` (shared per worker)."""
  import jax  # pylint: disable=g-import-not-at-top
  from configs import finetune, pretrain as pretrain_config  # pylint: disable=g-import-not-at-top
  from ssfer_jax.trainers import loop  # pylint: disable=g-import-not-at-top
  from ssfer_jax.trainers.stages import STAGES  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", True)
  config = small_config({"pretrain_mae": pretrain_config, "finetune": finetune}[stage], data_dir)
  loop.train(config, str(workdir), STAGES[stage])
  return str(workdir)


@pytest.fixture(scope="session")
def pretrained_run(small_dataset, tmp_path_factory):
  """Stage 1 (configs/pretrain.py:test) on `small_dataset`."""
  return _trained("pretrain_mae", small_dataset, tmp_path_factory.mktemp("pretrained"))


@pytest.fixture(scope="session")
def finetuned_run(small_dataset, tmp_path_factory):
  """Stage 2 (configs/finetune.py:test) from scratch on `small_dataset`."""
  return _trained("finetune", small_dataset, tmp_path_factory.mktemp("finetuned"))


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """~120 real demo faces at 32 px, built and split by data_prep (shared per test worker)."""
  return build_demo_subset(tmp_path_factory.mktemp("small_dataset"), rows=150, size=32)
