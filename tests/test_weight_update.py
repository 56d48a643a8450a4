"""OpTune / FTTT / FTTT+ attempt loops on a tiny random Llama with the embedded tokenizer (real chat template)."""

import json

import pytest
import torch

from guidedecode.backends import HFBackend
from guidedecode.deltas import DeltaInjector, OpTuneEditor
from guidedecode.errors import StrategyError
from guidedecode.strategies import FeedbackLoop, Verifier
from guidedecode.strategies.weight_update import FTTT, OpTune
from guidedecode.testing import tiny_model

QUESTIONS = ["What is 2 + 3?", "What is 7 * 6?"]
GOLDS = ["5", "42"]


def never(text, gold):
    return False


@pytest.fixture(scope="module")
def setup():
    from guidedecode.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer), num_hidden_layers=3)
    return model, tokenizer


def _backend(setup, batch_size=4):
    model, tokenizer = setup
    return HFBackend(model, tokenizer, batch_size=batch_size)


@pytest.mark.parametrize("schedule,pattern", [("alternate", [False, True, False, True]),
                                              ("always_edit", [False, True, True, True])])
def test_optune_schedules_and_edited_attempt_equals_manual_injection(setup, schedule, pattern):
    model, tokenizer = setup
    editor = OpTuneEditor.for_model(model, eta_init=0.5)
    loop = FeedbackLoop(_backend(setup), Verifier.oracle(never), 4, strategy="optune", editor=editor,
                        schedule=schedule, temperature=0.0, max_new_tokens=6)
    reports = loop.run(QUESTIONS, GOLDS)
    for report in reports:
        assert [a["edited"] for a in report["attempts"]] == pattern
        assert report["solved_at"] is None
    assert reports[0]["cost"]["backward_passes"] > 0
    # attempt 2 = greedy decoding under the edit computed by hand from attempt 1
    backend = _backend(setup)
    first = reports[0]["attempts"][0]["text"]
    ids = torch.tensor([editor.edit_sequence(tokenizer, QUESTIONS[0], first)])
    (edit,) = editor.eval().edit(model, ids)
    with DeltaInjector(model, {n: d for n, d in edit.items()}):
        manual = backend.greedy([backend.chat_prompt(QUESTIONS[0])], max_new_tokens=6)[0].text
    assert manual == reports[0]["attempts"][1]["text"]
    assert manual != first or schedule == "always_edit"  # the edit (eta 0.5) changes the greedy answer


def test_optune_stops_at_the_first_correct_attempt_and_counts_nothing_after(setup):
    editor = OpTuneEditor.for_model(setup[0])
    calls = []

    def second_is_right(text, gold):
        calls.append(text)
        return len(calls) > len(QUESTIONS)  # everything from round 2 on is "correct"

    loop = FeedbackLoop(_backend(setup), Verifier.oracle(second_is_right), 5, strategy="optune", editor=editor,
                        temperature=0.0, max_new_tokens=4)
    reports = loop.run(QUESTIONS, GOLDS)
    assert [r["solved_at"] for r in reports] == [2, 2]
    assert all(len(r["attempts"]) == 2 for r in reports)


def test_fttt_cached_feedback_loss_equals_full_forward(setup):
    model, tokenizer = setup
    backend = _backend(setup)
    strategy = FTTT(3, check=never, seed=1)
    strategy.start(backend, [backend.chat_prompt(q) for q in QUESTIONS])
    with torch.no_grad():  # a non-zero adapter so the loss depends on it
        for adapter in strategy.adapters:
            for A, B in adapter.values():
                B.normal_(0, 0.05)
    pieces = [strategy.feedback_pieces(tokenizer, [{"role": "user", "content": q}], a)
              for q, a in zip(QUESTIONS, ["It is 6.", "The answer is 40, I think"])]
    loss = strategy.feedback_loss(backend, [0, 1], pieces)
    expected = 0.0
    for r, p in enumerate(pieces):
        ids = torch.tensor([p["context"] + p["feedback"]])
        with DeltaInjector(model, strategy.lora_delta(r)):
            logits = model(input_ids=ids).logits[0]
        c = len(p["context"])
        nll = torch.nn.functional.cross_entropy(logits[c:-1].float(), ids[0, c + 1:], reduction="none")
        expected = expected + nll.mean()
    assert abs(loss.item() - expected.item()) <= 1e-4
    # the feedback turn: end of the assistant turn, then the user turn with the feedback
    text = tokenizer.decode(pieces[0]["feedback"])
    assert text.startswith("<|im_end|>") and "Your answer is incorrect." in text
    assert tokenizer.decode(pieces[0]["context"]).endswith("It is 6.")


