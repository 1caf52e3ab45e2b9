"""Sharded training equals the 1-device run: meshes (data=8), (data=2, memory=4) column- and
row-sharded values, (data=4, fsdp=2), for both value updates (sparse, dense), on 8 fake CPU devices.

Tolerance: fp32, rtol 1e-4 / atol 1e-5 on losses, atol 2e-5 + rtol 1e-4 on parameters after 3
steps. Sharding changes the order of reductions (per-shard partial sums, then an all-reduce), so
results differ in the last bits (~1e-7 relative per reduction); Adam divides by sqrt(v), which
amplifies a relative gradient difference into at most the same relative update difference, times
lr (3e-3 here), so parameter differences stay ~1e-6 and losses ~1e-6 relative. A real bug (a missing
psum, a shard read twice, a gradient summed over the wrong axis) moves them by > 1e-2.
"""

import os
import textwrap

import pytest
from fake_devices import run_result_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, REPO)
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    from configs import tiny
    from memjax import sharding
    from memjax.run_config import config_from_dict
    from memjax.train_lib import BATCH_KEYS, make_step_fns, state_shardings

    STEPS = 3
    MESHES = [("data8", "column", dict(data=8, fsdp=1, memory=1)),
              ("col_d2m4", "column", dict(data=2, fsdp=1, memory=4)),
              ("row_d2m4", "row", dict(data=2, fsdp=1, memory=4)),
              ("fsdp_d4f2", "column", dict(data=4, fsdp=2, memory=1))]

    def cfg_for(update, value_sharding):
      c = tiny.get_config()
      c.model.memory.value_update = update
      c.model.memory.value_sharding = value_sharding
      c.train.seq_len = 32
      return config_from_dict(c).with_vocab(259)

    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
      tokens = rng.integers(0, 259, (8, 33)).astype(np.int32)
      batches.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                      "loss_mask": np.ones((8, 32), np.int32), "segment_ids": np.ones((8, 32), np.int32),
                      "positions": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy()})

    def flat(state):
      return {jax.tree_util.keystr(p): np.asarray(jax.device_get(x))
              for p, x in jax.tree_util.tree_leaves_with_path({"params": state["params"], "values": state["values"]})}

    def train(cfg, sizes):
      fns = make_step_fns(cfg.model, cfg.train)
      if sizes is None:  # the reference: one device, no mesh, the plain read
        state = jax.jit(fns.init)(0)
        step = jax.jit(fns.train_step)
        put = lambda b: b
        table_shard = None
      else:
        mesh = sharding.make_mesh(sizes)
        rules = sharding.axis_rules(cfg.model.memory.value_sharding)
        abstract = jax.eval_shape(fns.init, 0)
        sh = state_shardings(fns, abstract, mesh, rules)
        bsh = sharding.batch_sharding(mesh)
        rep = NamedSharding(mesh, PartitionSpec())
        with jax.set_mesh(mesh):
          state = jax.jit(fns.init, out_shardings=sh)(0)
          step = jax.jit(fns.train_step, in_shardings=(sh, bsh), out_shardings=(sh, rep), donate_argnums=0)
          step = step.trace(state, {k: jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=bsh)
                                    for k in BATCH_KEYS}).lower().compile()
        put = lambda b: {k: jax.device_put(v, bsh) for k, v in b.items()}
      losses = []
      for b in batches:
        state, metrics = step(state, put(b))
        losses.append(float(metrics["loss"]))
      table = jax.tree.leaves(state["values"])[0]
      shard = list(table.addressable_shards[0].data.shape) if sizes is not None else None
      return losses, flat(state), shard, list(table.shape)

    out = {}
    for update in ("sparse", "dense"):
      ref_losses, ref_params, _, full = train(cfg_for(update, "column"), None)
      for name, vs, sizes in MESHES:
        losses, params, shard, _ = train(cfg_for(update, vs), sizes)
        diffs = {k: float(np.max(np.abs(params[k] - ref_params[k]) / (2e-5 + 1e-4 * np.abs(ref_params[k]))))
                 for k in ref_params}
        out[f"{update}/{name}"] = {"losses": losses, "ref_losses": ref_losses, "shard": shard, "full": full,
                                   "worst": max(diffs.items(), key=lambda kv: kv[1])}
    print("RESULT" + json.dumps(out))
""").replace("REPO", repr(REPO))


@pytest.fixture(scope="module")
def results():
  return run_result_script(SCRIPT)

@pytest.mark.parametrize("update", ["sparse", "dense"])
@pytest.mark.parametrize("mesh", ["data8", "col_d2m4", "row_d2m4", "fsdp_d4f2"])
def test_sharded_run_matches_one_device(results, update, mesh):
  r = results[f"{update}/{mesh}"]
  for got, want in zip(r["losses"], r["ref_losses"]):
    assert abs(got - want) <= 1e-5 + 1e-4 * abs(want), (r["losses"], r["ref_losses"])
  name, ratio = r["worst"]
  assert ratio <= 1.0, f"{name} differs from the 1-device run by {ratio:.2f}x the tolerance"


@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_value_table_shards_are_what_the_mode_promises(results, update):
  slots, dv = results[f"{update}/data8"]["full"]
  assert results[f"{update}/data8"]["shard"] == [slots, dv]  # replicated over data
  assert results[f"{update}/col_d2m4"]["shard"] == [slots, dv // 4]  # column: Dv / memory
  assert results[f"{update}/row_d2m4"]["shard"] == [slots // 4, dv]  # row: slots / memory
  assert results[f"{update}/fsdp_d4f2"]["shard"] == [slots, dv]
