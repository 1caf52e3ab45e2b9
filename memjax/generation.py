"""Generation with a KV cache: prefill a batch of prompts, then one token per step, greedy or sampled.

Shapes:
  B rows   T prompt window (every row left-aligned in it)   N max_new_tokens   V vocabulary
  S cache length = T + N - 1   H attention heads   Dh head width

``generate(model, tokens_BxT, lengths_B, ...)`` works in these steps (one ``jax.jit`` per shape):

1. An empty cache: a ``(k, v)`` pair [B, S, H, Dh] per block (``LM.init_cache``); slot s holds position s.
2. Prefill: ``LM.decode`` over the whole window (positions 0..T-1) writes every block's keys and values
   and returns the logits at each row's last prompt token (``lengths_B - 1``). The pad ids right of a
   shorter prompt are written too, but a query attends only to slots at or before its own position,
   and generated tokens overwrite them in order before any query can see them.
3. Pick token 0 (``sample_token``); then for i = 1 .. N-1 feed token i-1 at position ``lengths + i - 1``
   through ``LM.decode`` with T = 1 (memory layers read for that token alone: they need no cache; MoE
   layers run dropless so a token's output does not depend on the other rows).
4. A row stops after ``eos_id`` (which is not emitted); the loop (``lax.while_loop``) ends when every row
   has stopped or N tokens are out. Stop strings are text, so they are applied by ``generate_text``
   (the streaming loop stops a row as soon as its text holds one; otherwise the text is cut after).

``sample_token``: greedy (argmax) when ``temperature == 0``; otherwise the logits divided by the
temperature, cut to the ``top_k`` largest (0 = all), then to the smallest set whose probability reaches
``top_p`` (1 = all), and sampled with ``jax.random.categorical`` under the key
``fold_in(fold_in(key(seed), step), row)``: a seed gives the same tokens every time.

Example:
  >>> from flax import nnx
  >>> from memjax.config import ModelConfig
  >>> from memjax.model import LM
  >>> model = LM(ModelConfig(vocab_size=40, dim=32, num_layers=2, num_heads=2, head_dim=16, mlp_dim=64),
  ...            rngs=nnx.Rngs(0))
  >>> out = generate(model, jnp.array([[1, 5, 6, 0], [1, 7, 8, 9]]), jnp.array([3, 4]), max_new_tokens=5)
  >>> out.tokens.shape, out.lengths.tolist()
  ((2, 5), [5, 5])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memjax.config import GenerateConfig


class Generation(NamedTuple):
  """What ``generate`` returns."""

  tokens: jax.Array  # [B, N] int32: the new tokens, ``pad_id`` after a row stopped
  lengths: jax.Array  # [B] int32: how many new tokens each row has (eos not counted)
  stopped: jax.Array  # [B] bool: the row ended at eos (not at max_new_tokens)


# ----- pure pieces ----------------------------------------------------------------------------------


def sample_token(logits_BxV, key, temperature, top_k, top_p):
  """One token per row [B] int32: argmax when ``temperature == 0``, else a sample from the
  temperature-scaled logits cut to the ``top_k`` largest (0 = no cut) and then to the nucleus of
  probability ``top_p`` (the fewest tokens whose probabilities reach it; 1 = no cut). Every argument
  may be traced (one compilation for all sampling settings). ``key``: one key per row [B] or one key.

  Example:
    >>> logits = jnp.array([[0.0, 3.0, 1.0]])
    >>> int(sample_token(logits, jax.random.key(0), 0.0, 0, 1.0)[0])
    1
    >>> int(sample_token(logits, jax.random.key(0), 1.0, 1, 1.0)[0])  # top_k=1 is greedy too
    1
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  if jnp.ndim(jax.random.key_data(key)) == 1:  # one key: split per row
    key = jax.random.split(key, logits_BxV.shape[0])
  greedy = lambda: jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  # Only the branch taken runs: greedy decoding does not pay for the sort over the vocabulary.
  return jax.lax.cond(temperature > 0, lambda: _sample(logits_BxV, key, temperature, top_k, top_p), greedy)


