"""``train.py`` as 2 processes x 4 fake CPU devices (``jax.distributed`` on 127.0.0.1, gloo) trains
like one process with 8 devices fed the same global batches.

The pipeline shards documents by process, so a 2-process run reads other batches than a 1-process
run; the reference therefore builds each step's global batch from the two per-process pipelines
(process 0's rows first, as ``make_array_from_process_local_data`` lays them out on a data=8 mesh)
and runs the same jitted step in one process. Losses agree to fp32 reduction-order noise (rtol 1e-4).
Evaluation runs too (validation loss, memory usage, QA decoding): its outputs are replicated, so
every process can read them.
"""

import json
import os
import subprocess
import sys
import textwrap
import time


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
OVERRIDES = {"train.steps": STEPS, "train.log_every": 1, "eval.eval_batches": 1, "eval.qa_max_items": 8,
             "eval.qa_batch_size": 8, "eval.qa_seq_len": 32, "train.seq_len": 32}
FLAGS = ["--config=" + os.path.join(REPO, "configs", "tiny.py")] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]

REFERENCE = textwrap.dedent("""
    import os, sys, json, dataclasses
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, @REPO@)
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from configs import tiny
    from memjax import sharding
    from memjax.data import make_pipeline
    from memjax.run_config import config_from_dict
    from memjax.train_lib import BATCH_KEYS, make_step_fns, state_shardings
    raw = tiny.get_config()
    for key, value in @OVERRIDES@.items():
      section, field = key.split(".")
      raw[section][field] = value
    raw.data.data_dir = @DATA@
    cfg = config_from_dict(raw)
    tc = cfg.train
    pipes = [make_pipeline(**dataclasses.asdict(cfg.data), seq_len=tc.seq_len, batch_size=tc.batch_size // 2,
                           qa_jsonl=None, process_index=i, process_count=2) for i in range(2)]
    cfg = cfg.with_vocab(pipes[0].tokenizer.vocab_size)
    mesh = sharding.make_mesh(dict(data=8, fsdp=1, memory=1))
    fns = make_step_fns(cfg.model, tc, backend=cfg.backend)
    abstract = jax.eval_shape(fns.init, 0)
    sh = state_shardings(fns, abstract, mesh, sharding.axis_rules(cfg.model.memory.value_sharding))
    bsh = sharding.batch_sharding(mesh)
    state = jax.jit(fns.init, out_shardings=sh)(tc.seed)
    step = jax.jit(fns.train_step, in_shardings=(sh, bsh), out_shardings=(sh, NamedSharding(mesh, PartitionSpec())))
    its = [p.train for p in pipes]
    losses = []
    for _ in range(tc.steps):
      local = [next(it) for it in its]
      batch = {k: jax.device_put(np.concatenate([np.asarray(b[k]) for b in local]), bsh) for k in BATCH_KEYS}
      state, m = step(state, batch)
      losses.append(float(m["loss"]))
    print("RESULT" + json.dumps(losses))
""")


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "memjax-test-jax-cache"))
  return env


def test_two_processes_train_like_one(tmp_path):
  import portpicker
  data, workdir = str(tmp_path / "data"), tmp_path / "w"
  # The reference also prepares the dataset once (two processes preparing it at once would race).
  script = (REFERENCE.replace("@REPO@", repr(REPO)).replace("@OVERRIDES@", repr(OVERRIDES))
            .replace("@DATA@", repr(data)))
  ref = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = json.loads([l for l in ref.stdout.splitlines() if l.startswith("RESULT")][-1][len("RESULT"):])

  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *FLAGS, f"--config.data.data_dir={data}",
           f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
           f"--process_id={i}", "--num_cpu_devices=4"]
    procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=_env(), cwd=str(tmp_path)))
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      if metrics.exists():
        records = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        done = any(r.get("step") == STEPS and "loss" in r for r in records)
        if done and (workdir / "checkpoints" / str(STEPS)).is_dir():
          break
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
    for p in procs:  # the final checkpoint and export follow the last metrics line
      try:
        p.wait(timeout=15)
      except subprocess.TimeoutExpired:
        pass
  finally:
    outs = []
    for p in procs:
      if p.poll() is None:
        p.kill()
      outs.append(p.communicate())
  assert metrics.exists(), outs[0][1][-3000:]
  got = {int(r["step"]): r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r}
  assert sorted(got) == list(range(1, STEPS + 1)), (got, outs[0][1][-3000:])
  for s, loss in got.items():
    assert abs(loss - want[s - 1]) <= 1e-5 + 1e-4 * abs(want[s - 1]), (got, want)
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert steps == [STEPS]  # both processes took part in the Orbax save
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
  assert (workdir / "export" / "config.json").exists()  # the export is a collective save
  final = [r for r in map(json.loads, metrics.read_text().splitlines()) if "qa_exact_match" in r]
  assert final and {"val_loss", "kl", "used"} <= set(final[-1]), final
