"""``python -m memjax.compile`` compiles train steps for a real TPU and a real GPU target from this CPU
machine (deviceless AOT through libtpu / the CUDA plugin, in the venvs of ``.ci/aot_env.sh``): dense and
sparse value updates, column and row value sharding, ``backend="auto"`` (each kernel chosen for the
target's platform, not this host's). These run in CI (the venvs are built there on first use)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import CONFIGS, REPO, aot_env, one_error_line

CASES = [(u, vs) for u in ("dense", "sparse") for vs in ("column", "row")]


def _aot_python(platform: str) -> str:
  out = subprocess.run(["bash", os.path.join(REPO, ".ci", "aot_env.sh"), platform], capture_output=True, text=True,
                       timeout=3000)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip()


SCRIPT = """
import json, sys
from memjax.scale.compile import compile_step
from memjax.scale.plan import load_config
rows = []
for update, vs in {cases!r}:
  cfg = load_config({config!r}, [("model.memory.value_update", update), ("model.memory.value_sharding", vs)])
  rows.append(compile_step(cfg, {target!r}, dict(data=2, fsdp=1, memory=2)))
print("RESULT" + json.dumps(rows))
"""


@pytest.mark.parametrize("target", ["v5p-8", "h100-4"])
def test_train_steps_compile_for_the_target(target):
  platform = "tpu" if target.startswith("v") else "cuda"
  python = _aot_python(platform)
  # configs/tiny.py: every kernel and collective of the default model's step, a third of its compile time
  code = SCRIPT.format(cases=CASES, config=os.path.join(CONFIGS, "tiny.py"), target=target)
  out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-4000:]
  rows = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  assert [(r["value_update"], r["value_sharding"]) for r in rows] == CASES
  for r in rows:
    assert r["platform"] == platform and r["fits"] and r["bytes_per_device"]["temp"] > 0, r
    assert r["collectives"], r  # a (data=2, memory=2) step communicates
    if platform == "tpu":
      assert r["compiler_seconds_estimate"] is not None and r["compiler_flops"] > 0, r


@pytest.mark.parametrize("target", ["v5p-8", "h100-4"])
def test_a_peer_model_compiles_for_the_target(target):
  # PEER's tables live outside the memory's shard_map: under a mesh its bag must not be the Pallas
  # kernel (Mosaic cannot be partitioned automatically: the TPU compile failed before).
  platform = "tpu" if target.startswith("v") else "cuda"
  code = SCRIPT.format(cases=[("dense", "column")], config=os.path.join(CONFIGS, "peer.py"), target=target)
  out = subprocess.run([_aot_python(platform), "-c", code], capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-4000:]
  (row,) = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  assert row["platform"] == platform and row["fits"] and row["bytes_per_device"]["temp"] > 0, row


@pytest.mark.parametrize("argv,text", [
    (["--config=configs/tiny.py", "--target=v9x-8"], "--target='v9x-8'"),
    (["--config=configs/tiny.py", "--target=v5p-8", "--mesh", "data=3"], "has 3 devices"),
    (["--config=configs/tiny.py", "--target=v5p-8", "--step=decod"], "--step='decod'"),
    (["--config=configs/tiny.py", "--target=v5p-8", "--config.train.stepz=1"], "--config.train.stepz"),
    (["--target=v5p-8"], "--config"),
], ids=["unknown-target", "mesh-vs-chips", "unknown-step", "unknown-field", "no-config"])
def test_bad_input_exits_2_with_one_line(argv, text):
  out = subprocess.run([sys.executable, "-m", "memjax.compile", *argv], capture_output=True,
                       text=True, cwd=REPO, timeout=300, env={**os.environ, "MEMJAX_AOT_CHILD": "1"})
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert text in one_error_line(out.stderr)


REMAT_SCRIPT = """
import json
from memjax.scale.compile import compile_step
from memjax.scale.plan import load_config
out = {{}}
for remat in ("none", "full", "matmuls"):
  cfg = load_config({config!r}, [("model.remat", remat), ("model.num_layers", "4"), ("train.batch_size", "16"),
                                 ("train.seq_len", "512"), ("model.memory.layers", "")])
  out[remat] = compile_step(cfg, "v5p-8", dict(data=4, fsdp=1, memory=1))["bytes_per_device"]["temp"]
print("RESULT" + json.dumps(out))
"""


def test_remat_keeps_less_on_the_tpu_compiler():
  # Remat is per block, the same for every block type: measured on the default model's dense blocks
  # (4 blocks, 16 x 512, no memory layer: 40% less compile time than with its Memory+ layer), 392 MiB
  # of temporaries without remat, 292 with "full", 330 with "matmuls" (8 blocks at 32 x 256: 453 / 305
  # / 389, in 1.7x the compile time).
  out = subprocess.run([_aot_python("tpu"), "-c", REMAT_SCRIPT.format(config=os.path.join(CONFIGS, "default.py"))],
                       capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-4000:]
  temp = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  assert temp["full"] < 0.8 * temp["none"] and temp["matmuls"] < 0.9 * temp["none"], temp


PRICE_SCRIPT = """
import json
from memjax.scale.compile import compile_step
from memjax.scale.plan import load_config
out = {{}}
for k, price in ((1, False), (2, False), (2, True)):
  cfg = load_config({config!r}, [("train.microbatches", str(k)), ("model.memory.value_update", "sparse"),
                                  ("model.memory.value_dim", "128")])
  r = compile_step(cfg, "v5p-8", dict(data=1, fsdp=2, memory=2), price_microbatches=price)
  out[f"{{k}}{{price}}"] = (r["compiler_seconds_estimate"], r["estimate_note"])
