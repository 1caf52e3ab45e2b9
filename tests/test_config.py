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


# ----- ConfigError, the field checks, the ConfigDict bridge ---------------------------------------------

from memjax.config import ConfigError, DataConfig, DataConfigError, ModelConfig, TrainConfig  # noqa: E402
from memjax.config_bridge import apply_overrides, config_from_dict, config_to_dict, leaf_types  # noqa: E402
from memjax.data import DataError  # noqa: E402


def test_errors_carry_the_dotted_path_and_are_reowned_not_rewritten():
  with pytest.raises(ConfigError) as standalone:
    MemoryConfig(n_keys=8, k=9)
  assert (standalone.value.owner, standalone.value.field, standalone.value.value) == ("MemoryConfig", "k", 9)
  with pytest.raises(ConfigError) as nested:
    config_from_dict({"model": {"memory": {"n_keys": 8, "k": 9}}})
  assert nested.value.path == "model.memory.k"
  assert str(nested.value) == str(standalone.value).replace("MemoryConfig.k", "model.memory.k")


@pytest.mark.parametrize("raw,path", [
    ({"train": {"steps": True}}, "train.steps"),  # a bool is not an int
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"train": {"b2": 1.5}}, "train.b2"),
    ({"model": {"moe": {"layers": "0", "top_k": 9}}}, "model.moe.top_k"),
    ({"model": {"num_layers": 2, "memory": {"layers": "2"}}}, "model.memory.layers"),
    ({"model": {"memory": {"layers": "1", "backend": "gpu"}}}, "model.memory.backend"),
    ({"mesh": {"memory": 0}}, "mesh.memory"),
    ({"data": {"kb": "huge"}}, "data.kb"),
    ({"eval": {"qa_seq_len": -1}}, "eval.qa_seq_len"),
    ({"model": {"memory": 3}}, "model.memory"),
    ({"model": {"memory": {"nkeys": 3}}}, "model.memory.nkeys"),
])
def test_nested_errors_name_the_dotted_field(raw, path):
  with pytest.raises(ConfigError) as err:
    config_from_dict(raw)
  assert err.value.path == path and "\n" not in str(err.value)


def test_data_config_errors_are_also_data_errors():
  with pytest.raises(DataError) as err:
    DataConfig(tokenizer="chars")
  assert isinstance(err.value, DataConfigError) and isinstance(err.value, ConfigError)
  with pytest.raises(DataConfigError, match=r"^data\.tokenizer="):
    config_from_dict({"data": {"tokenizer": "chars"}})


def test_unknown_keys_suggest_the_nearest_field():
  with pytest.raises(ConfigError, match='Did you mean "steps"'):
    config_from_dict({"train": {"stepz": 3}})
  with pytest.raises(ConfigError, match=r'--config\.train\.stepz: not a known field .*Did you mean "steps"'):
    apply_overrides({}, [("train.stepz", "3")])


def test_overrides_are_parsed_by_the_field_type():
  raw = apply_overrides({}, [("train.steps", "7"), ("train.lr", "1e-3"), ("model.memory.swilu", "false"),
                             ("data.text_glob", "none"), ("model.memory.layers", "0,2")])
  cfg = config_from_dict(raw)
  assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and cfg.model.memory.layer.swilu is False
  assert cfg.data.text_glob is None and cfg.model.memory.layers == (0, 2)
  with pytest.raises(ConfigError, match=r"--config\.train\.steps='7\.5' must be an int"):
    apply_overrides({}, [("train.steps", "7.5")])


def test_round_trip_through_the_dict_form_of_every_leaf():
  leaves = leaf_types()
  assert {"model.memory.k", "model.memory.layers", "train.steps", "mesh.data", "data.kb", "eval.qa_jsonl"} <= set(leaves)
  cfg = config_from_dict({"model": {"memory": {"layers": "centered:1"}}, "train": {"steps": 3}})
  flat = config_to_dict(cfg)
  assert flat["model"]["memory"]["layers"] == "2" and config_from_dict(flat) == cfg


def test_vocab_size_zero_means_from_the_tokenizer():
  assert ModelConfig().vocab_size == 0
  from flax import nnx
  from memjax.model import LM
  with pytest.raises(ValueError, match="vocab_size=0"):
    LM(ModelConfig(), rngs=nnx.Rngs(0))
  assert TrainConfig().value_learning_rate == pytest.approx(3e-2)