def _sample(logits_BxV, key_B, temperature, top_k, top_p):
  v = logits_BxV.shape[-1]
  scaled = logits_BxV / temperature
  desc_BxV = -jnp.sort(-scaled, axis=-1)
  top_k = jnp.asarray(top_k, jnp.int32)
  kth_Bx1 = jnp.take_along_axis(desc_BxV, jnp.clip(jnp.where(top_k > 0, top_k, v) - 1, 0, v - 1)
                                * jnp.ones((desc_BxV.shape[0], 1), jnp.int32), axis=-1)
  desc_BxV = jnp.where(desc_BxV >= kth_Bx1, desc_BxV, -jnp.inf)
  probs_BxV = jax.nn.softmax(desc_BxV, axis=-1)
  before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the strictly larger tokens
  in_nucleus = (before_BxV < jnp.asarray(top_p, jnp.float32)) & jnp.isfinite(desc_BxV)
  in_nucleus = in_nucleus.at[:, 0].set(True)
  floor_Bx1 = jnp.min(jnp.where(in_nucleus, desc_BxV, jnp.inf), axis=-1, keepdims=True)
  cut = jnp.where(scaled >= jnp.maximum(floor_Bx1, kth_Bx1), scaled, -jnp.inf)
  return jax.vmap(jax.random.categorical)(key_B, cut).astype(jnp.int32)


def _row_keys(seed_key, step, batch: int):
  step_key = jax.random.fold_in(seed_key, step)
  return jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(batch))


def prefill(model, tokens_BxT, lengths_B, cache_len: int):
  """Steps 1-2: ``(logits at the last prompt token [B, V], cache)``."""
  b, t = tokens_BxT.shape
  positions_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
  logits, cache, _ = model.decode(tokens_BxT, positions_BxT, model.init_cache(b, cache_len),
                                  logits_at_B=lengths_B - 1)
  return logits[:, 0], cache


def decode_step(model, token_B, position_B, cache):
  """Step 3, one token per row at its own position: ``(logits [B, V], cache)``."""
  logits, cache, _ = model.decode(token_B[:, None], position_B[:, None], cache)
  return logits[:, 0], cache


def _generate_pure(graphdef, state, tokens_BxT, lengths_B, seed, temperature, top_k, top_p, eos_id, pad_id,
                   *, max_new_tokens: int):
  model = nnx.merge(graphdef, state)
  b, t = tokens_BxT.shape
  lengths_B = lengths_B.astype(jnp.int32)
  key = jax.random.key(seed)
  logits_BxV, cache = prefill(model, tokens_BxT, lengths_B, t + max_new_tokens - 1)
  first_B = sample_token(logits_BxV, _row_keys(key, 0, b), temperature, top_k, top_p)
  stopped_B = first_B == eos_id
  out_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  out_BxN = out_BxN.at[:, 0].set(jnp.where(stopped_B, pad_id, first_B))
  count_B = (~stopped_B).astype(jnp.int32)

  def cond(carry):
    i, _, _, stopped, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(stopped)

  def body(carry):
    i, cache, last_B, stopped, out, count = carry
    logits, cache = decode_step(model, last_B, lengths_B + i - 1, cache)
    nxt = sample_token(logits, _row_keys(key, i, b), temperature, top_k, top_p)
    now_stopped = stopped | (nxt == eos_id)
    out = out.at[:, i].set(jnp.where(now_stopped, pad_id, nxt))
    count = count + (~now_stopped).astype(jnp.int32)
    return i + 1, cache, nxt, now_stopped, out, count

  carry = (jnp.ones((), jnp.int32), cache, first_B, stopped_B, out_BxN, count_B)
  _, _, _, stopped_B, out_BxN, count_B = jax.lax.while_loop(cond, body, carry)
  return Generation(out_BxN, count_B, stopped_B)


_generate_jit = jax.jit(_generate_pure, static_argnames=("graphdef", "max_new_tokens"))


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len"))
def _prefill_jit(graphdef, state, tokens_BxT, lengths_B, *, cache_len):
  return prefill(nnx.merge(graphdef, state), tokens_BxT, lengths_B.astype(jnp.int32), cache_len)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _step_jit(graphdef, state, token_B, position_B, cache):
  return decode_step(nnx.merge(graphdef, state), token_B, position_B, cache)


_sample_jit = jax.jit(sample_token)


