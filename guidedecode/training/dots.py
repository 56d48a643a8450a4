"""DOTS planner training: trajectory search -> explanations -> SFT data -> fine-tune (arXiv 2410.03864).

Stages and files of a run directory (every stage resumes; a rerun of the same command skips what is
done and refuses a directory made with other settings):

``search``   :func:`guidedecode.dots.search.search` (Algorithm 1) on the training questions with the
             solver model (transformers, or a vLLM engine with ``backend="vllm"``): ``search/runs.jsonl`` (every run: trajectory, dialogue, prediction, score),
             ``search/search.jsonl`` (per question: success table, best trajectory or all-pass/all-fail).
``explain``  for each kept question, one paragraph on why its best trajectory fits, written greedily
             by the explainer model (default: the solver) from
             :func:`~guidedecode.dots.planner.explanation_prompt`: ``explain.jsonl``.
``sft``      the SFT records (:func:`build_sft`): ``sft.jsonl`` with ``{"id", "instruction", "output"}``.
             ``external``: output = header + explanation + ``Required Action:`` line; ``internal``:
             the same, then ``Now, I will begin solving ...`` and the solver's first turn of a
             successful run (``target="first_turn"``, the paper's) or all its assistant turns
             (``"full_dialogue"``).
``train``    prompt-masked SFT of the planner on ``[user: instruction] -> [assistant: output]`` with
             :func:`guidedecode.training.common.fit` (peft LoRA or full); dev split, dev loss per
             epoch, checkpoints; the final model is saved merged to ``planner/`` (a plain HF
             directory: ``DOTS(mode="external", planner=HFBackend(*load_model(out / "planner")))``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guidedecode.dots.actions import parse_trajectory
from guidedecode.dots.planner import explanation_prompt, plan_text, planner_prompt
from guidedecode.dots.search import PRESETS, SearchConfig, search
from guidedecode import validation as v
from guidedecode.errors import TrainingError
from guidedecode.records import read_jsonl, write_json
from guidedecode.training.common import check_collection_backend

__all__ = ["DotsPlannerConfig", "STAGES", "build_sft", "explain", "run_dots_pipeline"]

STAGES = ("search", "explain", "sft", "train")
FORMATS = ("external", "internal")
TARGETS = ("first_turn", "full_dialogue")


@dataclass
class DotsPlannerConfig:
    """One planner-training run. ``search`` holds Algorithm 1's settings (default: the paper's)."""

    task: str = "synthetic"
    task_options: dict = field(default_factory=dict)
    data: str | None = None
    split: str = "train"
    questions: int | None = None  # the first N questions of the split
    solver: str = "smollm2-135m-instruct"
    explainer: str | None = None  # default: the solver
    base_model: str | None = None  # the planner to fine-tune; default: the solver
    format: str = "external"
    target: str = "first_turn"
    upsample: int = 1  # copies of every SFT record
    search: SearchConfig = field(default_factory=lambda: PRESETS["paper"])
    lora: bool = True
    lora_r: int = 16
    epochs: int = 4
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 1536
    dev_fraction: float = 0.1
    seed: int = 0
    save_every: int = 20
    batch_size_generate: int = 16
    explain_max_new_tokens: int = 160
    device: str | None = None
    backend: str = "hf"  # where search and explain generate: "hf" or "vllm" (a vLLM engine per model)

    def validate(self, stages=("search", "explain")) -> None:
        check_collection_backend(self.backend, used=bool({"search", "explain"} & set(stages)))
        if self.format not in FORMATS:
            raise TrainingError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.target not in TARGETS:
            raise TrainingError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.format == "external" and self.target != "first_turn":
            raise TrainingError(f"target {self.target!r} applies to the internal format only (an external planner's "
                                "output has no solution): use --format internal or leave --target at first_turn")
        error = TrainingError
        v.optional(v.positive_int, "questions", self.questions, error=error)
        for name in ("upsample", "epochs", "batch_size", "grad_accum", "lora_r", "max_length", "batch_size_generate",
                     "explain_max_new_tokens"):
            v.positive_int(name, getattr(self, name), error=error)
        v.integer("seed", self.seed, minimum=0, error=error)
        v.integer("save_every", self.save_every, minimum=0, error=error)
        if v.number("lr", self.lr, error=error) <= 0:
            raise error(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= v.number("dev_fraction", self.dev_fraction, error=error) < 1:
            raise error(f"dev_fraction must be in [0, 1), got {self.dev_fraction}")
        if not isinstance(self.search, SearchConfig):
            raise error(f"search must be a SearchConfig (guidedecode.dots.search), got {type(self.search).__name__}")
        self.search.validate()

    def settings(self, stage: str) -> dict:
        """What a stage's output depends on (a resumed stage must match), as plain JSON values."""
        values = json.loads(json.dumps(asdict(self)))
        base = {k: values[k] for k in ("task", "task_options", "data", "split", "questions", "solver", "backend")}
        base["search"] = values["search"]
        if stage == "search":
            return base
        base.update(explainer=self.explainer or self.solver, explain_max_new_tokens=self.explain_max_new_tokens)
        if stage == "explain":
            return base
        base.update(format=self.format, target=self.target, upsample=self.upsample)
        if stage == "sft":
            return base
        base.update({k: values[k] for k in ("base_model", "lora", "lora_r", "epochs", "lr", "batch_size", "grad_accum",
                                             "max_length", "dev_fraction", "seed")})
        return base


