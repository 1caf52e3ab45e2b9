"""Per-device memory, FLOPs and communication of a training run, from formulas (nothing compiled).

  python -m memjax.plan --config=configs/paper_373m.py --mesh data=8,memory=1
  python -m memjax.plan --config=configs/paper_8b.py --mesh data=8,fsdp=8,memory=4 --json
  python -m memjax.plan --config=configs/paper_1b3.py --mesh fsdp=16,memory=2 --compiler=tpu
  (``memjax.plan`` is this module's command name; ``python -m memjax.scale.plan`` is the same)

Shapes: B global batch, b = B / (data * fsdp) per device, T sequence, C width, L layers, V vocab,
N query heads, Dh head width, F FFN hidden, and for memory H heads, k top-k, n sub-keys, M = n^2
slots, Dk key width, Dv value width; m = the ``memory`` axis size.

Per device (fp32 unless the config says otherwise):
  parameters   each parameter's shard under ``sharding.axis_rules`` (``spec_for`` on its logical axes)
  optimizer    Adam moments: 2 x the parameter shards (fp32), for the values too (dense or sparse)
  activations  what the backward pass keeps, per token of a block (``_activation_floats``), the
               logits (3 V per token: logits, softmax, its gradient), and per memory layer the
               gathered value rows [tokens, H k, Dv_local] (Dv/m in column mode, Dv in row mode)
               of an XLA read (CPU only: the TPU and CUDA compilers gather them again)
  temporaries  the larger of two phases, which XLA schedules apart and overlays in memory:
                 backward: activations + parameter gradients (+ dense: one [rows, Dv_local] value
                           gradient per memory layer, each reader's own scatter into zeros);
                 update:   2 x (parameter gradients + dense per-layer value gradients) when the
                           batch is split (the gradients and their all-reduced copies), 1 x if not;
                           sparse: the local row gradients [lookups, Dv_local] (one row per
                           lookup, the kernel's output), the merged row gradients [S, Dv_local]
                           and their psum, S = min(global lookups, table rows on the device + 1)
                           per table; without
                           batch shards the 1-device step's ~5 [lookups, Dv] buffers.
               (``gradients_bytes`` is the update phase; ``temp_bytes`` the larger one.)
               Checked against XLA's ``memory_analysis`` by ``benchmarks/plan_check.py``. The TPU
               and CUDA compilers keep other multiples of the value table (``COMPILERS``, the
               ``compiler`` argument; docs/planner.md, ``benchmarks/plan_probes.py``).
  FLOPs/token  3 x ``ModelConfig.flops_per_token`` (which counts 2 FLOPs per multiply-add): forward +
               backward (twice the forward)
  gathered     bytes of value rows one token reads: ``MemoryConfig.bytes_read_per_token`` x layers
  comms/step   data-parallel gradient all-reduce of the replicated parameter shards (and of the
               value table's shard in dense mode; sparse: an all-gather of the lookups' row ids and a
               psum of the merged row gradients); FSDP gathers of the embed-sharded parameters
               (forward + backward) and a reduce-scatter of their grads; column mode: a reduce of the
               memory read [b T, C] per memory layer (fwd + bwd); row mode: a psum of the partial
               reads [b T, Dv] per memory layer (fwd + bwd).
"""

from __future__ import annotations

import functools
import json
import math
import sys
import types

from memjax.config import ModelConfig, TrainConfig


def parse_mesh(text: str) -> dict:
  """"data=8,memory=4" -> {"data": 8, "fsdp": 1, "memory": 4}."""
  sizes = {"data": 1, "fsdp": 1, "memory": 1}
  for part in filter(None, (p.strip() for p in text.split(","))):
    name, _, value = part.partition("=")
    if name not in sizes or not value.isdigit() or int(value) < 1:
      raise ValueError(f"--mesh part {part!r} is invalid: use data=N,fsdp=N,memory=N with N >= 1")
    sizes[name] = int(value)
  return sizes


