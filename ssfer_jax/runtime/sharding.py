"""Device mesh, logical-axis rules and the shardings handed to `jax.jit`.

Models annotate parameters with logical names ('embed', 'mlp', ...); the config maps
those names to mesh axes. FSDP is then just a rule (`('embed', 'fsdp')`): on a mesh whose
`fsdp` axis has size 1 the same rules mean plain data parallelism. No `jax.set_mesh`
here or in model code: shardings are explicit arguments of `jax.jit` (docs/REFERENCE.md §4).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ssfer_jax import errors

BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry with "the rest" of the devices (as MaxText's ici_*_parallelism)."""
  shape = [int(s) for s in shape]
  if shape.count(-1) > 1:
    raise errors.ConfigError(f"mesh.shape {shape}: at most one axis may be -1.")
  if any(s == 0 or s < -1 for s in shape):
    raise errors.ConfigError(f"mesh.shape {shape}: sizes must be positive or -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise errors.ConfigError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} needs {math.prod(shape)} devices; "
                             f"{num_devices} are present. Use -1 for one axis to take the rest.")
  return tuple(shape)


def single_device_mesh() -> Mesh:
  """A (1, 1) mesh on the first device: loading weights for single-device use (prediction,
  export), wherever the run that wrote them was sharded."""
  return make_mesh((1, 1), devices=jax.devices()[:1])


def make_mesh(shape: Sequence[int], axes: Sequence[str] = BATCH_AXES,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  if len(shape) != len(axes):
    raise errors.ConfigError(f"mesh.shape {tuple(shape)} and mesh.axes {tuple(axes)} differ in length.")
  missing = [a for a in BATCH_AXES if a not in axes]
  if missing:
    raise errors.ConfigError(f"mesh.axes {tuple(axes)} lacks {missing}; the batch is split over "
                             f"{BATCH_AXES}.")
  resolved = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(resolved, tuple(axes), axis_types=(AxisType.Auto,) * len(axes),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = num_batch_shards(mesh)
  if global_batch_size % n:
    raise errors.ConfigError(f"{what}={global_batch_size} is not divisible by the {n} batch shards "
                             f"of the mesh {dict(mesh.shape)} (axes {BATCH_AXES}).")
  if global_batch_size % jax.process_count():
    raise errors.ConfigError(f"{what}={global_batch_size} is not divisible by the "
                             f"{jax.process_count()} processes.")


def logical_shardings(abstract_boxed: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicalPartitioned` boxes.

  Unannotated leaves (step counters, optimiser counts) are replicated. A rule that would
  split a dimension unevenly is reported with the parameter's path and shape.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])
  unboxed = nn.meta.unbox(abstract_boxed)
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(unboxed),
                                    jax.tree_util.tree_leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
      if dim % size:
        raise errors.ConfigError(
            f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be split "
            f"{size} ways along {axes} (sharding {sharding.spec}); change sharding_rules or mesh.shape.")
  return shardings


def describe(mesh: Mesh) -> str:
  kinds = sorted({d.device_kind for d in np.ravel(mesh.devices)})
  return (f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices ({', '.join(kinds)}), "
          f"{jax.process_count()} process(es)")