# ------------------------------------------------------------------------------------------- stages


def explain(items: list[dict], backend, *, max_new_tokens: int = 160) -> list[str]:
    """One explanation per ``{"question", "best"}`` item, greedy, batched."""
    prompts = [backend.chat_prompt(explanation_prompt(item["question"], item["best"])) for item in items]
    return [c.text.strip() for c in backend.greedy(prompts, max_new_tokens=max_new_tokens)]


def build_sft(kept: list[dict], *, format: str = "external", target: str = "first_turn", upsample: int = 1,
              runs: dict[str, list[dict]] | None = None) -> list[dict]:
    """SFT records ``{"id", "instruction", "output"}`` from the kept questions (each with ``question``,
    ``best``, ``explanation`` and, for ``internal``, ``first_turn``). ``target="full_dialogue"`` needs
    ``runs`` (question id -> runs) and uses every assistant turn of a successful run of the best
    trajectory. A question without a successful run's text is skipped in ``internal`` format."""
    if format not in FORMATS or target not in TARGETS:
        raise TrainingError(f"format must be one of {FORMATS} and target one of {TARGETS}")
    v.positive_int("upsample", upsample, error=TrainingError)
    needed = ("id", "question", "best", "explanation")
    records = []
    for item in kept:
        missing = [key for key in needed if key not in item]
        if missing:
            raise TrainingError(f"kept question {item.get('id', '?')!r} lacks {missing}: each needs {list(needed)}")
        solution = None
        if format == "internal":
            if target == "first_turn":
                solution = item.get("first_turn")
            else:
                winners = [r for r in (runs or {}).get(item["id"], [])
                           if r["score"] and r["trajectory"] == parse_trajectory(item["best"]).action_line]
                if winners:
                    solution = "\n\n".join(m["content"] for m in winners[0]["dialogue"] if m["role"] == "assistant")
            if not solution:
                continue
        record = {"instruction": planner_prompt(item["question"], internal=format == "internal"),
                  "output": plan_text(item["explanation"], item["best"], solution),
                  "trajectory": parse_trajectory(item["best"]).action_line}
        for copy in range(upsample):
            records.append({"id": f"{item['id']}#{copy}" if upsample > 1 else item["id"], **record})
    return records


def _describe(backend) -> dict:
    """The solver's backend, dtype and device (a scripted test backend without a model: its class name)."""
    from guidedecode.training.common import describe_backend

    try:
        return describe_backend(backend)
    except (AttributeError, StopIteration):
        return {"backend": type(backend).__name__}


def _sft_hash(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record["instruction"], record["output"]]).encode())
    return digest.hexdigest()[:16]


