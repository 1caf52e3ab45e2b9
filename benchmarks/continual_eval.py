"""QA exact match and validation loss of a trained run on a knowledge-base world: the learning side
(the new facts) and the forgetting side (the old facts) of a finetuning run (docs/continual.md).

  python benchmarks/continual_eval.py runs/finetune_smf/export --kb_seed=0   # old facts (A)
  python benchmarks/continual_eval.py runs/default --kb_seed=1               # new facts (B), before

The model, its tokenizer and the rest of the data config come from the run (a workdir or an
export); ``--kb_seed`` picks the world whose QA split and validation text are scored. Prints one
JSON line. (Not yet the full benchmark of issue 22: no grid, no plot, no results file.)
"""

from __future__ import annotations

import dataclasses
import json

import jax

from memjax import sharding
from memjax.command import ArgumentParser, run_command
from memjax.data import make_pipeline
from memjax.train.evaluate import evaluate
from memjax.train.finetune import load_source_params, read_source
from memjax.train.step import jit_steps, make_step_fns


def score(path: str, kb_seed: int) -> dict:
  """``{"qa", "val_loss"}`` of the run at ``path`` on the knowledge-base world ``kb_seed``.

  Example:
    >>> score("runs/default", 0)["qa"]   # doctest: +SKIP
    0.6855
  """
  src = read_source(path)
  cfg = src.config
  tok = cfg.data.tokenizer
  if tok == "bpe":  # the tokenizer the run trained on its own data, not one trained on the other world
    from memjax.data.pipeline import tokenizer_for
    tok = "sentencepiece:" + tokenizer_for(cfg.data)[1]
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kb_seed=kb_seed, tokenizer=tok),
                            finetune=dataclasses.replace(cfg.finetune, method=None))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "memory": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    steps = jit_steps(make_step_fns(cfg.model, cfg.train), mesh, cfg.model.memory.value_sharding)
    params, values = load_source_params(src, mesh, cfg.model.memory.value_sharding)
    pipe = make_pipeline(cfg.data, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size)
    ev = evaluate(cfg, steps, steps.start(params, values), pipe)
  return {"qa": ev.get("qa_exact_match"), "val_loss": ev.get("val_loss")}


def main(argv=None) -> None:
  parser = ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path", help="a workdir or an export directory")
  parser.add_argument("--kb_seed", type=int, default=0, help="the knowledge-base world scored")
  args = parser.parse_args(argv)
  print(json.dumps({"path": args.path, "kb_seed": args.kb_seed, **score(args.path, args.kb_seed)}))


if __name__ == "__main__":
  run_command(main)