def _shard_elems(shape, axes, rules, sizes) -> int:
  from memjax import sharding
  spec = sharding.spec_for(shape, axes, rules, types.SimpleNamespace(shape=sizes))
  count = 1
  for dim, s in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if s is None else ((s,) if isinstance(s, str) else tuple(s))
    count *= dim // math.prod(sizes[a] for a in names)
  return count


def parameter_shards(model_cfg: ModelConfig, sizes: dict) -> dict:
  """{"params", "values", "replicated"}: per-device element counts (replicated = no axis splits it)."""
  import dataclasses
  # Only shapes and shardings matter: remat and dtype do not change them (cached across layouts).
  key = dataclasses.replace(model_cfg, remat="none", dtype="float32")
  return dict(_parameter_shards(key, tuple(sorted(sizes.items()))))


@functools.lru_cache(maxsize=256)
def _parameter_shards(model_cfg: ModelConfig, sizes_items: tuple) -> dict:
  sizes = dict(sizes_items)
  import jax
  from flax import nnx

  from memjax import sharding
  from memjax.memory.layer import MemoryValue
  from memjax.model import LM

  rules = sharding.axis_rules(model_cfg.memory.value_sharding)
  abstract = nnx.eval_shape(lambda: LM(model_cfg, rngs=nnx.Rngs(0)))
  out = {"params": 0, "values": 0, "replicated": 0, "fsdp_full": 0, "value_dtype_bytes": 4}
  for _, var in nnx.iter_graph(abstract):
    if not isinstance(var, nnx.Variable):
      continue
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes")
    elems = _shard_elems(value.shape, axes, rules, sizes)
    if isinstance(var, MemoryValue):
      out["values"] += elems
      out["value_dtype_bytes"] = jax.numpy.dtype(value.dtype).itemsize
    else:
      out["params"] += elems
      full = math.prod(value.shape)
      if elems == full:
        out["replicated"] += elems
      else:
        out["fsdp_full"] += full
  return out


COMPILERS = ("xla", "tpu", "gpu")
# What the backward pass keeps differs by compiler: XLA on CPU keeps about what the jaxpr names
# ("xla"); XLA on TPU fuses more and keeps one copy of the attention probabilities and much less
# around the FFN ("tpu"). Both were fitted to ``memory_analysis`` of compiled steps (CPU: the 373M on
# 8 and 64 fake devices; TPU v5p and H100: 2- and 4-block probes of the 373M at 1024 and 2048 tokens,
# with and without remat and bf16; docs/planner.md has the comparison). "gpu" is "xla" with what the
# CUDA compiler was measured to keep less of (probes in docs/planner.md): an XLA read's gathered value
# rows are recomputed in the backward, not kept, and with batch shards the dense value gradient is one
# running sum (two [rows, Dv] buffers), not one buffer per reader.


def compiler_for(platform: str) -> str:
  """The planner's compiler model for a target platform: "tpu" -> "tpu", "cuda" -> "gpu", else "xla".

  >>> compiler_for("cuda")
  'gpu'
  """
  return {"tpu": "tpu", "cuda": "gpu"}.get(platform, "xla")


