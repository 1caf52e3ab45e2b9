"""Finetuning (``config.finetune``): tf-idf slot selection against a numpy reference, ``init_from``
restores the saved parameters exactly (workdir and export), one sparse-memory-finetuning step changes
only the selected value rows, and bad finetune settings exit 2 with one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import checkpoint_tree, one_error_line, random_batch, tiny_config, tiny_raw
from memjax.config import FinetuneConfig
from memjax.config_bridge import config_from_dict
from memjax.train import main as cli
from memjax.train.finetune import (background_df, load_source_params, merge_model_config, read_source, select_slots,
                                   slot_reads, start_from_source, tfidf_scores)
from memjax.train.loop import run
from memjax.train.step import jit_steps, make_step_fns


def numpy_select(reads, df, num_background, t):
  """The reference: score = tf log((|B|+1)/(df+1)); the t best of the slots read, ties to the lower slot."""
  score = reads * np.log((num_background + 1.0) / (df + 1.0))
  read = np.flatnonzero(reads > 0)
  order = sorted(read, key=lambda m: (-score[m], m))
  out = np.zeros(reads.shape, bool)
  out[order[:t]] = True
  return out


def test_tfidf_selection_equals_numpy_reference():
  # Hand-made: slot 0 read often but by every background batch (idf 0); 3 and 5 tie; 6 never read.
  reads = np.array([9, 1, 4, 2, 0, 2, 0, 3], np.float32)
  df = np.array([8, 0, 6, 1, 0, 1, 0, 0], np.float32)
  for t in (1, 2, 3, 4, 6, 8, 100):
    np.testing.assert_array_equal(np.asarray(select_slots(jnp.asarray(reads), jnp.asarray(df), 8, t)),
                                  numpy_select(reads, df, 8, t), err_msg=f"t={t}")
  np.testing.assert_allclose(np.asarray(tfidf_scores(jnp.asarray(reads), jnp.asarray(df), 8)),
                             reads * np.log(9.0 / (df + 1.0)), rtol=1e-6)
  rng = np.random.default_rng(0)
  for _ in range(5):
    reads = rng.integers(0, 4, 64).astype(np.float32)
    df = rng.integers(0, 11, 64).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(select_slots(jnp.asarray(reads), jnp.asarray(df), 10, 7)),
                                  numpy_select(reads, df, 10, 7))
  idx = jnp.array([[[0, 3], [3, 3]], [[1, 1], [2, 0]]])  # [B=2, T=2, 2]
  mask = jnp.array([[1.0, 1.0], [0.0, 1.0]])  # the read at (1, 0) does not count
  assert slot_reads([idx, idx], mask, 5).tolist() == [4.0, 0.0, 2.0, 6.0, 0.0]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  base = tmp_path_factory.mktemp("finetune")
  run(tiny_config(base / "data", steps=2), str(base / "pre"), progress=False)
  return base


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_init_from_restores_the_saved_parameters_exactly(pretrained):
  saved = checkpoint_tree(pretrained / "pre")
  want = _leaves(saved["params"]) + _leaves(saved["values"])
  for path in (pretrained / "pre", pretrained / "pre" / "export"):
    raw = tiny_raw(pretrained / "data")
    raw.finetune.init_from = str(path)  # tiny's model fields are set (not defaults) and equal the saved ones
    source = read_source(str(path))
    merged = merge_model_config(config_from_dict(raw), source.config)
    assert merged.model == source.config.model
    steps = jit_steps(make_step_fns(merged.model, merged.train), _mesh(), "column")
    params, values = load_source_params(source, steps.mesh, "column")
    got = _leaves(params) + _leaves(values)
    assert len(got) == len(want)
    for a, b in zip(got, want):
      assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # bitwise
    state = steps.start(params, values)  # fresh optimizer state
    assert int(state["step"]) == 0
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["value_opt"]) if np.ndim(x) == 2)


def _mesh():
  from memjax import sharding
  return sharding.make_mesh({"data": 1, "fsdp": 1, "memory": 1}, jax.devices()[:1])


def _smf_setup(pretrained, method, top_t=6):
  cfg = tiny_config(pretrained / "data")
  ft = FinetuneConfig(init_from=str(pretrained / "pre"), method=method, top_t=top_t, lr=0.5,
                      background_batches=4)
  source = read_source(ft.init_from)
  cfg = merge_model_config(dataclasses.replace(cfg, finetune=ft), source.config)
  steps = jit_steps(make_step_fns(cfg.model, cfg.train, finetune=ft), _mesh(), "column")
  return cfg, source, steps


def test_smf_step_changes_only_the_selected_value_rows(pretrained, tmp_path):
  cfg, source, steps = _smf_setup(pretrained, "smf", top_t=6)
  with jax.set_mesh(steps.mesh):
    state = start_from_source(cfg, source, steps, str(tmp_path))
    assert (tmp_path / "finetune" / "background_df.npz").exists()
    (pool,) = steps.fns.pools
    df = np.asarray(state["stats"][pool.key])
    assert df.max() <= 4 and df.sum() > 0  # in how many of the 4 background batches each slot was read
    batch = random_batch(3, cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size)
    lookups = steps.eval(state, batch)["lookups"]
    reads = np.zeros(cfg.model.memory.layer.num_slots)
    for j in pool.readers:
      np.add.at(reads, np.asarray(lookups[j][0]).reshape(-1), 1.0)
    chosen = numpy_select(reads, df, 4, 6)
    two = [random_batch(s, cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size) for s in (7, 8)]
    two[1]["loss_mask"][:, : cfg.train.seq_len // 2] = 0  # reads of masked tokens do not count
    ref = np.zeros_like(reads)
    for b in two:
      look = steps.eval(state, b)["lookups"]
      seen = np.zeros_like(reads)
      for j in pool.readers:
        idx = np.asarray(look[j][0])
        np.add.at(seen, idx[b["loss_mask"] > 0].reshape(-1), 1.0)
      ref += seen > 0
    np.testing.assert_array_equal(background_df(steps, state, two, len(reads))[pool.key], ref)
    before = jax.tree.map(np.asarray, state)
    after, metrics = steps.train(state, batch)
    after = jax.tree.map(np.asarray, after)
  assert int(metrics["slots_updated"]) == chosen.sum() == 6
  for a, b in zip(_leaves(before["params"]), _leaves(after["params"])):
    assert a.tobytes() == b.tobytes()  # every non-memory parameter: bitwise unchanged
  old, new = _leaves(before["values"])[0], _leaves(after["values"])[0]
  changed = np.flatnonzero(np.any(old != new, axis=1))
  assert 0 < len(changed) <= 6 and set(changed) <= set(np.flatnonzero(chosen))
  assert old[~chosen].tobytes() == new[~chosen].tobytes()  # every other row: bitwise unchanged


def test_memory_method_trains_values_only(pretrained):
  cfg, source, steps = _smf_setup(pretrained, "memory")
  with jax.set_mesh(steps.mesh):
    params, values = load_source_params(source, steps.mesh, "column")
    state = steps.start(params, values)
    before = jax.tree.map(np.asarray, state)
    after, _ = steps.train(state, random_batch(4, cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size))
    after = jax.tree.map(np.asarray, after)
  assert all(a.tobytes() == b.tobytes() for a, b in zip(_leaves(before["params"]), _leaves(after["params"])))
  old, new = _leaves(before["values"])[0], _leaves(after["values"])[0]
  assert np.any(old != new, axis=1).sum() > 6  # every row read moves, not a top-t subset


@pytest.mark.parametrize("flags, field", [
    (["--config.finetune.init_from=runs/x", "--config.finetune.method=smf", "--config.finetune.top_t=0"],
     "finetune.top_t=0"),
    (["--config.finetune.init_from=runs/x", "--config.finetune.method=lora2"], "finetune.method='lora2'"),
    (["--config.finetune.method=smf"], "finetune.init_from"),
    (["--config.finetune.method=smf", "--config.finetune.init_from=PRE", "--config.model.memory.n_keys=8"],
     "model.memory.n_keys=8"),
    (["--config.finetune.method=smf", "--config.finetune.init_from=NOWHERE"], "finetune.init_from="),
    (["--config.finetune.init_from=PRE", "--config.data.tokenizer=bpe"], "data.tokenizer='bpe'"),
    (["--config.finetune.init_from=PRE", "--config.finetune.method=lora", "--config.finetune.lora_rank=0"],
     "finetune.lora_rank=0"),
])
def test_bad_finetune_settings_exit_2_with_one_line(pretrained, tmp_path, capsys, flags, field):
  flags = [f.replace("PRE", str(pretrained / "pre")).replace("NOWHERE", str(tmp_path / "none")) for f in flags]
  workdir = tmp_path / "w"
  code = cli.main(["train.py", f"--config={cli.DEFAULT_CONFIG.replace('default.py', 'tiny.py')}",
                   f"--config.data.data_dir={pretrained / 'data'}", *flags, f"--workdir={workdir}"])
  line = one_error_line(capsys.readouterr().err)
  assert code == 2 and field in line, line
  assert not workdir.exists()  # refused before anything is written


def test_lora_has_the_stated_parameter_count_starts_equal_and_trains_only_adapters(pretrained):
  from memjax.train.finetune import lora_param_count
  cfg = tiny_config(pretrained / "data")
  ft = FinetuneConfig(init_from=str(pretrained / "pre"), method="lora", lora_rank=3, lr=0.5, optimizer="adam")
  source = read_source(ft.init_from)
  cfg = merge_model_config(dataclasses.replace(cfg, finetune=ft), source.config)
  m = cfg.model
  c, hd, f, r = m.dim, m.num_heads * m.head_dim, m.mlp_dim, 3
  # 4 attention matrices per block (wq, wk, wv: C -> N*Dh; wo: N*Dh -> C), 3 SwiGLU matrices per dense block
  dense = sum(m.block_kind(i) == "dense" for i in range(m.num_layers))
  want = m.num_layers * 4 * r * (c + hd) + dense * 3 * r * (c + f)
  assert lora_param_count(m, r) == want
  base_steps = jit_steps(make_step_fns(m, cfg.train), _mesh(), "column")
  steps = jit_steps(make_step_fns(m, cfg.train, finetune=ft), _mesh(), "column")
  with jax.set_mesh(steps.mesh):
    params, values = load_source_params(source, steps.mesh, "column")
    state = steps.start(params, values)
    assert sum(np.size(x) for x in jax.tree.leaves(state["lora"])) == want
    tokens = random_batch(5, 2, 16, m.vocab_size)["inputs"]
    base = np.asarray(base_steps.logits(base_steps.start(params, values), tokens))
    # B = 0: the base model, to fp32 rounding (bitwise at XLA's default optimization level; the suite
    # compiles at -O0, where these two programs differ by <= 5e-7: tests/conftest.py).
    np.testing.assert_allclose(np.asarray(steps.logits(state, tokens)), base, rtol=0, atol=2e-6)
    before = jax.tree.map(np.asarray, state)
    after, _ = steps.train(state, random_batch(6, cfg.train.batch_size, cfg.train.seq_len, m.vocab_size))
    after = jax.tree.map(np.asarray, after)
    moved = np.asarray(steps.logits(after, tokens))
  for group in ("params", "values"):  # the base is frozen: bitwise
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_leaves(before[group]), _leaves(after[group])))
  assert any(np.any(a != b) for a, b in zip(_leaves(before["lora"]), _leaves(after["lora"])))
  assert np.abs(moved - base).max() > 0


def test_model_config_comes_from_the_checkpoint(pretrained):
  saved = read_source(str(pretrained / "pre")).config
  raw = tiny_raw(pretrained / "data")
  for key in ("dim", "num_layers", "num_heads", "head_dim", "mlp_dim"):  # back to the defaults: "not given"
    del raw.model[key]
  raw.model.dtype = "bfloat16"  # given, not a shape (the compute dtype): kept
  merged = merge_model_config(config_from_dict(raw), saved)
  assert merged.model == dataclasses.replace(saved.model, dtype="bfloat16")
  assert merged.model.dim == 32 and merged.model.vocab_size == saved.model.vocab_size


def test_an_smf_run_end_to_end_and_its_resume(pretrained, tmp_path):
  from helpers import records
  raw = tiny_raw(pretrained / "data", steps=2, log_every=1)
  raw.finetune.init_from = str(pretrained / "pre")
  raw.finetune.method, raw.finetune.top_t, raw.finetune.background_batches = "smf", 5, 2
  cfg = config_from_dict(raw)
  result = run(cfg, str(tmp_path / "ft"), progress=False)
  assert result.step == 2
  logged = [r for r in records(tmp_path / "ft") if "loss" in r]
  assert [r["slots_updated"] for r in logged] == [5, 5]
  assert (tmp_path / "ft" / "finetune" / "background_df.npz").exists()
  assert (tmp_path / "ft" / "export" / "config.json").exists()
  assert run(cfg, str(tmp_path / "ft"), progress=False).step == 2  # resumes its own checkpoint
