"""Evaluation during and after training: validation loss, memory key usage, closed-book QA.

``evaluate(cfg, steps, state, pipe)`` returns the flat metrics the loop logs (the README's metrics
contract): ``val_loss``; the memory usage statistics of the validation lookups (``used``, ``kl``,
``gini``, ``top50/90/99``, prefixed by the pool when a model has several); the same statistics of
the experts PEER blocks retrieve (``peer/used``, ``peer/kl``, ...; ``peer/<block>/used`` ... when a model
has several PEER blocks, each over its own experts, weighted by the gates); and, when QA items are
configured, ``qa_exact_match``, ``qa_n``, ``qa_chance`` and ``qa_exact_match/<attribute>`` (decoded
with the KV cache, ``memjax.generation``, in a single-process run; by re-running the window otherwise);
with ``data.kb_questions``, ``qa_question_exact_match`` and ``qa_question_n``: the question form
("Q: Which company does X work for? A:") on the people whose question-form pairs were not trained on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memjax.config import Config
from memjax.data.pipeline import BATCH_KEYS
from memjax.metrics import memory_usage
from memjax.train.step import Steps


def global_batch(batch: dict, steps: Steps, global_batch_size: int) -> dict:
  """This process's rows of a batch as global arrays laid out by ``steps.batch_sharding``."""
  out = {}
  for key in BATCH_KEYS:
    local = np.asarray(batch[key])
    out[key] = jax.make_array_from_process_local_data(steps.batch_sharding, local,
                                                      (global_batch_size, *local.shape[1:]))
  return out


def qa_chance(items) -> float:
  """Exact match of the best fact-free guesser: always the most common answer of each attribute.

  Example:
    >>> from memjax.data import QAItem
    >>> qa_chance([QAItem("a", "x", "city"), QAItem("b", "x", "city"), QAItem("c", "y", "city")])
    0.6666666666666666
  """
  groups: dict[str, dict[str, int]] = {}
  for it in items:
    counts = groups.setdefault(getattr(it, "attribute", "") or "", {})
    counts[it.answer] = counts.get(it.answer, 0) + 1
  return sum(max(c.values()) for c in groups.values()) / max(len(items), 1)


def evaluate(cfg: Config, steps: Steps, state, pipe) -> dict:
  """Validation loss, memory usage over the validation lookups, and QA exact match."""
  out: dict[str, Any] = {}
  lookups_by_pool: dict[str, list] = {}
  peer_blocks = [i for i in range(cfg.model.num_layers) if cfg.model.block_kind(i) == "peer"]
  peer_reads: dict[int, list] = {}
  if pipe.validation is not None and cfg.eval.eval_batches > 0:
    it = pipe.validation()
    total, count = 0.0, 0.0
    for _ in range(cfg.eval.eval_batches):
      try:
        batch = next(it)
      except StopIteration:
        break
      metrics = steps.eval(state, global_batch(batch, steps, cfg.train.batch_size))
      n = float(metrics["tokens"])
      total += float(metrics["ce"]) * n
      count += n
      for pool in steps.fns.pools:
        for j in pool.readers:
          idx, w = metrics["lookups"][j]
          lookups_by_pool.setdefault(pool.key, []).append((np.asarray(idx), np.asarray(w)))
      for block, (idx, g) in zip(peer_blocks, metrics.get("peer_lookups", ())):
        peer_reads.setdefault(block, []).append((np.asarray(idx), np.asarray(g)))
    if count:
      out["val_loss"] = total / count
  num_slots = cfg.model.memory.layer.num_slots
  for key, pairs in lookups_by_pool.items():
    idx = np.concatenate([p[0].reshape(-1) for p in pairs])
    w = np.concatenate([p[1].reshape(-1) for p in pairs])
    usage = memory_usage(jnp.asarray(idx), jnp.asarray(w), num_slots)
    prefix = "" if len(lookups_by_pool) == 1 else key + "/"
    out.update({prefix + k: float(v) for k, v in usage.items()})
  for block, pairs in peer_reads.items():
    idx = np.concatenate([p[0].reshape(-1) for p in pairs])
    g = np.concatenate([p[1].reshape(-1) for p in pairs])
    usage = memory_usage(jnp.asarray(idx), jnp.asarray(g), cfg.model.peer.num_experts)
    prefix = "peer/" if len(peer_reads) == 1 else f"peer/{block}/"
    out.update({prefix + k: float(v) for k, v in usage.items()})
  items = list(pipe.qa_items)
  questions = list(getattr(pipe, "qa_question_items", []))
  if (items or questions) and (cfg.eval.qa_from_kb or cfg.eval.qa_jsonl):
    from memjax.data.qa import qa_exact_match
    logits_fn = lambda tokens: np.asarray(steps.logits(state, jnp.asarray(tokens, jnp.int32)))
    greedy_fn = None
    if jax.process_count() == 1:  # one process: decode with the KV cache (same predictions, faster)
      from memjax.data.qa import kv_cache_greedy
      from memjax.model import merge_model
      model = merge_model(steps.fns.graphdef, state["params"], state["values"])
      greedy_fn = kv_cache_greedy(model, eos_id=pipe.tokenizer.eos_id, pad_id=pipe.tokenizer.pad_id,
                                  mesh=steps.mesh)
    score = lambda its: qa_exact_match(logits_fn, its[:cfg.eval.qa_max_items], pipe.tokenizer,
                                       batch_size=cfg.eval.qa_batch_size,
                                       max_answer_tokens=cfg.eval.qa_max_answer_tokens or None,
                                       seq_len=cfg.eval.qa_seq_len or cfg.train.seq_len, greedy_fn=greedy_fn)
    if items:
      items = items[:cfg.eval.qa_max_items]
      result = score(items)
      out["qa_exact_match"] = result["qa_exact_match"]
      out["qa_n"] = result["n"]
      out["qa_chance"] = qa_chance(items)
      out.update({f"qa_exact_match/{attr}": v for attr, v in result.get("by_attribute", {}).items()})
    if questions and cfg.eval.qa_from_kb:
      result = score(questions)
      out["qa_question_exact_match"] = result["qa_exact_match"]
      out["qa_question_n"] = result["n"]
  return out
