"""Planning-token evidence on StrategyQA: zero-shot vs plain LoRA CoT vs planning tokens (memreason).

Three greedy decodes of the same seeded test subset (drawn without replacement from the 687
memreason test questions):

* ``zero-shot``: the base instruct model with the task's chat prompt (``guidedecode.tasks`` StrategyQA);
* ``lora-cot``: a ``guidedecode train planner --scheme none`` model (plain chain-of-thought LoRA);
* ``planning``: a ``--scheme memreason`` planner, prompt = source + general block, decoded with
  ``PlanningTokenGuide`` (block completion); with ``--unguided`` also without the guide.

The two fine-tunes use the same rows, batch size and optimizer steps (see their ``metrics.json``).
Answers are read with the StrategyQA task's yes/no extractor and compared with the gold yes/no;
accuracy comes with a 95% Wilson interval. For the planner the step-type distribution (steps per
type, block patterns, malformed blocks) is counted by token id. Every condition writes
``<out>/<label>/results.jsonl`` one batch at a time, so a killed run resumes; the table goes to
``benchmarks/results/evidence-planning-strategyqa-<device>.json``.

    python benchmarks/evidence_planning.py --planner runs/planner-strategyqa-memreason \\
        --baseline runs/planner-strategyqa-none --limit 100
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

import torch

from guidedecode.bench import write_result
from guidedecode.metrics import proportion_ci
from guidedecode.records import write_json
from guidedecode.training.common import collect_resumable


def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, guide=None) -> list[list[int]]:
    """Greedy continuations (cut after the first EOS) of left-padded prompts."""
    from guidedecode.backends.hf import eos_token_ids, left_pad

    eos = list(eos_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    ids, mask = left_pad(prompts, pad, next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=pad, logits_processor=[guide] if guide else None)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row[:cut] if cut is not None else row)
    return rows


def run_condition(label, model, tokenizer, problems, prompt_ids, out: Path, args, *, vocab=None, guide=None):
    from guidedecode.planning import trace_stats
    from guidedecode.tasks import get_task

    task = get_task("strategyqa")

    def work(chunk, index):
        if guide is not None:
            guide.reset()
        generated = generate(model, tokenizer, [prompt_ids(p) for p in chunk], max_new_tokens=args.max_new_tokens,
                             guide=guide)
        records = []
        for problem, tokens in zip(chunk, generated):
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            answer = task.extract(text)
            record = {"id": problem.id, "gold": problem.answer, "answer": answer, "correct": answer == problem.answer,
                      "tokens": len(tokens), "completion": text}
            if vocab is not None:
                record["trace"] = trace_stats(tokens, vocab, tokenizer)
            records.append(record)
        return records

    records = collect_resumable(problems, out / label / "results.jsonl", work, key=lambda p: p.id,
                                chunk_size=args.batch_size, progress=True, desc=label)
    if vocab is not None:  # recount from the text, so the counters are those of the current trace_stats
        for r in records:
            r["trace"] = trace_stats(r["completion"], vocab)
    correct = sum(r["correct"] for r in records)
    summary = {"accuracy": proportion_ci(correct, len(records)), "correct": correct, "n": len(records),
               "no_answer": sum(r["answer"] is None for r in records),
               "mean_tokens": sum(r["tokens"] for r in records) / len(records)}
    if vocab is not None:
        types, patterns = Counter(), Counter()
        for r in records:
            types.update(r["trace"]["types"])
            patterns[r["trace"]["pattern"]] += 1
        summary["step_types"] = dict(types)
        summary["steps_per_answer"] = sum(r["trace"]["steps"] for r in records) / len(records)
        summary["top_patterns"] = dict(patterns.most_common(5))
        summary["malformed_blocks"] = sum(r["trace"]["malformed_blocks"] for r in records)
        summary["truncated_blocks"] = sum(r["trace"]["truncated_blocks"] for r in records)
        summary["blocks"] = sum(r["trace"]["blocks"] for r in records)
    write_json(out / label / "summary.json", summary)
    return summary


def main() -> None:
    from guidedecode.guides.planning import PlanningTokenGuide
    from guidedecode.models import load_model
    from guidedecode.planning import prompt_text
    from guidedecode.planning.data import source_text
    from guidedecode.tasks import get_task
    from guidedecode.training.planner import load_planner

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planner", required=True, help="run directory of train planner --scheme memreason")
    parser.add_argument("--baseline", required=True, help="run directory of train planner --scheme none")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (zero-shot)")
    parser.add_argument("--limit", type=int, default=100, help="test questions (seeded, without replacement)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--unguided", action="store_true", help="also decode the planner without the guide")
    parser.add_argument("--conditions", default="zero-shot,lora-cot,planning")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evidence/planning-strategyqa"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    task = get_task("strategyqa")
    test = task.load(split="test")
    problems = [test[i] for i in sorted(random.Random(args.seed).sample(range(len(test)), args.limit))]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "subset.json", {"split": "test", "of": len(test), "seed": args.seed,
                                          "ids": [p.id for p in problems]})
    conditions = args.conditions.split(",") + (["planning-unguided"] if args.unguided else [])
    results = {}
    if "zero-shot" in conditions:
        model, tokenizer = load_model(args.model)

        def chat(problem):
            text = tokenizer.apply_chat_template(task.messages(problem), tokenize=False, add_generation_prompt=True)
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        results["zero-shot"] = run_condition("zero-shot", model, tokenizer, problems, chat, args.out, args)
    if "lora-cot" in conditions:
        model, tokenizer, _ = load_planner(args.baseline)
        results["lora-cot"] = run_condition(
            "lora-cot", model, tokenizer, problems,
            lambda p: tokenizer(source_text(p.question), add_special_tokens=False)["input_ids"], args.out, args)
    planning = [c for c in conditions if c.startswith("planning")]
    if planning:
        model, tokenizer, vocab = load_planner(args.planner)

        def planned(problem):
            return tokenizer(prompt_text(problem.question, vocab), add_special_tokens=False)["input_ids"]

        for label in planning:
            guide = PlanningTokenGuide(vocab, tokenizer=tokenizer) if label == "planning" else None
            results[label] = run_condition(label, model, tokenizer, problems, planned, args.out, args, vocab=vocab,
                                           guide=guide)
    def read_json(path):
        return json.loads(Path(path).read_text())

    train = {name: {k: v for k, v in read_json(Path(d) / "metrics.json").items()
                    if k in ("scheme", "rows", "train_examples", "dev_examples", "dropped_too_long", "global_step",
                             "history", "selected_epoch", "new_tokens", "trainable_parameters", "train_step_types")}
             for name, d in (("lora-cot", args.baseline), ("planning", args.planner))}
    train_config = {name: read_json(Path(d) / "config.json") for name, d in (("lora-cot", args.baseline),
                                                                               ("planning", args.planner))}
    figures = {"task": "strategyqa (memreason test split)", "subset": {"n": len(problems), "seed": args.seed,
                                                                        "of": len(test)},
               "decoding": {"greedy": True, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size},
               "results": results, "training": train, "training_config": train_config}
    path = write_result("evidence-planning-strategyqa", figures,
                        notes="accuracy = exact yes/no match; intervals are 95% Wilson; per-question records under "
                              f"{args.out}")
    print(path)
    for name, summary in results.items():
        acc = summary["accuracy"]
        print(f"{name:20s} {acc['mean']:.3f} [{acc['low']:.3f}, {acc['high']:.3f}] n={acc['n']}")


if __name__ == "__main__":
    main()
