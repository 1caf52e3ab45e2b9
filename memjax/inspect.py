"""Looking inside a trained model's memory: which slots a text reads, what a slot responds to, which
slots an answer depends on, and how evenly the slots are used.

Shapes:  B rows   T positions   H memory heads   k slots per head   R removal sets   m slots per set
A *read* is (layer, slot, weight): ``layer`` the block index in ``model.blocks``, ``slot`` a row of that
block's value table, ``weight`` its softmax weight summed over the heads that chose it.

1. ``slots_read(model, tokens)``: every position's reads, heaviest first.
2. ``top_contexts(model, tokenizer, corpus, layer, slot)``: the corpus positions that read one slot the
   most (a text file, a list of strings, or a data split via ``split_texts``), with their context.
3. ``attribute_answer(model, tokenizer, prompt, answer)``: the answer's log-probability (teacher forced,
   over the positions that predict the answer tokens), and for each of the top slots read there the drop
   in that log-probability when the slot is removed from the read at those positions (its weight set to 0,
   the others unchanged), ranked by drop. ``answer_with_slots_removed`` scores any sets of removed slots.
4. ``key_usage(model, tokenizer, corpus)`` counts reads per slot; ``plot_key_usage`` draws the sorted
   usage curve and the n x n key grid.

Removal goes through the read's ``read_mask`` (``memjax.memory.read.memory_read``): all removal sets are
evaluated in one batched forward pass. Single device only (no mesh).
"""

from __future__ import annotations

import functools
import heapq
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class SlotRead(NamedTuple):
  """One slot read at one position: block index, slot (row of the block's value table), weight."""

  layer: int
  slot: int
  weight: float


# ----- pure helpers ---------------------------------------------------------------------------------


def merge_heads(indices_xHxk, weights_xHxk):
  """Per position, the distinct slots and their weights summed over heads, heaviest first:
  ``(slots [..., H*k], weights [..., H*k])`` numpy, repeated slots after the first get weight 0 and slot -1.

  Example:
    >>> s, w = merge_heads(np.array([[3, 5], [5, 7]]), np.array([[0.6, 0.4], [0.9, 0.1]]))
    >>> s.tolist(), np.round(w, 2).tolist()
    ([5, 3, 7, -1], [1.3, 0.6, 0.1, 0.0])
  """
  idx = np.asarray(indices_xHxk).reshape(*np.shape(indices_xHxk)[:-2], -1)
  w = np.asarray(weights_xHxk, np.float64).reshape(idx.shape)
  order = np.argsort(idx, axis=-1, kind="stable")
  idx_s, w_s = np.take_along_axis(idx, order, -1), np.take_along_axis(w, order, -1)
  first = np.ones(idx_s.shape, bool)
  first[..., 1:] = idx_s[..., 1:] != idx_s[..., :-1]
  group = np.cumsum(first, axis=-1) - 1  # which distinct slot each entry belongs to
  flat_group = group.reshape(-1, group.shape[-1])
  sums = np.zeros(flat_group.shape)
  np.add.at(sums, (np.arange(flat_group.shape[0])[:, None], flat_group), w_s.reshape(flat_group.shape))
  sums = sums.reshape(group.shape)
  slots = np.full(idx.shape, -1, idx.dtype)
  np.put_along_axis(slots, group, idx_s, -1)  # every entry of a group writes the same slot
  n_distinct = group[..., -1:] + 1
  valid = np.arange(idx.shape[-1]) < n_distinct
  slots, sums = np.where(valid, slots, -1), np.where(valid, sums, 0.0)
  order = np.argsort(-sums, axis=-1, kind="stable")
  return np.take_along_axis(slots, order, -1), np.take_along_axis(sums, order, -1)


def removal_mask(slots_Rxm, layers_Rxm, positions_T, layer: int):
  """The ``read_mask`` that removes, in row r of a batch, the slots ``slots_Rxm[r]`` whose layer is ``layer``
  at the positions where ``positions_T`` is True (-1 pads a set). ``(indices [R, T, H, k]) -> [R, T, H, k]``.

  Example:
    >>> mask = removal_mask(jnp.array([[4]]), jnp.array([[1]]), jnp.array([False, True]), layer=1)
    >>> mask(jnp.full((1, 2, 1, 2), 4)).tolist()
    [[[[1.0, 1.0]], [[0.0, 0.0]]]]
  """
  def read_mask(indices_RxTxHxk):
    hit = (indices_RxTxHxk[..., None] == slots_Rxm[:, None, None, None, :]) & \
          (layers_Rxm == layer)[:, None, None, None, :] & (slots_Rxm >= 0)[:, None, None, None, :]
    removed = jnp.any(hit, axis=-1) & positions_T[None, :, None, None]
    return jnp.where(removed, 0.0, 1.0)
  return read_mask


