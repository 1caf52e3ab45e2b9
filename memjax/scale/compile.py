"""Compile memjax's steps for real TPU and GPU targets on a machine without them (deviceless AOT).

  python -m memjax.compile --config=configs/paper_373m.py --target=v5p-8 --mesh data=4 [--json]
  python -m memjax.compile --config=configs/tiny.py --target=h100-4 --mesh data=2,memory=2 \\
      --step=train --config.model.memory.value_update=sparse

The accelerator's own compiler runs (libtpu / Mosaic for TPU, XLA GPU + Triton + ptxas for NVIDIA),
so the step really compiles for the target and its limits (HBM, VMEM, shared memory) are enforced.
Reported per device: argument, output, aliased and temporary bytes (``memory_analysis``), whether the
step fits the target's HBM, the compiler's cost model (TPU: flops, bytes accessed and
``optimal_seconds``, a cost-model estimate, not a measurement), the tokens/s and MFU that estimate
implies, the collectives with their bytes (``memjax.scale.comms``), and the compile time.

This needs the target's compiler in the running Python (``pip install -e '.[aot-tpu]'`` or
``'.[aot-cuda]'`` in a venv of its own; ``bash .ci/aot_env.sh`` builds both outside the clone). Run
from the main venv, the command re-runs itself in the venv ``.ci/aot_env.sh`` keeps (building it the
first time) when this Python lacks the compiler.

Steps: ``train`` (the train step as ``train.py`` jits it: dense or sparse value update, column or row
value sharding, from the config), ``eval`` (the evaluation forward), ``decode`` (one generation step,
``memjax.generation.decode_step``: ``train.batch_size`` rows, one new token each, through a KV cache of
``train.seq_len`` positions; the cache is donated, the batch split over ``data`` x ``fsdp`` where it
divides, the value table sharded as in training).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from memjax.scale.targets import TARGETS, Target, devices, get

STEPS = ("train", "eval", "decode")


def _gpu_compiler_options(target: Target) -> dict:
  # Without a device XLA cannot ask CUDA how much scratch CUB's radix sort needs (cudaErrorInvalidDevice
  # at compile time for sorts over ~22k elements); the comparison sort compiles deviceless.
  return {"xla_gpu_enable_cub_radix_sort": False} if target.platform == "cuda" else {}


def _cost(compiled) -> dict:
  """The compiler's cost model as a dict (TPU: "flops", "bytes accessed", "optimal_seconds"; {} if none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return dict(cost) if cost else {}


