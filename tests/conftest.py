"""Every test runs on CPU with 8 simulated devices (set before JAX is imported)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATASET = REPO.parent / "shared" / "datasets" / "facial_expressions"
DEMO_DATA = REPO / "data_prep" / "demo_data"


@pytest.fixture(scope="session")
def demo_data_dir():
  """The committed demo sample (images/ + labels.csv): real faces, present on every clone."""
  if not (DEMO_DATA / "labels.csv").exists():
    pytest.fail(f"{DEMO_DATA}/labels.csv missing: regenerate with `python -m data_prep.make_demo_sample`.")
  return DEMO_DATA