def _check_batch(tokens_BxT, lengths_B, max_new_tokens):
  tokens_BxT = jnp.asarray(tokens_BxT, jnp.int32)
  if tokens_BxT.ndim != 2 or tokens_BxT.shape[1] < 1:
    raise ValueError(f"tokens must be int [B, T] with T >= 1, got shape {tokens_BxT.shape}")
  b, t = tokens_BxT.shape
  lengths_B = jnp.full((b,), t, jnp.int32) if lengths_B is None else jnp.asarray(lengths_B, jnp.int32)
  if lengths_B.shape != (b,):
    raise ValueError(f"lengths must have shape [B]=({b},), got {lengths_B.shape}")
  lens = np.asarray(lengths_B)
  if lens.min() < 1 or lens.max() > t:
    raise ValueError(f"lengths must be in [1, T={t}], got {lens.tolist()}")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
  return tokens_BxT, lengths_B


# ----- the public functions ------------------------------------------------------------------------


def generate(model, tokens_BxT, lengths_B=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
             pad_id: int = 0, mesh=None) -> Generation:
  """New tokens after each prompt, with a KV cache (see the module doc for the steps).

  Args:
    model: an ``LM`` (``memjax.model``), e.g. from ``load_exported``.
    tokens_BxT: int [B, T] prompts, each left-aligned (row b is ``tokens_BxT[b, :lengths_B[b]]``).
    lengths_B: int [B] prompt lengths in [1, T] (default: all T).
    max_new_tokens: N; the cache holds T + N - 1 positions.
    temperature, top_k, top_p, seed: sampling (``sample_token``); ``temperature=0`` is greedy.
    eos_id: a row stops after this token (not emitted); None: never.
    pad_id: fills ``tokens`` after a row stopped.
    mesh: run under ``jax.set_mesh(mesh)`` (memory reads then use the training's ``shard_map`` reads;
      the model's arrays keep the layout they have, e.g. ``load_exported(path, mesh)``'s).

  The whole loop is one jitted function of the model's state (compiled once per graph, batch shape and
  N); sampling settings are traced arguments. Returns ``Generation(tokens [B, N], lengths [B], stopped [B])``.

  Example:
    >>> from flax import nnx
    >>> from memjax.config import ModelConfig
    >>> from memjax.model import LM
    >>> model = LM(ModelConfig(vocab_size=40, dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64),
    ...            rngs=nnx.Rngs(0))
    >>> a = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4, temperature=1.0, seed=7)
    >>> b = generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4, temperature=1.0, seed=7)
    >>> a.tokens.tolist() == b.tokens.tolist()
    True
  """
  tokens_BxT, lengths_B = _check_batch(tokens_BxT, lengths_B, max_new_tokens)
  graphdef, state = nnx.split(model)
  args = (graphdef, state, tokens_BxT, lengths_B, jnp.asarray(seed, jnp.uint32), jnp.float32(temperature),
          jnp.int32(top_k), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id), jnp.int32(pad_id))
  if mesh is None:
    return _generate_jit(*args, max_new_tokens=max_new_tokens)
  with jax.set_mesh(mesh):
    return _generate_jit(*args, max_new_tokens=max_new_tokens)


