"""Logical axis names: the only vocabulary layers use to describe how their parameters split.

Every ``nnx.Param`` in memjax carries ``logical_axes`` metadata, a tuple with one name (or None)
per dimension. Layers never name mesh axes; the mapping from these logical names to mesh axes
lives in this file alone.

Glossary:
  embed        C, the model width
  mem_heads    H, memory heads
  mem_halves   2, the two halves of a product key
  mem_keys     n, sub-keys per half
  mem_key_dim  Dk (query) or Dk/2 (sub-keys)
  slots        M = n*n, rows of the value table
  value_dim    Dv, columns of the value table
"""

EMBED = "embed"
MEM_HEADS = "mem_heads"
MEM_HALVES = "mem_halves"
MEM_KEYS = "mem_keys"
MEM_KEY_DIM = "mem_key_dim"
SLOTS = "slots"
VALUE_DIM = "value_dim"

LOGICAL_AXES = (EMBED, MEM_HEADS, MEM_HALVES, MEM_KEYS, MEM_KEY_DIM, SLOTS, VALUE_DIM)


def logical_axes_of(variable) -> tuple | None:
  """The ``logical_axes`` metadata of an NNX variable (None if it has none)."""
  return variable.get_metadata().get("logical_axes")


# ----- logical -> mesh rules: the one place that names mesh axes -------------------------------

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec  # noqa: E402

MESH_AXES = ("data", "fsdp", "memory")
BATCH = "batch"


def axis_rules(value_sharding: str = "column") -> dict:
  """Logical axis -> mesh axis (or tuple of axes, or None = replicated).

  Activations split their batch over ``data`` and ``fsdp``; parameters split ``embed`` over
  ``fsdp`` (FSDP); the value table splits ``value_dim`` ("column") or ``slots`` ("row") over
  ``memory``, and so do the Memory+ matrices W1/W2 in column mode. Everything else is replicated.
  """
  if value_sharding not in ("column", "row"):
    raise ValueError(f"value_sharding={value_sharding!r} is invalid; allowed: ['column', 'row']")
  return {
      BATCH: ("data", "fsdp"),
      EMBED: "fsdp",
      SLOTS: "memory" if value_sharding == "row" else None,
      VALUE_DIM: "memory" if value_sharding == "column" else None,
  }


def spec_for(shape, axes, rules: dict, mesh: Mesh) -> PartitionSpec:
  """The PartitionSpec of one array from its logical axes; a dimension the mesh axes do not
  divide stays replicated (so odd vocabularies or tiny tables still work on any mesh)."""
  if axes is None:
    return PartitionSpec()
  out, used = [], set()
  for dim, name in zip(shape, axes):
    mesh_axes = rules.get(name)
    if mesh_axes is None:
      out.append(None)
      continue
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    names = tuple(a for a in names if a not in used and mesh.shape.get(a, 1) > 1)
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    if not names or dim % size:
      out.append(None)
      continue
    used.update(names)
    out.append(names[0] if len(names) == 1 else names)
  return PartitionSpec(*out)


def make_mesh(sizes: dict, devices=None) -> Mesh:
  """A mesh with axes ("data", "fsdp", "memory") of the given sizes (GSPMD ``Auto`` axis types)."""
  devices = jax.devices() if devices is None else devices
  shape = tuple(sizes[a] for a in MESH_AXES)
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh sizes {sizes} need {int(np.prod(shape))} devices, have {len(devices)}")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def state_shardings(state, mesh: Mesh, rules: dict):
  """NamedShardings for an ``nnx.State`` (or any tree of Variables) from their ``logical_axes``."""
  from flax import nnx

  def one(v):
    if isinstance(v, nnx.Variable):
      axes = v.get_metadata().get("logical_axes")
      value = v.get_value()
      return NamedSharding(mesh, spec_for(value.shape, axes, rules, mesh))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Inputs [B, T, ...]: batch over data x fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