@functools.partial(jax.jit, static_argnames=("graphdef", "memory_blocks"))
def _masked_logprobs(graphdef, state, tokens_RxT, targets_RxT, positions_T, slots_Rxm, layers_Rxm, *,
                     memory_blocks: tuple[int, ...]):
  """Log-probabilities of ``targets`` [R, T] and whether each is the argmax, with the removals applied."""
  model = nnx.merge(graphdef, state)
  masks = [removal_mask(slots_Rxm, layers_Rxm, positions_T, b) for b in memory_blocks]
  logits, _ = model(tokens_RxT, read_masks=masks)
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, targets_RxT[..., None], axis=-1)[..., 0]
  return picked, jnp.argmax(logits, axis=-1) == targets_RxT


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _reads(graphdef, state, tokens_BxT):
  _, aux = nnx.merge(graphdef, state)(tokens_BxT)
  return [(r.indices, r.weights) for r in aux["memory"]]


# ----- 1. what a text reads -------------------------------------------------------------------------


def raw_reads(model, tokens_BxT) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  """``{block index: (indices [B, T, H, k], weights [B, T, H, k])}`` of every memory block (numpy)."""
  graphdef, state = nnx.split(model)
  out = _reads(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32))
  return {b: (np.asarray(i), np.asarray(w)) for b, (i, w) in zip(model.memory_blocks, out)}


def slots_read(model, tokens_T, *, top: int | None = None) -> list[list[SlotRead]]:
  """For each position of one token sequence, the slots it reads, heaviest first over all memory blocks
  (at most ``top`` per position).

  Example:
    >>> from memjax.config import LMMemoryConfig, MemoryConfig, ModelConfig
    >>> from memjax.model import LM
    >>> cfg = ModelConfig(vocab_size=30, dim=16, num_layers=2, num_heads=2, head_dim=8, mlp_dim=32,
    ...                   memory=LMMemoryConfig(layer=MemoryConfig(n_keys=4, heads=2, k=2, key_dim=8,
    ...                                                            value_dim=16), layers=(1,)))
    >>> reads = slots_read(LM(cfg, rngs=nnx.Rngs(0)), [1, 5, 7], top=3)
    >>> len(reads), len(reads[0]), reads[0][0].layer
    (3, 3, 1)
  """
  tokens = np.asarray(tokens_T, np.int32).reshape(1, -1)
  per_pos: list[list[SlotRead]] = [[] for _ in range(tokens.shape[1])]
  for block, (idx, w) in raw_reads(model, tokens).items():
    slots, weights = merge_heads(idx[0], w[0])
    for t in range(tokens.shape[1]):
      per_pos[t] += [SlotRead(block, int(s), float(x)) for s, x in zip(slots[t], weights[t]) if s >= 0]
  return [sorted(p, key=lambda r: -r.weight)[:top] for p in per_pos]


# ----- 2. what a slot responds to -----------------------------------------------------------------


def split_texts(data_config, split: str = "validation", field: str = "text") -> list[str]:
  """The texts of a prepared data split (``memjax.data.pipeline.prepare_data``), for ``top_contexts``."""
  from memjax.data.pipeline import prepare_data
  source = prepare_data(data_config).as_data_source(split)
  return [source[i][field].decode() for i in range(len(source))]


