"""Writing and erasing facts through the memory: sparse updates of a few value rows of a trained model.

Shapes:  F facts   T tokens (prompt + answer, padded to a multiple of 8)   V vocabulary
         M slots of a value pool   Dv value width   S = ``top_t`` slots per pool (padded)

A *fact* is a (prompt, answer) pair: the prompt ends right before the answer, as in the knowledge base's
QA split (``memjax.data.qa.QAItem``, a ``{"prompt", "answer"}`` mapping or a 2-tuple). The model is an
``LM`` on one device, as ``memjax.load_exported`` (or ``memjax.generate.load_workdir``) returns it and
``memjax.inspect`` takes it; the tokenizer is the run's (``memjax.generate.tokenizer_of``). Nothing is
mutated: both functions return a new ``LM`` and an ``EditRecord``.

``write(model, facts, tokenizer=tok)`` teaches the facts (Lin et al. 2025, sparse memory finetuning,
on the facts alone):

1. Each fact becomes ``[bos] + encode(prompt) + encode(" " + answer)``; the answer positions are those
   whose logits predict the answer tokens.                                           -> tokens [F, T]
2. Per value pool, the reads of every slot at the answer positions (every reader, every head:
   ``memjax.train.finetune.slot_reads``) and the top ``top_t`` by tf-idf
   (``finetune.select_slots``; with no ``background`` every slot has the same idf, so the ranking is by
   reads alone).                                                                     -> ids [S] per pool
3. Adam (or SGD) on those rows only, at ``lr``, on the mean cross-entropy of the answer tokens, until
   every answer token of every fact is the argmax by at least ``margin`` logits (then greedy decoding
   gives the answer) or ``steps`` steps.   rows [S, Dv] -> table.at[ids].set(rows): every other row, and
   every other parameter, is bitwise the input's.

``erase(model, facts, tokenizer=tok)`` makes the model stop producing the answers:

1. Per fact, ``memjax.inspect.attribute_answer`` ranks the ``candidates`` heaviest slots read at the
   answer positions by the drop of the answer's log-probability when each is removed; the ``top_t``
   with a positive drop (per fact, their union over facts) are the slots that may change.
2. The same sparse optimisation, on the unlikelihood ``-log(1 - p(answer token))`` of the answer
   tokens, until for every fact some answer token is beaten by another by ``margin`` logits (greedy
   decoding then leaves the answer) or ``steps`` steps.

``produces(model, tokenizer, facts)`` says, per fact, whether greedy decoding of the prompt gives the
answer (every answer token the argmax given the ones before: the check of steps 3 and 2).

Single device only (no mesh), like ``memjax.inspect``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FACT_FIELDS = ("prompt", "answer", "attribute")  # "attribute" (a QA item's group) is accepted and ignored
OPTIMIZERS = ("adam", "sgd")


class Fact(NamedTuple):
  """One fact: ``prompt`` ends right before ``answer``."""

  prompt: str
  answer: str


@dataclasses.dataclass(frozen=True)
class EditRecord:
  """What ``write`` or ``erase`` changed.

  kind: "write" or "erase".
  slots: ``{pool key: sorted slot ids}`` of the rows that were allowed to change (every other row of
    every pool, and every other parameter, is bitwise the input's).
  update_norms: ``{pool key: ||new rows - old rows||_F}``.
  steps: optimisation steps taken.
  success: per fact, whether the edit holds (write: greedy gives the answer; erase: it does not).
  margins: per fact, the smallest answer-token logit margin over the runner-up (write; > 0: produced)
    or the largest margin of another token over an answer token (erase; > 0: not produced).
  loss: ``(first, last)`` loss of the optimisation.
  """

  kind: str
  slots: dict[str, list[int]]
  update_norms: dict[str, float]
  steps: int
  success: list[bool]
  margins: list[float]
  loss: tuple[float, float]

  @property
  def num_slots(self) -> int:
    """Rows allowed to change, over every pool."""
    return sum(len(s) for s in self.slots.values())

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


class Edited(NamedTuple):
  """What ``write`` and ``erase`` return: the new model and the record of what changed."""

  model: Any  # LM
  record: EditRecord


# ----- input checks ---------------------------------------------------------------------------------


def as_facts(facts) -> list[Fact]:
  """``facts`` as a list of ``Fact``: each a ``Fact``/``QAItem`` (``.prompt``, ``.answer``), a mapping
  with the fields ``prompt`` and ``answer`` (``attribute`` allowed and ignored) or a 2-tuple of strings.
  Raises ``ValueError`` naming the field for no facts, an unknown or missing field, or an empty answer.

  Example:
    >>> as_facts([("Mara was born in", "Lyon"), {"prompt": "Ada lives in", "answer": "Oslo"}])[1]
    Fact(prompt='Ada lives in', answer='Oslo')
    >>> as_facts([{"prompt": "x", "city": "y"}])
    Traceback (most recent call last):
    ...
    ValueError: facts[0].city: unknown field; a fact has the fields prompt, answer (and attribute, ignored)
  """
  if isinstance(facts, (str, bytes, Mapping)) or not isinstance(facts, Sequence):
    raise ValueError(f"facts: must be a list of (prompt, answer) facts, got {type(facts).__name__}")
  if not facts:
    raise ValueError("facts: empty; give at least one (prompt, answer) fact")
  out = []
  for i, f in enumerate(facts):
    if isinstance(f, Mapping):
      for key in f:
        if key not in FACT_FIELDS:
          raise ValueError(f"facts[{i}].{key}: unknown field; a fact has the fields prompt, answer "
                           "(and attribute, ignored)")
      for key in ("prompt", "answer"):
        if key not in f:
          raise ValueError(f"facts[{i}].{key}: missing")
      prompt, answer = f["prompt"], f["answer"]
    elif hasattr(f, "prompt") and hasattr(f, "answer"):
      prompt, answer = f.prompt, f.answer
    elif isinstance(f, (tuple, list)) and len(f) == 2:
      prompt, answer = f
    else:
      raise ValueError(f"facts[{i}]: must be a (prompt, answer) pair or a mapping with prompt and answer, "
                       f"got {f!r}")
    for key, v in (("prompt", prompt), ("answer", answer)):
      if not isinstance(v, str):
        raise ValueError(f"facts[{i}].{key}: must be a string, got {v!r}")
    if not answer.strip():
      raise ValueError(f"facts[{i}].answer: empty")
    out.append(Fact(prompt, answer))
  return out


def _check_settings(**settings) -> None:
  """``ValueError`` naming the first setting out of range (``optimizer`` one of ``OPTIMIZERS``; ``lr``
  a positive number; ``margin`` a number >= 0; every other one a positive int)."""
  for name, value in settings.items():
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if name == "optimizer":
      if value not in OPTIMIZERS:
        raise ValueError(f"optimizer={value!r}: unknown; allowed: {', '.join(OPTIMIZERS)}")
    elif name == "lr":
      if not (number and value > 0):
        raise ValueError(f"lr={value!r}: must be a positive number")
    elif name == "margin":
      if not (number and value >= 0):
        raise ValueError(f"margin={value!r}: must be a number >= 0")
    elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name}={value!r}: must be a positive int")


# ----- pure pieces ----------------------------------------------------------------------------------


class _Batch(NamedTuple):
  tokens: np.ndarray  # [F, T] int32
  targets: np.ndarray  # [F, T] int32: the next token
  answer: np.ndarray  # [F, T] bool: the positions that predict an answer token


def encode_facts(tokenizer, facts: Sequence[Fact], multiple: int = 8) -> _Batch:
  """Step 1: ``[bos] + encode(prompt) + encode(" " + answer)`` per fact, right-padded with ``pad_id`` to
  a common length (a multiple of ``multiple``: fewer shapes to compile), with the next-token targets and
  the answer positions.

  Example:
    >>> from memjax.data.tokenizers import ByteTokenizer
    >>> b = encode_facts(ByteTokenizer(), [Fact("ab", "c")])
    >>> b.tokens.shape, b.answer[0].nonzero()[0].tolist()   # [bos] a b " " c: " " and c predicted at 2, 3
    ((1, 8), [2, 3])
  """
  rows = []
  for f in facts:
    prompt = [tokenizer.bos_id] + tokenizer.encode(f.prompt)
    ids = prompt + tokenizer.encode(" " + f.answer)
    rows.append((ids, len(prompt)))
  t = -(-max(len(ids) for ids, _ in rows) // multiple) * multiple
  tokens = np.full((len(rows), t), tokenizer.pad_id, np.int32)
  targets = np.full((len(rows), t), tokenizer.pad_id, np.int32)
  answer = np.zeros((len(rows), t), bool)
  for r, (ids, n_prompt) in enumerate(rows):
    tokens[r, :len(ids)] = ids
    targets[r, :len(ids) - 1] = ids[1:]
    answer[r, n_prompt - 1:len(ids) - 1] = True
  return _Batch(tokens, targets, answer)


def answer_margins(logits_FxTxV, targets_FxT, answer_FxT):
  """Per fact ``(min margin [F], max beaten-by [F])``: over the answer positions, the smallest
  ``logit[target] - max other logit`` (> 0: greedy gives the answer) and the largest
  ``max other logit - logit[target]`` (> 0: greedy does not).

  Example:
    >>> logits = jnp.array([[[0.0, 2.0], [3.0, 0.0]]])          # F=1, T=2, V=2
    >>> lo, hi = answer_margins(logits, jnp.array([[1, 1]]), jnp.array([[True, True]]))
    >>> lo.tolist(), hi.tolist()
    ([-3.0], [3.0])
  """
  target = jnp.take_along_axis(logits_FxTxV, targets_FxT[..., None], axis=-1)[..., 0]
  others = jnp.where(jax.nn.one_hot(targets_FxT, logits_FxTxV.shape[-1], dtype=bool), -jnp.inf, logits_FxTxV)
  gap_FxT = target - jnp.max(others, axis=-1)
  lo = jnp.min(jnp.where(answer_FxT, gap_FxT, jnp.inf), axis=-1)
  hi = jnp.max(jnp.where(answer_FxT, -gap_FxT, -jnp.inf), axis=-1)
  return lo, hi


def _pool_of_block(model) -> dict[int, str]:
  """``{block index: pool key}`` of every memory block."""
  from memjax.model import value_pools
  out = {}
  for pool in value_pools(model):
    for j in pool.readers:
      out[model.memory_blocks[j]] = pool.key
  return out


def _num_slots(model) -> int:
  return model.blocks[model.memory_blocks[0]].ffn.config.num_slots


def _pad_ids(slots: dict[str, list[int]], width: int, num_slots: int) -> dict[str, np.ndarray]:
  """Slot ids per pool padded to ``width`` with ``num_slots`` (out of range: gathers clip, scatters drop)."""
  out = {}
  for key, ids in slots.items():
    arr = np.full((width,), num_slots, np.int32)
    arr[:len(ids)] = ids
    out[key] = arr
  return out


# ----- the optimisation -----------------------------------------------------------------------------


def _tables(values) -> dict[tuple, jax.Array]:
  return {tuple(p): v[...] for p, v in nnx.to_flat_state(values)}


def _with_rows(values, paths: dict[str, tuple], ids: dict[str, jax.Array], rows: dict[str, jax.Array]):
  """``values`` with ``table.at[ids].set(rows)`` in each pool (padding ids dropped)."""
  flat = {tuple(p): v for p, v in nnx.to_flat_state(values)}
  for key, path in paths.items():
    table = flat[path][...]
    flat[path] = flat[path].replace(table.at[ids[key]].set(rows[key].astype(table.dtype), mode="drop"))
  return nnx.from_flat_state(flat)


def _objective(kind: str, logits_FxTxV, targets_FxT, answer_FxT):
  mask = answer_FxT.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits_FxTxV, axis=-1)
  picked = jnp.take_along_axis(logp, targets_FxT[..., None], axis=-1)[..., 0]
  if kind == "write":
    per_token = -picked
  else:  # unlikelihood: -log(1 - p), computed stably from log p
    per_token = -jnp.log1p(-jnp.exp(jnp.minimum(picked, -1e-6)))
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "tx", "paths"))
def _step(graphdef, params, values, ids, rows, opt_state, tokens, targets, answer, *, kind, tx, paths):
  from memjax.model import merge_model
  paths_d = dict(paths)

  def loss_fn(rows):
    logits, _ = merge_model(graphdef, params, _with_rows(values, paths_d, ids, rows))(tokens)
    return _objective(kind, logits, targets, answer), logits

  (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(rows)
  lo, hi = answer_margins(logits, targets, answer)
  updates, opt_state = tx.update(g, opt_state, rows)
  return optax.apply_updates(rows, updates), opt_state, loss, lo, hi


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _margins(graphdef, state, tokens, targets, answer):
  logits, _ = nnx.merge(graphdef, state)(tokens)
  return answer_margins(logits, targets, answer)


@functools.lru_cache(maxsize=32)
def _transform(optimizer: str, lr: float):
  """One optax transformation per setting, so that repeated edits reuse one compiled step."""
  return optax.adam(lr) if optimizer == "adam" else optax.sgd(lr)


def _optimize(kind: str, model, batch: _Batch, slots: dict[str, list[int]], *, steps: int, lr: float,
              optimizer: str, margin: float, width: int):
  """Steps 3 / 2: the sparse optimisation; returns ``(Edited)``."""
  from memjax.model import merge_model, split_model, value_pools
  graphdef, params, values = split_model(model)
  pools = {p.key: tuple(p.path) for p in value_pools(model)}
  num_slots = _num_slots(model)
  ids = {k: jnp.asarray(v) for k, v in _pad_ids({k: slots.get(k, []) for k in pools}, width, num_slots).items()}
  tables = _tables(values)
  rows0 = {k: jnp.take(tables[path], ids[k], axis=0, mode="clip").astype(jnp.float32) for k, path in pools.items()}
  tx = _transform(optimizer, float(lr))
  rows, opt_state = rows0, tx.init(rows0)
  tokens, targets, answer = (jnp.asarray(x) for x in batch)
  paths = tuple(sorted(pools.items()))
  done = (lambda lo, hi: lo >= margin) if kind == "write" else (lambda lo, hi: hi >= margin)
  first = last = None
  taken = 0
  ok = np.asarray(done(*_margins(*nnx.split(model), tokens, targets, answer)))
  while taken < steps and not ok.all():
    new_rows, new_opt, loss, lo, hi = _step(graphdef, params, values, ids, rows, opt_state, tokens, targets,
                                            answer, kind=kind, tx=tx, paths=paths)
    first = float(loss) if first is None else first
    last = float(loss)
    ok = np.asarray(done(lo, hi))  # the margins of the rows before this update
    if ok.all():
      break
    rows, opt_state = new_rows, new_opt
    taken += 1
  new_values = _with_rows(values, dict(pools), ids, rows) if taken else values
  edited = nnx.clone(merge_model(graphdef, params, new_values))  # its own Variables: nothing shared with ``model``
  lo, hi = (np.asarray(x) for x in _margins(*nnx.split(edited), tokens, targets, answer))
  new_tables = _tables(new_values)
  norms = {k: float(np.linalg.norm(np.asarray(new_tables[p], np.float64) - np.asarray(tables[p], np.float64)))
           for k, p in pools.items()}
  record = EditRecord(kind=kind, slots={k: sorted(int(s) for s in slots.get(k, [])) for k in pools},
                      update_norms=norms, steps=taken,
                      success=[bool(x) for x in ((lo > 0) if kind == "write" else (hi > 0))],
                      margins=[float(x) for x in (lo if kind == "write" else hi)],
                      loss=(first if first is not None else float("nan"), last if last is not None else float("nan")))
  return Edited(edited, record)


# ----- the public functions ------------------------------------------------------------------------


def produces(model, tokenizer, facts) -> list[bool]:
  """Per fact, whether greedy decoding of the prompt gives the answer (every answer token is the argmax
  given the ones before; the answer may be followed by anything).

  Example:
    >>> produces(model, tok, [("Mara Quill was born in", "Lyon")])   # doctest: +SKIP
    [True]
  """
  facts = as_facts(facts)
  batch = encode_facts(tokenizer, facts, 32)
  lo, _ = _margins(*nnx.split(model), *(jnp.asarray(x) for x in batch))
  return [bool(x) for x in np.asarray(lo) > 0]


def background(model, tokenizer, texts, *, window: int = 128, batch_size: int = 1) -> tuple[dict, int]:
  """``({pool key: df [M]}, number of batches)``: in how many batches of ``texts`` (pretraining-like
  text, each read as ``[bos] + encode(text)`` in windows of ``window`` tokens, ``batch_size`` windows a
  batch) each slot was read, for ``write(..., background=, num_background=)``. With the default
  ``batch_size=1`` a batch is one window (one text, when texts fit the window): on the default model a
  16-window batch reads 96% of the 4,096 slots, so a per-batch df would tell the slots apart too little.

  Example:
    >>> df, n = background(model, tok, split_texts(cfg.data, "train")[:256])   # doctest: +SKIP
  """
  from memjax.inspect import _batched_reads, _documents
  from memjax.model import value_pools
  _check_settings(window=window, batch_size=batch_size)
  docs = _documents(texts)
  if not docs:
    raise ValueError("texts: empty; give at least one text")
  pools = value_pools(model)
  num_slots = _num_slots(model)
  df = {p.key: np.zeros((num_slots,), np.float32) for p in pools}
  n = 0
  for chunk, reads in _batched_reads(model, tokenizer, docs, window, batch_size):
    real = np.zeros((batch_size, window), bool)
    for r, (_, _, ids) in enumerate(chunk):
      real[r, :len(ids)] = True
    for p in pools:
      seen = np.zeros((num_slots,), bool)
      for j in p.readers:
        seen[reads[model.memory_blocks[j]][0][real].reshape(-1)] = True
      df[p.key] += seen
    n += 1
  return df, n


def write_slots(model, tokenizer, facts, *, top_t: int = 64, background: Mapping[str, Any] | None = None,
                num_background: int = 1) -> dict[str, list[int]]:
  """Step 2 of ``write``: ``{pool key: slot ids}``, the ``top_t`` slots per pool by tf-idf of their reads
  at the answer positions of ``facts`` (``background``: ``{pool key: df [M]}`` over ``num_background``
  batches, as ``<workdir>/finetune/background_df.npz`` of an smf run holds; None: reads alone).

  Example:
    >>> write_slots(model, tok, [("Mara Quill was born in", "Lyon")], top_t=8)   # doctest: +SKIP
    {'pool/values': [17, 88, 402, 940, 1734, 2210, 3001, 4007]}
  """
  from memjax.model import value_pools
  from memjax.train.finetune import select_slots, slot_reads
  facts = as_facts(facts)
  _check_settings(top_t=top_t, num_background=num_background)
  batch = encode_facts(tokenizer, facts, 32)
  from memjax.inspect import raw_reads
  reads = raw_reads(model, batch.tokens)
  num_slots = _num_slots(model)
  out = {}
  for pool in value_pools(model):
    idx = [jnp.asarray(reads[model.memory_blocks[j]][0]) for j in pool.readers]
    tf = slot_reads(idx, jnp.asarray(batch.answer), num_slots)
    if background is not None and pool.key not in background:
      raise ValueError(f"background: has no document frequencies for the pool {pool.key!r} "
                       f"(has {sorted(background)})")
    df = jnp.zeros((num_slots,)) if background is None else jnp.asarray(background[pool.key], jnp.float32)
    chosen = select_slots(tf, df, num_background if background is not None else 1, top_t)
    out[pool.key] = [int(s) for s in np.flatnonzero(np.asarray(chosen))]
  return out


def erase_slots(model, tokenizer, facts, *, top_t: int = 16, candidates: int = 64) -> dict[str, list[int]]:
  """Step 1 of ``erase``: ``{pool key: slot ids}``, per fact the ``top_t`` slots with the largest
  positive attribution (``memjax.inspect.attribute_answer`` over its ``candidates`` heaviest reads),
  their union over the facts.

  Example:
    >>> erase_slots(model, tok, [("Mara Quill was born in", "Lyon")], top_t=4)   # doctest: +SKIP
    {'pool/values': [88, 940, 1734, 3001]}
  """
  from memjax.inspect import attribute_answer
  from memjax.model import value_pools
  facts = as_facts(facts)
  _check_settings(top_t=top_t, candidates=candidates)
  pool_of = _pool_of_block(model)
  out: dict[str, set] = {p.key: set() for p in value_pools(model)}
  for f in facts:
    att = attribute_answer(model, tokenizer, f.prompt, f.answer, top=candidates)
    for s in [s for s in att["slots"] if s["drop"] > 0][:top_t]:
      out[pool_of[s["layer"]]].add(int(s["slot"]))
  return {k: sorted(v) for k, v in out.items()}


def write(model, facts, *, tokenizer, top_t: int = 64, steps: int = 200, lr: float = 0.03,
          optimizer: str = "adam", margin: float = 1.0, background: Mapping[str, Any] | None = None,
          num_background: int = 1) -> Edited:
  """Teaches ``facts`` by updating only the value rows they read (see the module doc, ``write``).

  Args:
    model: an ``LM`` on one device (``memjax.load_exported(path)[0]``); not modified.
    facts: (prompt, answer) facts (``as_facts``).
    tokenizer: the model's tokenizer.
    top_t: slots per value pool that may change (``write_slots``).
    steps: at most this many optimisation steps; fewer when every fact holds with ``margin``.
    lr, optimizer: ``"adam"`` or ``"sgd"`` at the constant ``lr`` on the selected rows.
    margin: stop once every answer token leads the runner-up by this many logits.
    background, num_background: background document frequencies for the tf-idf (``write_slots``).

  Returns ``Edited(model, record)``: the new ``LM`` (every parameter and every value row not in
  ``record.slots`` bitwise the input's) and the ``EditRecord``.

  Example:
    >>> new, rec = write(model, [("Mara Quill was born in", "Lyon")], tokenizer=tok)   # doctest: +SKIP
    >>> produces(new, tok, [("Mara Quill was born in", "Lyon")]), rec.slots            # doctest: +SKIP
    ([True], {'pool/values': [17, 88, ...]})
  """
  facts = as_facts(facts)
  _check_settings(top_t=top_t, steps=steps, lr=lr, optimizer=optimizer, margin=margin, num_background=num_background)
  slots = write_slots(model, tokenizer, facts, top_t=top_t, background=background, num_background=num_background)
  return _optimize("write", model, encode_facts(tokenizer, facts, 32), slots, steps=steps, lr=lr, optimizer=optimizer,
                   margin=margin, width=top_t)


def erase(model, facts, *, tokenizer, top_t: int = 16, candidates: int = 64, steps: int = 200, lr: float = 0.03,
          optimizer: str = "adam", margin: float = 1.0) -> Edited:
  """Makes the model stop producing the answers of ``facts`` by updating only the slots attributed to
  them (see the module doc, ``erase``).

  Args:
    model: an ``LM`` on one device; not modified.
    facts: (prompt, answer) facts the model (ideally) produces now.
    tokenizer: the model's tokenizer.
    top_t: per fact, how many of the top-attributed slots may change (``erase_slots``).
    candidates: how many of the heaviest slots read at the answer are attributed per fact.
    steps, lr, optimizer: as in ``write``.
    margin: stop once, for every fact, another token beats an answer token by this many logits.

  Returns ``Edited(model, record)`` as ``write`` does. A fact with no positively attributed slot gets
  nothing to change (its ``record.success`` then says whether it was produced before).

  Example:
    >>> new, rec = erase(model, [("Mara Quill was born in", "Lyon")], tokenizer=tok)   # doctest: +SKIP
    >>> produces(new, tok, [("Mara Quill was born in", "Lyon")])                       # doctest: +SKIP
    [False]
  """
  facts = as_facts(facts)
  _check_settings(top_t=top_t, candidates=candidates, steps=steps, lr=lr, optimizer=optimizer, margin=margin)
  slots = erase_slots(model, tokenizer, facts, top_t=top_t, candidates=candidates)
  width = max([top_t * len(facts)] + [len(v) for v in slots.values()])
  return _optimize("erase", model, encode_facts(tokenizer, facts, 32), slots, steps=steps, lr=lr, optimizer=optimizer,
                   margin=margin, width=width)
