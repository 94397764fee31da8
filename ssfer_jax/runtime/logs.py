"""Console output a person can read: our progress and metric lines, and every library's
warnings; library INFO chatter (orbax, absl, grain) goes to a log file in the workdir."""

from __future__ import annotations

import logging
import os

OURS = ("ssfer_jax", "data_prep", "configs")
# Orbax warns on every save without metrics once best-checkpoint tracking is on; such saves
# (periodic ones between evaluations) are intended.
_EXPECTED = ("Requested `tracked_metric`; did not provide metrics.",)


class _ConsoleFilter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if any(record.getMessage().startswith(m) for m in _EXPECTED):
      return False
    if record.levelno >= logging.WARNING:
      return True
    # Our modules log through the root logger (`logging.info`); tell them by their file.
    return record.name == "root" and any(f"{os.sep}{p}{os.sep}" in record.pathname for p in OURS)


def setup(workdir: str, filename: str = "log.txt") -> str:
  """Routes INFO and above to `workdir/filename`, and our lines plus warnings to the console."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, filename)
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  file_handler = logging.FileHandler(path)
  file_handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  for handler in root.handlers:
    handler.addFilter(_ConsoleFilter())
  root.addHandler(file_handler)
  return path
