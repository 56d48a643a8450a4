"""Eval harness: metrics, resume after an interruption, and one-line CLI errors."""

import json
import sys

import pytest

from guidedecode import evaluation
from guidedecode.evaluation import TIMING_FIELDS, EvalConfig, run_eval
from guidedecode.metrics import majority_correct, mean_ci, pass_at_k


def test_pass_at_k_matches_the_combinatorial_definition():
    from math import comb

    for n, c, k in [(10, 3, 1), (10, 3, 5), (8, 0, 4), (8, 8, 2), (5, 4, 2)]:
        assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k))
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_and_ci():
    assert majority_correct(["5", "3", "5", None], [True, False, True, False]) is True
    assert majority_correct(["3", "5", "5", "3"], [False, True, True, False]) is False  # tie -> earliest ("3")
    assert majority_correct([None, None], [False, False]) is False


def wilson(successes, n, z=1.959963984540054):
    """The Wilson score interval written out from its formula (Wilson 1927)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


@pytest.mark.parametrize("values", [[1.0] * 19 + [0.0], [0.0] * 9 + [1.0], [1.0] * 5, [0.0, 1.0, 1.0, 1.0]])
def test_a_proportion_gets_the_wilson_interval_inside_0_1(values):
    stats = mean_ci(values)
    low, high = wilson(int(sum(values)), len(values))
    assert stats["mean"] == sum(values) / len(values) and stats["interval"] == "wilson"
    assert (stats["low"], stats["high"]) == (pytest.approx(low), pytest.approx(high))
    assert 0.0 <= stats["low"] <= stats["mean"] <= stats["high"] <= 1.0


def test_several_samples_per_problem_get_a_seeded_bootstrap_over_problems():
    import random

    rng = random.Random(3)
    per_problem = [rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(15)] + [1.0, 1.0, 0.75]
    first, again, other = mean_ci(per_problem, seed=1), mean_ci(per_problem, seed=1), mean_ci(per_problem, seed=2)
    assert first == again and first["interval"] == "bootstrap" and first != other
    assert min(per_problem) <= first["low"] < first["mean"] < first["high"] <= max(per_problem)
    # a percentile bootstrap by hand: resample problems with replacement, take the 2.5% / 97.5% quantiles
    import numpy as np

    data = np.array(per_problem)
    means = np.sort(data[np.random.default_rng(0).integers(0, len(data), (20000, len(data)))].mean(axis=1))
    assert first["low"] == pytest.approx(means[int(0.025 * len(means))], abs=0.03)
    assert first["high"] == pytest.approx(means[int(0.975 * len(means))], abs=0.03)
    # near the bound the interval stays inside it (a normal approximation ran past 1 here)
    near_one = mean_ci([1.0] * 9 + [0.5])
    assert near_one["high"] <= 1.0 and near_one["low"] >= 0.5


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, embedded_tokenizer):
    from guidedecode.testing import tiny_model

    directory = tmp_path_factory.mktemp("tiny-qwen2")
    model = tiny_model("qwen2", seed=1, vocab_size=len(embedded_tokenizer),
                       eos_token_id=embedded_tokenizer.eos_token_id, pad_token_id=embedded_tokenizer.pad_token_id)
    model.save_pretrained(directory)
    embedded_tokenizer.save_pretrained(directory)
    return directory


def config_for(tiny_dir, **overrides):
    base = dict(task="synthetic", model=str(tiny_dir), limit=6, samples=2, seed=4, temperature=1.0,
                max_new_tokens=12, batch_size=4, guide="presence-penalty", params={"alpha": "0.5"})
    return EvalConfig(**{**base, **overrides})


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_and_resumed_eval_equals_an_uninterrupted_one(tmp_path, tiny_dir, monkeypatch):
    whole = run_eval(config_for(tiny_dir), tmp_path / "whole", progress=False)
    assert whole["problems"] == 6 and set(whole) >= {"accuracy", "pass@1", "pass@2", "maj@2", "tokens_generated"}

    real_append = evaluation._append_lines
    calls = {"n": 0}

    def crash_on_second_chunk(path, records):
        calls["n"] += 1
        if calls["n"] == 2:  # die mid-write: a torn line, then the process is gone
            with open(path, "a") as handle:
                handle.write(json.dumps(records[0])[:25])
            raise KeyboardInterrupt
        real_append(path, records)

    monkeypatch.setattr(evaluation, "_append_lines", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        run_eval(config_for(tiny_dir), tmp_path / "resumed", progress=False)
    monkeypatch.setattr(evaluation, "_append_lines", real_append)
    assert len(evaluation.read_results(tmp_path / "resumed" / "results.jsonl")) == 2  # torn line dropped

    resumed = run_eval(config_for(tiny_dir), tmp_path / "resumed", progress=False)
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(resumed) == strip(whole)
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop_time(lines(tmp_path / "resumed" / "results.jsonl")) == drop_time(lines(tmp_path / "whole" / "results.jsonl"))


def test_resuming_with_different_settings_is_refused(tmp_path, tiny_dir):
    run_eval(config_for(tiny_dir, limit=2), tmp_path / "run", progress=False)
    with pytest.raises(Exception, match="different settings"):
        run_eval(config_for(tiny_dir, limit=2, seed=5), tmp_path / "run", progress=False)


def test_eval_with_a_strategy(tmp_path, tiny_dir):
    summary = run_eval(config_for(tiny_dir, guide=None, params={"n": "2"}, samples=1, max_new_tokens=8,
                                  strategy="self-consistency", limit=2), tmp_path / "sc", progress=False)
    records = lines(tmp_path / "sc" / "results.jsonl")
    assert summary["problems"] == 2 and all(len(r["completions"]) == 1 for r in records)
    assert all(r["tokens"][0] > 0 for r in records)  # the strategy's internal samples are counted
    # cost counters: the chunk's spend shared by its problems; 2 samples of each prompt carry the prompt twice
    for record in records:
        cost = record["cost"]
        assert cost["generated_tokens"] == record["tokens"][0] and cost["sample_calls"] > 0
        # a sample call: one prefill per prompt (2 in the chunk), then at most max_new_tokens = 8 decoding steps
        assert cost["prompt_tokens"] > 0 and 0 < cost["forward_passes"] <= (2 + 8) * cost["sample_calls"]
    assert summary["cost_per_problem"]["generated_tokens"] == sum(r["tokens"][0] for r in records) / 2


def run_cli(monkeypatch, capsys, *args):
    from guidedecode.cli.main import main

    monkeypatch.setattr(sys, "argv", ["guidedecode", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (["eval", "--task", "nope"], "error: unknown task 'nope'"),
    (["eval", "--task", "gsm8k", "--data", "/no/such/dir", "--model", "x"],
     "error: gsm8k: data path '/no/such/dir' does not exist"),
    (["eval", "--task", "gsm8k", "--model", "no-such-model", "-n", "1"], "error: unknown model 'no-such-model'"),
    (["generate", "--prompt", "  "], "error: empty prompt"),
    (["eval", "--task", "synthetic", "--guide", "nope", "-n", "1"], "error: unknown guide 'nope'"),
    (["bench", "nope"], "error: unknown benchmark 'nope'"),
])
def test_cli_errors_are_one_line(monkeypatch, capsys, tmp_path, args, message):
    import datasets

    if args[0] != "bench":
        monkeypatch.chdir(tmp_path)
    # A cold datasets cache (as on a fresh CI machine) must not add progress output either.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    code, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and err.startswith(message) and "\n" not in err and "Traceback" not in err


def test_cli_eval_end_to_end(monkeypatch, capsys, tmp_path, tiny_dir):
    from guidedecode.cli.main import main

    out = tmp_path / "cli-run"
    monkeypatch.setattr(sys, "argv", ["guidedecode", "eval", "--task", "synthetic", "--model", str(tiny_dir), "-n", "2",
                                      "--samples", "2", "--max-new-tokens", "8", "--out", str(out), "--quiet"])
    main()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["samples"] == 2
    assert json.loads(capsys.readouterr().out)["problems"] == 2


def test_oracle_strategy_eval_records_trials_and_solved_at_k(tmp_path, tiny_dir, monkeypatch):
    from guidedecode.tasks.synthetic import SyntheticArithmetic

    # A deterministic stand-in verdict so that some problems are solved at a known attempt: the oracle accepts
    # completions of even length. The harness must hand the task's own check to the strategy (oracle stop).
    monkeypatch.setattr(SyntheticArithmetic, "check", lambda self, text, problem: len(text) % 2 == 0)
    monkeypatch.setattr(SyntheticArithmetic, "check_many",
                        lambda self, texts, problems: [len(t) % 2 == 0 for t in texts])
    config = config_for(tiny_dir, guide=None, params={"n": "4", "oracle": "1"}, max_new_tokens=6,
                        strategy="best-of-n", samples=1, limit=5)
    summary = run_eval(config, tmp_path / "oracle", progress=False)
    records = lines(tmp_path / "oracle" / "results.jsonl")
    trials = [r["trials"][0] for r in records]
    for record, trial in zip(records, trials):
        assert record["budget"] == 4
        if trial is None:
            assert record["attempts"] == [4] and record["correct"] == [False]
        else:  # stopped at the first accepted attempt, which is the chosen completion
            assert record["attempts"] == [trial] and record["correct"] == [True]
    solved = [t for t in trials if t is not None]
    assert summary["trial_histogram"]["solved"] == [solved.count(j) for j in range(1, 5)]
    assert summary["solved@1"]["mean"] == solved.count(1) / 5 and summary["solved@4"]["mean"] == len(solved) / 5
    assert 0 <= summary["solved@4"]["low"] <= summary["solved@4"]["mean"] <= summary["solved@4"]["high"] <= 1
    # the oracle picked each completion: its numbers appear only under oracle names, never as plain accuracy
    assert summary["verifier"] == "oracle"
    assert not any(key == "accuracy" or key.startswith(("pass@", "maj@")) for key in summary)
    assert all(r["verifier"] == "oracle" for r in records)


def test_revision_eval_gets_chat_messages(tmp_path, tiny_dir):
    config = config_for(tiny_dir, guide=None, params={"k": "2"}, strategy="revision", max_new_tokens=4,
                        temperature=0.0, samples=1, limit=2)
    summary = run_eval(config, tmp_path / "revision", progress=False)
    assert summary["problems"] == 2 and summary["attempts_mean"] == 2  # no oracle: the whole budget


def test_qsharp_eval_records_per_sample_kl(tmp_path, tiny_dir):
    from guidedecode.models import load_model
    from guidedecode.value_model import ValueModel

    model, tokenizer = load_model(str(tiny_dir))
    value_dir = tmp_path / "value-model"
    ValueModel.from_backbone(model, head="v", init="normal", tokenizer=tokenizer).save_pretrained(value_dir)
    runs = {}
    for eta in ("0", "10"):
        config = config_for(tiny_dir, guide="qsharp", params={"value_model": str(value_dir), "eta": eta},
                            top_p=0.8, limit=3, max_new_tokens=6)
        runs[eta] = run_eval(config, tmp_path / f"eta{eta}", model=model, tokenizer=tokenizer, progress=False)
        records = lines(tmp_path / f"eta{eta}" / "results.jsonl")
        assert all(len(r["kl"]) == len(r["kl_sample"]) == 2 for r in records)
    # eta = 0 is an exact no-op (KL 0 before top-p), but the sampled nucleus still has KL = -log(mass) > 0
    assert runs["0"]["kl"]["mean"] == 0.0 and runs["0"]["kl_sample"]["mean"] > 0
    assert runs["10"]["kl"]["mean"] > 0 and runs["10"]["kl_sample"]["mean"] > 0


def test_best_of_n_with_a_value_model_scorer_and_weighted_vote(tmp_path, tiny_dir):
    """The registry builds the Q# classifier as best-of-N's reward model; eval records its choices."""
    from guidedecode.errors import GuidedecodeError
    from guidedecode.models import load_model
    from guidedecode.registry import build_strategy
    from guidedecode.strategies import ValueModelScorer
    from guidedecode.value_model import ValueModel

    model, tokenizer = load_model(str(tiny_dir))
    value_dir = tmp_path / "value-model"
    ValueModel.from_backbone(model, head="v", init="normal", tokenizer=tokenizer).save_pretrained(value_dir)
    params = {"n": "2", "scorer": "value", "value_model": str(value_dir), "selection": "weighted_vote"}
    strategy = build_strategy("best-of-n", tokenizer, params, context={"model": model})
    assert isinstance(strategy.scorer, ValueModelScorer) and strategy.selection == "weighted_vote"
    summary = run_eval(config_for(tiny_dir, guide=None, strategy="best-of-n", params=params, samples=1, limit=2,
                                  max_new_tokens=6), tmp_path / "bon", model=model, tokenizer=tokenizer, progress=False)
    assert summary["problems"] == 2 and summary["cost_per_problem"]["generated_tokens"] > 0
    with pytest.raises(GuidedecodeError, match="needs -p value_model=DIR"):
        build_strategy("best-of-n", tokenizer, {"scorer": "value"}, context={"model": model})
    with pytest.raises(GuidedecodeError, match="only with scorer=value"):
        build_strategy("best-of-n", tokenizer, {"value_model": str(value_dir)}, context={"model": model})