def run_dots_pipeline(config: DotsPlannerConfig, out: str | Path, *, stages=STAGES, progress: bool = False,
                      models: dict[str, Any] | None = None, backends: dict[str, Any] | None = None,
                      check=None) -> dict:
    """Run ``stages`` in order (see the module docstring); returns the metrics (also ``metrics.json``).

    ``models``: already-loaded ``(model, tokenizer)`` pairs by name; ``backends``: ready backends by name
    for the solver / explainer; ``check(texts, problems)``: the search's checker (default: the task's
    ``check_many``)."""
    from guidedecode.tasks import get_task
    from guidedecode.training.common import check_ready_backend, check_settings, collect_resumable, collection_backend

    config.validate(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    out = v.output_dir("--out", out, error=TrainingError)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    cache: dict[str, Any] = dict(models or {})
    ready: dict[str, Any] = dict(backends or {})

    def load(name: str):
        if name not in cache:
            from guidedecode.models import load_model

            cache[name] = load_model(name, device=config.device)
        return cache[name]

    for name, given in ready.items():
        check_ready_backend(config.backend, given, name)

    def backend(name: str):
        if name not in ready:
            ready[name] = collection_backend(config.backend, name, load=lambda: load(name),
                                             batch_size=config.batch_size_generate, seed=config.seed,
                                             device=config.device)
        return ready[name]

    task = get_task(config.task, **config.task_options)
    problems = None

    def questions():
        nonlocal problems
        if problems is None:
            problems = task.load(config.data, split=config.split, limit=config.questions)
            if not problems:
                raise TrainingError(f"task {config.task!r} split {config.split!r} has no questions")
        return problems

    if "search" in stages:
        # the search is per question (seeds from the question id): more or fewer questions resume it
        check_settings(out / "search" / "settings.json", config.settings("search"), may_change=("questions",))
        summaries = search(questions(), backend(config.solver), messages=task.messages, check=check or task.check_many,
                           config=config.search,
                           out=out / "search", progress=progress)
        statuses = [s["status"] for s in summaries]
        best = [s["best"] for s in summaries if s["best"]]
        metrics["search"] = {
            "questions": len(summaries), "kept": statuses.count("kept"), "all_pass": statuses.count("all_pass"),
            "all_fail": statuses.count("all_fail"), "runs": sum(s["runs"] for s in summaries),
            "best_counts": {line: best.count(line) for line in sorted(set(best), key=best.index)},
            "cost": _search_cost(out / "search" / "runs.jsonl"), "settings": asdict(config.search),
            "solver": _describe(backend(config.solver)),
        }
        write_json(metrics_path, metrics)

    def kept_questions() -> list[dict]:
        path = out / "search" / "search.jsonl"
        if not path.is_file():
            raise TrainingError(f"{path} not found: run the search stage first")
        by_id = {p.id: p for p in questions()}
        kept = []
        for summary in read_jsonl(path):
            if summary["status"] == "kept" and summary["id"] in by_id:
                messages = task.messages(by_id[summary["id"]])
                kept.append({"id": summary["id"], "question": messages[-1]["content"], "best": summary["best"],
                             "first_turn": summary["first_turn"]})
        return kept

    if "explain" in stages:
        check_settings(out / "explain.settings.json", config.settings("explain"), may_change=("questions",))
        kept = kept_questions()
        explainer = backend(config.explainer or config.solver)

        def work(chunk, _index):
            texts = explain(chunk, explainer, max_new_tokens=config.explain_max_new_tokens)
            return [{"id": item["id"], "best": item["best"], "explanation": text} for item, text in zip(chunk, texts)]

        records = collect_resumable(kept, out / "explain.jsonl", work, key=lambda item: item["id"],
                                    chunk_size=config.batch_size_generate, progress=progress, desc="dots explain")
        metrics["explain"] = {"explained": len(records)}
        write_json(metrics_path, metrics)

    if "sft" in stages:
        kept = kept_questions()
        explanations = {r["id"]: r["explanation"] for r in read_jsonl(out / "explain.jsonl")}
        missing = [k["id"] for k in kept if k["id"] not in explanations]
        if missing:
            raise TrainingError(f"{len(missing)} kept question(s) have no explanation (e.g. {missing[0]}): "
                                "run the explain stage first")
        runs = None
        if config.target == "full_dialogue":
            runs = {}
            for unit in read_jsonl(out / "search" / "runs.jsonl"):
                runs.setdefault(unit["question"], []).extend(unit["runs"])
        records = build_sft([{**k, "explanation": explanations[k["id"]]} for k in kept], format=config.format,
                            target=config.target, upsample=config.upsample, runs=runs)
        if not records:
            raise TrainingError("no SFT records: the search kept no question (all were all-pass or all-fail) or, "
                                "in internal format, none has a successful run to imitate")
        tmp = out / "sft.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / "sft.jsonl")
        trajectories = [r["trajectory"] for r in records]
        metrics["sft"] = {"records": len(records), "format": config.format, "target": config.target,
                          "trajectories": {t: trajectories.count(t) for t in sorted(set(trajectories))},
                          "data_hash": _sft_hash(records)}
        write_json(metrics_path, metrics)

    if "train" in stages:
        records = read_jsonl(out / "sft.jsonl")
        if not records:
            raise TrainingError(f"{out / 'sft.jsonl'} has no records: run the sft stage first")
        metrics["train"] = _train(config, records, out, load, progress)
        write_json(metrics_path, metrics)
    return metrics


def _search_cost(path: Path) -> dict:
    """Solver tokens spent by the search, in total and per run."""
    units = read_jsonl(path)
    runs = [r for u in units for r in u["runs"]]
    tokens = sum(sum(r["tokens"].values()) for r in runs)
    return {"runs": len(runs), "generated_tokens": tokens, "tokens_per_run": tokens / len(runs) if runs else None}


def _train(config: DotsPlannerConfig, records: list[dict], out: Path, load, progress: bool) -> dict:
    """Prompt-masked SFT of the planner; the merged model goes to ``out/planner``."""
    from guidedecode.training.common import FitConfig, LMExample, atomic_dir, fit, split_dev
    from guidedecode.training.rationale import build_example, lora_targets

    final = out / "planner"
    summary_path = out / "train" / "summary.json"
    settings = {**config.settings("train"), "data_hash": _sft_hash(records)}
    if final.is_dir() and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("settings") != json.loads(json.dumps(settings)):
            raise TrainingError(f"{out} holds a trained planner made with other settings: use a new --out")
        return {**summary, "resumed_finished": True}
    model, tokenizer = load(config.base_model or config.solver)
    groups: dict[str, list[LMExample]] = {}  # by question: up-sampled copies stay on one side of the split
    too_long = 0
    for record in records:
        ids, labels = build_example(tokenizer, record["instruction"], record["output"])
        if len(ids) > config.max_length:
            too_long += 1
        else:
            groups.setdefault(record["id"].split("#")[0], []).append(LMExample(ids, labels))
    if not groups:
        raise TrainingError(f"every SFT example is longer than max_length={config.max_length}")
    train_ids, dev_ids = split_dev(sorted(groups), config.dev_fraction, config.seed)
    train = [e for key in train_ids for e in groups[key]]
    dev = [e for key in dev_ids for e in groups[key]]
    if config.lora:
        from peft import LoraConfig, get_peft_model

        import torch

        torch.manual_seed(config.seed)
        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_r, lora_dropout=0.0,
                                                 target_modules=lora_targets(model), task_type="CAUSAL_LM"))
    else:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    fit_config = FitConfig(epochs=config.epochs, batch_size=config.batch_size, grad_accum=config.grad_accum,
                           lr=config.lr, seed=config.seed, save_every=config.save_every)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = fit(model, train, dev, out / "train", fit_config, settings={"data": settings["data_hash"]},
                 pad_token_id=pad, progress=progress, desc="dots planner sft")
    model.eval()

    def write(directory: Path) -> None:
        merged = model.merge_and_unload() if config.lora else model
        merged.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    atomic_dir(final, write)
    summary = {"train_examples": len(train), "dev_examples": len(dev), "too_long": too_long,
               "fit": result.to_dict(), "lora": config.lora, "settings": settings, "planner": str(final)}
    write_json(summary_path, summary)
    return summary