def _microbatch_seconds(cfg, target: Target, mesh) -> float | None:
  """The cost model's seconds for one microbatch's forward + backward: ``StepFns.backward`` of the
  same model at ``train.batch_size / k`` rows and one microbatch (the loop's body: no optimizer
  update; with the sparse update the reads' cotangents, not yet row gradients), compiled for
  ``target`` on ``mesh``."""
  import dataclasses

  import jax

  from memjax.train.step import jit_steps, make_step_fns

  tc = cfg.train
  one = dataclasses.replace(tc, batch_size=tc.batch_size // tc.microbatches, microbatches=1)
  steps = jit_steps(make_step_fns(cfg.model, one), mesh, cfg.model.memory.value_sharding)
  grads = jax.jit(steps.fns.backward or steps.fns.grads, in_shardings=(steps.state_sharding, steps.batch_sharding))
  with jax.set_mesh(mesh):
    compiled = grads.trace(*steps.abstract_args(one.batch_size, one.seq_len)).lower().compile(
        _gpu_compiler_options(target) or None)
  return _cost(compiled).get("optimal_seconds")


def compile_step(cfg, target: str | Target, mesh_sizes: dict, *, step: str = "train",
                 price_microbatches: bool = False) -> dict:
  """Compiles ``step`` of the run ``cfg`` (a ``memjax.config.Config`` with its vocabulary set) for
  ``target`` on the mesh ``mesh_sizes`` (``{"data", "fsdp", "memory"}``, product = the target's chips)
  and returns the report (a JSON-able dict; see the module doc).

  The compiler's cost model prices a while loop's body once, so a step with ``train.microbatches``
  k > 1 gets no estimate from it. With ``price_microbatches`` (train step, a target with a cost model,
  a step that fits) one more compile prices one microbatch's forward + backward alone (``b``) and the
  estimate is derived: the step's figure (the loop counted once, the update) + (k - 1) x ``b``
  (``estimate_note`` says so)."""
  import jax

  from memjax import sharding
  from memjax.scale import comms
  from memjax.scale.plan import compiler_for, plan
  from memjax.train.step import jit_steps, make_step_fns

  target = get(target) if isinstance(target, str) else target
  if step not in STEPS:
    raise ValueError(f"--step={step!r} is not a step; allowed: {list(STEPS)}")
  if math.prod(mesh_sizes.values()) != target.chips:
    raise ValueError(f"--mesh {mesh_sizes} has {math.prod(mesh_sizes.values())} devices; target {target.name} "
                     f"has {target.chips}")
  tc = cfg.train
  if step == "decode":
    return _compile_decode(cfg, target, mesh_sizes)
  batch_shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if tc.batch_size % batch_shards:
    raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by mesh.data * mesh.fsdp = {batch_shards}")
  mesh = sharding.make_mesh(mesh_sizes, devices(target))
  steps = jit_steps(make_step_fns(cfg.model, tc), mesh, cfg.model.memory.value_sharding)
  state, batch = steps.abstract_args(tc.batch_size, tc.seq_len)
  t0 = time.time()
  with jax.set_mesh(mesh):
    fn = steps.train if step == "train" else steps.eval
    compiled = fn.trace(state, batch).lower().compile(_gpu_compiler_options(target) or None)
  seconds = time.time() - t0
  m = compiled.memory_analysis()
  mem = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
         "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes}
  total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  cost = _cost(compiled)
  estimate = cost.get("optimal_seconds")
  # The cost model prices a while loop's body once: with microbatches (a loop over them) its figure
  # is not the step's, and it is sometimes negative (overflow). Neither is reported as an estimate.
  estimate_note = None
  if estimate is not None and tc.microbatches > 1:
    body, why = None, f"the cost model counts the {tc.microbatches}-microbatch loop once"
    if price_microbatches and step == "train" and total <= target.hbm_bytes:
      if estimate <= 0:
        why = f"the cost model returned {estimate:.3g} s for the step (its loop counted once)"
      else:
        body = _microbatch_seconds(cfg, target, mesh)
        if body is None or body <= 0:
          why = f"the cost model returned {body} s for one microbatch's forward + backward"
    if body is not None and body > 0:
      estimate_note = (f"derived: the step's {estimate * 1e3:.1f} ms (the {tc.microbatches}-microbatch loop "
                       f"counted once) + {tc.microbatches - 1} x {body * 1e3:.1f} ms (one microbatch's "
                       f"forward + backward, compiled alone)")
      estimate = estimate + (tc.microbatches - 1) * body
    else:
      estimate, estimate_note = None, f"not priced: {why}"
  elif estimate is not None and estimate <= 0:
    estimate, estimate_note = None, f"not priced: the cost model returned {estimate:.3g} s"
  tokens = tc.batch_size * tc.seq_len
  factor = 3 if step == "train" else 1  # forward + backward = 3 forwards
  model_flops = factor * cfg.model.flops_per_token(tc.seq_len) * tokens
  p = plan(cfg.model, tc, mesh_sizes, compiler=compiler_for(target.platform))
  report = {
      "target": target.name, "platform": target.platform, "topology": target.topology, "chips": target.chips,
      "step": step, "mesh": mesh_sizes, "batch_size": tc.batch_size, "seq_len": tc.seq_len,
      "value_update": cfg.model.memory.value_update, "value_sharding": cfg.model.memory.value_sharding,
      "dtype": cfg.model.dtype, "remat": getattr(cfg.model, "remat", "none"),
      "compile_seconds": round(seconds, 1), "bytes_per_device": mem, "total_bytes_per_device": total,
      "hbm_bytes": target.hbm_bytes, "fits": total <= target.hbm_bytes,
      "compiler_flops": cost.get("flops"), "compiler_bytes_accessed": cost.get("bytes accessed"),
      "compiler_seconds_estimate": estimate, "estimate_note": estimate_note, "model_flops_per_step": model_flops,
      "tokens_per_s_estimate": tokens / estimate if estimate and estimate > 0 else None,
      "mfu_estimate": model_flops / (estimate * target.chips * target.peak_flops) if estimate and estimate > 0 else None,
      "collectives": comms.summarize(comms.collectives(compiled)),
      "plan_total_bytes_per_device": p["arguments_bytes"] + p["temp_bytes"],
  }
  return report


def _compile_decode(cfg, target: Target, mesh_sizes: dict) -> dict:
  """``compile_step`` for ``step="decode"``."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding

  from memjax import sharding
  from memjax.config import COMPUTE_DTYPES
  from memjax.generation import decode_step
  from memjax.model import LM
  from memjax.train.step import with_shardings

  m, b, s = cfg.model, cfg.train.batch_size, cfg.train.seq_len
  mesh = sharding.make_mesh(mesh_sizes, devices(target))
  rules = sharding.axis_rules(m.memory.value_sharding)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LM(m, rngs=nnx.Rngs(0))))
  state_sh = sharding.state_shardings(state, mesh, rules)
  row_sh = NamedSharding(mesh, sharding.spec_for((b,), (sharding.BATCH,), rules, mesh))
  cache_sh = NamedSharding(mesh, sharding.spec_for((b, s, m.num_heads, m.head_dim),
                                                   (sharding.BATCH, None, None, None), rules, mesh))
  kv = jax.ShapeDtypeStruct((b, s, m.num_heads, m.head_dim), COMPUTE_DTYPES[m.dtype], sharding=cache_sh)
  cache = tuple((kv, kv) for _ in range(m.num_layers))
  rows = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row_sh)
  fn = jax.jit(lambda st, tok, pos, c: decode_step(nnx.merge(graphdef, st), tok, pos, c), donate_argnums=3,
               out_shardings=(NamedSharding(mesh, jax.sharding.PartitionSpec()), cache_sh))
  t0 = time.time()
  with jax.set_mesh(mesh):
    compiled = fn.trace(with_shardings(state, state_sh), rows, rows, cache).lower().compile(
        _gpu_compiler_options(target) or None)
  seconds = time.time() - t0
  mem = compiled.memory_analysis()
  mem = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
         "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes}
  total = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
  cost = _cost(compiled)
  from memjax.scale import comms
  return {"target": target.name, "platform": target.platform, "topology": target.topology, "chips": target.chips,
          "step": "decode", "mesh": mesh_sizes, "batch_size": b, "cache_len": s, "slots": m.memory.layer.num_slots,
          "value_sharding": m.memory.value_sharding, "dtype": m.dtype, "compile_seconds": round(seconds, 1),
          "bytes_per_device": mem, "total_bytes_per_device": total, "hbm_bytes": target.hbm_bytes,
          "fits": total <= target.hbm_bytes, "compiler_flops": cost.get("flops"),
          "compiler_bytes_accessed": cost.get("bytes accessed"),
          "compiler_seconds_estimate": cost.get("optimal_seconds"),
          "collectives": comms.summarize(comms.collectives(compiled))}


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  mem = r["bytes_per_device"]
  if r["step"] == "decode":
    return (f"decode step of {r['batch_size']} rows, cache {r['cache_len']}, {r['slots']:,} slots on {r['target']} "
            f"(mesh {r['mesh']}, values {r['value_sharding']}): compiled in {r['compile_seconds']} s\n"
            f"  per device: arguments {gib(mem['argument'])}, temporaries {gib(mem['temp'])}; total "
            f"{gib(r['total_bytes_per_device'])} of {gib(r['hbm_bytes'])} HBM: " + ("fits" if r["fits"] else "DOES NOT FIT"))
  lines = [f"{r['step']} step of {r['batch_size']} x {r['seq_len']} tokens on {r['target']} ({r['chips']} chips, "
           f"mesh {r['mesh']}, values {r['value_update']} / {r['value_sharding']}): compiled in {r['compile_seconds']} s",
           f"  per device: arguments {gib(mem['argument'])}, outputs {gib(mem['output'])} (aliased {gib(mem['alias'])}), "
           f"temporaries {gib(mem['temp'])}; total {gib(r['total_bytes_per_device'])} of {gib(r['hbm_bytes'])} HBM: "
           + ("fits" if r["fits"] else "DOES NOT FIT"),
           f"  planner's total: {gib(r['plan_total_bytes_per_device'])}"]
  if r["compiler_seconds_estimate"] is not None:
    lines.append(f"  compiler's estimate: {r['compiler_seconds_estimate'] * 1e3:.1f} ms/step (cost model), "
                 f"{r['tokens_per_s_estimate'] or 0:,.0f} tokens/s, MFU {100 * (r['mfu_estimate'] or 0):.1f}%")
    if r.get("estimate_note"):
      lines.append(f"    {r['estimate_note']}")
  elif r.get("estimate_note"):
    lines.append(f"  compiler's estimate: {r['estimate_note']}")
  else:
    lines.append("  compiler's estimate: none (this target's compiler reports no cost model)")
  lines += [f"  {kind:20s} x{v['count']:<4d} {v['bytes'] / 2**20:,.1f} MiB" for kind, v in r["collectives"].items()]
  return "\n".join(lines)


def _has_compiler(platform: str) -> bool:
  import importlib.util
  try:
    return importlib.util.find_spec("libtpu" if platform == "tpu" else "jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def _aot_python(platform: str) -> str | None:
  """The python of ``.ci/aot_env.sh``'s venv for ``platform`` (built on first use), in a checkout."""
  script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), ".ci",
                        "aot_env.sh")
  if not os.path.exists(script):
    return None
  print(f"note: this Python has no {platform} compiler; using the venv of .ci/aot_env.sh {platform}", file=sys.stderr)
  out = subprocess.run(["bash", script, platform], stdout=subprocess.PIPE, text=True)
  return out.stdout.strip() or None if out.returncode == 0 else None


