"""A user's mistake, or a state the user must act on, as one error family.

Every command line (`ssfer_jax.main`, evaluate, predict, export, the analyses, data_prep)
catches `UserError` and prints its message as one line, exit status 2: the message names
the file or field and the fix, so a traceback would add nothing. Anything else is a bug and
keeps its traceback. Modules with errors of their own (a busy workdir, a damaged
checkpoint, a bad weight file) subclass `UserError` where they raise them.
"""

from __future__ import annotations

import logging
import sys
EXIT_STATUS = 2


class UserError(Exception):
  """Raised for input or state the user can fix; its message says how."""


class ConfigError(UserError, ValueError):
  """A configuration that cannot run; raised before anything compiles."""


class DatasetError(UserError, ValueError):
  """Bad or inconsistent dataset files; the message names the file and the fix."""


class InitError(UserError, ValueError):
  """Weights to start from or to load cannot be used; the message says why and what to do."""


def report(error: Exception, *, log: bool = False) -> int:
  """Prints `error` as its one line (through logging when `log`, so it reaches the run's log
  file too) and returns the exit status for it."""
  line = f"{type(error).__name__}: {error}"
  if log:
    logging.error("%s", line)
  else:
    sys.stderr.write(line + "\n")
  return EXIT_STATUS
