"""Do the slots ``memjax.inspect.attribute_answer`` ranks first really hold the answer?

  python benchmarks/attribution.py --workdir=runs/default            # 50 facts, the default trained run

For the first ``--facts`` knowledge-base facts the model answers correctly (teacher forced: every answer
token is the argmax, i.e. greedy decoding gives the answer), every slot read at the answer positions is
ranked by the drop in the answer's log-probability when it alone is removed from the read there. Then
the top ``m`` of them are removed together, and, as the control, ``--random_draws`` random sets of ``m``
slots drawn from the same slots read at the answer; the answer *flips* when greedy decoding no longer
gives it. ``m`` is 1% of the distinct slots read at the answer (at least 1), and also fixed sizes
(``--sizes``); and, for scale, every slot read at the answer (the memory's whole read there) and the
memory off altogether (every slot read anywhere in prompt and answer, removed at every position): how
many answers need the memory at all. (Not a bound on the others: a read with its strongest slots
removed can mislead more than no read.) Prints flip rates (top-attributed vs random) and writes ``benchmarks/results/attribution.json``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import numpy as np

from memjax import inspect as mi
from memjax.command import ArgumentParser, CommandLineError, run_command

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
  p = ArgumentParser(prog="benchmarks/attribution.py", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/default")
  p.add_argument("--facts", type=int, default=50)
  p.add_argument("--random_draws", type=int, default=10)
  p.add_argument("--sizes", default="1,2,4,8", help="fixed numbers of slots removed, besides 1%%")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=os.path.join(HERE, "results", "attribution.json"))
  args = p.parse_args(argv)
  from memjax.data.qa import load_qa_items
  from memjax.generate import load_workdir, tokenizer_of
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    raise CommandLineError(f"--workdir={args.workdir}: no checkpoint (run python train.py first)")
  model, cfg, step = load_workdir(args.workdir)
  tok = tokenizer_of(cfg, os.path.join(args.workdir, "export"))
  items = load_qa_items(cfg.data.resolved_data_dir, cfg.data.kb, cfg.data.kb_seed)
  rng = np.random.default_rng(args.seed)
  sizes = sorted({int(s) for s in args.sizes.split(",") if s})
  facts, tried, t0 = [], 0, time.time()
  for item in items:
    if len(facts) == args.facts:
      break
    tried += 1
    att = mi.attribute_answer(model, tok, item.prompt, item.answer, top=None)
    if not att["correct"]:
      continue
    ranked = [(s["layer"], s["slot"]) for s in att["slots"]]
    reads = [(r.layer, r.slot) for r in att["reads"]]
    one_pct = max(1, int(0.01 * len(reads)))
    row = {"prompt": item.prompt, "answer": item.answer, "logprob": att["logprob"], "slots_read": len(reads),
           "one_percent": one_pct, "top_drops": [s["drop"] for s in att["slots"][:8]], "by_size": {}}
    for m in sorted({one_pct, *sizes}):
      draws = [[reads[i] for i in rng.choice(len(reads), m, replace=False)] for _ in range(args.random_draws)]
      scored = mi.answer_with_slots_removed(model, tok, item.prompt, item.answer, [ranked[:m]] + draws)
      row["by_size"][str(m)] = {"top_flipped": not scored[0]["correct"],
                                "top_logprob_drop": att["logprob"] - scored[0]["logprob"],
                                "random_flip_rate": float(np.mean([not s["correct"] for s in scored[1:]])),
                                "random_logprob_drop": float(np.mean([att["logprob"] - s["logprob"] for s in scored[1:]]))}
    everything = mi.answer_with_slots_removed(model, tok, item.prompt, item.answer, [reads])[0]
    row["all_removed"] = {"flipped": not everything["correct"], "logprob_drop": att["logprob"] - everything["logprob"]}
    # The memory off altogether: every slot read anywhere in prompt + answer removed at every position.
    q_reads = mi.raw_reads(model, mi._question(tok, item.prompt, item.answer).tokens[None])
    anywhere = sorted({(b, int(s)) for b, (idx, _) in q_reads.items() for s in idx.reshape(-1)})
    off = mi.answer_with_slots_removed(model, tok, item.prompt, item.answer, [anywhere], at="all")[0]
    row["memory_off"] = {"flipped": not off["correct"], "logprob_drop": att["logprob"] - off["logprob"]}
    facts.append(row)
    print(f"{len(facts):>3}/{args.facts} {item.prompt!r} -> {item.answer!r}: {len(reads)} slots read, "
          f"1% = {one_pct}: top flips {row['by_size'][str(one_pct)]['top_flipped']}, "
          f"random flip rate {row['by_size'][str(one_pct)]['random_flip_rate']:.2f}", flush=True)
  summary = {"one_percent": {
      "slots_removed_mean": float(np.mean([f["one_percent"] for f in facts])),
      "slots_read_mean": float(np.mean([f["slots_read"] for f in facts])),
      "top_flip_rate": float(np.mean([f["by_size"][str(f["one_percent"])]["top_flipped"] for f in facts])),
      "random_flip_rate": float(np.mean([f["by_size"][str(f["one_percent"])]["random_flip_rate"] for f in facts]))}}
  summary["all"] = {"flip_rate": float(np.mean([f["all_removed"]["flipped"] for f in facts])),
                    "logprob_drop": float(np.mean([f["all_removed"]["logprob_drop"] for f in facts]))}
  summary["memory_off"] = {"flip_rate": float(np.mean([f["memory_off"]["flipped"] for f in facts])),
                           "logprob_drop": float(np.mean([f["memory_off"]["logprob_drop"] for f in facts]))}
  for m in sizes:
    summary[str(m)] = {"top_flip_rate": float(np.mean([f["by_size"][str(m)]["top_flipped"] for f in facts])),
                       "random_flip_rate": float(np.mean([f["by_size"][str(m)]["random_flip_rate"] for f in facts])),
                       "fraction_of_slots_read": float(np.mean([m / f["slots_read"] for f in facts]))}
  print(f"\n{len(facts)} facts answered correctly (of {tried} tried), {args.workdir} step {step}")
  print(f"{'removed':>18} {'top-attributed flips':>21} {'random flips':>13}")
  o = summary["one_percent"]
  print(f"{'1% (' + format(o['slots_removed_mean'], '.1f') + ' slots)':>18} {o['top_flip_rate']:>21.2f} "
        f"{o['random_flip_rate']:>13.2f}")
  for m in sizes:
    s = summary[str(m)]
    label = f"{m} ({s['fraction_of_slots_read']:.1%})"
    print(f"{label:>18} {s['top_flip_rate']:>21.2f} {s['random_flip_rate']:>13.2f}")
  print(f"{'all slots read':>18} {summary['all']['flip_rate']:>21.2f} {'-':>13}  (the memory's whole read at the answer)")
  print(f"{'memory off':>18} {summary['memory_off']['flip_rate']:>21.2f} {'-':>13}  (every read at every position)")
  meta = {"command": "python benchmarks/attribution.py " + " ".join(argv if argv is not None else sys.argv[1:]),
          "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}", "jax": jax.__version__,
          "workdir_step": step, "facts_tried": tried, "seconds": time.time() - t0}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"meta": meta, "summary": summary, "facts": facts}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  run_command(main)
