"""Learning new facts without forgetting old ones: full finetuning, LoRA, memory and sparse memory
finetuning (smf) on a grid, and single-fact writes and erasures through ``memjax.edit`` (issue 22).

  python benchmarks/continual.py --preset=smoke                      # <= 5 min on 2 cores: does it all work
  python benchmarks/continual.py --preset=full                       # the figures (~60 min on 2 cores)
  python benchmarks/continual.py --preset=full --init_from=runs/default --edits=20

1. Pretrain (unless ``--init_from`` names a trained workdir): a Memory+ model on knowledge base A
   (``data.kb_seed=0``, its biographies and general text, as ``configs/default.py`` does).
2. Finetune it on facts B (``data.kb_seed=1``: 200 new people, disjoint from A) with ``train.py
   --config.finetune.method=...`` for each point of the preset's grid (method, optimizer, lr, top_t),
   every run from the same checkpoint for the same steps.
3. Score each run: QA exact match on B (learning; the run's final evaluation), QA on A and validation
   loss on A's held-out text (forgetting; ``continual_eval.score`` on its export). Forgetting = the drop
   of QA on A from the pretrained model's.
4. Judge the issue's target as measured: among the runs whose QA on B is >= 90% of the best full
   finetuning run's ("equal learning"), the smallest forgetting of smf <= 1/8 of that full run's and
   <= 1/6 of the smallest forgetting of a LoRA run at equal learning.
5. Editing on the pretrained model: ``--edits`` random single facts of B written (``memjax.edit.write``)
   and as many facts of A that the model gives erased (``memjax.edit.erase``), each edit alone from the
   pretrained model. Success: greedy decoding gives the written answer / no longer gives the erased one.
   Change on the other facts: QA (greedy, teacher-forced check ``memjax.edit.produces``) on a probe set of
   A's facts other than the edited one, after minus before. Target: >= 95% success, <= 1 point change.

Writes ``benchmarks/results/continual.json`` (smoke: ``continual_smoke.json``) and the frontier plot
``benchmarks/results/continual_frontier.png`` (x: drop of QA on A, y: QA on B). Workdirs stay under
``--root``; a finished run is not re-run.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

import numpy as np

import _runs  # benchmarks/ is the script's directory, first on sys.path
from memjax.command import ArgumentParser, CommandLineError, run_command

METHODS = ("full", "lora", "memory", "smf")

# configs/default.py as overrides of configs/base.py (the default run: 4 blocks of width 128, one
# Memory+ layer over 4,096 slots in the middle, BPE, the 200-person knowledge base A).
DEFAULT_MODEL = {"model.memory.layers": "centered:1", "model.memory.value_update": "dense", "data.tokenizer": "bpe"}

PRESETS = {
    "smoke": {
        "pretrain": {**DEFAULT_MODEL, "model.dim": 64, "model.mlp_dim": 256, "model.num_heads": 2,
                     "model.memory.n_keys": 32, "model.memory.value_dim": 64, "model.memory.k": 8,
                     "train.steps": 200, "eval.qa_max_items": 64},
        "finetune_steps": 40,
        "grid": [("full", "adam", 1e-3, None), ("lora", "adam", 1e-3, None), ("memory", "adam", 0.03, None),
                 ("smf", "adam", 0.03, 500)],
        "qa_max_items": 64,
        "edits": 8,
        "probe": 64,
    },
    "full": {
        "pretrain": {**DEFAULT_MODEL, "train.steps": 400},
        "finetune_steps": 400,
        "grid": [("full", "adam", 1e-3, None), ("full", "adam", 1e-4, None),
                 ("lora", "adam", 1e-3, None), ("lora", "adam", 1e-2, None),
                 ("memory", "adam", 0.03, None),
                 ("smf", "adam", 0.03, 500), ("smf", "adam", 0.1, 500), ("smf", "adam", 0.3, 500),
                 ("smf", "adam", 0.1, 2000)],
        "qa_max_items": 512,
        "edits": 100,
        "probe": 256,
    },
}

WRITE = {"top_t": 64, "lr": 0.03, "steps": 200, "margin": 1.0}
ERASE = {"top_t": 16, "lr": 0.03, "steps": 200, "margin": 1.0}
BACKGROUND_TEXTS = 256  # texts of A's training split, one per background batch (edit.background)


def run_name(method: str, optimizer: str, lr: float, top_t) -> str:
  return f"{method}_{optimizer}_lr{lr:g}" + (f"_t{top_t}" if top_t else "")


def finetune_runs(preset: dict, init_from: str) -> list[_runs.Run]:
  runs = []
  for method, optimizer, lr, top_t in preset["grid"]:
    o = {"finetune.init_from": init_from, "finetune.method": method, "finetune.optimizer": optimizer,
         "finetune.lr": lr, "data.kb_seed": 1, "train.steps": preset["finetune_steps"], "train.eval_every": 0,
         "train.checkpoint_every": 0, "eval.qa_max_items": preset["qa_max_items"]}
    if top_t:
      o["finetune.top_t"] = top_t
    runs.append(_runs.Run(run_name(method, optimizer, lr, top_t), o, group=method))
  return runs


def cached_score(continual_eval, workdir: str, kb_seed: int, cache: str) -> dict:
  """``continual_eval.score`` of a workdir (its export if it has one) on world ``kb_seed``, kept in the
  JSON file ``cache`` (a rerun, e.g. with other ``--edits``, does not score it again)."""
  if os.path.exists(cache):
    with open(cache) as f:
      return json.load(f)
  export = os.path.join(workdir, "export")
  out = continual_eval.score(export if os.path.isdir(export) else workdir, kb_seed)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  with open(cache, "w") as f:
    json.dump(out, f)
  return out


def judge(rows: list[dict], pretrained: dict) -> dict:
  """Step 4 on the finetuning rows (each with method, qa_b, forgetting). Not judged (``met`` None)
  without a full finetuning run that learnt B (QA on B above the pretrained model's) and forgot A."""
  full = [r for r in rows if r["method"] == "full"]
  if not full:
    return {"met": None, "why": "no full finetuning run"}
  ref = max(full, key=lambda r: r["qa_b"])
  if ref["qa_b"] <= pretrained["qa_b"] or ref["forgetting"] <= 0:
    return {"met": None, "full_reference": ref["name"],
            "why": f"full finetuning learnt nothing measurable or forgot nothing (QA B {ref['qa_b']:.3f}, "
                   f"pretrained {pretrained['qa_b']:.3f}; forgetting {ref['forgetting']:.3f}): no ratio to judge"}
  bar = 0.9 * ref["qa_b"]
  equal = lambda m: [r for r in rows if r["method"] == m and r["qa_b"] >= bar]
  smf, lora = equal("smf"), equal("lora")
  out = {"full_reference": ref["name"], "full_qa_b": ref["qa_b"], "full_forgetting": ref["forgetting"],
         "equal_learning_bar": bar, "smf_at_equal_learning": [r["name"] for r in smf],
         "lora_at_equal_learning": [r["name"] for r in lora]}
  if not smf:
    best = max((r for r in rows if r["method"] == "smf"), key=lambda r: r["qa_b"], default=None)
    out.update(met=False, why=f"no smf run reaches 90% of full finetuning's QA on B ({bar:.3f}); best smf: "
                               + (f"{best['qa_b']:.3f} ({best['name']})" if best else "none"))
    return out
  s = min(smf, key=lambda r: r["forgetting"])
  vs_full = s["forgetting"] <= ref["forgetting"] / 8
  out.update(smf_run=s["name"], smf_forgetting=s["forgetting"], vs_full_met=vs_full)
  if lora:
    lo = min(lora, key=lambda r: r["forgetting"])
    out.update(lora_run=lo["name"], lora_forgetting=lo["forgetting"], vs_lora_met=s["forgetting"] <= lo["forgetting"] / 6)
  else:
    out.update(vs_lora_met=None, lora_note="no LoRA run at equal learning: the LoRA ratio cannot be judged")
  out["met"] = bool(vs_full and out["vs_lora_met"] is not False)
  out["why"] = (f"smf forgetting {s['forgetting']:.3f} vs full {ref['forgetting']:.3f} (need <= 1/8: "
                f"{ref['forgetting'] / 8:.3f})" + (f", vs LoRA {out['lora_forgetting']:.3f} (need <= 1/6)" if lora else ""))
  return out


# ----- editing ---------------------------------------------------------------------------------------


def editing(export_dir: str, n_edits: int, probe_size: int, seed: int = 0, log=print) -> dict:
  """Step 5: ``n_edits`` writes of facts of B and ``n_edits`` erasures of facts of A that the model gives."""
  from memjax import edit, load_exported
  from memjax.data.qa import load_qa_items
  from memjax.generate import tokenizer_of
  from memjax.inspect import split_texts

  model, cfg = load_exported(export_dir)
  tok = tokenizer_of(cfg, export_dir)
  facts_a = [edit.Fact(q.prompt, q.answer) for q in load_qa_items(cfg.data.data_dir, cfg.data.kb, 0)]
  facts_b = [edit.Fact(q.prompt, q.answer) for q in load_qa_items(cfg.data.data_dir, cfg.data.kb, 1)]
  rng = random.Random(seed)
  probe = rng.sample(facts_a, min(probe_size, len(facts_a)))
  base = np.array(edit.produces(model, tok, probe))
  known_b = np.array(edit.produces(model, tok, facts_b))
  unknown_b = [f for f, k in zip(facts_b, known_b) if not k]
  writes = rng.sample(unknown_b, min(n_edits, len(unknown_b)))
  known_a = [f for f, k in zip(facts_a, edit.produces(model, tok, facts_a)) if k]
  erases = rng.sample(known_a, min(n_edits, len(known_a)))
  texts = split_texts(cfg.data, "train")  # A's pretraining texts: the background of the writes' tf-idf
  random.Random(seed).shuffle(texts)
  df, n_bg = edit.background(model, tok, texts[:BACKGROUND_TEXTS])

  def one(kind: str, fact) -> dict:
    t0 = time.time()
    fn, settings = (edit.write, WRITE) if kind == "write" else (edit.erase, ERASE)
    extra = {"background": df, "num_background": n_bg} if kind == "write" else {}
    new, rec = fn(model, [fact], tokenizer=tok, **settings, **extra)
    keep = np.array([p != fact for p in probe])
    after = np.array(edit.produces(new, tok, probe))
    return {"prompt": fact.prompt, "answer": fact.answer, "success": rec.success[0], "steps": rec.steps,
            "slots": rec.num_slots, "update_norm": float(sum(rec.update_norms.values())),
            "qa_other_before": float(base[keep].mean()), "qa_other_after": float(after[keep].mean()),
            "flipped_other": int((after[keep] != base[keep]).sum()), "s": time.time() - t0}

  out = {"probe": len(probe), "background_texts": n_bg, "qa_probe_before": float(base.mean()), "write_settings": WRITE, "erase_settings": ERASE,
         "known_a": len(known_a), "known_b": int(known_b.sum())}
  for kind, facts in (("write", writes), ("erase", erases)):
    recs = []
    for i, f in enumerate(facts):
      recs.append(one(kind, f))
      if (i + 1) % 10 == 0 or i + 1 == len(facts):
        log(f"  {kind} {i + 1}/{len(facts)}: success {np.mean([r['success'] for r in recs]):.2f}")
    change = [r["qa_other_after"] - r["qa_other_before"] for r in recs]
    out[kind] = {"n": len(recs), "success_rate": float(np.mean([r["success"] for r in recs])) if recs else None,
                 "qa_other_change_mean": float(np.mean(change)) if recs else None,
                 "qa_other_change_abs_mean": float(np.mean(np.abs(change))) if recs else None,
                 "qa_other_change_worst": float(min(change)) if recs else None,
                 "steps_mean": float(np.mean([r["steps"] for r in recs])) if recs else None,
                 "slots_mean": float(np.mean([r["slots"] for r in recs])) if recs else None,
                 "edits": recs}
    out[kind]["met"] = bool(recs) and out[kind]["success_rate"] >= 0.95 and out[kind]["qa_other_change_abs_mean"] <= 0.01
  return out


# ----- report ----------------------------------------------------------------------------------------


def plot(rows: list[dict], pretrained: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  colors = {"full": "tab:red", "lora": "tab:orange", "memory": "tab:blue", "smf": "tab:green"}
  ax.scatter([0.0], [pretrained["qa_b"]], c="k", marker="x", label="pretrained")
  for m in METHODS:
    pts = [r for r in rows if r["method"] == m]
    if not pts:
      continue
    ax.scatter([r["forgetting"] for r in pts], [r["qa_b"] for r in pts], c=colors[m], label=m, s=40)
    for r in pts:
      ax.annotate(f"{r['lr']:g}" + (f", t{r['top_t']}" if r["top_t"] else ""), (r["forgetting"], r["qa_b"]),
                  fontsize=7, xytext=(3, 3), textcoords="offset points")
  ax.set_xlabel("forgetting: drop of QA exact match on facts A")
  ax.set_ylabel("learning: QA exact match on new facts B")
  ax.set_title("learning vs forgetting (finetuning on B)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  _runs.save_figure(fig, path, dpi=120)


def table(rows: list[dict], pretrained: dict) -> str:
  lines = ["| method | optimizer | lr | t | QA B (learning) | QA A | drop of QA A (forgetting) | val loss A |",
           "|---|---|---|---|---|---|---|---|",
           f"| pretrained | | | | {pretrained['qa_b']:.3f} | {pretrained['qa_a']:.3f} | | {pretrained['val_loss_a']:.3f} |"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['optimizer']} | {r['lr']:g} | {r['top_t'] or ''} | {r['qa_b']:.3f} | "
                 f"{r['qa_a']:.3f} | {r['forgetting']:.3f} | {r['val_loss_a']:.3f} |")
  return "\n".join(lines)


def main(argv=None):
  p = ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
  p.add_argument("--init_from", default="", help="a pretrained workdir to finetune (default: pretrain one)")
  p.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
  p.add_argument("--steps", type=int, default=0, help="finetuning steps (0 = the preset's)")
  p.add_argument("--edits", type=int, default=-1, help="writes and erasures each (-1 = the preset's; 0 = none)")
  p.add_argument("--jobs", type=int, default=2, help="runs at once, each pinned to one core")
  p.add_argument("--root", default="", help="workdirs (default: runs/bench_continual_<preset>)")
  p.add_argument("--out", default="", help="JSON path (default: benchmarks/results/continual[_smoke].json)")
  p.add_argument("--plot", default="", help="PNG path (default: benchmarks/results/continual_frontier[_smoke].png)")
  args = p.parse_args(argv)
  preset = dict(PRESETS[args.preset])
  methods = [m for m in args.methods.split(",") if m] or list(METHODS)
  for m in methods:
    if m not in METHODS:
      raise CommandLineError(f"--methods: unknown method {m!r}; allowed: {', '.join(METHODS)}")
  if args.steps < 0:
    raise CommandLineError(f"--steps={args.steps}: must be >= 0")
  if args.jobs < 1:
    raise CommandLineError(f"--jobs={args.jobs}: must be >= 1")
  if args.init_from and not os.path.isdir(os.path.join(args.init_from, "checkpoints")):
    raise CommandLineError(f"--init_from={args.init_from}: not a trained workdir (no checkpoints/ there)")
  if args.steps:
    preset["finetune_steps"] = args.steps
  preset["grid"] = [g for g in preset["grid"] if g[0] in methods]
  n_edits = preset["edits"] if args.edits < 0 else args.edits
  suffix = "" if args.preset == "full" else f"_{args.preset}"
  root = os.path.abspath(args.root or os.path.join(_runs.REPO, "runs", f"bench_continual_{args.preset}"))
  results_dir = os.path.join(_runs.REPO, "benchmarks", "results")
  out = args.out or os.path.join(results_dir, f"continual{suffix}.json")
  png = args.plot or os.path.join(results_dir, f"continual_frontier{suffix}.png")
  t_start = time.time()
  import continual_eval

  # 1. the pretrained model
  if args.init_from:
    pre_dir = os.path.abspath(args.init_from)
  else:
    pre_dir = os.path.join(root, "pretrain")
    print(f"pretraining on facts A: {pre_dir}")
    _runs.prepare_data(preset["pretrain"])
    _runs.run_all([_runs.Run("pretrain", preset["pretrain"])], root, jobs=1)
  _runs.prepare_data({"data.kb_seed": 1})  # build world B once, before parallel runs would race to
  scores = os.path.join(root, "scores")
  pre_a, pre_b = (cached_score(continual_eval, pre_dir, k, os.path.join(scores, f"pretrained_kb{k}.json")) for k in (0, 1))
  pretrained = {"workdir": pre_dir, "qa_a": pre_a["qa"], "val_loss_a": pre_a["val_loss"], "qa_b": pre_b["qa"],
                "val_loss_b": pre_b["val_loss"]}
  print(f"pretrained: QA A {pretrained['qa_a']:.3f}, QA B {pretrained['qa_b']:.3f}")

  # 2-3. finetune on B, score on A
  runs = finetune_runs(preset, pre_dir)
  logs = _runs.run_all(runs, os.path.join(root, "finetune"), jobs=args.jobs)
  rows = []
  for run, (method, optimizer, lr, top_t) in zip(runs, preset["grid"]):
    log = logs[run.name]
    a = cached_score(continual_eval, os.path.join(root, "finetune", run.name), 0,
                     os.path.join(scores, f"{run.name}_kb0.json"))
    rows.append({"name": run.name, "method": method, "optimizer": optimizer, "lr": lr, "top_t": top_t,
                 "steps": preset["finetune_steps"], "qa_b": log["final"].get("qa_exact_match"),
                 "val_loss_b": log["final"].get("val_loss"), "qa_a": a["qa"], "val_loss_a": a["val_loss"],
                 "forgetting": pretrained["qa_a"] - a["qa"], "wall_s": log["wall_s"], "command": log["command"]})
    print(f"  {run.name}: QA B {rows[-1]['qa_b']:.3f}, QA A {a['qa']:.3f}")
  verdict = judge(rows, pretrained)

  # 5. editing
  edits = None
  if n_edits:  # kept in the root like the scores: a rerun with the same edits does not redo them
    cache = os.path.join(scores, f"editing_n{n_edits}_probe{preset['probe']}.json")
    if os.path.exists(cache):
      with open(cache) as f:
        edits = json.load(f)
    else:
      edits = editing(os.path.join(pre_dir, "export"), n_edits, preset["probe"])
      with open(cache, "w") as f:
        json.dump(edits, f, default=float)

  print()
  print(table(rows, pretrained))
  print()
  print("target (at equal learning, smf forgetting <= 1/8 of full's and <= 1/6 of LoRA's):",
        {True: "MET", False: "NOT MET", None: "not judged"}[verdict["met"]], "-", verdict["why"])
  if edits:
    for kind in ("write", "erase"):
      e = edits[kind]
      if e["n"]:
        print(f"{kind}: {e['n']} single-fact edits, success {e['success_rate']:.2f}, QA on other facts "
              f"{e['qa_other_change_mean'] * 100:+.2f} points (mean |change| {e['qa_other_change_abs_mean'] * 100:.2f}): "
              f"target (>= 95% success, <= 1 point) {'MET' if e['met'] else 'NOT MET'}")
  plot(rows, pretrained, png)
  _runs.write_json(out, {"command": "python benchmarks/continual.py " + " ".join(sys.argv[1:] if argv is None else argv), "preset": args.preset,
                         "machine": _runs.machine(), "preset_config": preset, "pretrained": pretrained,
                         "finetune": rows, "targets": verdict, "editing": edits, "wall_s_total": time.time() - t_start})


if __name__ == "__main__":
  run_command(main)