def _activation_floats(cfg: ModelConfig, seq_len: int, kind: str, compiler: str = "xla") -> int:
  """Floats per token one block keeps for the backward pass (no rematerialisation)."""
  c, nh, dh, t = cfg.dim, cfg.num_heads, cfg.head_dim, seq_len
  if compiler == "tpu":
    attn = 2 * c + 4 * nh * dh + nh * t  # x, h; q, k, v, attention output; the probabilities
    ffn = {"dense": cfg.mlp_dim, "moe": cfg.moe.top_k * cfg.moe_mlp_dim + cfg.moe.num_experts}
  else:
    attn = 4 * c + 5 * nh * dh + 2 * nh * t  # norms, x, h; q, k, v, rotated q/k; scores and probabilities
    ffn = {"dense": 4 * cfg.mlp_dim, "moe": 4 * cfg.moe.top_k * cfg.moe_mlp_dim + cfg.moe.num_experts}
  if kind in ffn:
    return attn + ffn[kind]
  if kind == "peer":  # a formula by analogy with the memory layer's, not fitted to memory_analysis
    p = cfg.peer
    h, k, n, dk = p.heads, p.top_k, p.n_keys, p.key_dim
    peer = 2 * h * dk + 2 * h * 2 * n + 3 * h * k * k + 4 * h * k + h * k * c + 2 * c  # + the gathered u_i rows
    return attn + (peer // 2 if compiler == "tpu" else peer)
  mem = cfg.memory.layer
  h, k, n, dk, dv = mem.heads, mem.k, mem.n_keys, mem.key_dim, mem.value_dim
  memory = 2 * h * dk + 2 * h * 2 * n + 3 * h * k * k + 4 * h * k + 5 * dv
  return attn + (memory // 2 if compiler == "tpu" else memory)


def _matmul_floats(cfg: ModelConfig, kind: str) -> int:
  """Floats per token of a block's matmul outputs (what ``model.remat="matmuls"`` keeps)."""
  c, hd = cfg.dim, cfg.num_heads * cfg.head_dim
  attn = 3 * hd + c  # q, k, v projections and the output projection
  if kind == "dense":
    return attn + 2 * cfg.mlp_dim + c
  if kind == "moe":
    return attn + cfg.moe.num_experts + cfg.moe.top_k * (2 * cfg.moe_mlp_dim + c)
  if kind == "peer":
    p = cfg.peer
    return attn + p.heads * p.key_dim + 2 * p.heads * p.top_k + c  # query; <u_i, x> and weights; the bag
  mem = cfg.memory.layer
  return attn + mem.heads * mem.key_dim + 2 * mem.value_dim + c  # query; W1 and the read; W2


def _table_shard(model_cfg: ModelConfig, sizes: dict) -> tuple[int, int]:
  """(rows, columns) of one value table on one device under the mesh's sharding rules."""
  from memjax import sharding
  mem = model_cfg.memory.layer
  rules = sharding.axis_rules(model_cfg.memory.value_sharding)
  spec = sharding.spec_for((mem.num_slots, mem.value_dim), (sharding.SLOTS, sharding.VALUE_DIM), rules,
                           types.SimpleNamespace(shape=sizes))
  split = lambda s: 1 if s is None else math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s))
  spec = tuple(spec) + (None,) * (2 - len(spec))
  return mem.num_slots // split(spec[0]), mem.value_dim // split(spec[1])


# XLA on CUDA keeps this fraction of a block's activations as the CPU formula counts them
# (benchmarks/plan_probes.py: 6 blocks of the 373M on 8 x H200 at 8192 tokens a device, the sparse
# update behind ``train.update_barrier``: 19.9 GB of temporaries where the CPU formula says 23.3).
_GPU_BLOCK_FRACTION = 0.83


