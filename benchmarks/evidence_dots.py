"""DOTS evidence table: CoT vs PoT vs the searched best trajectory vs the trained planner's choice.

Every method is an ordinary, resumable ``guidedecode eval --strategy dots`` run under
``benchmarks/results/evidence/dots-<task>/<method>/``; the planner comes from ``guidedecode train planner
--method dots`` (its run directory holds the search tables). This script only reads those records and
writes ``benchmarks/results/evidence-dots-<device>.json``: per task, over the problems every method has
finished, and per method the accuracy with its
95% Wilson interval, the cost per problem (policy tokens generated and forward passes, planner
included for the external planner), the trajectories used, code runs and failures, planner fallbacks;
plus the search statistics and the exact commands (given with ``--command``, in order).

    python benchmarks/evidence_dots.py --train-dir runs/dots-planner-synthetic \\
        --command "guidedecode eval ..." --command "..."
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from guidedecode.bench import results_dir, write_result
from guidedecode.metrics import proportion_ci
from guidedecode.records import read_jsonl

METHODS = ("CoT", "PoT", "searched-best", "trained-planner")


def load_records(directory: Path) -> list[dict] | None:
    path = directory / "results.jsonl"
    return read_jsonl(path) if path.is_file() else None


def summarize_method(directory: Path, records: list[dict]) -> dict:
    """Accuracy (Wilson 95%), cost per problem and trace statistics over ``records``."""
    config = json.loads((directory / "config.json").read_text())
    correct = sum(int(r["correct"][0]) for r in records)
    heads = [r["trace"][0][0] for r in records if r.get("trace")]
    events = [e for r in records for e in (r["trace"][0][1:] if r.get("trace") else [])]
    code = [e for e in events if e.get("event") == "code"]
    cost_names = sorted({k for r in records for k in r.get("cost", {})})
    return {
        "problems": len(records),
        "accuracy": proportion_ci(correct, len(records)),
        "params": config["params"],
        "max_new_tokens": config["max_new_tokens"],
        "cost_per_problem": {k: sum(r["cost"].get(k, 0) for r in records) / len(records) for k in cost_names},
        "trajectories": dict(Counter(h["trajectory"] for h in heads)),
        "sources": dict(Counter(h["source"] for h in heads)),
        "tokens_per_action": {k: sum(h["tokens"].get(k, 0) for h in heads) / max(len(heads), 1)
                              for k in sorted({k for h in heads for k in h["tokens"]})},
        "code_runs": len(code),
        "code_status": dict(Counter(e["status"] for e in code)),
        "failed_runs": sum(e.get("event") == "failed" for e in events),
        "fallbacks": sum(e.get("event") == "fallback" for e in events),
        "verdicts": dict(Counter(e["verdict"] for e in events if e.get("event") == "verify")),
        "seconds_per_problem": sum(r["seconds"] for r in records) / len(records),
    }


def search_stats(train_dir: Path) -> dict | None:
    metrics_path = train_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    questions = read_jsonl(train_dir / "search" / "search.jsonl")
    return {
        "metrics": metrics,
        "questions": [{k: q[k] for k in ("id", "status", "best", "success", "runs")} for q in questions],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence", type=Path, default=results_dir() / "evidence")
    parser.add_argument("--tasks", nargs="+", default=["synthetic", "gsm8k"])
    parser.add_argument("--train-dir", type=Path, default=Path("runs/dots-planner-synthetic"))
    parser.add_argument("--command", action="append", default=[], help="an exact command that made the records")
    parser.add_argument("--notes", default=None)
    args = parser.parse_args()
    figures = {"tasks": {}, "commands": args.command}
    for task in args.tasks:
        found = {m: load_records(args.evidence / f"dots-{task}" / m) for m in METHODS}
        found = {m: rows for m, rows in found.items() if rows}
        if not found:
            continue
        # the problems every method has finished, in the order of the first method's records
        common = set.intersection(*({r["id"] for r in rows} for rows in found.values()))
        order = [r["id"] for r in next(iter(found.values())) if r["id"] in common]
        figures["tasks"][task] = {
            "problem_ids": order,
            "methods": {m: summarize_method(args.evidence / f"dots-{task}" / m,
                                            [next(r for r in rows if r["id"] == i) for i in order])
                        for m, rows in found.items()},
        }
    figures["search"] = search_stats(args.train_dir)
    path = write_result("evidence-dots", figures, notes=args.notes)
    print(path)
    for task, table in figures["tasks"].items():
        for method, row in table["methods"].items():
            if row:
                acc = row["accuracy"]
                cost = row["cost_per_problem"] or {}
                print(f"{task:10s} {method:16s} {acc['mean']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] n={acc['n']} "
                      f"tokens/problem={cost.get('generated_tokens', float('nan')):.0f} {row['trajectories']}")


if __name__ == "__main__":
    main()
