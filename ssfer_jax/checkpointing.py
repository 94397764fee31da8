"""Orbax checkpoints holding the train state, the data iterator state and the resolved config.

Async and atomic (orbax commits a step directory only when every item is written), keep-N,
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

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  pass


class Checkpointer:

  def __init__(self, workdir: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any | None, config_json: dict,
           stage: str) -> None:
    items = dict(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_json),
        meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "stage": stage, "step": step}))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None,
              stage: str) -> Any:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying NamedShardings)."""
    meta = self.read_meta(step)
    if meta.get("format_version") != FORMAT_VERSION:
      raise CheckpointError(f"{self.directory}/{step}: format version {meta.get('format_version')} "
                            f"!= {FORMAT_VERSION}; it was written by an incompatible version.")
    if meta.get("stage") != stage:
      raise CheckpointError(f"{self.directory}/{step} holds a '{meta.get('stage')}' checkpoint, "
                            f"not '{stage}': use a fresh --workdir for this stage.")
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def read_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)
