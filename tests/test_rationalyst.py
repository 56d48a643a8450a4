"""RATIONALYST step search on tiny real models: choices against brute-force rescoring, call counts,
stopping, prompt placement, trace accounting and errors."""

import copy
import math

import pytest
import torch
from transformers import LogitsProcessor

from guidedecode.backends.hf import HFBackend
from guidedecode.errors import StrategyError
from guidedecode.strategies.rationalyst import (SCORER_SYSTEM_PROMPT, RationaleStepSearch, contains_answer_marker,
                                                last_user_message)
from guidedecode.testing import tiny_model

PROMPTS = ["Question: what is 2+3?\nAnswer:", "Q: name a colour"]
BOUNDARY = ["e"]  # a stop string the random tiny model reaches within a few tokens


class RecordingBackend(HFBackend):
    """A real HFBackend that records every primitive call (prompts and outputs)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"greedy": [], "sample": [], "score": [], "score_many": []}

    def greedy(self, prompts, **kwargs):
        out = super().greedy(prompts, **kwargs)
        self.calls["greedy"].append((list(prompts), out))
        return out

    def sample(self, prompts, n=1, **kwargs):
        out = super().sample(prompts, n, **kwargs)
        self.calls["sample"].append((list(prompts), out))
        return out

    def score(self, prefix, continuations):
        out = super().score(prefix, continuations)
        self.calls["score"].append((prefix, list(continuations)))
        return out

    def score_many(self, requests):
        # one entry per (prefix, continuations) request, as if score() had been called for each
        out = super().score_many(requests)
        self.calls["score_many"].append(len(requests))
        self.calls["score"].extend((prefix, list(continuations)) for prefix, continuations in requests)
        return out


class BoostToken(LogitsProcessor):
    """Adds ``bias`` to one token's logit (``bias=inf`` forces it): makes a random model end its turns."""

    def __init__(self, token_id, bias):
        self.token_id, self.bias = token_id, bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        if math.isinf(self.bias):
            scores[:] = float("-inf")
            scores[:, self.token_id] = 0.0
        else:
            scores[:, self.token_id] += self.bias
        return scores


@pytest.fixture(scope="module")
def parts(tiny_llama_with_tokenizer):
    return tiny_llama_with_tokenizer


def recording(parts, **kwargs):
    model, tokenizer = parts
    return RecordingBackend(model, tokenizer, batch_size=8, **kwargs)


