"""The row-sparse value update on a mesh runs per shard (``train_lib.sharded_sparse_value_update``):
each device computes row gradients for its own batch shard and its own columns of the table, so no
buffer spans the whole batch's lookups at full value width. Checked on XLA's compiled step: its HLO
and ``memory_analysis()`` (no timing). Equality with the 1-device run is in
``tests/test_scale_equivalence.py``."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lookups dominate this model's temporaries: 16 x 64 tokens x 4 heads x k=8 = 32768 lookups, each
# row gradient 128 floats (16 MiB per [lookups, Dv] fp32 buffer); the table is 1024 x 128 (0.5 MiB).
SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, REPO)
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from configs import tiny
    from memjax import comms
    from memjax.run_config import config_from_dict
    c = tiny.get_config()
    c.model.memory.n_keys, c.model.memory.heads, c.model.memory.k, c.model.memory.value_dim = 32, 4, 8, 128
    c.model.memory.value_update, c.model.memory.value_sharding = "sparse", "column"
    c.train.batch_size, c.train.seq_len = 16, 64
    cfg = config_from_dict(c).with_vocab(259)
    out = {}
    for name, sizes, devices in [("one", dict(data=1, fsdp=1, memory=1), jax.devices()[:1]),
                                 ("col_d2m4", dict(data=2, fsdp=1, memory=4), None)]:
      compiled, *_ = comms.compile_train_step(cfg.model, cfg.train, sizes, devices=devices)
      out[name] = {"temp": compiled.memory_analysis().temp_size_in_bytes, "hlo": compiled.as_text(),
                   "gathers": [[list(d) for _, d in g.shapes] for g in comms.collectives(compiled)
                               if g.kind == "all-gather"]}
    print("RESULT" + json.dumps(out))
""").replace("REPO", repr(REPO))

LOOKUPS, DV, MEMORY = 16 * 64 * 4 * 8, 128, 4


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache"))
  proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])


def test_one_device_step_holds_global_full_width_row_gradients(results):
  # The reference point: without a mesh the row gradients span every lookup at full width.
  assert f"f32[{LOOKUPS},{DV}]" in results["one"]["hlo"]


def test_column_sharded_step_has_no_full_width_buffer_over_the_global_lookups(results):
  hlo = results["col_d2m4"]["hlo"]
  assert not re.search(rf"f32\[{LOOKUPS},{DV}\]", hlo)  # the global-batch kernel would create this
  # The per-shard row gradients are merged over ``data``: gathered at Dv / memory columns.
  assert [[LOOKUPS, DV // MEMORY]] in results["col_d2m4"]["gathers"], results["col_d2m4"]["gathers"]


def test_column_sharded_step_temporaries_shrink_with_the_memory_axis(results):
  # Every [lookups, .] buffer is split over memory=4 columns: ~1/4 of the 1-device step's temporaries.
  # The global-batch kernel (one full-width [lookups, Dv] buffer, the rest split) needed 0.37x here.
  one, sharded = results["one"]["temp"], results["col_d2m4"]["temp"]
  assert sharded < 0.3 * one, (sharded, one)
