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
