"""Orbax checkpoints holding the train state, the data iterator state and the resolved config.

Async and atomic (orbax commits a step directory only when every item is written), keep the
latest N plus, for stages that evaluate, the best on val (orbax preservation policies: a
save that carries metrics competes for "best"; resume always takes the latest step),
restored straight into the concrete shardings of the running mesh. A format version
guards against loading checkpoints from an incompatible layout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

FORMAT_VERSION = 2   # 2: TrainState.extra (stage state)
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, keep_best: bool = False,
               async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
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
           stage: str, metrics: dict | None = None) -> None:
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "stage": stage, "step": step}))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              stage: str) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying NamedShardings)."""
    self._check_meta(step, stage)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def restore_subtree(self, step: int, abstract_subtree: dict, stage: str) -> dict:
    """Restores only the named parts of the saved train state, e.g. {"params": ...} or
    {"extra": {"ema": ...}}: loading weights to use needs neither the optimiser state nor the
    stage state, nor the config that shaped them."""
    self._check_meta(step, stage)
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        abstract_subtree, restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_subtree), partial_restore=True)))
    return restored["state"]

  def _check_meta(self, step: int, stage: str) -> None:
    meta = self.read_meta(step)
    if meta.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(f"{self.directory}/{step}: format version {meta.get('format_version')} "
                            f"!= {FORMAT_VERSION}; it was written by an incompatible version.")
    if meta.get("stage") != stage:
      raise CheckpointError(f"{self.directory}/{step} holds a '{meta.get('stage')}' checkpoint, "
                            f"not '{stage}': use a fresh --workdir for this stage.")

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def read_config(self, step: int) -> dict:
    """The resolved config the run that wrote `step` trained with."""
    return self._manager.restore(
        step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _select(metrics: dict) -> float:
  return metrics["select"]


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
