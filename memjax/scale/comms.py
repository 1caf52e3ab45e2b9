"""The collectives in a compiled XLA program: what a sharded train step sends between devices.

``collectives(compiled)`` parses ``compiled.as_text()`` (post-optimisation HLO, after SPMD
partitioning) and returns one ``Collective`` per all-gather / all-reduce / reduce-scatter /
all-to-all / collective-permute instruction, with its result shapes (per device) and bytes.

Bytes are those of the instruction's result on one device (for an all-gather: the gathered array;
for a reduce-scatter: the scattered shard), the size a ring implementation moves up to a factor
(n-1)/n (all-gather, reduce-scatter) or 2(n-1)/n (all-reduce). Instructions inside loops are counted
once (the step's HLO is loop-free unless a backend adds a ``while``).

Example (``memjax.train.step.compile_train_step`` compiles the step the training loop runs)::

  compiled, _ = compile_train_step(model_cfg, train_cfg, {"data": 2, "fsdp": 1, "memory": 4})
  for c in collectives(compiled):
    print(c.kind, c.shapes, c.bytes)
"""

from __future__ import annotations

import dataclasses
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

# `%name = f32[8,16]{1,0} all-gather(...)` or a tuple result `(f32[8]{0}, s32[2]{0}) all-reduce(...)`;
# async pairs appear as `all-gather-start` / `all-gather-done`: the start is counted.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>\(.*?\)|\S+)\s+"
                    r"(?P<op>" + "|".join(KINDS) + r")(?P<suffix>-start)?\(")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of KINDS
  shapes: tuple  # ((dtype, (dims...)), ...) of the per-device result
  bytes: int  # bytes of the result on one device
  replica_groups: str  # as printed, e.g. "{{0,1},{2,3}}" or "mesh['axis_0'=2,'axis_1'=4] {'axis_1'}"
  line: str


def _parse_shapes(type_text: str) -> tuple:
  shapes = []
  for m in _ARRAY.finditer(type_text):
    if m.group("dtype") not in DTYPE_BYTES:
      continue
    dims = tuple(int(d) for d in m.group("dims").split(",") if d)
    shapes.append((m.group("dtype"), dims))
  return tuple(shapes)


def _nbytes(shapes) -> int:
  total = 0
  for dtype, dims in shapes:
    n = 1
    for d in dims:
      n *= d
    total += n * DTYPE_BYTES[dtype]
  return total


def parse_collectives(hlo_text: str) -> list[Collective]:
  """Every collective instruction of an HLO module's text."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    shapes = _parse_shapes(m.group("type"))
    if m.group("suffix"):  # async start: result is (operands..., results...); keep the second half
      shapes = shapes[len(shapes) // 2:] if len(shapes) > 1 else shapes
    groups = re.search(r"replica_groups=(.*?)(?:, [a-z_]+=|$)", line)
    out.append(Collective(m.group("op"), shapes, _nbytes(shapes), groups.group(1) if groups else "",
                          line.strip()))
  return out


def collectives(compiled) -> list[Collective]:
  """Collectives of a ``jax.stages.Compiled`` (``jit(f).lower(...).compile()``)."""
  return parse_collectives(compiled.as_text())


def summarize(colls: list[Collective]) -> dict:
  """{kind: {"count": n, "bytes": total}} over the collectives given."""
  out: dict = {}
  for c in colls:
    entry = out.setdefault(c.kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += c.bytes
  return out


def gathers_of_shape(colls: list[Collective], shape: tuple) -> list[Collective]:
  """All-gathers whose result holds an array of exactly ``shape`` (e.g. a full value table)."""
  shape = tuple(shape)
  return [c for c in colls if c.kind == "all-gather" and any(dims == shape for _, dims in c.shapes)]