def generate_stream(model, tokens_BxT, lengths_B=None, *, max_new_tokens: int = 32, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                    mesh=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """``generate`` one step at a time: yields ``(tokens [B], stopped [B])`` (numpy) per new token, the
  same tokens as ``generate`` for the same arguments (jitted prefill and step; the cache is donated).
  The caller may stop iterating at any point (a stop string). ``stopped[b]``: row b has ended (at eos
  now or before); its token is then meaningless.

  Example:
    >>> from flax import nnx
    >>> from memjax.config import ModelConfig
    >>> from memjax.model import LM
    >>> model = LM(ModelConfig(vocab_size=40, dim=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64),
    ...            rngs=nnx.Rngs(0))
    >>> steps = [tok for tok, _ in generate_stream(model, jnp.array([[1, 2, 3]]), max_new_tokens=4)]
    >>> np.stack(steps, axis=1).tolist() == generate(model, jnp.array([[1, 2, 3]]), max_new_tokens=4).tokens.tolist()
    True
  """
  tokens_BxT, lengths_B = _check_batch(tokens_BxT, lengths_B, max_new_tokens)
  graphdef, state = nnx.split(model)
  b, t = tokens_BxT.shape
  key = jax.random.key(jnp.asarray(seed, jnp.uint32))
  eos = -1 if eos_id is None else eos_id
  settings = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  ctx = jax.set_mesh(mesh) if mesh is not None else _nullcontext()
  with ctx:
    logits, cache = _prefill_jit(graphdef, state, tokens_BxT, lengths_B, cache_len=t + max_new_tokens - 1)
  stopped = np.zeros(b, bool)
  for i in range(max_new_tokens):
    with ctx:
      if i > 0:
        logits, cache = _step_jit(graphdef, state, token, lengths_B + i - 1, cache)
      token = _sample_jit(logits, _row_keys(key, i, b), *settings)
    host = np.asarray(token)
    stopped = stopped | (host == eos)
    yield host, stopped.copy()
    if stopped.all():
      return


class _nullcontext:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def encode_prompts(tokenizer, prompts: Sequence[str], *, window: int, pad_id: int | None = None):
  """``([bos] + encode(p))`` for each prompt, left-aligned: ``(tokens [B, T] int32, lengths [B])`` with T
  the longest prompt rounded up to a multiple of 8 (at most ``window``). Raises ``DataError`` for a prompt longer than ``window`` (the model's window).

  Example:
    >>> from memjax.data.tokenizers import ByteTokenizer
    >>> tokens, lengths = encode_prompts(ByteTokenizer(), ["ab", "c"], window=8)
    >>> tokens.shape, lengths.tolist()
    ((2, 8), [3, 2])
  """
  from memjax.data.errors import DataError
  if not prompts:
    raise DataError("generation needs at least one prompt, got none")
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  for i, row in enumerate(ids):
    if len(row) > window:
      raise DataError(f"prompt {i} is {len(row)} tokens (with bos), longer than the model's window of "
                      f"{window} (train.seq_len)")
  t = min(window, -(-max(len(r) for r in ids) // 8) * 8)  # rounded up to 8: fewer shapes to compile
  tokens = np.full((len(ids), t), tokenizer.pad_id if pad_id is None else pad_id, np.int32)
  for i, row in enumerate(ids):
    tokens[i, :len(row)] = row
  return tokens, np.array([len(r) for r in ids], np.int32)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """``text`` up to (not including) the first of the ``stop`` strings, and whether one was found.

  Example:
    >>> cut_at_stop("Lyon.\\nMara", ["\\n"])
    ('Lyon.', True)
  """
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def generate_text(model, tokenizer, prompts: Sequence[str], config: GenerateConfig = GenerateConfig(), *,
                  window: int, mesh=None, on_token: Callable[[int, str], Any] | None = None) -> list[str]:
  """Continuations of text prompts: ``encode_prompts``, ``generate`` (or ``generate_stream`` when
  ``on_token`` is given), decoded and cut at ``config.stop``.

  ``on_token(row, text)`` is called with each new piece of a row's text as it comes (streaming);
  a row stops at eos, at a stop string, or after ``config.max_new_tokens``.

  Example:
    >>> from flax import nnx
    >>> from memjax.config import ModelConfig
    >>> from memjax.data.tokenizers import ByteTokenizer
    >>> from memjax.model import LM
    >>> tok = ByteTokenizer()
    >>> model = LM(ModelConfig(vocab_size=tok.vocab_size, dim=32, num_layers=1, num_heads=2, head_dim=16,
    ...                        mlp_dim=64), rngs=nnx.Rngs(0))
    >>> out = generate_text(model, tok, ["Hi", "Hello"], GenerateConfig(max_new_tokens=3), window=16)
    >>> len(out)
    2
  """
  tokens, lengths = encode_prompts(tokenizer, prompts, window=window)
  kwargs = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                top_p=config.top_p, seed=config.seed, eos_id=tokenizer.eos_id, mesh=mesh)
  if on_token is None:
    out = generate(model, tokens, lengths, pad_id=tokenizer.pad_id, **kwargs)
    toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
    return [cut_at_stop(tokenizer.decode(toks[b, :lens[b]].tolist()), config.stop)[0] for b in range(len(prompts))]
  ids: list[list[int]] = [[] for _ in prompts]
  shown = [""] * len(prompts)
  done = np.zeros(len(prompts), bool)
  for step_tokens, stopped in generate_stream(model, tokens, lengths, **kwargs):
    for b in np.flatnonzero(~done):
      if stopped[b]:
        done[b] = True
        continue
      ids[b].append(int(step_tokens[b]))
      text, hit = cut_at_stop(tokenizer.decode(ids[b]), config.stop)
      if hit:
        done[b] = True
      if text.startswith(shown[b]) and len(text) > len(shown[b]):
        on_token(int(b), text[len(shown[b]):])
        shown[b] = text
    if done.all():
      break
  return [cut_at_stop(tokenizer.decode(r), config.stop)[0] for r in ids]