def activation_bytes(model_cfg: ModelConfig, seq_len: int, tokens: int, compiler: str = "xla") -> int:
  """Bytes the backward pass keeps for ``tokens`` tokens (one microbatch) on one device.

  ``model.remat``: "none" keeps every block's activations; "full" each block's input (C per token)
  plus one block's activations while it is recomputed; "matmuls" each block's matmul outputs plus one
  block being recomputed. ``model.dtype`` "bfloat16" halves the blocks' activations; the logits
  (and their softmax and gradient) stay fp32.
  """
  if compiler not in COMPILERS:
    raise ValueError(f"compiler={compiler!r}; allowed: {list(COMPILERS)}")
  mem = model_cfg.memory.layer
  kinds = [model_cfg.block_kind(i) for i in range(model_cfg.num_layers)]
  full = [_activation_floats(model_cfg, seq_len, k, compiler) for k in kinds]
  if compiler == "gpu":  # what XLA on CUDA keeps of them (fitted: gpu_sparse_b32, backward-bound)
    full = [int(_GPU_BLOCK_FRACTION * f) for f in full]
  if model_cfg.remat == "none":
    blocks = sum(full)
  elif model_cfg.remat == "full":
    blocks = model_cfg.num_layers * model_cfg.dim + max(full)
  else:
    blocks = sum(_matmul_floats(model_cfg, k) for k in kinds) + max(full)
  # bf16 halves what XLA on CPU/GPU keeps; on TPU the compiler kept no less in bf16 than in fp32 (measured).
  width = 2 if model_cfg.dtype == "bfloat16" and compiler != "tpu" else 4
  n_mem = len(model_cfg.memory.layers)
  logits = (1.5 if compiler == "tpu" else 3) * model_cfg.vocab_size + 2 * model_cfg.dim
  # Each memory layer's gathered value rows [tokens, H k, Dv], when the read is XLA's gather (backend
  # "xla", and "auto" with the sparse update, which reads with XLA): the kernels keep none, and the TPU
  # and CUDA compilers gather them again in the backward (benchmarks/plan_probes.py: 6 blocks of the
  # 373M on 8 x H200 keep 8.1 GiB more for twice the tokens, where keeping the rows would add 16.9).
  xla_read = model_cfg.memory.backend == "xla" or (model_cfg.memory.backend == "auto" and model_cfg.memory.row_sparse)
  xla_read = xla_read and compiler == "xla"
  rows = n_mem * mem.heads * mem.k * mem.value_dim if xla_read and model_cfg.remat != "full" else 0
  return int(tokens * (width * (blocks + rows) + 4 * logits))


