"""Evidence runs: one task, several methods, the same seeds, one table with 95% confidence intervals.

Each method is an ordinary ``guidedecode eval`` run (same task, problems, samples, temperature,
top-p, max new tokens and seed), written to ``<out>/<label>/`` (config.json, results.jsonl,
summary.json), so an interrupted suite resumes where it stopped. The table (accuracy = mean
pass@1, maj@k, pass@k, KL where the method reports it, tokens/s; oracle-stop methods report only
solved@k and the trial histogram) with 95% intervals inside [0, 1] (Wilson, or a seeded bootstrap
over problems when several samples share a problem) is written by
:func:`guidedecode.bench.write_result` as ``benchmarks/results/evidence-<suite>-<task>-<device>.json``
with a PNG of the accuracies.

    python benchmarks/evidence.py qsharp --task synthetic --limit 60 --samples 4 \\
        --param value_model=runs/qsharp-synthetic/model
    python benchmarks/evidence.py strategies --task gsm8k --limit 30

Suites (methods are registry names; see guidedecode/registry.py):

* ``qsharp``: unguided sampling, Q# at ``--etas``, CD at the first eta (the same value model).
* ``strategies``: greedy, self-consistency@k, best-of-k with the oracle, step beam search,
  RATIONALYST ``random`` and ``implicit`` with the reference scoring context (default) and the inline
  one (``--rationale-model`` for a trained rationale model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from guidedecode.bench import results_dir, write_result
from guidedecode.evaluation import EvalConfig, run_eval


def qsharp_suite(args) -> list[tuple[str, dict]]:
    value_model = {"value_model": args.value_model}
    runs = [("unguided", {})]
    for eta in args.etas:
        runs.append((f"qsharp-eta{eta:g}", {"guide": "qsharp", "params": {**value_model, "eta": str(eta)}}))
    runs.append((f"cd-eta{args.etas[0]:g}", {"guide": "qsharp",
                                             "params": {**value_model, "eta": str(args.etas[0]), "mode": "cd"}}))
    # the value model as best-of-N's reward model on the same number of samples (spec test_time_scaling §3.1)
    n = str(args.samples)
    reward = {**value_model, "n": n, "scorer": "value", "temperature": str(args.temperature), "top_p": str(args.top_p)}
    for selection in ("argmax", "weighted_vote"):
        runs.append((f"best-of-{n}-value-{selection.replace('_', '-')}",
                     {"strategy": "best-of-n", "samples": 1, "params": {**reward, "selection": selection}}))
    return runs


def strategies_suite(args) -> list[tuple[str, dict]]:
    k = str(args.budget)
    runs = [
        ("greedy", {"temperature": 0.0, "samples": 1}),
        (f"self-consistency@{k}", {"strategy": "self-consistency", "samples": 1, "params": {"n": k}}),
        (f"best-of-{k}-oracle", {"strategy": "best-of-n", "samples": 1, "params": {"n": k, "oracle": "1"}}),
        ("beam-search-w4x2", {"strategy": "beam-search", "samples": 1, "params": {"width": "4", "expansions": "2"}}),
        ("rationalyst-random", {"strategy": "rationalyst", "samples": 1, "params": {"mode": "random"}}),
        ("rationalyst-implicit", {"strategy": "rationalyst", "samples": 1, "params": {"mode": "implicit"}}),
        ("rationalyst-implicit-inline", {"strategy": "rationalyst", "samples": 1,
                                         "params": {"mode": "implicit", "scoring_context": "inline"}}),
    ]
    if args.rationale_model:
        runs.append(("rationalyst-implicit-trained", {"strategy": "rationalyst", "samples": 1,
                                                      "params": {"mode": "implicit",
                                                                 "rationale_model": args.rationale_model}}))
    return runs


SUITES = {"qsharp": qsharp_suite, "strategies": strategies_suite}


def table_row(label: str, summary: dict) -> dict:
    """One table row; an oracle-stop method has no ``accuracy`` (its figures are solved@k)."""
    row = {"method": label, "problems": summary["problems"], "samples": summary["samples"],
           "verifier": summary.get("verifier"), "tokens_generated": summary["tokens_generated"],
           "tokens_per_second": summary["tokens_per_second"]}
    for key, value in summary.items():
        if key.startswith(("accuracy", "pass@", "maj@", "kl", "solved@")) or key in (
                "trial_histogram", "attempts_mean", "cost_per_problem"):
            row[key] = value
    return row


def headline(row: dict) -> tuple[str, dict]:
    """The figure a row is plotted by: accuracy, or for an oracle-stop method solved@budget (labelled so)."""
    if "accuracy" in row:
        return "accuracy", row["accuracy"]
    budget = max(int(key.split("@")[1]) for key in row if key.startswith("solved@"))
    return f"solved@{budget}", row[f"solved@{budget}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--task", default="synthetic")
    parser.add_argument("--data", default=None)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--samples", type=int, default=4, help="samples per problem for sampled methods")
    parser.add_argument("--budget", type=int, default=8, help="N / attempts of the step strategies")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=47)
    parser.add_argument("--value-model", default=None, help="qsharp suite: ValueModel directory")
    parser.add_argument("--etas", type=float, nargs="+", default=[1.0, 10.0], help="qsharp suite: guidance strengths")
    parser.add_argument("--rationale-model", default=None, help="strategies suite: trained rationale model directory")
    parser.add_argument("--only", nargs="+", default=None, help="run only these method labels")
    parser.add_argument("--name", default=None, help="result name (default evidence-<suite>-<task>[-<only>])")
    parser.add_argument("--out", default=None, help="run directories (default benchmarks/results/evidence/<suite>-<task>)")
    parser.add_argument("--notes", default=None, help="provenance notes stored in the result JSON")
    args = parser.parse_args()
    if args.suite == "qsharp" and not args.value_model:
        parser.error("the qsharp suite needs --value-model")

    from guidedecode.models import load_model

    model, tokenizer = load_model(args.model)
    out_root = Path(args.out or results_dir() / "evidence" / f"{args.suite}-{args.task}")
    rows = []
    for label, overrides in SUITES[args.suite](args):
        if args.only and label not in args.only:
            continue
        settings = dict(task=args.task, model=args.model, data=args.data, limit=args.limit, samples=args.samples,
                        seed=args.seed, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        settings.update(overrides)
        print(f"== {label}", flush=True)
        summary = run_eval(EvalConfig(**settings), out_root / label, model=model, tokenizer=tokenizer)
        rows.append(table_row(label, summary))
        print(json.dumps(rows[-1]), flush=True)

    def plot(ax):
        figures = [headline(r) for r in rows]
        means = [f["mean"] for _, f in figures]
        errors = [[f["mean"] - f["low"] for _, f in figures], [f["high"] - f["mean"] for _, f in figures]]
        oracle = [name != "accuracy" for name, _ in figures]
        ax.bar(range(len(rows)), means, yerr=errors, capsize=4, color=["tab:gray" if o else "tab:blue" for o in oracle])
        labels = [r["method"] + (f"\n({name}, oracle)" if o else "") for r, (name, _), o in zip(rows, figures, oracle)]
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (mean pass@1), 95% interval\ngray: oracle solved@k (upper bound)")

    name = args.name or f"evidence-{args.suite}-{args.task}" + ("-" + "-".join(args.only) if args.only else "")
    path = write_result(name, {"suite": args.suite, "task": args.task, "model": args.model, "limit": args.limit,
                               "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
                               "max_new_tokens": args.max_new_tokens, "seed": args.seed, "rows": rows,
                               "run_dirs": str(out_root)}, plot=plot, notes=args.notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
