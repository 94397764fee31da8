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


def quiet_console() -> None:
  """Keeps library INFO off the console from now on. Called before anything touches JAX: its
  backend probe logs "Unable to initialize backend 'tpu'" at INFO on every host without a TPU,
  and the log file can only open once the workdir exists. Idempotent; log files unfiltered."""
  for handler in logging.getLogger().handlers:
    if not isinstance(handler, logging.FileHandler) and not any(
        isinstance(f, _ConsoleFilter) for f in handler.filters):
      handler.addFilter(_ConsoleFilter())


def setup(workdir: str, filename: str = "log.txt") -> str:
  """Routes INFO and above to `workdir/filename`, and our lines plus warnings to the console."""
  quiet_console()
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, filename)
  logging.getLogger().setLevel(logging.INFO)
  file_handler = logging.FileHandler(path)
  file_handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  logging.getLogger().addHandler(file_handler)
  return path