def plan(model_cfg: ModelConfig, train_cfg: TrainConfig, sizes: dict, *, compiler: str = "xla") -> dict:
  """The per-device plan as a flat dict of numbers (bytes, FLOPs).

  ``compiler`` is the one whose memory use is modelled (``COMPILERS``: "xla" = XLA on CPU, "tpu", "gpu" = CUDA;
  ``compiler_for(platform)`` picks it for a target).
  ``train.microbatches`` k: the activations of one microbatch (tokens / k), plus an fp32 accumulator
  of the parameter gradients (and, for the sparse update, the whole batch's row-gradient inputs).
  """
  mem = model_cfg.memory.layer
  devices = math.prod(sizes.values())
  batch_shards = sizes["data"] * sizes["fsdp"]
  b, t = train_cfg.batch_size // batch_shards, train_cfg.seq_len
  tokens = b * t
  shards = parameter_shards(model_cfg, sizes)
  vb = shards["value_dtype_bytes"]
  params_bytes = 4 * shards["params"] + vb * shards["values"]
  opt_bytes = 2 * 4 * (shards["params"] + shards["values"])
  n_mem = len(model_cfg.memory.layers)
  sparse = model_cfg.memory.row_sparse
  lookups = n_mem * tokens * mem.heads * mem.k
  global_lookups = lookups * batch_shards
  p_bytes = 4 * shards["params"]
  # The value table's shard on one device: [rows, dv] (row mode splits rows, column mode dv).
  rows, dv = _table_shard(model_cfg, sizes)
  tables = 1 if model_cfg.memory.shared else n_mem
  # Activations: what the backward keeps per token (``activation_bytes``), for one microbatch.
  k_micro = train_cfg.microbatches
  act_bytes = activation_bytes(model_cfg, t, tokens // k_micro, compiler)
  if k_micro > 1:  # fp32 accumulators: the parameter gradients, and the value gradient (dense) or the
    # whole batch's row-gradient inputs (sparse: the reads' cotangents [tokens, Dv] and ids, weights)
    act_bytes += p_bytes + (n_mem * tokens * 4 * dv + 2 * 4 * lookups if sparse else 4 * shards["values"])
  # Two phases peak apart (XLA reuses the activations' memory for the update):
  #   backward  activations + the parameter gradients + (dense) one [rows, dv] value gradient per
  #             memory layer (each reader's gradient is its own scatter into zeros until they are summed)
  #   update    every gradient and its all-reduced copy (one tuple all-reduce over the batch axes when
  #             they split the batch), 2 x (parameter gradients + per-layer value gradients); sparse:
  #             the local row gradients [lookups, dv] (the whole batch's lookups under microbatches),
  #             the merged row gradients [S, dv] and their psum (S = min(global lookups, rows + 1)
  #             distinct rows), Adam running over chunks of them in memory freed by the kernel.
  #             Without batch shards the sparse step is the 1-device one: the row-gradient kernel and
  #             Adam over all lookups, ~5 [lookups, dv] fp32 buffers.
  copies = 2 if batch_shards > 1 else 1
  if sparse and n_mem:
    backward = act_bytes + p_bytes
    if batch_shards > 1:
      merged_rows = min(global_lookups // tables, rows + 1) * tables
      # The row-gradient kernel returns one row per local lookup, [lookups, dv], before the merge into
      # the [S, dv] buffer and its psum: measured on TPU and on H100 (the 1.3B at 32 microbatches
      # (whole-batch lookups): 192 GiB of local row gradients; compiler 203 GiB of temporaries).
      # XLA on CUDA, without microbatches, behind the barrier, psums the merged rows in place: one
      # [S, dv] buffer (gpu_sparse_b16: 11.1 GB of temporaries; lookups + 2 S rows would be 15.0).
      merged_copies = 1 if compiler == "gpu" and k_micro == 1 else 2
      update = 4 * dv * (lookups + merged_copies * merged_rows)
      if compiler != "tpu":  # CPU/GPU: also the parameter gradients and their all-reduced copies
        update = max(update, copies * (p_bytes + 4 * merged_rows * dv))
    else:
      update = copies * p_bytes + 5 * 4 * global_lookups * dv
  else:
    table_bytes = 4 * rows * dv  # one table's shard (a gradient of it, fp32)
    readers = n_mem // tables if n_mem else 0  # memory layers reading each table
    value_grads = n_mem * table_bytes
    backward = act_bytes + p_bytes + value_grads
    update = copies * (p_bytes + value_grads)
    if compiler == "tpu" and n_mem:
      # Measured on v5p (373M blocks, dense update, remat full, tables of 1 and 4 GiB a device, 1 to 3
      # readers, 1 and 2 microbatches, meshes 1/1/4 and 1/4/1): the update keeps (2 r + copies) table
      # shards for r >= 2 readers (each reader's scatter and its copy, the sum; 7.0 and 7.7 x at r = 3,
      # 5.0 x at r = 2) and `copies` for one reader; microbatches add no value accumulator beyond that.
      # Those shards are the readers' gradients as the backward makes them, so the backward holds them
      # beside the activations (under microbatches, inside the loop: the 1.3B at mesh 1/2/2 with 64
      # microbatches keeps 74.7 GB where r shards would make 46.1; tpu_fsdp4_r3_v4_k2 36.6 GiB, -12% -> -1%).
      kept = tables * table_bytes * (copies if readers == 1 else 2 * readers + copies)
      update = copies * p_bytes + kept
      backward += kept - value_grads
    elif compiler == "gpu" and n_mem and batch_shards > 1:
      # Measured on H200 (373M blocks, fsdp 8, a 4 GiB table, 3 readers, 1 and 2 microbatches): the
      # readers' gradients go into one running sum (the accumulator under microbatches), two [rows, dv]
      # buffers in all; the update all-reduces that sum. (A 16 GiB table, past the compiler's memory
      # limit, kept 3.7: docs/planner.md.)
      summed = tables * table_bytes
      backward += 2 * summed - value_grads - (summed if k_micro > 1 else 0)
      update = copies * (p_bytes + summed)
  grad_bytes = update
  temp_bytes = max(backward, update)
  batch_bytes = 5 * 4 * tokens

  fwd = model_cfg.flops_per_token(t)
  comm = {}
  if sizes["data"] * sizes["fsdp"] > 1 or sizes["memory"] > 1:
    comm["all-reduce grads"] = 4 * shards["replicated"] if batch_shards > 1 else 0
    if batch_shards > 1 and n_mem and not sparse:  # the dense value gradient, per table shard
      comm["all-reduce value grads"] = 4 * shards["values"]
  if sizes["fsdp"] > 1:
    comm["fsdp all-gather params"] = 2 * 4 * shards["fsdp_full"]
    comm["fsdp reduce-scatter grads"] = 4 * shards["fsdp_full"] // sizes["fsdp"]
  if sizes["memory"] > 1 and n_mem:
    width = model_cfg.dim if model_cfg.memory.value_sharding == "column" else mem.value_dim
    comm[f"memory read reduce ({model_cfg.memory.value_sharding})"] = 2 * n_mem * 4 * tokens * width
  if sparse and n_mem and batch_shards > 1:  # all-gather the row ids, psum the merged row gradients
    comm["sparse update row ids"] = 4 * global_lookups
    comm["sparse update psum rows"] = 4 * min(global_lookups // tables, rows + 1) * tables * dv
  return {
      "devices": devices, "mesh": sizes, "tokens_per_device": tokens,
      "param_count": model_cfg.param_counts()["total"],
      "parameters_bytes": params_bytes, "optimizer_bytes": opt_bytes, "gradients_bytes": grad_bytes,
      "activations_bytes": act_bytes, "batch_bytes": batch_bytes, "temp_bytes": temp_bytes,
      "arguments_bytes": params_bytes + opt_bytes + batch_bytes,
      "total_bytes": 2 * (params_bytes + opt_bytes) + batch_bytes + temp_bytes,
      "train_flops_per_token": 3 * fwd, "forward_flops_per_token": fwd,
      "value_bytes_gathered_per_token": n_mem * mem.bytes_read_per_token(),
      "comm_bytes_per_step": comm, "comm_total_bytes_per_step": sum(comm.values()),
  }


def _fmt(n: float) -> str:
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def format_plan(p: dict) -> str:
  lines = [f"mesh {p['mesh']} ({p['devices']} devices), {p['tokens_per_device']} tokens/device/step, "
           f"{p['param_count'] / 1e6:,.1f}M parameters",
           f"  parameters      {_fmt(p['parameters_bytes'])}",
           f"  optimizer       {_fmt(p['optimizer_bytes'])}",
           f"  activations     {_fmt(p['activations_bytes'])}",
           f"  update temps    {_fmt(p['gradients_bytes'])}",
           f"  temporaries     {_fmt(p['temp_bytes'])}   (max of backward and update phases)",
           f"  total (peak)    {_fmt(p['total_bytes'])}   (state in + state out + temporaries)",
           f"  FLOPs/token     {p['train_flops_per_token'] / 1e9:.2f} GFLOP train "
           f"({p['forward_flops_per_token'] / 1e9:.2f} forward)",
           f"  value bytes gathered/token  {_fmt(p['value_bytes_gathered_per_token'])}",
           f"  communication/step  {_fmt(p['comm_total_bytes_per_step'])}"]
  lines += [f"    {k:28s} {_fmt(v)}" for k, v in p["comm_bytes_per_step"].items()]
  return "\n".join(lines)


def compare_with_xla(config_path: str, sizes: dict, *, batch_size=None, seq_len=None, value_update=None,
                     value_sharding=None, backend="xla", overrides=()) -> dict:
  """The plan of a configs/*.py file next to XLA's ``memory_analysis`` of the same sharded train step,
  compiled ahead of time on this process's devices (``jax.devices()``, e.g. fake CPU devices).

  Compared per device: arguments (parameters + optimizer state + batch) with XLA's argument bytes;
  temporaries with XLA's temp bytes; their sum with argument + output - alias + temp. Returns a dict
  with both sides, the relative errors and the collectives of the compiled step.
  """
  import dataclasses
  import time

  from memjax.memory.product_keys import gathered_xla_gradient
  from memjax.scale import comms
  from memjax.train.step import compile_train_step

  cfg = load_config(config_path, overrides)
  train = dataclasses.replace(cfg.train, **{k: v for k, v in (("batch_size", batch_size), ("seq_len", seq_len))
                                            if v is not None})
  # The "xla" compiler model describes XLA's own formulations (what GPU compiles): the bag on
  # ``backend`` and the top-k's ``xla`` formulation (three top_k and, by gathered_xla_gradient, the
  # gathered sub-keys' gradient, which plain CPU runs replace by the dense-score picks). The CPU
  # kernels keep less (the C++ selection has no k x k grid in XLA; the dense-score picks no gathered
  # sub-keys), so on CPU the plan is an upper bound.
  layer = dataclasses.replace(cfg.model.memory.layer, topk="xla")
  memory = dataclasses.replace(cfg.model.memory, backend=backend, layer=layer,
                               **{k: v for k, v in (("value_update", value_update),
                                                    ("value_sharding", value_sharding)) if v is not None})
  model = dataclasses.replace(cfg.model, memory=memory)
  p = plan(model, train, sizes)
  t0 = time.time()
  with gathered_xla_gradient():
    compiled, _ = compile_train_step(model, train, sizes)
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  xla = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  xla_total = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
  planned = {"arguments": p["arguments_bytes"], "temp": p["temp_bytes"],
             "total": p["arguments_bytes"] + p["temp_bytes"]}
  err = lambda a, b: (a - b) / b
  return {"config": config_path, "mesh": sizes, "batch_size": train.batch_size, "seq_len": train.seq_len,
          "value_update": memory.value_update, "value_sharding": memory.value_sharding,
          "compile_seconds": round(seconds, 1), "xla": xla, "xla_total": xla_total, "plan": planned,
          "error": {"arguments": err(planned["arguments"], xla["argument"]), "temp": err(planned["temp"], xla["temp"]),
                    "total": err(planned["total"], xla_total)},
          "collectives": comms.summarize(comms.collectives(compiled)), "planned_comm": p["comm_bytes_per_step"]}


def load_config(path: str, overrides=()):
  """A ``Config`` from a configs/*.py file and ``(dotted key, TEXT)`` overrides; its vocabulary as
  set there, or 32000 if 0 (the planner has no tokenizer)."""
  from memjax.config_bridge import apply_overrides, config_from_dict, load_config_file
  cfg = config_from_dict(apply_overrides(load_config_file(path), list(overrides)))
  return cfg.with_vocab(32000) if cfg.model.vocab_size == 0 else cfg


def main(argv=None) -> int:
  """``python -m memjax.plan``; bad input exits 2 with one line (``error: ...``)."""
  from memjax.config import ConfigError
  from memjax.command import ArgumentParser, CommandLineError
  from memjax.train.main import split_config_overrides

  parser = ArgumentParser(prog="python -m memjax.plan", description=__doc__.splitlines()[0],
                          epilog="Override config fields with --config.<section>.<field>=VALUE.")
  parser.add_argument("--config", required=True, help="a configs/*.py file")
  parser.add_argument("--mesh", default="data=1", help="data=N,fsdp=N,memory=N")
  parser.add_argument("--json", action="store_true", help="print the plan as JSON")
  parser.add_argument("--compiler", default="xla", choices=COMPILERS,
                      help="whose memory use to model: xla (CPU), tpu, gpu (CUDA); default xla")
  try:
    rest, overrides = split_config_overrides(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(rest)
    sizes = parse_mesh(args.mesh)
    cfg = load_config(args.config, overrides)
  except (ConfigError, CommandLineError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  p = plan(cfg.model, cfg.train, sizes, compiler=args.compiler)
  print(json.dumps(p, indent=1) if args.json else format_plan(p))
  return 0


if __name__ == "__main__":
  sys.exit(main())
