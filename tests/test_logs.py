"""Console vs log file: our lines and every warning on the console, library INFO only in the
workdir's log file; the command line's --help."""

import logging
import os
import pathlib
import re
import subprocess
import sys

from absl import logging as absl_logging

from ssfer_jax.runtime import logs

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_library_info_goes_to_the_file_only(tmp_path, capsys):
  root = logging.getLogger()
  console = logging.StreamHandler()   # stands in for absl's handler on the root logger
  root.addHandler(console)
  handlers = list(root.handlers)
  try:
    path = logs.setup(str(tmp_path))
    logging.info("test-module info")                     # tests/ is not one of our packages
    absl_logging.info("orbax: saving checkpoint")        # library INFO
    absl_logging.warning("a library warning")
    logging.getLogger("orbax").warning("Requested `tracked_metric`; did not provide metrics.")
    for h in root.handlers:
      h.flush()
    console_out = capsys.readouterr().err
    with open(path) as f:
      file_out = f.read()
  finally:
    for h in list(root.handlers):
      if h not in handlers or h is console:
        root.removeHandler(h)
    for h in handlers:
      h.filters.clear()
  assert os.path.basename(path) == "log.txt"
  for line in ("test-module info", "orbax: saving checkpoint", "a library warning"):
    assert line in file_out
  assert "a library warning" in console_out
  assert "orbax: saving checkpoint" not in console_out and "test-module info" not in console_out
  assert "tracked_metric" not in console_out


def test_our_modules_info_reaches_the_console(tmp_path):
  record = logging.LogRecord("root", logging.INFO, os.path.join(os.sep, "x", "ssfer_jax",
                                                                  "loop.py"), 1, "step 5", (), None)
  library = logging.LogRecord("absl", logging.INFO, os.path.join(os.sep, "x", "orbax",
                                                                   "manager.py"), 1, "saved", (), None)
  f = logs._ConsoleFilter()  # pylint: disable=protected-access
  assert f.filter(record) and not f.filter(library)


def _main(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "ssfer_jax.main", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_library_info_before_the_log_file_stays_off_the_console(tmp_path, capsys):
  # With JAX_PLATFORMS unset JAX probes every backend the first time it is used, before the
  # workdir's log file exists, and logs "Unable to initialize backend 'tpu'" at INFO.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"XLA_FLAGS": ""}
  out = _main("--config", "configs/pretrain.py:test", "--workdir", str(tmp_path / "run"),
              f"--config.data.dir={tmp_path / 'missing'}", env=env)
  assert out.returncode == 2, out.stderr
  assert "Unable to initialize backend" not in out.stderr
  lines = [re.match(r"([IWEF])\d{4} [\d:.]+ +\d+ (\S+):\d+\] ", line) for line in
           out.stderr.splitlines()]
  assert all(lines), out.stderr
  assert [m[2] for m in lines if m[1] == "I"] == ["main.py"], out.stderr   # "library logs: ..."
  assert "DatasetError" in out.stderr.splitlines()[-1]
  # In process: quiet_console filters a handler once, however often it is called.
  root = logging.getLogger()
  console = logging.StreamHandler()
  root.addHandler(console)
  level = root.level
  try:
    root.setLevel(logging.INFO)
    logs.quiet_console()
    logs.quiet_console()
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    assert len(console.filters) == 1
  finally:
    root.removeHandler(console)
    root.setLevel(level)
  assert "backend" not in capsys.readouterr().err


def test_help_exits_0_with_the_usage_each_configs_variants_and_its_fields():
  out = _main("--config", "configs/pretrain.py:test", "--help",
              env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr
  assert "--workdir DIR \\\n      --config.data.dir=DATA_DIR" in out.stdout   # not run together
  assert "--workdir: Checkpoints" in out.stdout and "--config.FIELD=VALUE" in out.stdout
  for name, variants in (("ssfer.py", ("cpu", "small", "test", "DATASET,BUDGET")),
                         ("pretrain.py", ("vit_b16", "vit_s16", "small", "cpu", "test")),
                         ("finetune.py", ("vit_b16", "vit_b16_code", "small", "cpu", "test")),
                         ("semisup.py", ("vit_b16", "small", "cpu", "test", "leaf", "negative"))):
    section = out.stdout.split(f"\nconfigs/{name}: ")[1].split("\nconfigs/")[0]
    for variant in variants:
      assert re.search(rf"^ +{re.escape(variant)} ", section, re.M), (name, variant)
  listed = out.stdout.split("\nconfigs/pretrain.py:test:\n")[1]
  fields = dict(re.findall(r"^  (\S+) +(.+)$", listed, re.M))
  assert fields["model.mask_ratio"] == "0.75" and fields["total_steps"] == "6"
  assert fields["data.dir"] == "None" and fields["stage"] == "'pretrain_mae'"
  # A config that does not load: one line, status 2 (in a subprocess: importing main here
  # would define its absl flags beside those of a command another test imported).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  out = _main("--help", "--config=configs/pretrain.py:bogus", env=env)
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert "unknown variant 'bogus'" in out.stderr
  out = _main("-h", "--config", "configs/nope.py", env=env)
  assert out.returncode == 2 and "no file configs/nope.py" in out.stderr
