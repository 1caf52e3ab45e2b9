"""Logical axis names and the one mapping from them to mesh axes.

Every ``nnx.Param`` in memjax carries ``logical_axes`` metadata (``memjax.nn.param``), a tuple with
one name (or None) per dimension, taken from this file. Layers never name mesh axes; the mapping
from logical names to mesh axes (``axis_rules``) and the shard_map specs of the memory read and of
the row-sparse update live here alone.

Logical axes:
  batch        B, rows of a batch (activations)
  embed        C, the model width
  vocab        V, the vocabulary
  heads        N, attention heads             head_dim     Dh, attention head width
  mlp          F, FFN / expert hidden width   experts      E, MoE experts
  mem_heads    H, memory heads                mem_halves   2, the two halves of a product key
  mem_keys     n, sub-keys per half           mem_key_dim  Dk (query) or Dk/2 (sub-keys)
  slots        M = n*n, rows of the value table
  value_dim    Dv, columns of the value table

Mesh axes (``MESH_AXES``): ``data`` (batch), ``fsdp`` (batch and parameters' ``embed``), ``memory``
(the value table: ``value_dim`` in column mode, ``slots`` in row mode).
"""

from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

BATCH = "batch"
EMBED = "embed"
VOCAB = "vocab"
HEADS = "heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
EXPERTS = "experts"
MEM_HEADS = "mem_heads"
MEM_HALVES = "mem_halves"
MEM_KEYS = "mem_keys"
MEM_KEY_DIM = "mem_key_dim"
SLOTS = "slots"
VALUE_DIM = "value_dim"

LOGICAL_AXES = (BATCH, EMBED, VOCAB, HEADS, HEAD_DIM, MLP, EXPERTS, MEM_HEADS, MEM_HALVES, MEM_KEYS, MEM_KEY_DIM,
                SLOTS, VALUE_DIM)

MESH_AXES = ("data", "fsdp", "memory")


# ----- logical -> mesh rules: the one place that names mesh axes -------------------------------

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
  return NamedSharding(mesh, PartitionSpec(axis_rules()[BATCH], *([None] * (ndim - 1))))


def constrain_batch(x_BxE):
  """``x`` [B, ...], an activation, pinned to its batch split over ``data`` x ``fsdp`` when traced under
  a mesh that splits the batch (``jax.set_mesh``; automatic axes); unchanged otherwise (no mesh, one
  device, a batch the split does not divide, inside a ``shard_map``).

  This keeps FSDP what it says: each matmul gathers its ``embed``-sharded weight and computes on the
  device's rows. Left alone, GSPMD may instead split a projection over its contracting ``embed`` axis
  and keep whole-batch activations on every device: the 373M at fsdp=32 on v5p-64 kept 42 buffers
  f32[64, 2048, 4096] (the global batch's FFN hidden) per chip, 133 GiB of temporaries.

  Example:
    >>> constrain_batch(jax.numpy.ones((4, 3))).shape  # no mesh: unchanged
    (4, 3)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp"} <= set(mesh.axis_names) or mesh.manual_axes:
    return x_BxE
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if shards == 1 or x_BxE.shape[0] % shards:
    return x_BxE
  return jax.lax.with_sharding_constraint(x_BxE, PartitionSpec(axis_rules()[BATCH], *([None] * (x_BxE.ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  """Scalars, metrics and evaluation outputs: the same on every device."""
  return NamedSharding(mesh, PartitionSpec())


# ----- the memory read under a mesh ---------------------------------------------------------------


class MemoryReadSpecs(NamedTuple):
  """How ``memory.read.sharded_memory_read`` splits one read over the mesh (``jax.shard_map``).

  batch      the leading (token batch) dim over ``data`` x ``fsdp`` when they divide it
  table      the value table as ``axis_rules(value_sharding)`` splits it
  out_last   the read's Dv dim: ``memory`` in column mode (no communication), else None
  psum_axis  ``memory`` in row mode (the masked partial reads are summed over it), else None
  """

  batch: object
  table: PartitionSpec
  out_last: object
  psum_axis: str | None


class SparseUpdateSpecs(NamedTuple):
  """How ``optim.sharded_sparse_value_update`` splits the row-sparse update, consistent with the read.

  batch       the lookups' batch dim over ``data`` x ``fsdp`` (when they divide it)
  table       the value table (and its moments) as ``axis_rules(value_sharding)`` splits it
  dys_last    the tap cotangent's Dv dim: ``memory`` in column mode, else None
  batch_axes  mesh axes splitting the batch: the row gradients are merged over them
  table_axes  mesh axes splitting the table: the squared gradient norm is summed over them
  row_axis    ``memory`` in row mode (each device keeps the lookups of the rows it owns), else None
  """

  batch: object
  table: PartitionSpec
  dys_last: object
  batch_axes: tuple
  table_axes: tuple
  row_axis: str | None


def axis_names(spec_entry) -> tuple:
  """The mesh axes of one PartitionSpec entry: None -> (), "memory" -> ("memory",), a tuple as is."""
  return () if spec_entry is None else ((spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry))


def memory_read_specs(value_sharding: str, batch_size: int, table_shape: tuple) -> MemoryReadSpecs | None:
  """The ``MemoryReadSpecs`` of one read under the abstract mesh set by ``jax.set_mesh``, or None
  when there is no such mesh (the plain read is used)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
    return None
  rules = axis_rules(value_sharding)
  batch = spec_for((batch_size,), (BATCH,), rules, mesh)[0]
  table = spec_for(table_shape, (SLOTS, VALUE_DIM), rules, mesh)
  psum_axis = table[0] if table[0] is not None else None
  out_last = table[1] if len(table) > 1 else None
  return MemoryReadSpecs(batch, table, out_last, psum_axis)


def sparse_update_specs(value_sharding: str, batch_size: int, table_shape: tuple) -> SparseUpdateSpecs | None:
  """The ``SparseUpdateSpecs`` of one pool's update, or None without a mesh (``jax.set_mesh``) or on
  a 1-device mesh: the plain update runs."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size <= 1:
    return None
  specs = memory_read_specs(value_sharding, batch_size, table_shape)
  if specs is None:
    return None
  table_axes = tuple(a for s in specs.table for a in axis_names(s))
  return SparseUpdateSpecs(specs.batch, specs.table, specs.out_last, axis_names(specs.batch), table_axes,
                           specs.psum_axis)
