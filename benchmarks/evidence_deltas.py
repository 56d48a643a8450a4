"""Evidence for test-time weight deltas: best-of-N vs revision vs FTTT vs OpTune at equal attempt budgets.

Every method gets the same ``--budget`` attempts per problem under the oracle verifier (the task's checker
against the gold answer; the oracle-stop protocol of FTTT, arXiv 2502.15771) and reports solved@k for
k = 1..budget with 95% Wilson intervals, the trial histogram and the mean cost per problem (generated
tokens, model forwards, backward passes). Oracle numbers are upper bounds, not deployable accuracy.

Methods (``FeedbackLoop`` strategies; OpTune edits the last two layers' q/v, FTTT's LoRA all layers' q/v):

* ``best-of-N``: N independent samples (T, top-p);
* ``revision``: greedy attempts with the growing conversation and "Your answer is incorrect. Please try again.";
* ``fttt`` / ``fttt+``: per-question LoRA, one AdamW step after each failure (``--fttt-lr``);
* ``optune-init``: the editor at initialisation (η = 1e-4, identity transform: a scaled gradient step);
* ``optune`` / ``optune-always``: the trained editor (``--editor``) with the reference's alternating schedule /
  with every attempt after the first edited.

Each method writes ``<out>/<method>/results.jsonl`` (one FeedbackLoop report per problem, appended per chunk,
so a killed run resumes) and the table goes to ``benchmarks/results/evidence-deltas-<task>-<device>.json``
(+ PNG of solved@k).

    OMP_NUM_THREADS=1 python benchmarks/evidence_deltas.py --task synthetic --limit 30 --budget 4 \\
        --editor runs/optune-synthetic/editor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from guidedecode.bench import results_dir, write_result

METHODS = ("best-of-N", "revision", "fttt", "fttt+", "optune-init", "optune", "optune-always")


def _loop(name, backend, verifier, args, editor_trained, editor_init):
    from guidedecode.strategies import FeedbackLoop

    common = dict(max_new_tokens=args.max_new_tokens)
    sampled = dict(common, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if name == "best-of-N":
        return FeedbackLoop(backend, verifier, args.budget, strategy="best_of_n", **sampled)
    if name == "revision":
        return FeedbackLoop(backend, verifier, args.budget, strategy="revision", temperature=0.0, **common)
    if name in ("fttt", "fttt+"):
        return FeedbackLoop(backend, verifier, args.budget, strategy=name, lr=args.fttt_lr,
                            reflection_tokens=args.max_new_tokens, **sampled)
    if name == "optune-init":
        return FeedbackLoop(backend, verifier, args.budget, strategy="optune", editor=editor_init, **sampled)
    schedule = "always_edit" if name == "optune-always" else "alternate"
    return FeedbackLoop(backend, verifier, args.budget, strategy="optune", editor=editor_trained, schedule=schedule,
                        **sampled)


def summarize(reports: list[dict], budget: int) -> dict:
    from guidedecode.metrics import proportion_ci

    trials = [r["solved_at"] for r in reports]
    solved = {f"solved@{k}": proportion_ci(sum(t is not None and t <= k for t in trials), len(trials))
              for k in range(1, budget + 1)}
    histogram = [sum(t == j for t in trials) for j in range(1, budget + 1)]
    cost = {}
    for r in reports:
        for key, value in r["cost"].items():
            cost[key] = cost.get(key, 0.0) + value / len(reports)
    edited = [a.get("edited") for r in reports for a in r["attempts"] if "edited" in a]
    return {"problems": len(reports), **solved, "histogram": histogram, "unsolved": trials.count(None),
            "cost_per_problem": {k: round(v, 1) for k, v in cost.items()},
            "edited_attempts": sum(bool(e) for e in edited) if edited else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="synthetic")
    ap.add_argument("--task-option", action="append", default=[], help="KEY=VALUE task setting (repeatable)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=30, help="the first N problems")
    ap.add_argument("--budget", type=int, default=4, help="attempts per problem for every method")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--editor", default=None, help="trained OpTune editor directory (for optune, optune-always)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--fttt-lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=8, help="problems per FeedbackLoop call (and per resume unit)")
    ap.add_argument("--out", default=None, help="run directory (default: benchmarks/results/evidence/deltas-<task>)")
    args = ap.parse_args(argv)

    from guidedecode.backends import HFBackend
    from guidedecode.deltas import OpTuneEditor
    from guidedecode.models import load_model
    from guidedecode.records import append_jsonl, read_jsonl
    from guidedecode.strategies import Verifier
    from guidedecode.tasks import get_task

    options = {}
    for item in args.task_option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    task = get_task(args.task, **options)
    problems = task.load(split=args.split, limit=args.limit)
    by_id = {p.id: p for p in problems}
    model, tokenizer = load_model(args.model)
    model.eval()
    verifier = Verifier.oracle(lambda text, pid: task.check(text, by_id[pid]))
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    editor_trained = OpTuneEditor.from_pretrained(args.editor, model) if args.editor else None
    if editor_trained is None and {"optune", "optune-always"} & set(methods):
        raise SystemExit("--editor is needed for optune and optune-always")
    editor_init = OpTuneEditor.for_model(model).eval()
    out = Path(args.out or results_dir() / "evidence" / f"deltas-{args.task}")
    rows = {}
    for name in methods:
        directory = out / name
        directory.mkdir(parents=True, exist_ok=True)
        unused = {"methods", "chunk", "out"} | ({"editor"} if name not in ("optune", "optune-always") else set()) | (
            {"fttt_lr"} if not name.startswith("fttt") else set())
        config = {k: v for k, v in vars(args).items() if k not in unused}
        config_file = directory / "config.json"
        if config_file.is_file() and json.loads(config_file.read_text()) != config:
            raise SystemExit(f"{directory} holds a run with other settings: use another --out")
        config_file.write_text(json.dumps(config, indent=2))
        done = {r["id"]: r for r in read_jsonl(directory / "results.jsonl")}
        todo = [p for p in problems if p.id not in done]
        for start in range(0, len(todo), args.chunk):
            chunk = todo[start:start + args.chunk]
            backend = HFBackend(model, tokenizer, batch_size=16)
            loop = _loop(name, backend, verifier, args, editor_trained, editor_init)
            prompts = [task.messages(p) for p in chunk]
            if not getattr(loop.strategy, "takes_messages", False):
                prompts = [backend.chat_prompt(m) for m in prompts]
            reports = loop.run(prompts, [p.id for p in chunk])
            records = [{"id": p.id, **r} for p, r in zip(chunk, reports)]
            append_jsonl(directory / "results.jsonl", records)
            done.update((r["id"], r) for r in records)
            print(f"{name}: {len(done)}/{len(problems)}", flush=True)
        reports = [done[p.id] for p in problems]
        rows[name] = summarize(reports, args.budget)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k.startswith("solved@")}), flush=True)

    def plot(ax):
        ks = list(range(1, args.budget + 1))
        for name, row in rows.items():
            means = [row[f"solved@{k}"]["mean"] for k in ks]
            lows = [row[f"solved@{k}"]["low"] for k in ks]
            highs = [row[f"solved@{k}"]["high"] for k in ks]
            ax.plot(ks, means, marker="o", label=name)
            ax.fill_between(ks, lows, highs, alpha=0.1)
        ax.set_xlabel("attempts k")
        ax.set_ylabel("solved@k (oracle stop), 95% Wilson")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)

    figures = {"task": args.task, "task_options": options, "split": args.split, "problems": len(problems),
               "budget": args.budget, "verifier": "oracle (task checker vs gold answer)", "model": args.model,
               "edited_layers": "OpTune: last two layers' q_proj/v_proj; FTTT: q_proj/v_proj of all layers (LoRA r 4)",
               "temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
               "fttt_lr": args.fttt_lr, "seed": args.seed, "editor": args.editor, "run_dir": str(out), "rows": rows}
    path = write_result(f"evidence-deltas-{args.task}", figures, plot=plot,
                        notes="oracle verifier: solved@k are upper bounds; small seeded subset on CPU")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
