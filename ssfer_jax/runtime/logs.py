"""Console output a person can read: our progress and metric lines, and every library's
warnings; library INFO chatter (orbax, absl, grain) goes to a log file in the workdir."""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading

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


class _LogFile(logging.FileHandler):
  """The workdir's log file. On a full disk it stops at the first failed line instead of
  printing logging's traceback for every later one: it leaves the root logger, says so in one
  console line and, on the main thread, raises the error where the line was logged, so the
  run stops there (with the last good checkpoint named) like any other write to a full disk."""

  def handleError(self, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    if not (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)):
      super().handleError(record)
      return
    logging.getLogger().removeHandler(self)
    try:
      self.close()
    except OSError:
      pass
    sys.stderr.write(f"{self.baseFilename}: {os.strerror(error.errno)}; no more lines are "
                     "written to it.\n")
    if threading.current_thread() is threading.main_thread():
      raise OSError(error.errno, error.strerror, self.baseFilename) from error


def setup(workdir: str, filename: str = "log.txt") -> str:
  """Routes INFO and above to `workdir/filename`, and our lines plus warnings to the console.
  A later call (another command in the same process) replaces the file, never adds a second."""
  quiet_console()
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, filename)
  root = logging.getLogger()
  root.setLevel(logging.INFO)
  for old in [h for h in root.handlers if isinstance(h, _LogFile)]:
    root.removeHandler(old)
    old.close()
  file_handler = _LogFile(path)
  file_handler.setFormatter(logging.Formatter(
      "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"))
  root.addHandler(file_handler)
  return path
