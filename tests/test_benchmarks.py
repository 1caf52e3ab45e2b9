"""The paper-claims benchmarks (benchmarks/knowledge.py, scaling.py): model matching and one real sweep."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import _runs
import knowledge

VOCAB = 1024


@pytest.mark.parametrize("preset", sorted(knowledge.PRESETS))
def test_dense_family_hits_flop_multiples(preset):
  table = knowledge.variants(knowledge.PRESETS[preset], VOCAB)
  base = _runs.model_figures(table["dense_1x"], VOCAB)["flops_per_token"]
  for m in knowledge.PRESETS[preset]["multiples"]:
    flops = _runs.model_figures(table[f"dense_{m}x"], VOCAB)["flops_per_token"]
    assert abs(flops / base / m - 1) < 0.1, (m, flops / base)
  # ... and the models really differ in size, growing with the multiple.
  params = [_runs.model_figures(table[f"dense_{m}x"], VOCAB)["params_total"] for m in (1, 2, 4, 8)]
  assert params == sorted(params) and len(set(params)) == 4


@pytest.mark.parametrize("preset", sorted(knowledge.PRESETS))
def test_moe_and_peer_match_memory_plus_in_flops_and_params(preset):
  table = knowledge.variants(knowledge.PRESETS[preset], VOCAB)
  moe = _runs.model_figures(table["moe"], VOCAB)
  mp = _runs.model_figures(table["memory_plus"], VOCAB)
  assert abs(moe["flops_per_token"] / mp["flops_per_token"] - 1) < 0.1
  assert abs(moe["params_total"] / mp["params_total"] - 1) < 0.1
  assert table["moe"]["model.moe.layers"] == table["memory_plus"]["model.memory.layers"]
  # PEER likewise: matched in both, at the same layers, with Memory+'s key width.
  peer = _runs.model_figures(table["peer"], VOCAB)
  assert abs(peer["flops_per_token"] / mp["flops_per_token"] - 1) < 0.1
  assert abs(peer["params_total"] / mp["params_total"] - 1) < 0.1
  assert table["peer"]["model.peer.layers"] == table["memory_plus"]["model.memory.layers"]
  assert table["peer"]["model.peer.key_dim"] == table["memory_plus"]["model.memory.key_dim"]
  # Memory and Memory+ cost at most the dense base's FLOPs (+10%) while holding more parameters.
  dense = _runs.model_figures(table["dense_1x"], VOCAB)
  for name in ("memory", "memory_plus"):
    f = _runs.model_figures(table[name], VOCAB)
    assert f["flops_per_token"] <= 1.1 * dense["flops_per_token"]
    assert f["params_total"] > dense["params_total"]


@pytest.mark.parametrize("preset", [p for p in sorted(knowledge.PRESETS) if knowledge.PRESETS[p].get("capacity_check")])
def test_capacity_presets_add_the_dense_run_at_twice_the_steps(preset):
  p = knowledge.PRESETS[preset]
  table = knowledge.variants(p, VOCAB)
  short, long = table["dense_1x"], table["long_dense_1x"]
  assert long["train.steps"] == 2 * short["train.steps"] == 2 * p["steps"]
  rest = lambda o: {k: v for k, v in o.items() if k not in ("train.steps", "train.eval_every")}
  assert rest(long) == rest(short)  # the same model, data and seed: only the budget differs
  # QA along the way: eval_points evaluations per run, at the same fractions of the long run.
  assert short["train.eval_every"] * p["eval_points"] == p["steps"]
  assert long["train.eval_every"] == 2 * short["train.eval_every"]
  assert all(o["train.eval_every"] == short["train.eval_every"] for name, o in table.items() if name != "long_dense_1x")
  assert "long_dense_1x" not in knowledge.variants(knowledge.PRESETS["full"], VOCAB)


def test_training_seconds_and_qa_at_equal_time():
  # 100 tokens a step; the first interval (compilation) is priced at the median of the others (100/s).
  secs = _runs.training_seconds([(10, 5.0), (20, 100.0), (30, 200.0), (40, 100.0)], tokens_per_step=100)
  assert secs == [(10, 10.0), (20, 20.0), (30, 25.0), (40, 35.0)]
  # An interval under half the median had an evaluation in it: priced at the median too (steps 50-60).
  secs = _runs.training_seconds([(10, 5.0), (20, 100.0), (30, 200.0), (40, 100.0), (50, 100.0), (60, 30.0)], 100)
  assert secs[-1] == (60, 55.0)
  result = {"rates": [(10, 5.0), (20, 100.0), (30, 200.0), (40, 100.0)],
            "evals": [{"step": 20, "qa_exact_match": 0.2, "qa_question_exact_match": 0.1},
                      {"step": 40, "val_loss": 1.0},  # no QA in this record: not a point of the curve
                      {"step": 40, "qa_exact_match": 0.6}]}
  curve = knowledge.qa_curve(result, {"train.batch_size": 4, "train.seq_len": 25}, VOCAB)
  assert [(c["step"], c["train_s"], c["qa"], c["qa_question"]) for c in curve] == [
      (0, 0.0, 0.0, 0.0), (20, 20.0, 0.2, 0.1), (40, 35.0, 0.6, None)]
  assert knowledge.qa_at_seconds(curve, 27.5) == pytest.approx(0.4)  # halfway between 20 s and 35 s
  assert knowledge.qa_at_seconds(curve, 10.0) == pytest.approx(0.1)
  assert knowledge.qa_at_seconds(curve, 1000.0) == 0.6  # finished sooner: its final QA
  # The question form, on the evaluations that scored it (the last did not: its latest is 0.1).
  assert knowledge.qa_at_seconds(curve, 10.0, "qa_question") == pytest.approx(0.05)
  assert knowledge.qa_at_seconds(curve, 27.5, "qa_question") == pytest.approx(0.1)
  assert knowledge.qa_at_seconds(curve[:1] + [{**c, "qa_question": None} for c in curve[1:]], 5.0, "qa_question") is None


def test_capacity_check_needs_a_plateau_that_learnt_something():
  check = lambda qa, qa_long, chance=0.06: knowledge.capacity_check(
      {"dense_1x": {"qa_mean": qa}, "long_dense_1x": {"qa_mean": qa_long}}, chance)
  assert check(0.30, 0.315)["bound"] and check(0.30, 0.315)["rise"] == pytest.approx(0.015)
  assert not check(0.30, 0.33)["bound"]   # still rising
  assert not check(0.85, 0.86)["bound"]   # near 100%: saturated, not parameter-bound
  assert not check(0.01, 0.01)["bound"]   # learnt nothing
  assert not check(0.15, 0.16, chance=0.16)["bound"]  # guesses the most common values: learnt no facts
  assert knowledge.capacity_check({"dense_1x": {"qa_mean": 0.3}}) is None


def test_dense_equivalent_interpolates_in_log_flops():
  dense = {f"dense_{m}x": {"qa_mean": q, "flops_x_dense": float(m)} for m, q in ((1, 0.3), (2, 0.6), (4, 0.8))}
  for qa, want in ((0.6, 2.0), (0.7, 2 * 2**0.5), (0.45, 2**0.5)):
    got = knowledge.dense_equivalent({**dense, "memory_plus": {"qa_mean": qa, "flops_x_dense": 1.0}})
    assert got == pytest.approx(want)
  assert knowledge.dense_equivalent({**dense, "memory_plus": {"qa_mean": 0.9, "flops_x_dense": 1.0}}) is None


def test_read_log_splits_train_and_eval_records(tmp_path):
  recs = [{"step": 10, "loss": 3.0, "tokens_per_s": 10.0}, {"step": 20, "loss": 2.0, "tokens_per_s": 100.0},
          {"step": 30, "loss": 1.0, "tokens_per_s": 300.0}, {"step": 30, "val_loss": 1.5, "qa_exact_match": 0.25}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
  out = _runs.read_log(str(tmp_path))
  assert out["final"]["qa_exact_match"] == 0.25 and len(out["evals"]) == 1
  assert out["train_loss_last"] == pytest.approx(2.0)
  assert out["tokens_per_s"] == pytest.approx(200.0)  # the first interval (compilation) is dropped


def test_knowledge_sweep_end_to_end(tmp_path):
  """Two models, 3 steps each, two at a time through train.py: a JSON row per run and a plot."""
  out = tmp_path / "k.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "knowledge.py"), "--preset=smoke",
                         "--steps=3", "--variants=dense_1x,memory_plus", f"--root={tmp_path / 'runs'}",
                         f"--out={out}"], capture_output=True, text=True, env=env, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  payload = json.loads(out.read_text())
  assert {r["variant"] for r in payload["runs"]} == {"dense_1x", "memory_plus"}
  for r in payload["runs"]:
    assert 0.0 <= r["qa_exact_match"] <= 1.0 and r["tokens_per_s"] > 0 and r["qa_n"] == 64
  assert payload["summary"]["memory_plus"]["params_total"] > payload["summary"]["dense_1x"]["params_total"]
  assert (tmp_path / "k.png").stat().st_size > 1000
  assert payload["targets"] == {}  # smoke models learn nothing: no target is judged on them
  assert set(payload["runs"][0]["qa_by_attribute"]) == {"birth_date", "birth_city", "university", "employer",
                                                        "field", "instrument"}
  # Bits stored: the formula over the row's own per-attribute QA, facts and values (smoke: 200 people).
  assert payload["facts_by_attribute"] == {a: 200 for a in payload["runs"][0]["qa_by_attribute"]}
  for r in payload["runs"]:
    want = sum(em * 200 * math.log2(payload["values_by_attribute"][a]) for a, em in r["qa_by_attribute"].items())
    assert r["bits_stored"] == pytest.approx(want)
    assert r["bits_per_param"] == pytest.approx(want / r["params_total"])
  assert payload["runs"][0]["bits_per_value_param"] is None or payload["runs"][0]["params_values"] > 0
  # QA against training time: a curve from (0 s, 0) to the final evaluation; at its own training time
  # the dense 1x run scores its final QA.
  for r in payload["runs"]:
    assert r["curve"][0] == {"step": 0, "train_s": 0.0, "qa": 0.0, "qa_question": 0.0}
    assert r["curve"][-1]["step"] == 3 and r["curve"][-1]["qa"] == r["qa_exact_match"] and r["curve"][-1]["train_s"] > 0
    assert "qa_question_exact_match" in r
  dense = next(r for r in payload["runs"] if r["variant"] == "dense_1x")
  assert dense["qa_at_dense_1x_time"] == pytest.approx(dense["qa_exact_match"])
  assert payload["capacity_check"] is None  # smoke has no twice-as-long dense run
  # A finished run is not re-run: the second call reuses both workdirs.
  again = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "knowledge.py"), "--preset=smoke",
                          "--steps=3", "--variants=dense_1x,memory_plus", f"--root={tmp_path / 'runs'}",
                          f"--out={out}"], capture_output=True, text=True, env=env, timeout=600)
  assert again.returncode == 0 and "start" not in again.stdout


def test_scaling_sweep_end_to_end(tmp_path):
  """All three parts at toy sizes: size and usage runs through train.py, interleaved cost timing."""
  import scaling
  out = tmp_path / "s.json"
  scaling.main(["--preset=smoke", "--steps=3", "--sizes=16", "--cost_sizes=16", "--repeats=2",
                f"--root={tmp_path / 'runs'}", f"--out={out}"])
  payload = json.loads(out.read_text())
  assert [r["slots"] for r in payload["size"]] == [256]
  value_dim = knowledge.PRESETS["smoke"]["memory"]["model.memory.value_dim"]
  assert payload["size"][0]["params_values"] == 256 * value_dim  # one shared pool
  assert 0.0 <= payload["size"][0]["qa_exact_match"] <= 1.0
  assert {r["model"] for r in payload["cost"]["rows"]} == {"dense_ffn", "sparse_n16", "dense_n16"}
  assert all(len(r["times_s"]) == 2 for r in payload["cost"]["rows"])
  for r in payload["usage"]:
    assert r["steps"] == [1, 2, 3]  # evaluated every step (steps // 8 rounds down to 1)
    assert all(0.0 < u <= 1.0 for u in r["used"]) and all(k >= 0.0 for k in r["kl"])
  assert {r["qk_norm"] for r in payload["usage"]} == {True, False}
  assert (tmp_path / "s.png").stat().st_size > 1000


def test_continual_judge_applies_the_issue_ratios():
  import continual
  pre = {"qa_b": 0.02}
  row = lambda name, m, qa_b, forget: {"name": name, "method": m, "qa_b": qa_b, "forgetting": forget}
  base = [row("full", "full", 0.70, 0.60), row("lora", "lora", 0.66, 0.48), row("smf_far", "smf", 0.30, 0.0)]
  met = continual.judge(base + [row("smf", "smf", 0.64, 0.07)], pre)  # 0.07 <= 0.60 / 8 and <= 0.48 / 6
  assert met["met"] is True and met["smf_run"] == "smf" and met["smf_at_equal_learning"] == ["smf"]
  assert continual.judge(base + [row("smf", "smf", 0.64, 0.08)], pre)["met"] is False  # > 0.60 / 8
  assert continual.judge(base, pre)["met"] is False  # no smf run at 90% of full's learning
  assert continual.judge([row("full", "full", 0.02, 0.1)], pre)["met"] is None  # full learnt nothing
