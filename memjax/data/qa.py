"""QA evaluation: ask a causal LM for the facts back, by batched greedy decoding.

Shapes: ``B`` batch rows, ``T`` the fixed window (at most ``seq_len``), ``V`` vocabulary.

``qa_exact_match(logits_fn, items, tokenizer)`` works in these steps:

1. Each prompt becomes ``[bos] + encode(prompt)``, left-aligned in a row of ``T`` pad ids; a
   prompt longer than ``T - max_answer_tokens`` keeps its last tokens (counted in
   ``"prompts_truncated"``). The last batch is filled up with dummy rows, so ``logits_fn`` always
   sees ``int32 [B, T]`` and is traced once under ``jax.jit``.
2. For ``max_answer_tokens`` steps: run ``logits_fn(tokens_BxT) -> logits_BxTxV`` over the whole
   window (``T`` cut to what the longest prompt and its answer need, see ``decode_window``), take
   the argmax at each row's last filled position and write it after. The model is causal, so
   the pad ids to the right change nothing. A row stops at ``eos`` or when its decoded
   continuation contains a newline; decoding ends early when all rows have stopped.
3. The continuation is decoded, cut at the first newline and normalised (strip, collapse runs of
   whitespace). It matches when it starts with the normalised answer and the answer ends on a word
   boundary: the next character, if any, is not alphanumeric (``"Lyon."`` and ``"Lyon, where"``
   match ``"Lyon"``; ``"Lyons"`` does not).

Items are ``QAItem``s (or mappings with ``"prompt"`` and ``"answer"``) from the knowledge base's
``qa`` split (``load_qa_items``) or from a JSONL file of ``{"prompt", "answer"}`` lines
(``read_qa_jsonl``; extra keys are ignored except ``"attribute"``, which groups the scores).

Example:
  >>> normalize_answer("  New   York \\n")
  'New York'
  >>> answer_matches(" Lyon. Mara studied", "Lyon"), answer_matches(" Lyons", "Lyon")
  (True, False)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from memjax.data.errors import DataError, jsonl_objects
from memjax.data.tokenizers import Tokenizer


@dataclasses.dataclass(frozen=True)
class QAItem:
  """One question: the prompt ends right before the answer; ``attribute`` groups scores ("" = none)."""

  prompt: str
  answer: str
  attribute: str = ""


def normalize_answer(text: str) -> str:
  """Strips and collapses whitespace."""
  return " ".join(text.split())


def answer_matches(continuation: str, answer: str) -> bool:
  """Whether a decoded continuation gives ``answer`` (see step 3 of the module doc)."""
  pred = normalize_answer(continuation.split("\n", 1)[0])
  want = normalize_answer(answer)
  if not want or not pred.startswith(want):
    return False
  return len(pred) == len(want) or not pred[len(want)].isalnum()


def _as_item(item: QAItem | Mapping[str, Any]) -> QAItem:
  if isinstance(item, QAItem):
    return item
  return QAItem(str(item["prompt"]), str(item["answer"]), str(item.get("attribute", "") or ""))


def read_qa_jsonl(path: str | os.PathLike) -> list[QAItem]:
  """Reads ``{"prompt": str, "answer": str}`` lines (blank lines skipped).

  Raises ``DataError`` naming the file and line for a malformed line, and for a missing or empty file.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      blob = f.read()
  except OSError as err:
    raise DataError(f"cannot read QA file {path!r}: {err.strerror}") from None
  items = []
  for lineno, record in jsonl_objects(blob, path, expected='a JSON object with "prompt" and "answer"'):
    for key in ("prompt", "answer"):
      if not isinstance(record.get(key), str):
        raise DataError(f'{path}:{lineno}: field "{key}" must be a string, got {record.get(key)!r}')
    if not record["answer"].strip():
      raise DataError(f'{path}:{lineno}: field "answer" is empty')
    attribute = record.get("attribute", "")
    items.append(QAItem(record["prompt"], record["answer"], attribute if isinstance(attribute, str) else ""))
  if not items:
    raise DataError(f"QA file {path!r} has no items")
  return items


