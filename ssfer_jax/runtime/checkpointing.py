"""Orbax checkpoints holding the train state, the data iterator state and the resolved config.

Async and atomic (orbax commits a step directory only when every item is written), keep the
latest N plus, for stages that evaluate, the best on val (orbax preservation policies: a
save that carries metrics competes for "best"; resume always takes the latest step),
restored straight into the concrete shardings of the running mesh. A format version
guards against loading checkpoints from an incompatible layout; each step's metadata carries
a digest of every array it holds (`fingerprint`), checked on every restore, so flipped bytes
are found as damage instead of training on, and the data the state was trained on (each
build's manifest checksum and its split's), which a resume must match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ssfer_jax import errors
from ssfer_jax.runtime import workdir

FORMAT_VERSION = 2   # 2: TrainState.extra (stage state)
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(errors.UserError, RuntimeError):
  pass


class DamagedCheckpointError(CheckpointError):
  """A step's arrays restore, but not as they were saved (their digest differs)."""


def directory(workdir: str) -> str:
  """Where a run's checkpoints live: WORKDIR/checkpoints, absolute."""
  return os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_best: bool = False,
               async_save: bool = True):
    self.directory = directory(workdir)
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=_select, n=1, keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Needed for orbax to store and rank the metrics saved with a step.
            best_fn=_select if keep_best else None, best_mode="max",
            enable_async_checkpointing=async_save, create=True))
    self._pending = None   # (step, args, metrics) of the last save
    self._error = "no error reported"   # the last background write error

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the highest `select` metric: None before any evaluated save (the
    latest step for a Checkpointer made without keep_best)."""
    return self._manager.best_step()

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with `step` ({"select": float, "report": {...}}), if any."""
    return self._manager.metrics(step)

  def save(self, step: int, state: Any, data_iterator: Any | None, config_json: dict,
           stage: str, metrics: dict | None = None, data: dict | None = None) -> None:
    """Starts writing `step` in the background. A previous save that failed to commit (disk
    full, an I/O error: orbax only logs those) is retried by this one, synchronously; if the
    retry fails too, CheckpointError names both steps and the last good checkpoint. `data`:
    what the state was trained on (`TrainData.identity`), for a resume to check."""
    meta = {"format_version": FORMAT_VERSION, "stage": stage, "step": step,
            "digest": fingerprint(state), "data": data}
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave(meta))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._wait()
    failed = self._failed_pending()
    self._pending = (step, ocp.args.Composite(**items), metrics)
    self._manager.save(step, args=self._pending[1], metrics=metrics, force=True)
    if failed is not None:
      logging.warning("checkpoint step %d failed to commit (%s); retrying with step %d",
                      failed, self._error, step)
      self._wait()
      self._raise_if_failed(f"saving step {failed} failed and so did the retry at step {step}")

  def _wait(self) -> None:
    """Waits for the background save; orbax re-raises a failed commit here, which is kept
    (the directory on disk says whether the step committed)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._error = f"{type(e).__name__}: {_first_line(e)}"
      logging.error("checkpoint write failed: %s", self._error)

  def _failed_pending(self) -> int | None:
    """The step of the last save if it did not commit (call after waiting for it, on every
    process: process 0 commits, and its verdict is every process's, so all retry or none)."""
    if self._pending is None:
      return None
    failed = not self._committed(self._pending[0])
    if jax.process_count() > 1:
      failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
    return self._pending[0] if failed else None

  def _committed(self, step: int) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step)))

  def _raise_if_failed(self, what: str) -> None:
    if self._failed_pending() is None:
      return
    raise CheckpointError(
        f"{what} in {self.directory} ({self._error}). Last good checkpoint: "
        f"{last_committed(self.directory)}. Free disk space or fix the error, then rerun the "
        "same command to resume from it.")

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              stage: str) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying NamedShardings): any mesh.

    A step written by another number of processes still restores: every process saved the
    same data position (the global batch number: each process's rows are a function of it,
    the global batch size and its index), so each process of this run continues the global
    stream from there."""
    meta = self._check_meta(step, stage)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    foreign = None
    if data_iterator is not None:
      foreign = self._foreign_data_state(step)
      if foreign is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    self._verify(step, meta, restored["state"])
    if foreign is not None:
      data_iterator.set_state(foreign)
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def _verify(self, step: int, meta: dict, restored: Any) -> None:
    """DamagedCheckpointError unless every restored array has the digest `meta` (the step's)
    saved for it (steps written before digests were saved are taken as they are)."""
    saved = meta.get("digest")
    if not saved:
      return
    differ = [k for k, v in fingerprint(restored).items() if saved.get(k, v) != v]
    if differ:
      raise DamagedCheckpointError(
          f"{self.directory}/{step}: {len(differ)} array(s) differ from what was saved (digest "
          f"mismatch: {', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")

  def _foreign_data_state(self, step: int) -> dict | None:
    """The data position saved by a different process count (None when this run's own
    files are there); CheckpointError if those processes disagree."""
    data = os.path.join(self.directory, str(step), "data")
    mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    names = sorted(n for n in (os.listdir(data) if os.path.isdir(data) else [])
                   if n.startswith("process_") and n.endswith(".json"))
    if mine in names or not names:
      return None
    states = {}
    for n in names:
      with open(os.path.join(data, n)) as f:
        states[n] = json.load(f)
    if len({json.dumps(v, sort_keys=True) for v in states.values()}) != 1:
      raise CheckpointError(
          f"{data}: the {len(names)} processes that wrote step {step} saved different data "
          f"positions ({states}); this run has {jax.process_count()} process(es) and cannot "
          f"continue their streams: resume with {len(names)} processes.")
    logging.warning("step %d was written by %d process(es), this run has %d: the data stream "
                    "continues from the same global position (%s)", step, len(names),
                    jax.process_count(), states[names[0]])
    return states[names[0]]

  def restore_latest(self, abstract_state: Any, data_iterator: Any | None, stage: str,
                     check: Callable[[dict, dict, str], None]) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores, or None when there is none.

    A damaged step (a file missing or truncated after its commit, arrays that differ from
    their saved digest) is skipped with a warning naming it, and the previous one tried; once
    one restores, the damaged newer steps move to `checkpoints_damaged/` beside the
    checkpoints (kept for inspection, out of the way of the steps the run saves again).
    `check(saved_config, saved_meta, where)` runs on each step before its state is read: a
    config or data that does not fit is the caller's error, never mistaken for damage."""
    damaged = []

    def skip(step: int, where: str, e: Exception) -> None:
      damaged.append((step, f"{where}: {type(e).__name__}: {_first_line(e)}"))
      logging.warning("checkpoint %s is damaged; trying the previous one", damaged[-1][1])

    for step in reversed(self.all_steps()):
      where = os.path.join(self.directory, str(step))
      try:
        saved = self.read_config(step)
        meta = self._check_meta(step, stage)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except   (orbax/tensorstore read errors)
        skip(step, where, e)
        continue
      check(saved, meta, where)
      try:
        state = self.restore(step, abstract_state, data_iterator, stage)
      except Exception as e:  # pylint: disable=broad-except
        skip(step, where, e)
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged])
      return step, state
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores:\n  " + "\n  ".join(d for _, d in damaged)
          + "\nMove the directory aside to start over, or restore it from a copy.")
    return None

  def _set_aside(self, steps: list[int]) -> None:
    aside = self.directory + "_damaged"
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        os.replace(os.path.join(self.directory, str(step)), target)
        logging.warning("moved damaged checkpoint step %d to %s", step, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ssfer_checkpoints_set_aside")
    self._manager.reload()

  def restore_subtree(self, step: int, abstract_subtree: dict, stage: str) -> dict:
    """Restores only the named parts of the saved train state, e.g. {"params": ...} or
    {"extra": {"ema": ...}}: loading weights to use needs neither the optimiser state nor the
    stage state, nor the config that shaped them."""
    meta = self._check_meta(step, stage)
    where = os.path.join(self.directory, str(step))
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              abstract_subtree, restore_args=ocp.checkpoint_utils.construct_restore_args(
                  abstract_subtree), partial_restore=True)))["state"]
      self._verify(step, meta, restored)
    except DamagedCheckpointError as e:
      raise DamagedCheckpointError(f"{e}; restore the run from a copy, or pass an earlier step "
                                   f"(RUN/checkpoints/STEP; saved: {self.all_steps()}).") from None
    except (KeyError, ValueError, OSError, RuntimeError) as e:   # orbax / tensorstore reads
      raise DamagedCheckpointError(
          f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}): the checkpoint is "
          f"damaged or incomplete; restore the run from a copy, or pass an earlier step "
          f"(RUN/checkpoints/STEP; saved: {self.all_steps()}).") from None
    return restored

  def _check_meta(self, step: int, stage: str) -> dict:
    meta = self.read_meta(step)
    if meta.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(f"{self.directory}/{step}: format version {meta.get('format_version')} "
                            f"!= {FORMAT_VERSION}; it was written by an incompatible version.")
    if meta.get("stage") != stage:
      raise CheckpointError(f"{self.directory}/{step} holds a '{meta.get('stage')}' checkpoint, "
                            f"not '{stage}': use a fresh --workdir for this stage.")
    return meta

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def read_config(self, step: int) -> dict:
    """The resolved config the run that wrote `step` trained with (under current field names)."""
    return workdir.upgrade(self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])

  def wait(self) -> None:
    """Waits for the last save. One that failed to commit is retried once, then
    CheckpointError: call it only while the saved state is still the current one (no step
    ran since: the step donates its input state)."""
    self._wait()
    failed = self._failed_pending()
    if failed is None:
      return
    logging.warning("checkpoint step %d failed to commit (%s); retrying it", failed, self._error)
    step, args, metrics = self._pending
    self._manager.save(step, args=args, metrics=metrics, force=True)
    self._wait()
    self._raise_if_failed(f"saving step {failed} failed twice")

  def close(self) -> None:
    """Waits for the last save (a failure is logged: close runs on every exit path, where
    the saved state may be gone) and releases orbax's threads."""
    self._wait()
    failed = self._failed_pending()
    if failed is not None:
      logging.error("checkpoint step %d did not commit (%s)", failed, self._error)
    self._manager.close()


