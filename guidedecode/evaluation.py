"""The eval harness: run a task with plain sampling, a token guide or a step strategy; resumable.

Output directory layout::

    config.json     the run's settings (a resumed run must match them)
    results.jsonl   one line per problem: id, gold, completions, answers, correct, tokens, seconds, cost
    summary.json    accuracy (mean pass@1) with a 95% CI, pass@k, maj@k, tokens, tokens/s

Problems are processed in fixed chunks (by index) with a seed derived from (seed, chunk), so each
problem's samples do not depend on which chunks ran before: a run killed midway and resumed writes
the same lines, and the summary (all but the timing fields) equals an uninterrupted run's.
Each chunk's lines are appended and fsynced together; a torn last line is dropped on resume.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidedecode import validation
from guidedecode.errors import GuidedecodeError, ValidationError
from guidedecode.metrics import majority_correct, mean_ci, pass_at_k, solved_at_ks, trial_histogram, trial_index
from guidedecode.records import append_jsonl as _append_lines
from guidedecode.records import check_complete, read_json
from guidedecode.records import read_jsonl as _read_jsonl
from guidedecode.records import write_json as _atomic_write_json

TIMING_FIELDS = ("seconds", "tokens_per_second")
# Per-sequence figures a guide may attach to its completions (``Completion.info``); recorded per
# sample and summarised as a mean over problems with a 95% CI. Q#: KL(guided || reference) summed
# over the generated tokens, before top-p ("kl") and of the sampled, post-top-p policy ("kl_sample").
GUIDE_FIGURES = ("kl", "kl_sample")
BACKENDS = ("hf", "vllm")


@dataclass
class EvalConfig:
    task: str
    model: str
    data: str | None = None
    split: str = "test"
    limit: int | None = None
    samples: int = 1
    seed: int = 0
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    guide: str | None = None
    strategy: str | None = None
    params: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    backend: str = "hf"  # "hf" (transformers generate) or "vllm" (a vllm.LLM engine: guidedecode.vllm)

    def validate(self) -> None:
        """Check every setting (types and ranges) before anything is loaded or written."""
        from guidedecode.registry import check_params

        v, error = validation, ValidationError
        v.string("task", self.task, error=error)
        v.string("model", self.model, error=error)
        v.optional(v.string, "data", self.data, error=error)
        v.string("split", self.split, error=error)
        v.optional(v.integer, "limit", self.limit, minimum=1, error=error)
        v.positive_int("samples", self.samples, error=error)
        v.integer("seed", self.seed, minimum=0, error=error)
        v.temperature("temperature", self.temperature, allow_zero=True, error=error)
        v.probability("top_p", self.top_p, error=error)
        v.positive_int("max_new_tokens", self.max_new_tokens, error=error)
        v.positive_int("batch_size", self.batch_size, error=error)
        if self.backend not in BACKENDS:
            raise error(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name, value in (("params", self.params), ("task_options", self.task_options)):
            if not isinstance(value, dict):
                raise error(f"{name} must be a dict, got {type(value).__name__}")
        if not all(isinstance(k, str) and isinstance(x, str) for k, x in self.params.items()):
            raise error(f"params must map names to strings (as on the command line), got {self.params!r}")
        if self.guide and self.strategy:
            raise error("pass either a guide or a strategy, not both")
        if self.guide:
            check_params("guide", self.guide, self.params)
        elif self.strategy:
            check_params("strategy", self.strategy, self.params)
        elif self.params:
            raise error(f"parameters {sorted(self.params)} given without a guide or strategy to take them")
        if self.temperature == 0 and self.samples > 1 and not self.strategy:
            raise error("greedy decoding (temperature 0) gives identical samples: use --samples 1")


def read_results(path) -> list[dict]:
    """The records of a ``results.jsonl`` (tail repaired; a damaged line or a missing/repeated id is refused)."""
    return _read_jsonl(path, key="id")


def run_eval(config: EvalConfig, out_dir: str | os.PathLike, *, model=None, tokenizer=None, progress: bool = True,
             device=None, dtype=None, engine=None) -> dict:
    """Evaluate, appending to ``out_dir/results.jsonl`` and skipping problems already there.

    ``model``/``tokenizer``: already loaded objects; else ``load_model(config.model, device=, dtype=)``.
    ``config.backend == "vllm"``: the model runs in a ``vllm.LLM`` engine (:mod:`guidedecode.vllm`); a guide
    becomes its vLLM logits processor with per-request settings (Q#'s KL is not reported there);
    ``engine``: an already built ``vllm.LLM`` of ``config.model`` (with the guide's processor loaded).
    """
    from guidedecode.backends import HFBackend
    from guidedecode.registry import build_guide, build_strategy
    from guidedecode.tasks import get_task

    config.validate()
    out = validation.output_dir("out_dir", out_dir)
    _check_or_write_config(out / "config.json", config)
    task = get_task(config.task, **config.task_options)
    problems = task.load(config.data, split=config.split, limit=config.limit)
    if not problems:
        raise GuidedecodeError(f"task '{config.task}' loaded no problems")
    request_args = {}
    if config.backend != "vllm" and engine is not None:
        raise ValidationError("an engine was given but the config's backend is 'hf'")
    if config.backend == "vllm":
        if engine is None:
            engine, request_args = _vllm_engine(config, dtype=dtype)
        elif config.guide:
            from guidedecode.vllm.engine import guide_request, require_processor

            processor, _, request_args = guide_request(config.guide, config.params)
            require_processor(engine, processor)
        model, tokenizer = None, engine.get_tokenizer()
    elif model is None or tokenizer is None:
        from guidedecode.models import load_model

        model, tokenizer = load_model(config.model, device=device, dtype=dtype)
    # The run's sampling settings reach the guide (Q#'s KL accounting needs them) and the strategy; a
    # strategy that ends up with other ones is refused (check_strategy_settings), never recorded wrongly.
    context = {"model": model, "task": task, "max_new_tokens": config.max_new_tokens}
    sampling = {"temperature": config.temperature, "top_p": config.top_p}
    guide = None
    if config.guide and engine is None:
        guide = build_guide(config.guide, tokenizer, config.params, context={**context, **sampling})
    strategy = None
    if config.strategy:
        strategy = build_strategy(config.strategy, tokenizer, config.params, context={**context, **sampling})
        check_strategy_settings(strategy, config)
    if strategy is not None and hasattr(strategy, "extract"):
        strategy.extract = task.extract  # vote over the task's own answer format
    if engine is not None:
        from guidedecode.vllm import VLLMBackend

        backend = VLLMBackend(engine, extra_args=request_args)
    else:
        backend = HFBackend(model, tokenizer, batch_size=config.batch_size, logits_processor=[guide] if guide else None)

    results_path = out / "results.jsonl"
    done = {record["id"] for record in read_results(results_path)}
    # sequences per generate call ~ batch_size: a strategy sampling b sequences per prompt takes batch_size // b problems
    width = config.samples * (_sequences_per_prompt(strategy) if strategy else 1)
    per_chunk = max(1, config.batch_size // width)
    chunks = [problems[i : i + per_chunk] for i in range(0, len(problems), per_chunk)]
    bar = _progress(len(problems), len(done & {p.id for p in problems}), progress, config.task)
    for index, chunk in enumerate(chunks):
        todo = [p for p in chunk if p.id not in done]
        if not todo:
            continue
        seed = config.seed * 1_000_003 + index
        records = _run_chunk(task, backend, strategy, chunk, config, seed)
        _append_lines(results_path, [r for r in records if r["id"] not in done])
        bar.update(len(todo))
    bar.close()
    records = read_results(results_path)
    check_complete(results_path, records, [p.id for p in problems])  # every problem exactly once
    summary = summarize(records, [p.id for p in problems], config)
    if engine is not None:  # what the numbers were computed with
        model_config = engine.llm_engine.model_config
        summary.update(backend="vllm", dtype=str(model_config.dtype).removeprefix("torch."),
                       device=str(engine.llm_engine.vllm_config.device_config.device))
    else:
        weights = next(model.parameters())
        summary.update(backend="hf", device=str(weights.device), dtype=str(weights.dtype).removeprefix("torch."))
    _atomic_write_json(out / "summary.json", summary)
    return summary


def check_strategy_settings(strategy, config: EvalConfig) -> None:
    """The strategy samples with the run's temperature, top-p and max new tokens, or the run is refused.

    The registry hands a strategy the run's settings; a ``-p`` parameter that sets another value, or a
    method that cannot use them (token beam search decodes at temperature 0), would make
    ``config.json`` / ``summary.json`` record settings the run did not use.
    """
    name = config.strategy
    temperature = getattr(strategy, "temperature", None)
    if temperature is None:
        raise GuidedecodeError(f"strategy '{name}' does not say at which temperature it decodes")
    if float(temperature) != float(config.temperature):
        raise GuidedecodeError(
            f"strategy '{name}' decodes at temperature {temperature:g} but the run says --temperature "
            f"{config.temperature:g}: give the temperature once, as --temperature {temperature:g}"
        )
    top_p = getattr(strategy, "top_p", None)
    if temperature > 0 and (top_p is None or float(top_p) != float(config.top_p)):
        raise GuidedecodeError(
            f"strategy '{name}' samples with top-p {top_p if top_p is not None else 'of its own'} but the run says "
            f"--top-p {config.top_p:g}: give top-p once, as --top-p"
        )
    if getattr(strategy, "max_new_tokens", config.max_new_tokens) != config.max_new_tokens:
        raise GuidedecodeError(
            f"strategy '{name}' generates up to {strategy.max_new_tokens} new tokens but the run says "
            f"--max-new-tokens {config.max_new_tokens}: give the limit once, as --max-new-tokens"
        )


def _sequences_per_prompt(strategy) -> int:
    """How many sequences one prompt puts in a generate call: its attempts, or a step search's candidates."""
    return max(attempt_budget(strategy) or 1, getattr(strategy, "candidates_per_step", 1))


def _run_chunk(task, backend, strategy, chunk, config: EvalConfig, seed: int) -> list[dict]:
    # A prompt reaches the harness's consumer once: chat messages for strategies that render (and
    # extend) the chat themselves, else the text rendered with the chat template, never both.
    if getattr(strategy, "takes_messages", False):
        prompts = [task.messages(p) for p in chunk]
    else:
        prompts = [backend.chat_prompt(task.messages(p)) for p in chunk]
    started, spent_before = time.perf_counter(), backend.stats.counters()
    infos, trials = None, None
    if strategy is not None:
        texts, tokens = [[] for _ in chunk], [[] for _ in chunk]
        attempts, trials, traces = [[] for _ in chunk], [[] for _ in chunk], [[] for _ in chunk]
        if getattr(strategy, "oracle", False):
            by_gold = {p.answer: p for p in chunk}
            strategy.check = lambda text, gold: task.check(text, by_gold[gold])  # the oracle-stop protocol
        for k in range(config.samples):
            strategy.seed = seed * 101 + k
            for i, result in enumerate(strategy.run(backend, prompts, golds=[p.answer for p in chunk])):
                texts[i].append(result.completion.text)
                tokens[i].append(result.generated_tokens)
                attempts[i].append(result.attempts)
                trials[i].append(trial_index(result) if getattr(strategy, "oracle", False) else None)
                traces[i].append(_jsonable(result.trace))
    elif config.temperature == 0:
        completions = backend.greedy(prompts, max_new_tokens=config.max_new_tokens)
        texts, tokens = [[c.text] for c in completions], [[c.num_tokens] for c in completions]
    else:
        samples = backend.sample(prompts, config.samples, max_new_tokens=config.max_new_tokens,
                                 temperature=config.temperature, top_p=config.top_p, seed=seed)
        texts = [[c.text for c in row] for row in samples]
        tokens = [[c.num_tokens for c in row] for row in samples]
        infos = [[c.info for c in row] for row in samples]
    seconds = (time.perf_counter() - started) / len(chunk)
    # the policy model's cost counters (see BackendStats), shared evenly by the chunk's problems
    cost = {name: value / len(chunk) for name, value in backend.stats.since(spent_before).items()}
    flat_texts = [t for row in texts for t in row]
    flat_problems = [p for p, row in zip(chunk, texts) for _ in row]
    verdicts = iter(task.check_many(flat_texts, flat_problems))
    records = [
        {
            "id": problem.id,
            "gold": problem.answer,
            "completions": row,
            "answers": [task.extract(t) for t in row],
            "correct": [next(verdicts) for _ in row],
            "tokens": row_tokens,
            "seconds": seconds,
            "cost": cost,
        }
        for problem, row, row_tokens in zip(chunk, texts, tokens)
    ]
    if trials is not None:
        for record, row_attempts, row_trials, row_traces in zip(records, attempts, trials, traces):
            record["attempts"] = row_attempts  # complete answers made (the attempt of strategies.budget)
            record["budget"] = attempt_budget(strategy)
            record["trace"] = row_traces  # per sample: the strategy's trace (attempt records, RATIONALYST steps)
            if getattr(strategy, "oracle", False):
                # the oracle picked the completion: its verdict is "solved within the budget", not accuracy
                record["trials"] = row_trials  # 1-based attempt of the first correct answer (oracle stop)
                record["verifier"] = "oracle"
    for key in GUIDE_FIGURES:  # per-sample figures a guide reports (e.g. Q#'s KL), where present
        if infos and all(key in info for row in infos for info in row):
            for record, row in zip(records, infos):
                record[key] = [float(info[key]) for info in row]
    return records


def attempt_budget(strategy) -> int | None:
    """The most attempts (complete answers, see ``strategies.budget``) per problem a strategy may make."""
    value = getattr(strategy, "max_attempts", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _jsonable(value):
    """A trace as JSON: tuples as lists, non-finite floats (e.g. the -inf score of a skipped candidate) as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def summarize(records: list[dict], ids: list[str], config: EvalConfig) -> dict:
    """Metrics over the records of ``ids`` (in that order); timing fields are listed in TIMING_FIELDS.

    Intervals are 95% and stay inside [0, 1] (``metrics.mean_ci``: Wilson, or a bootstrap over problems
    seeded with the run's seed when several samples share a problem). An oracle-stop run (the oracle
    picked each completion) reports only oracle names: solved@k and the trial histogram, never
    accuracy, pass@k or maj@k.
    """
    by_id = {r["id"]: r for r in records}
    rows = [by_id[i] for i in ids if i in by_id]
    k = config.samples
    oracle = bool(rows) and all("trials" in r for r in rows)
    ci = lambda values: mean_ci(values, seed=config.seed)  # noqa: E731
    summary = {
        "task": config.task,
        "model": config.model,
        "guide": config.guide,
        "strategy": config.strategy,
        "params": config.params,
        "problems": len(rows),
        "problems_total": len(ids),
        "samples": k,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "seed": config.seed,
        "verifier": "oracle" if oracle else None,
        "tokens_generated": sum(sum(r["tokens"]) for r in rows),
    }
    if oracle:  # oracle stop: solved@k (each problem's share of samples solved within k attempts) + histogram
        trials = [t for r in rows for t in r["trials"]]
        budget = max(r.get("budget") or max(r["attempts"]) for r in rows)
        summary["trial_histogram"] = trial_histogram(trials, budget)
        for name in solved_at_ks(trials, budget):
            kk = int(name.split("@")[1])
            summary[name] = ci([sum(t is not None and t <= kk for t in r["trials"]) / len(r["trials"])
                                for r in rows])
    else:
        summary["accuracy"] = ci([sum(r["correct"]) / len(r["correct"]) for r in rows])
        for kk in sorted({1, 2, 4, 8, 16, 32, k} & set(range(1, k + 1))):
            summary[f"pass@{kk}"] = ci([pass_at_k(len(r["correct"]), sum(r["correct"]), kk) for r in rows])
        summary[f"maj@{k}"] = ci([float(majority_correct(r["answers"], r["correct"])) for r in rows])
    for key in GUIDE_FIGURES:
        if rows and all(key in r for r in rows):
            summary[key] = ci([sum(r[key]) / len(r[key]) for r in rows])
    if rows and all("attempts" in r for r in rows):
        summary["attempts_mean"] = sum(sum(r["attempts"]) for r in rows) / sum(len(r["attempts"]) for r in rows)
    if rows and all("cost" in r for r in rows):  # per problem, averaged over problems (all samples included)
        summary["cost_per_problem"] = {name: sum(r["cost"][name] for r in rows) / len(rows)
                                       for name in rows[0]["cost"]}
    seconds = sum(r["seconds"] for r in rows)
    summary["seconds"] = seconds
    summary["tokens_per_second"] = summary["tokens_generated"] / seconds if seconds > 0 else None
    return summary


def _vllm_engine(config: EvalConfig, *, dtype=None):
    """(``vllm.LLM``, per-request ``extra_args``) for ``--backend vllm``: the guide as its processor."""
    from guidedecode.vllm import require_vllm
    from guidedecode.vllm.engine import build_engine, guide_request

    require_vllm()
    processors, request_args = [], {}
    if config.guide:
        processor, _, request_args = guide_request(config.guide, config.params)
        processors = [processor]
    name = str(dtype).removeprefix("torch.") if dtype is not None else None
    return build_engine(config.model, processors=processors, dtype=name, seed=config.seed), request_args


def _check_or_write_config(path: Path, config: EvalConfig) -> None:
    wanted = asdict(config)
    defaults = asdict(EvalConfig(task=config.task, model=config.model))  # a key added later reads as its default
    # a directory without records (e.g. a run that failed before its first chunk) takes the new settings
    if path.exists() and read_results(path.parent / "results.jsonl"):
        existing = read_json(path, error=ValidationError)
        if not isinstance(existing, dict):
            raise ValidationError(f"{path} does not hold a settings object: use a new --out directory")
        changed = sorted(key for key in wanted if existing.get(key, defaults[key]) != wanted[key])
        if changed:
            raise GuidedecodeError(
                f"{path.parent} holds a run with different settings ({', '.join(changed)}): use a new --out directory"
            )
        return
    _atomic_write_json(path, wanted)


def _progress(total: int, initial: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"eval {name}", unit="problem")
