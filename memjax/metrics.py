"""Pure metrics, including how evenly a memory's slots are used (memory-layers.md §6).

Shapes:
  indices [..., L] int   slots read (any leading shape; flattened)
  weights [..., L]       the softmax weight each read gave its slot
  z       [M]            total weight per slot, normalised to sum 1
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

USAGE_KEYS = ("used", "kl", "gini", "top50", "top90", "top99")


def slot_mass(indices, weights, num_slots: int):
  """z [M]: total weight each slot received, normalised to sum 1 (all zeros if no weight)."""
  if indices.shape != weights.shape:
    raise ValueError(f"weights.shape={weights.shape} must equal indices.shape={indices.shape}")
  if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots <= 0:
    raise ValueError(f"num_slots={num_slots!r} must be a positive int")
  mass = jax.ops.segment_sum(
      weights.reshape(-1).astype(jnp.float32), indices.reshape(-1), num_segments=num_slots)
  total = mass.sum()
  return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)


def _fewest_slots_for(z_desc_cumsum, fraction: float):
  # Fewest slots whose mass reaches `fraction` (a small tolerance absorbs fp32 rounding of the cumsum).
  return jnp.sum(z_desc_cumsum < fraction - 1e-6).astype(jnp.int32) + 1


def memory_usage(indices, weights, num_slots: int) -> dict:
  """Key-usage statistics of a memory over a set of reads.

  With z the per-slot mass (``slot_mass``) and M = ``num_slots``:
    used:  fraction of slots with z > 0, in [0, 1].
    kl:    KL(z || uniform) = log M + sum z log z (0 = perfectly even use; log M = one slot).
    gini:  1 - 2 mean(L) + 1/M with L = cumsum(sorted ascending z), the trapezoid Lorenz-curve form:
           0 for even use, 1 - 1/M when one slot takes all the mass.
    top50, top90, top99: fewest slots that carry 50/90/99% of the mass (int32 counts).

  Args:
    indices: [..., L] integer slots in [0, num_slots).
    weights: [..., L] non-negative weights (e.g. the per-head softmax).
    num_slots: M, static.

  Returns:
    dict of scalar arrays keyed by ``USAGE_KEYS``; jit-friendly.

  Example:
    >>> u = memory_usage(jnp.array([[0, 1], [2, 3]]), jnp.ones((2, 2)), 4)
    >>> float(u["kl"]), float(u["used"])
    (0.0, 1.0)
  """
  z = slot_mass(indices, weights, num_slots)
  m = num_slots
  used = jnp.mean((z > 0).astype(jnp.float32))
  z_log_z = jnp.where(z > 0, z * jnp.log(jnp.where(z > 0, z, 1.0)), 0.0)
  kl = jnp.log(jnp.float32(m)) + jnp.sum(z_log_z)
  z_asc = jnp.sort(z)
  gini = 1.0 - 2.0 * jnp.mean(jnp.cumsum(z_asc)) + 1.0 / m
  cum_desc = jnp.cumsum(z_asc[::-1])
  return {
      "used": used,
      "kl": kl,
      "gini": gini,
      "top50": _fewest_slots_for(cum_desc, 0.50),
      "top90": _fewest_slots_for(cum_desc, 0.90),
      "top99": _fewest_slots_for(cum_desc, 0.99),
  }


def bits_stored(exact_match_by_attribute, facts_by_attribute, values_by_attribute) -> dict:
  """Bits of knowledge a model reproduces, in the sense of Allen-Zhu & Li ("Physics of Language
  Models 3.3"), simple form: a fact of attribute ``a`` whose value is one of ``V_a`` equally likely
  values carries ``log2(V_a)`` bits, credited when the fact is answered exactly:

      bits = sum_a  exact_match_a * facts_a * log2(V_a)

  ``exact_match_by_attribute``: {attribute: QA exact match in [0, 1]} (the fraction of that
  attribute's facts answered; measured on a subset, it is extrapolated to ``facts_a``);
  ``facts_by_attribute``: {attribute: facts in the knowledge base}; ``values_by_attribute``:
  {attribute: V_a >= 1}. No credit is taken off for guessing: a model that always answers the most
  common value of an attribute is credited for the facts it gets right (report chance beside it).
  Returns ``{"bits": total, "by_attribute": {attribute: bits}}``.

  Example:
    >>> bits_stored({"city": 0.5}, {"city": 200}, {"city": 64})["bits"]
    600.0
  """
  import math

  by = {}
  for name, em in exact_match_by_attribute.items():
    if name not in facts_by_attribute or name not in values_by_attribute:
      raise ValueError(f"attribute {name!r} needs facts_by_attribute and values_by_attribute entries "
                       f"(have {sorted(facts_by_attribute)} and {sorted(values_by_attribute)})")
    if not 0.0 <= em <= 1.0:
      raise ValueError(f"exact_match_by_attribute[{name!r}]={em} must be in [0, 1]")
    if values_by_attribute[name] < 1:
      raise ValueError(f"values_by_attribute[{name!r}]={values_by_attribute[name]} must be >= 1")
    by[name] = float(em) * facts_by_attribute[name] * math.log2(values_by_attribute[name])
  return {"bits": float(sum(by.values())), "by_attribute": by}