def _documents(corpus) -> list[str]:
  if isinstance(corpus, (str, os.PathLike)):
    from memjax.data.errors import DataError
    try:
      with open(corpus, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise DataError(f"cannot read corpus {os.fspath(corpus)!r}: {getattr(e, 'strerror', None) or e}") from None
  return list(corpus)


def _windows(tokenizer, docs: Sequence[str], window: int):
  """(doc index, start, tokens) for windows of ``window`` tokens covering each ``[bos] + encode(doc)``."""
  for d, text in enumerate(docs):
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    for start in range(0, len(ids), window):
      yield d, start, ids[start:start + window]


def _batched_reads(model, tokenizer, docs, window: int, batch_size: int):
  """Yields ``(meta [(doc, start, ids)], {block: (indices, weights)})`` for fixed [batch, window] calls."""
  rows = list(_windows(tokenizer, docs, window))
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    tokens = np.full((batch_size, window), tokenizer.pad_id, np.int32)
    for r, (_, _, ids) in enumerate(chunk):
      tokens[r, :len(ids)] = ids
    yield chunk, raw_reads(model, tokens)


def top_contexts(model, tokenizer, corpus: str | os.PathLike | Iterable[str], layer: int, slot: int, *,
                 window: int = 64, top: int = 10, span: int = 12, batch_size: int = 16) -> list[dict]:
  """The ``top`` positions of a corpus that read ``slot`` of block ``layer`` with the most weight.

  ``corpus``: a text file (one document per non-empty line), or strings (e.g. ``split_texts(cfg.data)``).
  Each document is read as ``[bos] + encode(text)`` in windows of ``window`` tokens. Returns dicts
  ``{"weight", "doc", "position", "context" (the ``span`` tokens up to and including the position),
  "next" (the token after it)}``, heaviest first.

  Example:
    >>> top_contexts(model, tok, "corpus.txt", layer=2, slot=1234)[0]["context"]   # doctest: +SKIP
    ' Mara Quill was born in'
  """
  if layer not in model.memory_blocks:
    raise ValueError(f"layer={layer} is not a memory block; memory blocks: {model.memory_blocks}")
  heap: list[tuple[float, int, int, int]] = []
  docs = _documents(corpus)
  seq = 0
  for chunk, reads in _batched_reads(model, tokenizer, docs, window, batch_size):
    idx, w = reads[layer]
    weight_BxT = np.sum(np.where(idx == slot, w, 0.0), axis=(-1, -2))
    for r, (d, start, ids) in enumerate(chunk):
      for t in np.flatnonzero(weight_BxT[r, :len(ids)] > 0):
        seq += 1
        item = (float(weight_BxT[r, t]), -seq, d, start + int(t))  # ties: the earliest position wins
        if len(heap) < top:
          heapq.heappush(heap, item)
        else:
          heapq.heappushpop(heap, item)
  out = []
  for weight, _, d, pos in sorted(heap, key=lambda x: (-x[0], -x[1])):
    ids = [tokenizer.bos_id] + tokenizer.encode(docs[d])
    out.append({"weight": weight, "doc": d, "position": pos,
                "context": tokenizer.decode(ids[max(0, pos - span + 1):pos + 1]),
                "next": tokenizer.decode(ids[pos + 1:pos + 2])})
  return out


# ----- 3. attribution of an answer ------------------------------------------------------------------


class _Question(NamedTuple):
  tokens: np.ndarray  # [T] prompt + answer
  targets: np.ndarray  # [T] the next token at each position
  positions: np.ndarray  # [T] bool: the positions that predict the answer tokens


def _question(tokenizer, prompt: str, answer: str) -> _Question:
  prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
  answer_ids = tokenizer.encode(" " + answer)
  ids = np.asarray(prompt_ids + answer_ids, np.int32)
  targets = np.append(ids[1:], tokenizer.pad_id).astype(np.int32)
  positions = np.zeros(len(ids), bool)
  positions[len(prompt_ids) - 1:len(ids) - 1] = True
  return _Question(ids, targets, positions)


def answer_with_slots_removed(model, tokenizer, prompt: str, answer: str,
                              removed: Sequence[Sequence[tuple[int, int]]], *, chunk: int = 64,
                              at: str = "answer") -> list[dict]:
  """For each set of ``(layer, slot)`` pairs: the answer's log-probability with those slots removed from
  the read at the answer positions (``at="answer"``) or at every position of prompt and answer
  (``at="all"``), and ``"correct"``: every answer token is still the argmax (greedy decoding would
  still give the answer). An empty set is the unmodified model.

  Example:
    >>> base, without = answer_with_slots_removed(model, tok, "Mara was born in", "Lyon",
    ...                                           [[], [(2, 17), (2, 940)]])   # doctest: +SKIP
  """
  if at not in ("answer", "all"):
    raise ValueError(f"at={at!r}: must be 'answer' or 'all'")
  q = _question(tokenizer, prompt, answer)
  where_T = q.positions if at == "answer" else np.ones_like(q.positions)
  graphdef, state = nnx.split(model)
  m = max([len(s) for s in removed] + [1])
  out = []
  for start in range(0, len(removed), chunk):
    sets = list(removed[start:start + chunk])
    rows = len(sets)
    pad_rows = chunk if len(removed) > chunk else rows  # one shape per call
    slots = np.full((pad_rows, m), -1, np.int32)
    layers = np.full((pad_rows, m), -1, np.int32)
    for r, s in enumerate(sets):
      for j, (layer, slot) in enumerate(s):
        layers[r, j], slots[r, j] = layer, slot
    tokens = np.broadcast_to(q.tokens, (pad_rows, len(q.tokens)))
    targets = np.broadcast_to(q.targets, tokens.shape)
    logp, hit = _masked_logprobs(graphdef, state, jnp.asarray(tokens), jnp.asarray(targets),
                                 jnp.asarray(where_T), jnp.asarray(slots), jnp.asarray(layers),
                                 memory_blocks=tuple(model.memory_blocks))
    logp, hit = np.asarray(logp)[:rows], np.asarray(hit)[:rows]
    for r in range(rows):
      out.append({"logprob": float(logp[r][q.positions].sum()), "correct": bool(hit[r][q.positions].all())})
  return out


def answer_reads(model, tokenizer, prompt: str, answer: str) -> list[SlotRead]:
  """The ``(layer, slot)`` pairs read at the answer positions, with their weights summed over those
  positions and heads, heaviest first."""
  q = _question(tokenizer, prompt, answer)
  total: dict[tuple[int, int], float] = {}
  for block, (idx, w) in raw_reads(model, q.tokens[None]).items():
    slots, weights = merge_heads(idx[0][q.positions], w[0][q.positions])
    for s_row, w_row in zip(slots, weights):
      for s, x in zip(s_row, w_row):
        if s >= 0:
          total[(block, int(s))] = total.get((block, int(s)), 0.0) + float(x)
  return [SlotRead(b, s, x) for (b, s), x in sorted(total.items(), key=lambda kv: -kv[1])]


def attribute_answer(model, tokenizer, prompt: str, answer: str, *, top: int | None = 32) -> dict:
  """Attribution of an answer to memory slots (step 3 of the module doc).

  Returns ``{"logprob": the answer's log-probability, "correct": greedy would give the answer,
  "reads": every (layer, slot) read at the answer positions (``answer_reads``), "slots": the ``top``
  heaviest of them (None: all) as dicts {layer, slot, weight, drop, correct_without}, sorted by ``drop`` (log-prob
  lost when that slot alone is removed), largest first}``.

  Example:
    >>> att = attribute_answer(model, tok, "Mara Quill was born in", "Lyon")   # doctest: +SKIP
    >>> att["slots"][0]                                                          # doctest: +SKIP
    {'layer': 2, 'slot': 1734, 'weight': 0.81, 'drop': 3.2, 'correct_without': False}
  """
  reads = answer_reads(model, tokenizer, prompt, answer)
  candidates = reads[:top]
  scored = answer_with_slots_removed(model, tokenizer, prompt, answer,
                                     [[]] + [[(r.layer, r.slot)] for r in candidates])
  base = scored[0]
  slots = [{"layer": r.layer, "slot": r.slot, "weight": r.weight, "drop": base["logprob"] - s["logprob"],
            "correct_without": s["correct"]} for r, s in zip(candidates, scored[1:])]
  slots.sort(key=lambda d: -d["drop"])
  return {"logprob": base["logprob"], "correct": base["correct"], "reads": reads, "slots": slots}


# ----- 4. key usage ---------------------------------------------------------------------------------


def key_usage(model, tokenizer, corpus, *, window: int = 64, batch_size: int = 16) -> dict[int, np.ndarray]:
  """``{block index: weight mass per slot [num_slots]}`` summed over every real position of the corpus."""
  docs = _documents(corpus)
  mass: dict[int, np.ndarray] = {}
  for chunk, reads in _batched_reads(model, tokenizer, docs, window, batch_size):
    real = np.zeros((batch_size, window), bool)
    for r, (_, _, ids) in enumerate(chunk):
      real[r, :len(ids)] = True
    for block, (idx, w) in reads.items():
      num_slots = model.blocks[block].ffn.config.num_slots
      acc = mass.setdefault(block, np.zeros(num_slots))
      np.add.at(acc, idx[real].reshape(-1), w[real].reshape(-1))
  return mass


def plot_key_usage(mass_by_block: dict[int, np.ndarray], *, n_keys: int | None = None):
  """A matplotlib figure: per memory block, the slots' share of the read mass sorted descending (log-log,
  with the fraction of slots never read) and the mass on the ``n x n`` product-key grid. Returns the figure.

  Example:
    >>> fig = plot_key_usage({1: np.arange(16.0)})
    >>> len(fig.axes) >= 2
    True
  """
  import matplotlib.pyplot as plt
  blocks = sorted(mass_by_block)
  fig, axes = plt.subplots(len(blocks), 2, figsize=(9, 3.2 * len(blocks)), squeeze=False)
  for row, block in enumerate(blocks):
    mass = np.asarray(mass_by_block[block], np.float64)
    share = np.sort(mass)[::-1] / max(mass.sum(), 1e-30)
    ax = axes[row][0]
    ax.loglog(np.arange(1, len(share) + 1), np.maximum(share, 1e-12))
    ax.set_xlabel("slot rank")
    ax.set_ylabel("share of read mass")
    ax.set_title(f"block {block}: {np.mean(mass > 0):.1%} of {len(mass):,} slots read")
    n = n_keys or int(round(len(mass) ** 0.5))
    ax = axes[row][1]
    if n * n == len(mass):
      im = ax.imshow(mass.reshape(n, n), cmap="viridis")
      fig.colorbar(im, ax=ax)
      ax.set_xlabel("second-half key j")
      ax.set_ylabel("first-half key i")
      ax.set_title("read mass on the key grid (slot = i*n + j)")
  fig.tight_layout()
  return fig