print("RESULT" + json.dumps(out))
"""


def test_a_microbatched_step_is_priced_from_one_microbatch():
  # The TPU cost model counts the microbatch loop's body once: no estimate for k = 2 unless priced;
  # priced, the estimate adds the other microbatch's forward + backward (compiled alone) and lands
  # between the one-microbatch step's figure and k times it (the same work). Sparse update under FSDP:
  # the microbatch is priced without the row gradients, whose Pallas kernel needs the step's shard_map.
  out = subprocess.run([_aot_python("tpu"), "-c", PRICE_SCRIPT.format(config=os.path.join(CONFIGS, "tiny.py"))],
                       capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  one, unpriced, priced = r["1False"][0], r["2False"], r["2True"]
  assert one > 0 and unpriced[0] is None and "loop once" in unpriced[1], r
  assert priced[1].startswith("derived") and one < priced[0] <= 2 * one, r


DECODE_SCRIPT = """
import json
from memjax.scale.compile import compile_step
from memjax.scale.plan import load_config
rows = []
for vs in ("column", "row"):
  cfg = load_config({config!r}, [("model.memory.value_sharding", vs), ("model.vocab_size", "1024"),
                                 ("train.batch_size", "8"), ("train.seq_len", "4096")])
  rows.append(compile_step(cfg, "v5p-8", dict(data=2, fsdp=1, memory=2), step="decode"))
print("RESULT" + json.dumps(rows))
"""


def test_decode_step_compiles_for_tpu_with_the_cache_updated_in_place():
  python = _aot_python("tpu")
  code = DECODE_SCRIPT.format(config=os.path.join(CONFIGS, "default.py"))
  out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert out.returncode == 0, out.stderr[-4000:]
  rows = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  cache_bytes = 4 * 2 * 8 * 4096 * 4 * 32 * 4 // 2  # blocks x (k, v) x [B, S, N, Dh] fp32, batch over data=2
  for r in rows:
    assert r["step"] == "decode" and r["fits"], r
    assert r["bytes_per_device"]["alias"] >= cache_bytes, r  # the donated cache is the output cache
    assert r["bytes_per_device"]["temp"] < cache_bytes / 2, r  # no copy of the cache per step (a scatter: ~1.6x)
  assert rows[1]["collectives"], rows[1]  # row mode sums the partial reads over memory


ATTENTION_SCRIPT = """
import collections, json, re, jax
from memjax import sharding
from memjax.scale.compile import _gpu_compiler_options
from memjax.scale.plan import load_config
from memjax.scale.targets import devices, get
from memjax.train.step import jit_steps, make_step_fns
target = get({target!r})
cfg = load_config({config!r}, [("model.dtype", "bfloat16"), ("train.seq_len", "128"), ("model.attention", "auto")])
mesh = sharding.make_mesh(dict(data=2, fsdp=1, memory=target.chips // 2), devices(target))
steps = jit_steps(make_step_fns(cfg.model, cfg.train), mesh, cfg.model.memory.value_sharding)
state, batch = steps.abstract_args(cfg.train.batch_size, cfg.train.seq_len)
with jax.set_mesh(mesh):
  hlo = steps.train.trace(state, batch).lower().compile(_gpu_compiler_options(target) or None).as_text()
print("RESULT" + json.dumps({{"targets": collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo)),
                              "flash": len(re.findall(r"flash_attention", hlo))}}))
"""


@pytest.mark.parametrize("target", ["v5p-8", "h100-4"])
def test_auto_attention_is_the_fused_kernel_of_the_target(target):
  # model.attention="auto" follows the platform the step is compiled for: cuDNN's fused attention
  # (forward and backward) on the GPU, the Pallas flash kernel on the TPU; einsum on this CPU host.
  platform = "tpu" if target.startswith("v") else "cuda"
  code = ATTENTION_SCRIPT.format(config=os.path.join(CONFIGS, "tiny.py"), target=target)
  out = subprocess.run([_aot_python(platform), "-c", code], capture_output=True, text=True, timeout=1200, cwd=REPO,
                       env=aot_env(JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-4000:]
  row = json.loads([l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])
  layers = 2  # configs/tiny.py
  if platform == "cuda":
    fwd = sum(n for t, n in row["targets"].items() if t.startswith("__cudnn$fmha") and "Backward" not in t)
    bwd = sum(n for t, n in row["targets"].items() if t.startswith("__cudnn$fmha") and "Backward" in t)
    assert (fwd, bwd) == (layers, layers), row
  else:
    assert row["targets"].get("tpu_custom_call", 0) >= 3 * layers and row["flash"] > 0, row  # fwd, dkv, dq