def brute_logprobs(model, tokenizer, context, continuation):
    """log p(c_i | context, c_<i) by one plain forward over context+continuation tokenised together;
    the continuation's tokens are those ending after the context's last character."""
    encoding = tokenizer(context + continuation, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    first = next(i for i, (_, end) in enumerate(encoding["offset_mapping"]) if end > len(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [float(logp[t - 1, ids[t]]) for t in range(first, len(ids))]


def reference_context(tokenizer, user):
    """The reference's scoring context (get_post_prob): [system: S_r, user: traj <BOT>r<EOT>], then the
    candidate as the assistant turn."""
    return tokenizer.apply_chat_template([{"role": "system", "content": SCORER_SYSTEM_PROMPT},
                                          {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("context", ["reference", "inline"])
@pytest.mark.parametrize("score_fn,gamma", [("mean", 0.9), ("decayed", 0.8), ("pmi", 0.9)])
def test_choice_is_the_argmax_of_brute_force_scores(parts, score_fn, gamma, context):
    model, tokenizer = parts
    backend = recording(parts)
    strategy = RationaleStepSearch(3, score_fn=score_fn, gamma=gamma, step_boundary=BOUNDARY, max_steps=2,
                                   max_step_tokens=16, max_rationale_tokens=5, seed=4, is_final=lambda s: False,
                                   scoring_context=context)
    results = strategy.run(backend, PROMPTS)
    checked = 0
    for prompt, result in zip(PROMPTS, results):
        assert len(result.trace) == 2
        prefix, trajectory = prompt, prompt  # a plain-text prompt starts the trajectory as written
        for entry in result.trace:
            block = "<BOT>" + entry["rationale"] + "<EOT>"
            if context == "inline":  # the rationale after the policy's context, the candidate continuing it
                with_context, without_context = prefix + block, prefix
                scored = list(entry["candidates"])
            else:  # each candidate its own assistant turn, without its boundary and surrounding whitespace
                with_context = reference_context(tokenizer, trajectory + " " + block)
                without_context = reference_context(tokenizer, trajectory)
                scored = [(t[:-1] if t.endswith("e") else t).strip() or t for t in entry["candidates"]]
            usable = [i for i, t in enumerate(entry["candidates"]) if t]
            finished = [i for i in usable if entry["finish_reasons"][i] != "length"]
            assert entry["eligible"] == (finished or usable) and entry["truncated"] == (not finished and bool(usable))
            expected = []
            for i, text in enumerate(scored):
                if i not in entry["eligible"]:
                    expected.append(float("-inf"))
                    continue
                with_r = brute_logprobs(model, tokenizer, with_context, text)
                if score_fn == "decayed":
                    value = sum(gamma**j * lp for j, lp in enumerate(with_r)) / len(with_r)
                else:
                    value = sum(with_r) / len(with_r)
                if score_fn == "pmi":
                    without = brute_logprobs(model, tokenizer, without_context, text)
                    value -= sum(without) / len(without)
                assert entry["token_logprobs"]["with"][i] == pytest.approx(with_r, abs=1e-4)
                expected.append(value)
                checked += 1
            assert entry["scores"] == pytest.approx(expected, abs=1e-4)
            best = max(range(3), key=lambda i: (expected[i], -i))
            assert entry["chosen"] == best
            prefix += entry["candidates"][entry["chosen"]]
            trajectory += " " + entry["candidates"][entry["chosen"]].strip()
        assert result.text == prefix[len(prompt):]
    assert checked >= 8
    # one score call per live problem and step, two for pmi (with and without the rationale)
    assert len(backend.calls["score"]) == 4 * (2 if score_fn == "pmi" else 1)


def test_random_mode_never_calls_the_rationale_model_or_scorer_and_is_seeded(parts):
    policy = recording(parts)
    rationale, scorer = recording(parts), recording(parts)

    def run(seed):
        strategy = RationaleStepSearch(3, mode="random", rationale_backend=rationale, scorer_backend=scorer,
                                       step_boundary=BOUNDARY, max_steps=2, max_step_tokens=16, seed=seed,
                                       is_final=lambda s: False)
        return strategy.run(policy, PROMPTS)

    first, again, other = run(5), run(5), run(6)
    assert rationale.calls == {"greedy": [], "sample": [], "score": [], "score_many": []}
    assert scorer.calls == {"greedy": [], "sample": [], "score": [], "score_many": []}
    assert policy.calls["greedy"] == [] and policy.calls["score"] == []
    assert len(policy.calls["sample"]) == 12  # one seeded sampling call per problem and step, three runs
    assert [r.text for r in first] == [r.text for r in again]
    assert [r.text for r in first] != [r.text for r in other]
    for result in first:
        for entry in result.trace:
            assert entry["rationale"] is None and entry["scores"] is None
            assert entry["calls"] == {"rationale": 0, "sample": 1, "score": 0}


def test_k_one_reduces_to_plain_step_by_step_sampling(parts):
    options = dict(step_boundary=BOUNDARY, max_steps=2, max_step_tokens=16, max_rationale_tokens=3, seed=11,
                   is_final=lambda s: False)
    guided = RationaleStepSearch(1, **options).run(recording(parts), PROMPTS)
    plain = RationaleStepSearch(1, mode="random", **options).run(recording(parts), PROMPTS)
    assert [r.completion.token_ids for r in guided] == [r.completion.token_ids for r in plain]
    assert all(e["chosen"] == 0 and e["rationale"] is not None for r in guided for e in r.trace)


def test_stops_on_the_step_that_contains_the_answer(parts):
    rationale = recording(parts)
    policy = recording(parts)
    detector = lambda text: "o" in text  # noqa: E731  -- fires on the first chosen step with an "o"
    strategy = RationaleStepSearch(3, rationale_backend=rationale, step_boundary=BOUNDARY, max_steps=8,
                                   max_step_tokens=16, max_rationale_tokens=4, seed=0, is_final=detector)
    results = strategy.run(policy, PROMPTS)
    lengths = [len(r.trace) for r in results]
    assert max(lengths) >= 2 and lengths[0] != lengths[1]  # a later stop and staggered stops are exercised
    for result in results:
        chosen = [e["candidates"][e["chosen"]] for e in result.trace]
        assert [detector(s) for s in chosen] == [False] * (len(chosen) - 1) + [True]
        assert result.completion.finish_reason == "stop" and result.trace[-1]["finish"] == "answer"
    # no call after a problem's answer step: each phase's call holds exactly the problems still running
    live_per_step = [sum(n > t for n in lengths) for t in range(max(lengths))]
    assert [len(prompts) for prompts, _ in rationale.calls["greedy"]] == live_per_step
    assert [len(prompts) for prompts, _ in policy.calls["sample"]] == [1] * sum(lengths)  # seeded per problem
    assert len(policy.calls["score"]) == sum(lengths)
    assert policy.calls["score_many"] == live_per_step  # scoring is batched across the live problems too


def test_default_answer_detector():
    assert contains_answer_marker("so the total is \\boxed{12}.")
    assert contains_answer_marker("The answer is 7")
    assert contains_answer_marker("Thus the correct answer is (B).")
    assert not contains_answer_marker("We need the answer")
    assert not contains_answer_marker("\\boxed{}")
    assert not contains_answer_marker("The answer is")


@pytest.mark.parametrize("mode", ["explicit", "implicit"])
def test_explicit_mode_puts_the_rationale_in_the_policy_prompt(parts, mode):
    policy = recording(parts)
    strategy = RationaleStepSearch(2, mode=mode, step_boundary=BOUNDARY, max_steps=2, max_step_tokens=16,
                                   max_rationale_tokens=5, seed=3, is_final=lambda s: False, scoring_context="inline")
    (result,) = strategy.run(policy, [PROMPTS[0]])
    prefix = PROMPTS[0]
    for entry, (prompts, _) in zip(result.trace, policy.calls["sample"]):
        block = "<BOT>" + entry["rationale"] + "<EOT>"
        assert prompts == [prefix + block if mode == "explicit" else prefix]
        prefix += entry["candidates"][entry["chosen"]]
    # the scorer context holds the rationale in both modes: one score call per step, after the rationale block
    for entry, (context, _) in zip(result.trace, policy.calls["score"]):
        assert context.endswith("<BOT>" + entry["rationale"] + "<EOT>")


def test_trace_and_cost_accounting(parts):
    policy = recording(parts)
    strategy = RationaleStepSearch(3, step_boundary=BOUNDARY, max_steps=3, max_step_tokens=16,
                                   max_rationale_tokens=6, seed=2, is_final=lambda s: False)
    (result,) = strategy.run(policy, [PROMPTS[1]])
    assert len(result.trace) == 3 and result.completion.finish_reason == "length"
    assert result.trace[-1]["finish"] == "max_steps"
    assert result.attempts == 1  # one complete answer (the attempt of every strategy); 9 candidate steps below
    assert sum(len(e["candidates"]) for e in result.trace) == 9
    rationale_tokens = [out[0].num_tokens for _, out in policy.calls["greedy"]]
    sampled_tokens = [sum(c.num_tokens for c in out[0]) for _, out in policy.calls["sample"]]
    assert result.generated_tokens == sum(rationale_tokens) + sum(sampled_tokens)
    chosen_ids = []
    for entry, (_, out), (_, rationale_out) in zip(result.trace, policy.calls["sample"], policy.calls["greedy"]):
        assert set(entry) >= {"rationale", "candidates", "scores", "chosen", "token_logprobs", "calls"}
        assert entry["candidates"] == [c.text for c in out[0]]
        assert entry["rationale"] == rationale_out[0].text.replace("<EOT>", "").replace("<BOT>", "").strip()
        assert entry["rationale_tokens"] == rationale_out[0].num_tokens
        assert entry["calls"] == {"rationale": 1, "sample": 1, "score": 1}
        chosen_ids += out[0][entry["chosen"]].token_ids
    assert result.completion.token_ids == chosen_ids
    assert [c.text for c in result.candidates] == result.trace[-1]["candidates"]
    assert result.scores == result.trace[-1]["scores"]


def test_chat_turn_steps_follow_the_chat_template(parts):
    model, tokenizer = parts
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = recording(parts, logits_processor=[BoostToken(end_of_turn, 6.0)])
    rationale = RecordingBackend(model, tokenizer, batch_size=8)  # no end-of-turn boost for the rationale model
    messages = [{"role": "user", "content": "What is 2+3?"}]
    strategy = RationaleStepSearch(3, rationale_backend=rationale, step_boundary="chat", max_steps=3,
                                   max_step_tokens=32, max_rationale_tokens=4, seed=1, is_final=lambda s: False)
    (result,) = strategy.run(policy, [messages])
    chosen = [e["candidates"][e["chosen"]] for e in result.trace]
    assert len(chosen) == 3 and all(f in ("eos", "length") for e in result.trace for f in e["finish_reasons"])
    for t, (prompts, _) in enumerate(policy.calls["sample"]):
        turns = messages + [{"role": "assistant", "content": s} for s in chosen[:t]]
        assert prompts == [tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)]
    assert result.text == "<|im_end|>\n<|im_start|>assistant\n".join(chosen)
    # the rationale model saw [user: "Question: q\nAnswer:" + " " + each step so far] in its own chat template
    for t, (prompts, _) in enumerate(rationale.calls["greedy"]):
        preceding = "Question: What is 2+3?\nAnswer:" + "".join(" " + s.strip() for s in chosen[:t])
        assert prompts == [tokenizer.apply_chat_template([{"role": "user", "content": preceding}], tokenize=False,
                                                         add_generation_prompt=True)]


def test_custom_generate_wraps_only_the_policy(parts):
    model, tokenizer = parts
    other = tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    rationale = RecordingBackend(other, tokenizer, batch_size=8)
    options = dict(rationale_backend=rationale, step_boundary=BOUNDARY, max_steps=2, max_step_tokens=12,
                   max_rationale_tokens=4, seed=7, is_final=lambda s: False, max_new_tokens=40)
    strategy = RationaleStepSearch(2, **options)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out = model.generate(**inputs, custom_generate=strategy, strategy_tokenizer=tokenizer, max_new_tokens=40)
    assert len(rationale.calls["greedy"]) == 2  # the rationale model given to the constructor did the rationales
    reference = RationaleStepSearch(2, **options).run(HFBackend(model, tokenizer, batch_size=8), PROMPTS)
    width = inputs["input_ids"].shape[1]
    for row, got, expected in zip(out, strategy.last_results, reference):
        assert got.completion.token_ids == expected.completion.token_ids
        flat = [s for e in got.trace for s in e["scores"]]
        assert flat == pytest.approx([s for e in expected.trace for s in e["scores"]], abs=1e-5)
        assert row[width: width + len(expected.completion.token_ids)].tolist() == expected.completion.token_ids


def test_bad_parameters_are_named():
    for k in (0, True, 2.0, "3"):
        with pytest.raises(StrategyError, match="k >= 1"):
            RationaleStepSearch(k)
    with pytest.raises(StrategyError, match="max_steps must be an integer"):
        RationaleStepSearch(max_steps=True)
    with pytest.raises(StrategyError, match="unknown scoring_context 'chat'"):
        RationaleStepSearch(scoring_context="chat")
    with pytest.raises(StrategyError, match="unknown mode 'greedy'"):
        RationaleStepSearch(mode="greedy")
    with pytest.raises(StrategyError, match="unknown score function 'max'"):
        RationaleStepSearch(score_fn="max")
    for gamma in (0.0, -0.5, 1.5):
        with pytest.raises(StrategyError, match="gamma must be in"):
            RationaleStepSearch(score_fn="decayed", gamma=gamma)
    RationaleStepSearch(score_fn="decayed", gamma=1.0)
    with pytest.raises(StrategyError, match="step_boundary"):
        RationaleStepSearch(step_boundary="")
    with pytest.raises(StrategyError, match="rationale_template"):
        RationaleStepSearch(rationale_template="<BOT><EOT>")
    with pytest.raises(StrategyError, match="max_step_tokens"):
        RationaleStepSearch(max_step_tokens=0)


def test_steps_cut_at_max_step_tokens_are_kept_and_marked(parts):
    """No candidate reaches a boundary: the search keeps a truncated step (as the reference does), records
    it, and goes on, instead of aborting the whole run."""
    model, tokenizer = parts
    strategy = RationaleStepSearch(3, step_boundary=["\u2603\u2603\u2603"], max_step_tokens=3, max_steps=2,
                                   max_rationale_tokens=2, seed=0, is_final=lambda s: False)
    results = strategy.run(recording(parts), PROMPTS)
    for result in results:
        assert len(result.trace) == 2 and result.attempts == 1
        for entry in result.trace:
            assert entry["finish_reasons"] == ["length"] * 3 and entry["truncated"] is True
            assert entry["chosen"] in entry["eligible"] and entry["scores"][entry["chosen"]] > float("-inf")
        assert result.text == "".join(e["candidates"][e["chosen"]] for e in result.trace)


def test_a_policy_that_produces_nothing_ends_that_problem_only(parts):
    model, tokenizer = parts
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    policy = recording(parts, logits_processor=[BoostToken(end_of_turn, math.inf)])
    strategy = RationaleStepSearch(2, step_boundary="chat", max_rationale_tokens=2, seed=0)
    (result,) = strategy.run(policy, [[{"role": "user", "content": "hi"}]])
    (entry,) = result.trace
    assert entry["finish"] == "no_step" and entry["chosen"] is None and entry["eligible"] == []
    assert result.text == "" and result.completion.finish_reason == "length"

    class DropsCandidates(HFBackend):
        def sample(self, prompts, n=1, **kwargs):
            return [[] for _ in super().sample(prompts, n, **kwargs)]

    with pytest.raises(StrategyError, match="empty candidate list"):
        RationaleStepSearch(2, step_boundary=BOUNDARY, max_step_tokens=4, max_rationale_tokens=2).run(
            DropsCandidates(model, tokenizer), [PROMPTS[0]])


def test_chat_boundary_needs_a_chat_template(parts):
    model, tokenizer = parts
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(StrategyError, match="chat template"):
        RationaleStepSearch(2, step_boundary="chat").run(HFBackend(model, plain), [PROMPTS[0]])


def test_sampling_is_seeded_per_problem_and_step_not_per_batch(parts):
    """A problem's candidates depend on (seed, problem, step) only: alone or in a batch, first or second."""
    options = dict(mode="random", step_boundary=BOUNDARY, max_steps=2, max_step_tokens=12, seed=9,
                   is_final=lambda s: False)
    together = RationaleStepSearch(3, **options).run(recording(parts), PROMPTS)
    alone = RationaleStepSearch(3, **options).run(recording(parts), [PROMPTS[1]])
    swapped = RationaleStepSearch(3, **options).run(recording(parts), PROMPTS[::-1])
    assert [e["candidates"] for e in alone[0].trace] == [e["candidates"] for e in together[1].trace]
    assert [e["candidates"] for e in swapped[0].trace] == [e["candidates"] for e in together[1].trace]
    assert alone[0].text == together[1].text == swapped[0].text
    twice = RationaleStepSearch(3, **options).run(recording(parts), [PROMPTS[0], PROMPTS[0]])
    assert twice[0].trace[0]["candidates"] != twice[1].trace[0]["candidates"]  # a repeat is a new draw


def test_a_rendered_chat_prompt_is_not_wrapped_again(parts):
    """Token ids of a chat-rendered prompt (the custom_generate path): the question is read back from the
    template, so the rationale model and the scorer see it once, never a chat inside a chat."""
    model, tokenizer = parts
    messages = [{"role": "user", "content": "What is 2+3?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert last_user_message(tokenizer, rendered) == "What is 2+3?"
    assert last_user_message(tokenizer, "Question: what is 2+3?\nAnswer:") is None
    options = dict(step_boundary=BOUNDARY, max_steps=1, max_step_tokens=12, max_rationale_tokens=3, seed=2,
                   is_final=lambda s: False)
    by_text, by_messages = recording(parts), recording(parts)
    (from_text,) = RationaleStepSearch(2, **options).run(by_text, [rendered])
    (from_messages,) = RationaleStepSearch(2, **options).run(by_messages, [messages])
    assert by_text.calls["greedy"][0][0] == by_messages.calls["greedy"][0][0]
    (rationale_prompt,) = by_text.calls["greedy"][0][0]
    assert rationale_prompt.count("<|im_start|>user") == 1 and "Question: What is 2+3?\nAnswer:" in rationale_prompt
    assert [c for c, _ in by_text.calls["score"]] == [c for c, _ in by_messages.calls["score"]]
    assert from_text.text == from_messages.text


def test_reference_context_needs_a_scorer_chat_template(parts):
    model, tokenizer = parts
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(StrategyError, match="scoring_context='inline'"):
        RationaleStepSearch(2, step_boundary=BOUNDARY).run(HFBackend(model, plain), [PROMPTS[0]])
    RationaleStepSearch(2, step_boundary=BOUNDARY, max_steps=1, max_step_tokens=4, max_rationale_tokens=2,
                        scoring_context="inline").run(HFBackend(model, plain), [PROMPTS[0]])


def test_reference_context_scores_a_step_as_turn_content():
    """The boundary and surrounding whitespace are not part of an assistant turn's content; a step of only
    whitespace (a blank line) stays scorable and choosable as sampled."""
    from guidedecode.backends.base import Completion

    search = RationaleStepSearch(2, step_boundary="\n")
    step = lambda text: Completion(text=text, token_ids=[1], finish_reason="stop")  # noqa: E731
    assert search._scored_text(step(" x = 1 + 2.\n")) == "x = 1 + 2."
    assert search._scored_text(step("\n")) == "\n"
    assert search._eligible([step("\n"), step("\n")]) == ([0, 1], False)
    assert RationaleStepSearch(2, step_boundary="\n", scoring_context="inline")._scored_text(step(" a\n")) == " a\n"
