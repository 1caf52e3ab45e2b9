"""``python -m memjax.generate``: continue prompts with a trained model, streaming the text as it comes.

  python -m memjax.generate --workdir=runs/default --prompt="Mara Quill was born in"
  python -m memjax.generate --export=runs/default/export --prompts_file=prompts.txt --json

The model comes from a training workdir (its latest checkpoint, or ``--step``) or from an export
(``load_exported``); the tokenizer from the export's ``tokenizer`` file, else from the run's data config.
Each prompt (``--prompt``, repeatable, or one per non-empty line of ``--prompts_file``) gets ``[bos]``
and is continued with ``memjax.generation.generate_text`` (greedy by default; ``--temperature``,
``--top_k``, ``--top_p``, ``--seed``; ``--stop`` strings; ``--max_new_tokens``). Text mode prints each
prompt and streams its continuation; ``--json`` prints one ``{"prompt", "completion"}`` line per prompt
(all prompts in one batch). Bad input is one ``error:`` line and exit 2: no or an unreadable checkpoint,
one whose arrays do not match its config, a prompt longer than the model's window, a bad option value.

As a library, ``memjax.generate`` is also callable: ``memjax.generate(model, tokens, lengths, ...)`` is
``memjax.generation.generate``.
"""

from __future__ import annotations

import json
import os
import sys
import types

from memjax.command import ArgumentParser, CommandLineError, run_command
from memjax.generation import generate, generate_text  # noqa: F401  (re-exported: memjax.generate(...))


def load_workdir(workdir: str, step: int | None = None, *, backend: str | None = None):
  """``(model, config, step)`` from a training workdir's checkpoint (latest by default), on one device.

  Raises ``CommandLineError`` (one line) when the workdir has no checkpoint, no such step, or arrays
  that do not match the config saved with them.

  Example:
    >>> model, cfg, step = load_workdir("runs/default")   # doctest: +SKIP
  """
  import dataclasses

  import jax

  from memjax import sharding
  from memjax.config_bridge import config_from_dict
  from memjax.model import merge_model
  from memjax.train.checkpoint import Checkpointer, first_line
  from memjax.train.step import make_step_fns, state_shardings, with_shardings

  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []
  if not steps:
    raise CommandLineError(f"--workdir={workdir}: no checkpoint (expected {directory}/<step>; train first)")
  if step is not None and step not in steps:
    raise CommandLineError(f"--step={step}: {workdir} has checkpoints at steps {steps}")
  ckpt = Checkpointer(workdir)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise CommandLineError(f"--workdir={workdir}: no finished checkpoint among {steps}")
    raw = ckpt.read_config(step)
    if raw is None:
      raise CommandLineError(f"--workdir={workdir}: checkpoint step {step} has no config")
    cfg = config_from_dict(raw)
    if backend is not None:
      memory = dataclasses.replace(cfg.model.memory, backend=backend)
      cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, memory=memory))
    fns = make_step_fns(cfg.model, cfg.train)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "memory": 1}, jax.devices()[:1])
    abstract = jax.eval_shape(fns.init, 0)
    target = with_shardings(abstract, state_shardings(fns, abstract, mesh,
                                                      sharding.axis_rules(cfg.model.memory.value_sharding)))
    try:
      state, _, _ = ckpt.restore(target, step)
    except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError or bare Exception
      raise CommandLineError(f"--workdir={workdir}: checkpoint step {step} does not match its config "
                             f"({first_line(e)})") from None
  finally:
    ckpt.close()
  return merge_model(fns.graphdef, state["params"], state["values"]), cfg, step


def load_export(path: str, *, backend: str | None = None):
  """``(model, config)`` from an export directory (``load_exported``), with one-line errors."""
  from memjax.train.checkpoint import first_line, load_exported
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CommandLineError(f"--export={path}: no export there (expected {path}/config.json and params/)")
  try:
    return load_exported(path, backend=backend)
  except (ValueError, KeyError, TypeError) as e:
    if type(e).__name__ == "ConfigError":
      raise
    raise CommandLineError(f"--export={path}: the parameters do not match config.json ({first_line(e)})") from None
  except Exception as e:  # noqa: BLE001 - TensorStore
    raise CommandLineError(f"--export={path}: unreadable export ({first_line(e)})") from None


def tokenizer_of(cfg, export_dir: str | None = None):
  """The run's tokenizer: the export's ``tokenizer`` file if there is one, else the data config's."""
  from memjax.data.tokenizers import load_tokenizer
  if export_dir is not None and os.path.isfile(os.path.join(export_dir, "tokenizer")):
    return load_tokenizer(os.path.join(export_dir, "tokenizer"))
  from memjax.data.pipeline import prepare_data, tokenizer_for
  return tokenizer_for(cfg.data, prepare_data(cfg.data))[0]


def _read_prompts(args) -> list[str]:
  prompts = list(args.prompt or [])
  if args.prompts_file is not None:
    try:
      with open(args.prompts_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise CommandLineError(f"--prompts_file={args.prompts_file}: cannot read it "
                             f"({getattr(e, 'strerror', None) or type(e).__name__})") from None
  if not prompts:
    raise CommandLineError("no prompt: give --prompt=TEXT (repeatable) or --prompts_file=FILE")
  return prompts


def parser() -> ArgumentParser:
  from memjax.config import BACKEND_NAMES
  p = ArgumentParser(prog="python -m memjax.generate", description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training workdir (its latest checkpoint)")
  source.add_argument("--export", help="an export directory (<workdir>/export)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
  p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  p.add_argument("--prompts_file", help="a text file, one prompt per non-empty line")
  p.add_argument("--json", action="store_true", help="one JSON line per prompt instead of streamed text")
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top_k", type=int, default=0, help="0 = no cut")
  p.add_argument("--top_p", type=float, default=1.0, help="1 = no cut")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="a string that ends the text (repeatable)")
  p.add_argument("--backend", choices=BACKEND_NAMES, default=None, help="the memory read's embedding_bag backend")
  return p


def main(argv: list[str] | None = None) -> int:
  from memjax.config import ConfigError, GenerateConfig
  args = parser().parse_args(argv)
  try:
    gen = GenerateConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop=tuple(args.stop))
  except ConfigError as e:
    flag = f"--{e.field}" if e.field != "stop" else "--stop"
    raise CommandLineError(f"{flag}={e.value!r} {e.rule}") from None
  prompts = _read_prompts(args)
  if args.workdir is not None:
    model, cfg, _ = load_workdir(args.workdir, args.step, backend=args.backend)
    tokenizer = tokenizer_of(cfg, os.path.join(args.workdir, "export"))
  else:
    model, cfg = load_export(args.export, backend=args.backend)
    tokenizer = tokenizer_of(cfg, args.export)
  window = cfg.train.seq_len
  if args.json:
    texts = generate_text(model, tokenizer, prompts, gen, window=window)
    for prompt, text in zip(prompts, texts):
      print(json.dumps({"prompt": prompt, "completion": text}), flush=True)
    return 0
  from memjax.generation import encode_prompts
  encode_prompts(tokenizer, prompts, window=window)  # every prompt checked before any output
  for prompt in prompts:
    sys.stdout.write(prompt)
    sys.stdout.flush()
    generate_text(model, tokenizer, [prompt], gen, window=window,
                  on_token=lambda _, piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")
    sys.stdout.flush()
  return 0


class _CallableModule(types.ModuleType):
  """Lets ``memjax.generate`` be called like ``memjax.generation.generate`` even after
  ``import memjax.generate`` has bound the package attribute to this module."""

  def __call__(self, *args, **kwargs):
    return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  run_command(main)