def last_committed(directory: str) -> str:
  """'step N' of the newest committed step in a checkpoint directory, or 'none' (read from
  the directory listing alone: it needs no manager and works while the disk is full)."""
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
  return f"step {steps[-1]} in {directory}" if steps else "none"


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


@jax.jit
def _leaf_sums(leaves: list[jax.Array]) -> jax.Array:
  """Two wrapping uint32 sums per leaf over its bits: plain and position-weighted. Integer
  sums are exact in any order, so the digest is the same on any mesh and after any restore."""

  def sums(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
      x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    bits = bits.astype(jnp.uint32).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + 1
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * weights,
                                                               dtype=jnp.uint32)])

  return jnp.stack([sums(x) for x in leaves]) if leaves else jnp.zeros((0, 2), jnp.uint32)


def fingerprint(tree: Any) -> dict[str, str]:
  """Path ("params/encoder/...") -> a digest of that array's bits, for every array leaf."""
  flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(x, (jax.Array, np.ndarray))]
  sums = np.asarray(jax.device_get(_leaf_sums([x for _, x in flat])))
  return {_path_name(p): hashlib.sha256(s.tobytes() + str(x.shape).encode()).hexdigest()[:16]
          for (p, x), s in zip(flat, sums)}


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _select(metrics: dict) -> float:
  return metrics["select"]


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
