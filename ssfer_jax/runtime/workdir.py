"""A training workdir's guards: one job at a time in it, and a resume only under the config
its checkpoints were written with.

The lock is a POSIX advisory lock (`flock`) on WORKDIR/lock, taken by process 0 for the
whole job (the other processes of a multi-host job follow its verdict), so a second job on
the same workdir stops before it touches anything. The operating system drops the lock when
the holder dies, SIGKILL included: a stale lock file never blocks a rerun. It holds on local
disks and on network file systems that support locks (NFSv4, Lustre, GPFS); object stores
(gs://, s3://) have none: there, one job per workdir is the scheduler's to ensure.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from ssfer_jax import errors

LOCK_FILE = "lock"
# Fields a resumed run may change: cadence, threads, evaluation batch, the mesh (checkpoints
# restore onto any mesh), where stage 3's strong views are made (the same draws, host or
# device), rematerialisation (memory, not numbers). Changing the schedule's length needs
# allow_schedule_change.
SAFE_FIELDS = ("log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
               "peak_tflops_per_device", "viz_every", "data.num_threads", "eval.batch_size",
               "eval.every_epochs", "eval.every_steps", "mesh.shape", "data.strong_view",
               "model.remat", "model.remat_policy")
SCHEDULE_FIELDS = ("total_steps", "num_epochs", "few_labels_epochs")
# A field added to the configs since a checkpoint was written holds one of these to mean
# "as before" (e.g. stage 1's init_from ""), so it does not block that checkpoint's resume.
NEUTRAL_VALUES = ("", None, False, 0, [], {})
# Fields added since with a value other than neutral: the value that runs before them used.
FORMER_DEFAULTS = {"data.crop_scale": [0.2, 1.0], "data.crop_ratio": [3 / 4, 4 / 3],
                   "model.stem": "patch", "data.center_crop": 1.0, "init_resample": "mae"}
# Fields renamed since (old -> new): a checkpoint, result or job file written under the old
# name is read under the new one (`upgrade`), so its run still resumes and loads.
RENAMED_FIELDS = {"data.mix": "data.blend"}


class WorkdirError(errors.UserError, RuntimeError):
  """The workdir cannot be used for this run (busy, another config, not a directory)."""


def prepare(workdir: str) -> None:
  """Creates `workdir`, or says why it cannot be one."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise WorkdirError(f"--workdir {workdir}: {e.strerror} ({e.filename}): a file is in the "
                       "way; pass a directory path.") from None
  except PermissionError:
    raise WorkdirError(f"--workdir {workdir}: permission denied; pass a directory you can "
                       "write.") from None


def check_free(workdir: str) -> None:
  """WorkdirError now if another job holds `workdir`, before this one writes anything there
  (its log file included); the job still takes the lock itself when it starts."""
  with Lock(workdir):
    pass


class Lock:
  """Held by process 0 from `__enter__` to `__exit__`; every process raises WorkdirError
  when it is held by another job."""

  def __init__(self, workdir: str):
    self._path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._file = None

  def __enter__(self) -> "Lock":
    holder = None
    if jax.process_index() == 0:
      holder = self._acquire()
    busy = holder is not None
    if jax.process_count() > 1:
      busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    if busy:
      raise WorkdirError(
          f"{os.path.dirname(self._path)} is in use by another job ({holder or 'see process 0'}"
          f"; lock {self._path}). Wait for it to finish, stop it, or use another --workdir.")
    return self

  def _acquire(self) -> str | None:
    """None when acquired, else what the holder wrote."""
    f = open(self._path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      f.seek(0)
      holder = f.read().strip() or "unknown holder"
      f.close()
      return holder
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    self._file = f
    return None

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}: a nested config as dotted field names."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def upgrade(config: Mapping[str, Any]) -> dict[str, Any]:
  """A stored config (a stage's, or a section of the job's) with every renamed field under its
  current name (`RENAMED_FIELDS`); the stored mapping itself is left as it was."""
  out = json.loads(json.dumps(config))
  for old, new in RENAMED_FIELDS.items():
    *old_path, old_key = old.split(".")
    *new_path, new_key = new.split(".")
    parent = out
    for k in old_path:
      parent = parent.get(k) if isinstance(parent, dict) else None
    if not isinstance(parent, dict) or old_key not in parent:
      continue
    target = out
    for k in new_path:
      target = target.setdefault(k, {})
    value = parent.pop(old_key)
    target.setdefault(new_key, value)
  return out


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) for every field that differs or exists in one only
  (as JSON: tuples and lists compare equal), the saved config read under current names."""
  saved = upgrade(saved)
  a, b = flatten(json.loads(json.dumps(saved))), flatten(json.loads(json.dumps(current)))
  missing = object()
  return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)]


def added_as_before(field: str, saved: Any, current: Any) -> bool:
  """True for a field added to the configs since a run was written (`saved` "<absent>") whose
  value means "as before" (neutral, or the value runs before it used): no change to refuse."""
  return saved == "<absent>" and (current in NEUTRAL_VALUES
                                  or current == FORMER_DEFAULTS.get(field, saved))


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], where: str, *,
                 allow_schedule_change: bool = False) -> None:
  """Refuses to resume the checkpoints in `where` under a config that changes what they mean;
  cadence and threads may change, the schedule's length only when allowed (with a warning),
  and a field newer than the checkpoint may hold its neutral value."""
  diffs = [d for d in config_diff(saved, current) if d[0] not in SAFE_FIELDS
           and not added_as_before(*d)]
  schedule = [d for d in diffs if d[0] in SCHEDULE_FIELDS]
  other = [d for d in diffs if d[0] not in SCHEDULE_FIELDS]
  show = lambda ds: "\n".join(f"  {k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in ds)
  if other:
    raise WorkdirError(
        f"{where} was written by a run with another config; resuming would train on silently "
        f"changed settings:\n{show(other)}\nSet them back, or start a fresh --workdir.")
  if schedule and not allow_schedule_change:
    raise WorkdirError(
        f"{where}: the run's length changed, which reshapes the learning-rate schedule "
        f"mid-run:\n{show(schedule)}\nPass --allow_schedule_change to resume with it anyway, "
        "or set it back.")
  if schedule:
    logging.warning("resuming %s with a changed schedule (allowed):\n%s", where, show(schedule))


def check_data(saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str) -> None:
  """Refuses to resume the checkpoints in `where` on other records at the same path: a build
  or split whose checksum (`TrainData.identity`) differs from the one they were trained on.
  Checkpoints written before the checksums were kept (`saved` None) are not checked."""
  if not saved:
    return
  short = lambda v: v[:12] if isinstance(v, str) else repr(v)
  changed = [f"  {d} {what}: {short((saved.get(d) or {}).get(what))} in the checkpoint, "
             f"{short(ids.get(what))} now"
             for d, ids in current.items() for what in ("build", "split")
             if (saved.get(d) or {}).get(what) != ids.get(what)]
  changed += [f"  {d}: in the checkpoint, not read now" for d in saved if d not in current]
  if changed:
    raise WorkdirError(
        f"{where} was trained on other data at the same path (the build was redone or "
        f"re-split since; sha256 prefixes):\n" + "\n".join(changed) + "\nRestore the build and "
        "split it trained on, or start a fresh --workdir.")
