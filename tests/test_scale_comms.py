"""Collectives of the compiled sharded train step (``memjax.comms``): column mode never all-gathers
the value table, row mode neither; the HLO parser reads shapes and bytes."""

import os
import textwrap

import pytest
from fake_devices import run_result_script

from memjax import comms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HLO = """
  %all-gather.2 = f32[256,32]{0,1} all-gather(%x), channel_id=33, replica_groups=[2,4]<=[8], dimensions={1}
  %ar = (f32[4,64,32]{2,1,0}, bf16[8]{0}) all-reduce(%a, %b), channel_id=3, replica_groups={{0,1},{2,3}}, to_apply=%add
  %rs = f32[16,8]{1,0} reduce-scatter(%c), replica_groups={{0,1}}, dimensions={0}
  ROOT %a2a = s32[4,4]{1,0} all-to-all(%d), replica_groups={{0,1,2,3}}, dimensions={0}
  %cp = f32[10]{0} collective-permute(%e), source_target_pairs={{0,1}}
  %ags = (f32[2,8]{1,0}, f32[8,8]{1,0}) all-gather-start(%f), replica_groups={{0,1,2,3}}, dimensions={0}
  %not = f32[2]{0} add(%all-reduce, %x)
"""


def test_parser_reads_kinds_shapes_and_bytes():
  colls = comms.parse_collectives(HLO)
  assert [c.kind for c in colls] == ["all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                                     "collective-permute", "all-gather"]
  assert colls[0].shapes == (("f32", (256, 32)),) and colls[0].bytes == 256 * 32 * 4
  assert colls[1].bytes == 4 * 64 * 32 * 4 + 8 * 2 and colls[1].replica_groups == "{{0,1},{2,3}}"
  assert colls[5].shapes == (("f32", (8, 8)),)  # the async start's result, not its operand
  assert comms.summarize(colls)["all-gather"] == {"count": 2, "bytes": 256 * 32 * 4 + 8 * 8 * 4}
  assert comms.gathers_of_shape(colls, (256, 32)) == [colls[0]]


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
    out = {}
    for update in ("sparse", "dense"):
      for vs in ("column", "row"):
        c = tiny.get_config()
        c.model.memory.n_keys = 32  # 1024 slots: no activation of the tiny batch has the table's shape
        c.model.memory.value_update, c.model.memory.value_sharding = update, vs
        c.train.seq_len = 32
        cfg = config_from_dict(c).with_vocab(259)
        compiled, *_ = comms.compile_train_step(cfg.model, cfg.train, dict(data=2, fsdp=1, memory=4))
        colls = comms.collectives(compiled)
        table = (cfg.model.memory.layer.num_slots, cfg.model.memory.layer.value_dim)
        out[f"{update}/{vs}"] = {"summary": comms.summarize(colls),
                                 "table_gathers": [c.line for c in comms.gathers_of_shape(colls, table)]}
    print("RESULT" + json.dumps(out))
""").replace("REPO", repr(REPO))


@pytest.fixture(scope="module")
def results():
  return run_result_script(SCRIPT)

@pytest.mark.parametrize("mode", ["sparse/column", "dense/column", "sparse/row", "dense/row"])
def test_step_never_all_gathers_the_value_table(results, mode):
  assert results[mode]["table_gathers"] == [], results[mode]["table_gathers"]
  assert results[mode]["summary"], "a (data=2, memory=4) step must communicate"
