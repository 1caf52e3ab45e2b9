"""The default run (``python train.py``): a small Memory+ model on the synthetic knowledge base.

4 blocks of width 128, one Memory+ layer in the middle over 64^2 = 4,096 slots, a BPE tokenizer
trained locally; trains in a few minutes on 2 CPU cores and reports QA exact match at the end.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.memory.layers = "centered:1"
  c.model.memory.value_update = "dense"  # at 4k slots the dense update is the cheaper one
  c.data.tokenizer = "bpe"  # a biography fits one 128-token row, so a fact and its name share a context
  c.data.kb_questions = True  # half the people's QA pairs in training: qa_question_exact_match on the rest
  c.train.steps = 400
  c.train.eval_every = 0
  c.train.checkpoint_every = 200
  return c