def main(argv=None) -> int:
  """``python -m memjax.compile``; bad input is one ``error:`` line and exit 2."""
  from memjax.command import ArgumentParser, CommandLineError
  from memjax.config import ConfigError
  from memjax.scale.plan import load_config, parse_mesh
  from memjax.train.main import split_config_overrides

  argv = sys.argv[1:] if argv is None else list(argv)
  import jax
  jax.config.update("jax_platforms", "cpu")  # the target's compiler runs deviceless; no accelerator is used
  parser = ArgumentParser(prog="python -m memjax.compile", description=__doc__.splitlines()[0],
                          epilog="Override config fields with --config.<section>.<field>=VALUE.")
  parser.add_argument("--config", required=True, help="a configs/*.py file")
  parser.add_argument("--target", required=True, help="one of " + ", ".join(TARGETS))
  parser.add_argument("--mesh", default=None, help="data=N,fsdp=N,memory=N (default: data = the target's chips)")
  parser.add_argument("--step", default="train", help="one of " + ", ".join(STEPS))
  parser.add_argument("--json", action="store_true", help="print the report as JSON")
  parser.add_argument("--price_microbatches", action="store_true",
                      help="with train.microbatches > 1: one more compile prices a microbatch's forward + "
                           "backward, and the step's time estimate is derived from it (TPU)")
  try:
    rest, overrides = split_config_overrides(argv)
    args = parser.parse_args(rest)
    target = get(args.target)
    if args.step not in STEPS:
      raise ValueError(f"--step={args.step!r} is not a step; allowed: {list(STEPS)}")
    sizes = parse_mesh(args.mesh) if args.mesh else {"data": target.chips, "fsdp": 1, "memory": 1}
    cfg = load_config(args.config, overrides)
  except (ConfigError, CommandLineError, ValueError) as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2
  if not _has_compiler(target.platform) and not os.environ.get("MEMJAX_AOT_CHILD"):
    python = _aot_python(target.platform)
    if python:
      env = {**os.environ, "MEMJAX_AOT_CHILD": "1", "JAX_PLATFORMS": "cpu"}
      return subprocess.run([python, "-m", "memjax.compile", *argv], env=env).returncode
  try:
    report = compile_step(cfg, target, sizes, step=args.step, price_microbatches=args.price_microbatches)
  except (RuntimeError, ValueError) as e:
    print(f"error: {' '.join(str(e).split())[:400]}", file=sys.stderr)
    return 2 if isinstance(e, ValueError) else 1
  print(json.dumps(report, indent=1) if args.json else format_report(report))
  return 0