def test_fttt_first_attempts_are_the_base_model_and_batched_steps_equal_single(setup):
    model, tokenizer = setup
    base = _backend(setup).greedy([_backend(setup).chat_prompt(q) for q in QUESTIONS], max_new_tokens=5)
    runs = {}
    for label, questions in (("batch", QUESTIONS), ("single0", QUESTIONS[:1]), ("single1", QUESTIONS[1:])):
        strategy = FTTT(2, check=never, temperature=0.0, max_new_tokens=5, lr=1e-2, seed=3)
        results = strategy.run(_backend(setup), questions, golds=GOLDS[:len(questions)])
        runs[label] = (strategy, results)
    batch_strategy, batch_results = runs["batch"]
    assert [r.candidates[0].text for r in batch_results] == [c.text for c in base]  # B = 0: base model
    for q in range(2):
        single, _ = runs[f"single{q}"]
        for name, (A, B) in batch_strategy.adapters[q].items():
            A1, B1 = single.adapters[0][name]
            assert torch.allclose(B, B1, atol=1e-6) and B.abs().max() > 0  # one AdamW step, per question
        assert batch_strategy.steps[q] == 1  # the last attempt is not followed by a step
    assert all(r.trace[1]["edited"] for r in batch_results)


def test_fttt_plus_reflection_weights(setup):
    model, tokenizer = setup
    strategy = FTTT(3, check=never, reflection=True, reflection_tokens=8, temperature=0.0, seed=0)
    p = strategy.feedback_pieces(tokenizer, [{"role": "user", "content": "What is 2 + 3?"}], "It is 6.",
                                 reflection="I added wrongly.")
    assert "reflection" in p["kinds"] and "feedback" in p["kinds"]
    reflection = [t for t, k in zip(p["feedback"], p["kinds"]) if k == "reflection"]
    assert tokenizer.decode(reflection).strip() == "I added wrongly."
    loop = FeedbackLoop(_backend(setup), Verifier.oracle(never), 2, strategy="fttt+", temperature=0.0,
                        max_new_tokens=4, reflection_tokens=6)
    reports = loop.run(QUESTIONS[:1], GOLDS[:1])
    assert reports[0]["cost"]["sample_calls"] == 3  # two attempts + one reflection round


def test_bad_options_are_named(setup):
    with pytest.raises(StrategyError, match="editor"):
        FeedbackLoop(_backend(setup), Verifier.oracle(never), 2, strategy="optune", editor=None)
    with pytest.raises(StrategyError, match="schedule"):
        OpTune(2, check=never, editor=OpTuneEditor.for_model(setup[0]), schedule="odd")
    with pytest.raises(StrategyError, match="oracle"):
        FTTT(2).run(_backend(setup), QUESTIONS[:1], golds=GOLDS[:1])
    other = OpTuneEditor.for_model(tiny_model("llama", seed=0, hidden_size=96))
    from guidedecode.deltas import DeltaError

    with pytest.raises(DeltaError, match="another model"):
        OpTune(2, check=never, editor=other).run(_backend(setup), QUESTIONS[:1], golds=GOLDS[:1])


@pytest.mark.slow
def test_eval_harness_runs_optune_and_fttt_from_the_registry(setup, tmp_path):
    """``guidedecode eval --strategy optune|fttt``: the harness hands its checker to the strategy (oracle stop)."""
    from guidedecode.evaluation import EvalConfig, run_eval

    model, tokenizer = setup
    for name, params in (("optune", {"k": "2", "max_new_tokens": "6"}),
                         ("fttt", {"k": "2", "max_new_tokens": "6", "reflection": "1"})):
        config = EvalConfig(task="synthetic", model="tiny-llama", limit=2, strategy=name, params=params, seed=0,
                            max_new_tokens=6)
        summary = run_eval(config, tmp_path / name, model=model, tokenizer=tokenizer, progress=False)
        assert summary["verifier"] == "oracle"
        records = [json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
        assert len(records) == 2 and all(len(r["trials"]) == 1 for r in records)


@pytest.mark.parametrize("bad, needle", [({"lr": float("nan")}, "lr"), ({"lr": float("inf")}, "lr"),
                                         ({"alpha": 0}, "alpha"), ({"rank": 2.5}, "rank"), ({"lr": "1e-5"}, "lr")])
def test_fttt_settings_are_finite_and_positive(bad, needle):
    from guidedecode.errors import StrategyError

    with pytest.raises(StrategyError, match=needle):
        FTTT(2, **bad)
