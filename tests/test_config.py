"""MemoryConfig validation and its parameter / FLOP formulas."""

import pytest

from memjax import MemoryConfig


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_keys=8, k=9), "k=9"),
    (dict(key_dim=15), "key_dim=15"),
    (dict(n_keys=46341), "n_keys=46341"),
    (dict(heads=0), "heads=0"),
    (dict(heads=-2), "heads=-2"),
    (dict(value_dim=0), "value_dim=0"),
    (dict(key_dim=-4), "key_dim=-4"),
    (dict(n_keys=0, k=1), "n_keys=0"),
    (dict(k=0), "k=0"),
    (dict(value_dtype="float64"), "value_dtype='float64'"),
    (dict(value_dtype="bf16"), "value_dtype='bf16'"),
    (dict(heads=2.0), "heads=2.0"),
    (dict(heads=True), "heads=True"),
    (dict(swilu="yes"), "swilu='yes'"),
    (dict(value_init_std=-1.0), "value_init_std=-1.0"),
])
def test_bad_configs_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match="MemoryConfig." + field.replace("(", r"\(")) as err:
    MemoryConfig(**kwargs)
  assert "\n" not in str(err.value)


def test_dtype_error_lists_allowed_values():
  with pytest.raises(ValueError, match=r"allowed: \['bfloat16', 'float16', 'float32'\]"):
    MemoryConfig(value_dtype="int8")


def test_largest_int32_safe_n_keys_is_allowed():
  assert MemoryConfig(n_keys=46340).num_slots == 46340**2


def test_flops_formula_by_hand():
  cfg = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=8, value_dim=32, swilu=True)
  c = 32
  want = (2 * c * 2 * 8) + (2 * 2 * 16 * 8) + (2 * 4 * 4) + 3 * 2 * 4 + (2 * 2 * 4 * 32) + (4 * c * 32 + 32)
  assert cfg.flops_per_token(c) == want
  # Swapping the Memory+ gating for nothing (Dv == C) removes exactly its 4*C*Dv + Dv FLOPs.
  plain = MemoryConfig(n_keys=16, heads=2, k=4, key_dim=8, value_dim=32, swilu=False)
  assert cfg.flops_per_token(c) - plain.flops_per_token(c) == 4 * c * 32 + 32


def test_paper_size_counts():
  cfg = MemoryConfig(n_keys=1024, heads=4, k=32, key_dim=512, value_dim=1024)
  assert cfg.num_slots == 2**20
  assert cfg.value_params() == 2**30
  per_layer = 1024 * 4 * 512 + 4 * 512 + 4 * 1024 * 512 + 2 * 1024 * 1024
  assert cfg.param_count(1024, layers=3, shared=True) == 3 * per_layer + 2**30
  assert cfg.param_count(1024, layers=3, shared=False) == 3 * per_layer + 3 * 2**30
  assert cfg.bytes_read_per_token() == 4 * 32 * 1024 * 4
