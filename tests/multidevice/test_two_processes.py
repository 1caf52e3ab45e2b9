"""``train.py`` as 2 processes x 4 fake CPU devices (``jax.distributed`` on 127.0.0.1, gloo) trains
like one process with 8 devices fed the same global batches.

The pipeline shards documents by process, so a 2-process run reads other batches than a 1-process
run; the reference therefore builds each step's global batch from the two per-process pipelines
(process 0's rows first, as ``make_array_from_process_local_data`` lays them out on a data=8 mesh)
and runs the same jitted step in this process (8 fake devices). Losses agree to fp32 reduction-order
noise (rtol 1e-4). Evaluation runs too (validation loss, memory usage, QA decoding): its outputs are
replicated, so every process can read them.
"""

import time

import jax
import numpy as np

from helpers import CONFIGS, checkpoint_steps, launch_train_processes, logged_losses, records, tiny_raw
from memjax import sharding
from memjax.config_bridge import config_from_dict
from memjax.data import make_pipeline
from memjax.data.pipeline import BATCH_KEYS
from memjax.train.step import jit_steps, make_step_fns

STEPS = 2
OVERRIDES = {"train.steps": STEPS, "train.log_every": 1, "eval.eval_batches": 1, "eval.qa_max_items": 8,
             "eval.qa_batch_size": 8, "eval.qa_seq_len": 32, "train.seq_len": 32}


def _reference_losses(data_dir) -> list[float]:
  raw = tiny_raw(data_dir)
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    raw[section][field] = value
  cfg = config_from_dict(raw)
  tc = cfg.train
  pipes = [make_pipeline(cfg.data, seq_len=tc.seq_len, batch_size=tc.batch_size // 2, process_index=i,
                         process_count=2) for i in range(2)]
  cfg = cfg.with_vocab(pipes[0].tokenizer.vocab_size)
  steps = jit_steps(make_step_fns(cfg.model, tc), sharding.make_mesh(dict(data=8, fsdp=1, memory=1)),
                    cfg.model.memory.value_sharding)
  state, losses = steps.init(tc.seed), []
  for _ in range(tc.steps):
    local = [next(p.train) for p in pipes]
    batch = {k: jax.device_put(np.concatenate([np.asarray(b[k]) for b in local]), steps.batch_sharding)
             for k in BATCH_KEYS}
    state, m = steps.train(state, batch)
    losses.append(float(m["loss"]))
  return losses


def test_two_processes_train_like_one(tmp_path):
  data, workdir = tmp_path / "data", tmp_path / "w"
  want = _reference_losses(data)  # also prepares the dataset once (two processes at once would race)
  flags = [f"--config={CONFIGS}/tiny.py", f"--config.data.data_dir={data}"]
  flags += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  procs = launch_train_processes(flags, workdir, cwd=str(tmp_path))
  deadline = time.time() + 300
  try:
    while time.time() < deadline and any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, 0) for p in procs):
        break
      time.sleep(0.5)
  finally:
    outs = []
    for p in procs:
      if p.poll() is None:
        p.kill()
      outs.append(p.communicate())
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
  got = logged_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1)), got
  np.testing.assert_allclose([got[s] for s in sorted(got)], want, rtol=1e-4, atol=1e-5)
  assert checkpoint_steps(workdir) == [STEPS]  # both processes took part in the Orbax save
  assert (workdir / "export" / "config.json").exists()  # the export is a collective save
  final = [r for r in records(workdir) if "qa_exact_match" in r]
  assert final and {"val_loss", "kl", "used"} <= set(final[-1]), final