def load_qa_items(data_dir: str | os.PathLike | None = None, kb: str = "small", kb_seed: int = 0, *,
                  split: str = "qa") -> list[QAItem]:
  """Every fact of a knowledge base once, from its ``qa`` split (building it if needed); with
  ``split="qa_question"`` the question form of the facts of the people held out from question
  training (``data.kb_questions``). ``kb`` is any ``data.kb`` value: a synthetic size or a
  ``world_*`` preset of real-world facts or a ``numbers_*`` preset of numeric facts."""
  if split not in ("qa", "qa_question"):
    raise ValueError(f"split={split!r}: allowed 'qa', 'qa_question'")
  from memjax.config import default_data_dir
  from memjax.data.knowledge import prepare_kb

  builder = prepare_kb(data_dir if data_dir is not None else default_data_dir(), kb, kb_seed)
  source = builder.as_data_source(split)
  return [QAItem(r["prompt"].decode(), r["answer"].decode(), r["attribute"].decode())
          for r in (source[i] for i in range(len(source)))]


def qa_exact_match(
    logits_fn: Callable[[np.ndarray], Any],
    items: Sequence[QAItem | Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    batch_size: int = 32,
    max_answer_tokens: int | None = None,
    seq_len: int = 128,
    return_predictions: bool = False,
    greedy_fn: Callable[[np.ndarray, np.ndarray, int], Any] | None = None,
) -> dict[str, Any]:
  """Greedy-decodes an answer after each prompt and scores exact match (see the module doc).

  Args:
    logits_fn: causal LM, ``int32 [B, T] -> float [B, T, V]`` (numpy or jax arrays).
    items: ``QAItem``s or mappings with ``"prompt"``, ``"answer"`` (and optional ``"attribute"``).
    tokenizer: the tokenizer the model was trained with.
    batch_size: ``B`` rows per ``logits_fn`` call.
    max_answer_tokens: decoding steps; ``None`` means one more than the longest
      ``encode(" " + answer)`` among the items.
    seq_len: the largest window ``T`` (prompts are cut to fit it; the window used is
      ``decode_window``'s, the same for every call).
    return_predictions: also return ``"predictions"``, one dict per item.
    greedy_fn: decode with a KV cache instead of re-running the window: ``(tokens [B, T] int32, lengths
      [B], steps) -> (new tokens [B, steps], counts [B])``, greedy and stopping at ``tokenizer.eos_id``
      (``kv_cache_greedy(model)`` builds one). ``T`` is the longest prompt rounded up to 8; rows are
      cut at the first newline as in step 2, so the predictions are the window re-run's. ``logits_fn``
      may then be None.

  Returns:
    ``{"qa_exact_match": float, "n": int, "prompts_truncated": int}``, plus
    ``"by_attribute": {attribute: float}`` when items carry attributes and ``"predictions"``
    (``prompt``, ``answer``, ``prediction`` (normalised continuation), ``correct``) if asked.
  """
  items = [_as_item(it) for it in items]
  if not items:
    raise DataError("qa_exact_match needs at least one item, got none")
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise DataError(f"qa_exact_match {name}={value!r} must be a positive int")
  if max_answer_tokens is None:
    max_answer_tokens = 1 + max(len(tokenizer.encode(" " + it.answer)) for it in items)
  if isinstance(max_answer_tokens, bool) or not isinstance(max_answer_tokens, int) or max_answer_tokens <= 0:
    raise DataError(f"qa_exact_match max_answer_tokens={max_answer_tokens!r} must be a positive int")
  if max_answer_tokens >= seq_len:
    raise DataError(f"qa_exact_match max_answer_tokens={max_answer_tokens} must be < seq_len={seq_len} "
                    "(the window must hold the prompt's last token and the answer)")

  max_prompt = seq_len - max_answer_tokens
  prompts, truncated = [], 0
  for it in items:
    ids = [tokenizer.bos_id] + tokenizer.encode(it.prompt)
    if len(ids) > max_prompt:
      ids, truncated = ids[-max_prompt:], truncated + 1
    prompts.append(ids)

  window = decode_window(prompts, max_answer_tokens, seq_len)
  continuations: list[str] = []
  for start in range(0, len(items), batch_size):
    chunk = prompts[start:start + batch_size]
    if greedy_fn is not None:
      continuations.extend(_cached_batch(greedy_fn, chunk, tokenizer, batch_size=batch_size,
                                         width=min(window, -(-max(len(p) for p in prompts) // 8) * 8),
                                         steps=max_answer_tokens))
    else:
      continuations.extend(_greedy_batch(logits_fn, chunk, tokenizer, batch_size=batch_size, seq_len=window,
                                         steps=max_answer_tokens))

  correct = [answer_matches(c, it.answer) for c, it in zip(continuations, items)]
  result: dict[str, Any] = {"qa_exact_match": float(np.mean(correct)), "n": len(items),
                            "prompts_truncated": truncated}
  if any(it.attribute for it in items):
    groups: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct):
      groups.setdefault(it.attribute, []).append(ok)
    result["by_attribute"] = {k: float(np.mean(v)) for k, v in sorted(groups.items())}
  if return_predictions:
    result["predictions"] = [
        {"prompt": it.prompt, "answer": it.answer, "prediction": normalize_answer(c.split("\n", 1)[0]),
         "correct": ok} for it, c, ok in zip(items, continuations, correct)]
  return result


def decode_window(prompts: Sequence[Sequence[int]], max_answer_tokens: int, seq_len: int) -> int:
  """The width of every ``logits_fn`` call: the longest prompt plus the answer budget, rounded up
  to a multiple of 8 and at most ``seq_len``.

  A causal model's logits at a position do not depend on what lies to its right, so cutting the
  pad ids after the longest prompt's answer changes no prediction; it only stops paying for them
  (knowledge-base prompts and answers fit in 32 tokens, so a 64-token window does twice the work).

  Example:
    >>> decode_window([[1, 5, 6], [1, 7]], max_answer_tokens=4, seq_len=64)
    8
    >>> decode_window([[1] * 60], max_answer_tokens=4, seq_len=64)
    64
  """
  need = max(len(p) for p in prompts) + max_answer_tokens
  return min(seq_len, -(-need // 8) * 8)


def _cached_batch(greedy_fn, prompts: list[list[int]], tokenizer: Tokenizer, *, batch_size: int, width: int,
                  steps: int) -> list[str]:
  """``_greedy_batch`` through ``greedy_fn`` (one call: prefill and every step with a KV cache)."""
  n = len(prompts)
  tokens_BxT = np.full((batch_size, width), tokenizer.pad_id, np.int32)
  length_B = np.ones(batch_size, np.int32)
  tokens_BxT[n:, 0] = tokenizer.bos_id  # dummy rows
  for b, ids in enumerate(prompts):
    tokens_BxT[b, :len(ids)] = ids
    length_B[b] = len(ids)
  new_BxN, count_B = greedy_fn(tokens_BxT, length_B, steps)
  new_BxN, count_B = np.asarray(new_BxN), np.asarray(count_B)
  out = []
  for b in range(n):
    ids: list[int] = []
    for tok in new_BxN[b, :count_B[b]].tolist():  # counts stop before eos
      ids.append(tok)
      if "\n" in tokenizer.decode(ids):
        break
    out.append(tokenizer.decode(ids))
  return out


def kv_cache_greedy(model, *, eos_id: int, pad_id: int = 0, mesh=None):
  """``greedy_fn`` for ``qa_exact_match`` from an ``LM``: ``memjax.generation.generate``, greedy.

  Example:
    >>> fn = kv_cache_greedy(model, eos_id=tok.eos_id)        # doctest: +SKIP
    >>> qa_exact_match(None, items, tok, greedy_fn=fn)        # doctest: +SKIP
  """
  from memjax.generation import generate

  def greedy_fn(tokens_BxT, lengths_B, steps):
    out = generate(model, tokens_BxT, lengths_B, max_new_tokens=steps, eos_id=eos_id, pad_id=pad_id, mesh=mesh)
    return out.tokens, out.lengths
  return greedy_fn


def _greedy_batch(logits_fn, prompts: list[list[int]], tokenizer: Tokenizer, *, batch_size: int,
                  seq_len: int, steps: int) -> list[str]:
  """Decoded continuations of up to ``batch_size`` prompts (fixed ``[B, T]`` calls)."""
  n = len(prompts)
  tokens_BxT = np.full((batch_size, seq_len), tokenizer.pad_id, np.int32)
  length_B = np.ones(batch_size, np.int64)
  tokens_BxT[n:, 0] = tokenizer.bos_id  # dummy rows
  for b, ids in enumerate(prompts):
    tokens_BxT[b, :len(ids)] = ids
    length_B[b] = len(ids)
  done_B = np.arange(batch_size) >= n
  generated: list[list[int]] = [[] for _ in range(n)]
  rows_B = np.arange(batch_size)
  for _ in range(steps):
    logits_BxTxV = np.asarray(logits_fn(tokens_BxT))
    next_B = np.argmax(logits_BxTxV[rows_B, length_B - 1], axis=-1).astype(np.int32)
    for b in np.flatnonzero(~done_B):
      tok = int(next_B[b])
      if tok == tokenizer.eos_id:
        done_B[b] = True
        continue
      generated[b].append(tok)
      tokens_BxT[b, length_B[b]] = tok
      length_B[b] += 1
      if "\n" in tokenizer.decode(generated[b]):
        done_B[b] = True
    if done_B.all():
      break
  return [tokenizer.decode(ids) for ids in generated]
