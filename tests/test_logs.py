"""Console vs log file: our lines and every warning on the console, library INFO only in the
workdir's log file."""

import logging
import os

from absl import logging as absl_logging

from ssfer_jax.runtime import logs


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