# ------------------------------------------------------------------ strategies under eval: settings, prompts, traces


@pytest.mark.parametrize("strategy, params, temperature, top_p, message", [
    ("best-of-n", {"n": "2", "temperature": "0.2"}, 0.7, 1.0, "decodes at temperature 0.2 but the run says"),
    ("best-of-n", {"n": "2", "top_p": "0.5"}, 0.7, 1.0, "samples with top-p 0.5 but the run says --top-p 1"),
    ("best-of-n", {"n": "2", "max_new_tokens": "3"}, 0.7, 1.0, "up to 3 new tokens but the run says"),
    ("token-beam", {"width": "2"}, 0.7, 1.0, "decodes at temperature 0 but the run says --temperature 0.7"),
    ("revision", {"k": "2", "temperature": "0"}, 0.7, 1.0, "decodes at temperature 0 but"),
])
def test_strategy_settings_that_disagree_with_the_run_are_refused(tmp_path, tiny_dir, strategy, params,
                                                                 temperature, top_p, message):
    from guidedecode.errors import GuidedecodeError

    config = config_for(tiny_dir, guide=None, strategy=strategy, params=params, samples=1, limit=1,
                        temperature=temperature, top_p=top_p)
    with pytest.raises(GuidedecodeError, match=message):
        run_eval(config, tmp_path / "run", progress=False)


