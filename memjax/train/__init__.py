"""The training system: pure steps, the loop, evaluation, checkpoints, the command line.

  step.py        make_step_fns (pure init / train / eval steps), state shardings, jit_steps, compile_train_step
  loop.py        run(config, workdir): the loop, signals, logging, resume
  evaluate.py    validation loss, memory usage, QA exact match
  checkpoint.py  Orbax save / restore / export, and the restore policy (fallback, quarantine)
  finetune.py    config.finetune: starting from a trained run, sparse memory finetuning (tf-idf slots), LoRA
  main.py        the train.py command: flags, overrides, distributed init, exit codes
  errors.py      TrainingError, Interrupted
"""

from memjax.train.checkpoint import Checkpointer, export_params, load_exported, restore_latest_good
from memjax.train.errors import Interrupted, TrainingError
from memjax.train.evaluate import evaluate, qa_chance
from memjax.train.loop import RunResult, run, truncate_log
from memjax.train.step import StepFns, Steps, compile_train_step, jit_steps, make_step_fns, state_shardings

__all__ = [
    "Checkpointer",
    "Interrupted",
    "RunResult",
    "StepFns",
    "Steps",
    "TrainingError",
    "compile_train_step",
    "evaluate",
    "export_params",
    "jit_steps",
    "load_exported",
    "make_step_fns",
    "qa_chance",
    "restore_latest_good",
    "run",
    "state_shardings",
    "truncate_log",
]
