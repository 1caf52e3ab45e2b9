"""The HLO parser of ``memjax.scale.comms`` reads kinds, shapes and bytes of collectives.
(The collectives of real compiled steps are checked on 8 fake devices in ``multidevice/test_comms.py``.)"""

from memjax.scale import comms

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