def test_eval_sampling_settings_reach_the_strategy(tmp_path, tiny_dir, monkeypatch):
    """--temperature / --top-p are the ones the strategy samples with, and the ones summary.json records."""
    from guidedecode.backends.hf import HFBackend

    used = []
    real_sample = HFBackend.sample

    def spy(self, prompts, n=1, **kwargs):
        used.append((kwargs["temperature"], kwargs["top_p"], kwargs["max_new_tokens"]))
        return real_sample(self, prompts, n, **kwargs)

    monkeypatch.setattr(HFBackend, "sample", spy)
    for strategy, params in (("best-of-n", {"n": "2"}), ("self-consistency", {"n": "2"}),
                             ("rationalyst", {"mode": "random", "max_steps": "1", "max_step_tokens": "4"})):
        used.clear()
        config = config_for(tiny_dir, guide=None, strategy=strategy, params=params, samples=1, limit=1,
                            temperature=0.2, top_p=0.9, max_new_tokens=5)
        summary = run_eval(config, tmp_path / strategy, progress=False)
        assert used and all(t == 0.2 and p == 0.9 for t, p, _ in used), (strategy, used)
        assert summary["temperature"] == 0.2 and summary["top_p"] == 0.9


def test_rationalyst_eval_renders_the_chat_once_and_keeps_its_trace(tmp_path, tiny_dir, monkeypatch):
    from guidedecode.backends.hf import HFBackend

    seen = []
    real_greedy, real_sample = HFBackend.greedy, HFBackend.sample
    monkeypatch.setattr(HFBackend, "greedy", lambda self, prompts, **kw: seen.extend(prompts) or real_greedy(
        self, prompts, **kw))
    monkeypatch.setattr(HFBackend, "sample", lambda self, prompts, n=1, **kw: seen.extend(prompts) or real_sample(
        self, prompts, n, **kw))
    config = config_for(tiny_dir, guide=None, strategy="rationalyst", samples=1, limit=2, max_new_tokens=24,
                        params={"k": "2", "max_steps": "2", "max_step_tokens": "6", "max_rationale_tokens": "4"})
    summary = run_eval(config, tmp_path / "rationalyst", progress=False)
    assert seen
    # one chat: one system turn at most and no rendered chat inside a user message
    for prompt in seen:
        assert prompt.count("<|im_start|>system") <= 1, prompt
        users = prompt.split("<|im_start|>user\n")[1:]
        assert all("<|im_start|>" not in user.split("<|im_end|>")[0] for user in users), prompt
    records = lines(tmp_path / "rationalyst" / "results.jsonl")
    for record in records:
        (trace,) = record["trace"]  # one sample: its per-step trace
        assert 1 <= len(trace) <= 2 and all({"rationale", "candidates", "chosen", "scores"} <= set(e) for e in trace)
        assert record["attempts"] == [1] and record["budget"] == 1  # one complete answer, like every strategy
    assert summary["attempts_mean"] == 1


def test_evidence_tables_plot_oracle_rows_under_oracle_names():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "evidence.py"
    spec = importlib.util.spec_from_file_location("evidence_script", path)
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    interval = {"mean": 0.5, "low": 0.3, "high": 0.7, "n": 20, "interval": "wilson"}
    base = {"problems": 20, "samples": 1, "tokens_generated": 10, "tokens_per_second": 1.0}
    oracle = evidence.table_row("bo8", {**base, "verifier": "oracle", "solved@1": interval, "solved@8": interval,
                                        "trial_histogram": {"budget": 8}})
    plain = evidence.table_row("greedy", {**base, "verifier": None, "accuracy": interval, "pass@1": interval})
    assert "accuracy" not in oracle and evidence.headline(oracle) == ("solved@8", interval)
    assert evidence.headline(plain) == ("accuracy", interval)
