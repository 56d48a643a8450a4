"""Test-time-scaling baselines and their one attempt-budget accounting, on a tiny real Llama.

Every expected value is recomputed here independently: trial indices and histograms by counting,
beam-search selections by re-scoring the recorded expansions with a plain forward + log_softmax,
chat prompts by rendering the expected message lists with the tokenizer's own template.
"""

import copy
import random

import pytest
import torch

from guidedecode.backends import HFBackend
from guidedecode.backends.base import Completion
from guidedecode.errors import GuidedecodeError, StrategyError
from guidedecode.metrics import final_answer_accuracy, solved_at_k, solved_at_ks, trial_histogram, trial_index
from guidedecode.strategies.beam_search import BeamSearch, TokenBeamSearch
from guidedecode.strategies.best_of_n import BestOfN
from guidedecode.strategies.budget import AttemptLog
from guidedecode.strategies.revision import TRY_AGAIN, Revision
from guidedecode.strategies.rationalyst import RationaleStepSearch
from guidedecode.strategies.self_consistency import SelfConsistency
from guidedecode.strategies.self_refine import CRITIQUE, SelfRefine


class RecordingBackend(HFBackend):
    """The real HFBackend, recording what each call was asked and what it returned."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def sample(self, prompts, n=1, **options):
        out = super().sample(prompts, n, **options)
        self.calls.append(("sample", [p if isinstance(p, str) else list(p) for p in prompts], out))
        return out

    def greedy(self, prompts, **options):
        out = super().greedy(prompts, **options)
        self.calls.append(("greedy", list(prompts), out))
        return out


@pytest.fixture
def backend(tiny_llama_with_tokenizer):
    model, tokenizer = tiny_llama_with_tokenizer
    return RecordingBackend(model, tokenizer, batch_size=8)


def render(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def mean_logprob(model, prompt_ids, continuation_ids):
    """Independent reference: full forward, log_softmax over the vocabulary, gather, mean."""
    ids = prompt_ids + continuation_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return float(torch.stack([logp[t - 1, ids[t]] for t in range(len(prompt_ids), len(ids))]).mean())


def done(text):
    return Completion(text=text, token_ids=list(range(len(text))), finish_reason="eos")


# ------------------------------------------------------------------ metrics


def test_solved_at_k_and_histogram_match_counting():
    rng = random.Random(7)
    budget = 7
    trials = [rng.choice([None] + list(range(1, budget + 1))) for _ in range(23)]
    histogram = trial_histogram(trials, budget)
    for j in range(1, budget + 1):
        assert histogram["solved"][j - 1] == sum(1 for t in trials if t == j)
    assert histogram["unsolved"] == trials.count(None) and histogram["problems"] == 23
    for k in range(1, budget + 3):
        brute = sum(1 for t in trials if t is not None and t <= k) / len(trials)
        assert solved_at_k(trials, k) == pytest.approx(brute)
    table = solved_at_ks(trials, budget)
    assert list(table) == ["solved@1", "solved@2", "solved@4", "solved@7"]
    assert table["solved@4"] == pytest.approx(solved_at_k(trials, 4))


def test_trial_index_reads_attempt_records_and_rejects_bad_input():
    log = AttemptLog(5, check=lambda text, gold: text == gold, gold="c")
    for text in ["a", "b", "c"]:
        log.add(done(text))
    assert log.done and log.solved_at == 3
    result = log.result(log.attempts[-1], generated_tokens=0)
    assert trial_index(result) == 3 and result.attempts == 3
    assert [r["verdict"] for r in result.trace] == [False, False, True]
    assert solved_at_k([result, None, 1], 2) == pytest.approx(1 / 3)
    with pytest.raises(StrategyError, match="over the budget"):
        log.add(done("d"))
    for bad in (0, -1, True):
        with pytest.raises(GuidedecodeError, match="trial index"):
            trial_index(bad)
    for bad_k in (0, 1.5, True):
        with pytest.raises(GuidedecodeError, match="k >= 1"):
            solved_at_k([1], bad_k)
    with pytest.raises(GuidedecodeError, match="empty"):
        solved_at_k([], 1)
    with pytest.raises(GuidedecodeError, match="beyond the budget"):
        trial_histogram([3], 2)
    with pytest.raises(StrategyError, match="budget >= 1"):
        AttemptLog(0)


def test_final_answer_accuracy_judges_only_the_final_text():
    texts = ["x=1", "x=2", "x=3"]
    assert final_answer_accuracy(texts, ["x=1", "x=1", "x=3"], lambda t, g: t == g) == pytest.approx(2 / 3)
    with pytest.raises(GuidedecodeError, match="golds"):
        final_answer_accuracy(texts, ["x"], lambda t, g: True)


# ------------------------------------------------------------------ best-of-N and self-consistency


def test_best_of_n_oracle_stop_equals_one_minus_product_of_failures(backend):
    prompts = ["Say something:", "Another thing:", "Third:"]
    n = 4
    samples = backend.sample(prompts, n, max_new_tokens=3, temperature=1.0, seed=11)
    targets = [samples[0][3].text, "no sample says this", samples[2][1].text]
    check = lambda text, gold: text == gold  # noqa: E731  accepts exactly one answer
    strategy = BestOfN(n, check=check, temperature=1.0, seed=11, max_new_tokens=3)
    results = strategy.run(backend, prompts, golds=targets)
    for result, row, gold in zip(results, samples, targets):
        correct = [c.text == gold for c in row]
        expected = next((i + 1 for i, ok in enumerate(correct) if ok), None)
        assert trial_index(result) == expected
        assert result.attempts == (expected or n)
        assert result.generated_tokens == sum(c.num_tokens for c in row)
        if expected:
            assert result.completion.text == gold
    assert results[2].completion.text == samples[2][1].text
    # solved@N over problems = mean over problems of 1 - prod_i (1 - correct_i)
    brute = sum(1 - int(all(c.text != g for c in row)) for row, g in zip(samples, targets)) / len(prompts)
    assert solved_at_k(results, n) == pytest.approx(brute)
    with pytest.raises(StrategyError, match="no gold answers"):
        strategy.run(backend, prompts)


class FixedScorer:
    """Known scores, one per candidate, in order."""

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, backend, prompt, completions, gold):
        return list(self.scores)


def test_best_of_n_weighted_vote_sums_scores_per_answer_class():
    """"7" scores highest alone (0.9) but the "5" class sums to 0.3 + 0.35 + 0.3 = 0.95; "1/2" and
    "0.5" are one math-verify class; samples without an answer do not vote."""
    texts = ["The answer is 7", "The answer is 5", "so \\boxed{5}", "The answer is 5", "no idea"]
    scores = [0.9, 0.3, 0.35, 0.3, 0.99]
    candidates = [done(t) for t in texts]
    argmax = BestOfN(5, scorer=FixedScorer(scores)).select(None, "q", candidates)
    assert argmax.completion.text == "no idea"
    voted = BestOfN(5, scorer=FixedScorer(scores), selection="weighted_vote").select(None, "q", candidates)
    assert voted.completion.text == "so \\boxed{5}"  # the top member of the winning class
    head = voted.trace[0]
    assert head["chosen"] == 2 and sorted(map(sorted, head["classes"])) == [[0], [1, 2, 3]]
    assert sorted(head["class_scores"]) == pytest.approx([0.9, 0.95])

    halves = [done("The answer is 1/2"), done("The answer is 3"), done("The answer is 0.5")]
    picked = BestOfN(3, scorer=FixedScorer([0.5, 0.9, 0.45]), selection="weighted_vote").select(None, "q", halves)
    assert picked.completion.text == "The answer is 1/2"  # 0.5 + 0.45 beats 0.9
    exact = BestOfN(3, scorer=FixedScorer([0.5, 0.9, 0.45]), selection="weighted_vote", equivalence="exact")
    assert exact.select(None, "q", halves).completion.text == "The answer is 3"

    nothing = [done("hmm"), done("well")]
    fallback = BestOfN(2, scorer=FixedScorer([0.1, 0.2]), selection="weighted_vote").select(None, "q", nothing)
    assert fallback.completion.text == "well"  # nobody voted: the argmax
    with pytest.raises(StrategyError, match="must be >= 0"):
        BestOfN(2, scorer=FixedScorer([-1.0, 0.2]), selection="weighted_vote").select(None, "q", nothing)
    with pytest.raises(StrategyError, match="unknown selection 'vote'"):
        BestOfN(2, selection="vote")
    with pytest.raises(StrategyError, match="returned 1 scores for 2 candidates"):
        BestOfN(2, scorer=FixedScorer([0.3])).select(None, "q", nothing)


@pytest.mark.parametrize("head, loss", [("v", "bce"), ("q", "bce"), ("v", "mle")])
def test_value_model_scorer_is_p_correct_of_the_whole_sequence(backend, head, loss):
    """Reference: the value logits of prompt + completion computed alone, cache-free (``brute_value``),
    turned into P(correct) by hand (sigmoid, or the expected atom for the distributional head)."""
    from guidedecode.strategies.scorers import ValueModelScorer
    from guidedecode.testing import brute_value, tiny_model
    from guidedecode.value_model import ValueModel

    tokenizer = backend.tokenizer
    vm = ValueModel.from_backbone(tiny_model("qwen2", seed=5, vocab_size=len(tokenizer)), head=head, loss=loss,
                                  num_atoms=5 if loss == "mle" else None, init="normal", tokenizer=tokenizer)
    prompt = "What is 2 + 3?"
    candidates = [Completion(text="", token_ids=ids, finish_reason="eos")
                  for ids in ([11, 12, 13], [400], [7, 8, 9, 10, 11, 12, 13])]  # uneven: left padding inside a batch
    scores = ValueModelScorer(vm, batch_size=2)(backend, prompt, candidates, None)
    prompt_ids = backend.encode(prompt)
    with torch.no_grad():
        for score, c in zip(scores, candidates):
            logits = brute_value(vm, prompt_ids + c.token_ids[:-1], [c.token_ids[-1]])[0]
            if loss == "mle":
                expected = float((torch.softmax(logits, -1) * torch.linspace(0, 1, 5)).sum())
            else:
                expected = float(torch.sigmoid(logits[0]))
            assert score == pytest.approx(expected, abs=1e-5)

    from guidedecode.models import load_tokenizer
    other = copy.deepcopy(load_tokenizer())
    other.add_tokens(["<extra-token>"])  # a tokenizer that maps more ids than the value model knows
    mismatched = copy.copy(backend)
    mismatched.tokenizer = other
    with pytest.raises(Exception, match="vocabulary has|tokenizer mismatch"):
        ValueModelScorer(vm)(mismatched, prompt, candidates, None)


def test_self_consistency_judges_only_the_voted_answer():
    """Votes with known counts: "4" x3 (first at index 1), "5" x2, one None."""
    texts = ["5", "4", None, "4", "5", "4"]
    candidates = [Completion(text=t or "", token_ids=[1, 2], finish_reason="eos") for t in texts]
    extract = lambda text: text or None  # noqa: E731
    strategy = SelfConsistency(6, extract=extract, equivalence="exact", check=lambda t, g: t == g)
    voted_right = strategy.select(candidates, gold="4")
    assert voted_right.completion.text == "4" and trial_index(voted_right) == 2  # first occurrence of "4"
    assert voted_right.attempts == 6 and voted_right.scores == [2.0, 3.0, 0.0, 3.0, 2.0, 3.0]
    voted_wrong = strategy.select(candidates, gold="5")  # "5" was sampled, but only the vote is judged
    assert trial_index(voted_wrong) is None
    assert [r["verdict"] for r in voted_wrong.trace[1:]] == [None, False, None, None, None, None]
    # math-verify classes: {"1/2", "0.5", "\\frac{1}{2}"} (3 votes, first at index 2) beats {"3"} (2 votes)
    mixed = [Completion(text=t, token_ids=[1], finish_reason="eos") for t in ["3", "3", "1/2", "0.5", "\\frac{1}{2}"]]
    math_vote = SelfConsistency(5, extract=extract, check=lambda t, g: t == g).select(mixed, gold="1/2")
    assert trial_index(math_vote) == 3 and math_vote.text == "1/2"
    exact_vote = strategy.select(mixed, gold="1/2")  # exact strings: "3" wins, so "1/2" is never judged
    assert exact_vote.text == "3" and trial_index(exact_vote) is None
    nothing = strategy.select([Completion("", [], "eos")] * 3, gold="4")
    assert trial_index(nothing) is None and nothing.attempts == 3
    with pytest.raises(StrategyError, match="empty candidate list"):
        strategy.select([], gold="4")
    with pytest.raises(StrategyError, match="empty candidate list"):
        BestOfN(2).select(None, "prompt", [], None)


# ------------------------------------------------------------------ revision


def test_revision_prompts_hold_the_full_history_and_the_oracle_stops_at_the_accepted_answer(backend):
    tokenizer = backend.tokenizer
    question = "What is 2 + 2?"
    k = 4
    free = Revision(k, max_new_tokens=4).run(backend, [question])[0]
    texts = [c.text for c in free.candidates]
    assert free.attempts == k and trial_index(free) is None and free.text == texts[-1]
    # the prompt of attempt j holds exactly the j-1 earlier attempts and j-1 feedback turns
    history = [{"role": "user", "content": question}]
    for j, (kind, prompts, _) in enumerate(backend.calls, start=1):
        assert kind == "greedy" and prompts == [render(tokenizer, history)]
        assert prompts[0].count(TRY_AGAIN) == j - 1
        history += [{"role": "assistant", "content": texts[j - 1]}, {"role": "user", "content": TRY_AGAIN}]
    # greedy is deterministic: a second run repeats every attempt
    assert [c.text for c in Revision(k, max_new_tokens=4).run(backend, [question])[0].candidates] == texts

    target = 3 if texts[2] not in texts[:2] else texts.index(texts[2]) + 1
    backend.calls.clear()
    solved = Revision(k, check=lambda text, gold: text == gold, max_new_tokens=4).run(
        backend, [question, [{"role": "user", "content": question}]], golds=[texts[2], "never said"])
    assert trial_index(solved[0]) == target and solved[0].attempts == target
    assert solved[0].text == texts[2]
    assert [r["verdict"] for r in solved[0].trace] == [False] * (target - 1) + [True]
    assert solved[1].attempts == k and trial_index(solved[1]) is None
    # the solved problem leaves the batch: later calls generate for the other one only
    assert [len(prompts) for _, prompts, _ in backend.calls] == [2] * target + [1] * (k - target)


def test_chat_strategies_reject_prompts_without_chat_turns(tiny_llama_with_tokenizer, backend):
    model, tokenizer = tiny_llama_with_tokenizer
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    for strategy in (Revision(2), SelfRefine(2)):
        with pytest.raises(StrategyError, match="no chat template"):
            strategy.run(HFBackend(model, plain), ["What is 2 + 2?"])
        with pytest.raises(StrategyError, match="token ids"):
            strategy.run(backend, [[5, 6, 7]])
        with pytest.raises(StrategyError, match="already rendered"):
            strategy.run(backend, [backend.chat_prompt("What is 2 + 2?")])
        with pytest.raises(StrategyError, match="end with a user turn"):
            strategy.run(backend, [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]])


# ------------------------------------------------------------------ self-refine


def test_self_refine_sees_only_the_last_attempt_and_does_not_judge_the_initial_answer(backend):
    tokenizer = backend.tokenizer
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    k = 3
    free = SelfRefine(k, temperature=0, max_new_tokens=4).run(backend, [question])[0]
    initial = free.trace[0]
    assert initial["initial"] and "attempt" not in initial
    texts = [initial["text"]] + [c.text for c in free.candidates]
    assert free.attempts == k and len(backend.calls) == k + 1
    assert free.generated_tokens == initial["tokens"] + sum(c.num_tokens for c in free.candidates)
    assert backend.calls[0][1] == [render(tokenizer, question)]
    for t in range(1, k + 1):
        expected = question + [{"role": "assistant", "content": texts[t - 1]}, {"role": "user", "content": CRITIQUE}]
        (prompt,) = backend.calls[t][1]
        assert prompt == render(tokenizer, expected)
        assert prompt.count(CRITIQUE) == 1  # history is not accumulated

    backend.calls.clear()
    check = lambda text, gold: text == gold  # noqa: E731
    # a checker that accepts only the initial answer never fires (unless a round repeats it)
    repeats = [j + 1 for j, text in enumerate(texts[1:]) if text == texts[0]]
    unjudged = SelfRefine(k, check=check, temperature=0, max_new_tokens=4).run(backend, [question], golds=[texts[0]])
    assert trial_index(unjudged[0]) == (repeats[0] if repeats else None)
    target = next(j for j in range(1, k + 1) if texts[j] == texts[2])
    stopped = SelfRefine(k, check=check, temperature=0, max_new_tokens=4).run(backend, [question], golds=[texts[2]])
    assert trial_index(stopped[0]) == target and stopped[0].attempts == target


def test_self_refine_sampling_is_reproducible_with_a_seed(backend):
    runs = [SelfRefine(2, seed=4, max_new_tokens=3).run(backend, ["Pick a number."])[0] for _ in range(2)]
    assert [c.text for c in runs[0].candidates] == [c.text for c in runs[1].candidates]
    assert runs[0].trace[0]["text"] == runs[1].trace[0]["text"]


# ------------------------------------------------------------------ step-level beam search


def letter_count_scorer(letter):
    """A scorer whose ranking is known: how often ``letter`` occurs in the partial solution."""

    def score(backend, prompt, completions, gold):
        return [float(c.text.count(letter)) for c in completions]

    return score


def test_beam_width_one_follows_the_known_scorer_step_by_step(backend):
    prompt = "Write a story:"
    strategy = BeamSearch(1, 4, scorer=letter_count_scorer("e"), step_stop=".", max_steps=4, max_step_tokens=3,
                          max_new_tokens=40, seed=3)
    (result,) = strategy.run(backend, [prompt])
    prompt_ids = backend.encode(prompt)
    path = []
    for _, prompts, rows in backend.calls:
        assert prompts == [prompt_ids + path]  # the kept beam is what gets expanded
        children = [path + c.token_ids for c in rows[0]]
        counts = [backend.decode(ids).count("e") for ids in children]
        path = children[counts.index(max(counts))]  # argmax, earliest on ties
    assert len(backend.calls) == 4 and result.completion.token_ids == path
    assert result.text == backend.decode(path) and result.attempts == 1


def test_full_width_beam_equals_brute_force_enumeration_of_the_sampled_tree(backend):
    """W >= E^steps keeps every node, so the top beam is the argmax over all enumerated leaves."""
    prompt, E, steps = "Numbers:", 3, 2
    strategy = BeamSearch(E ** steps, E, step_stop="\n", max_steps=steps, max_step_tokens=2, max_new_tokens=20, seed=5)
    (result,) = strategy.run(backend, [prompt])
    prompt_ids = backend.encode(prompt)
    (_, roots, first), (_, inner, second) = backend.calls
    leaves = []
    for node, row in zip(inner, second):
        for c in row:
            leaves.append(node[len(prompt_ids):] + c.token_ids)
    assert {tuple(node[len(prompt_ids):]) for node in inner} == {tuple(c.token_ids) for c in first[0]}
    leaves = [list(leaf) for leaf in dict.fromkeys(tuple(leaf) for leaf in leaves)]  # distinct, first seen first
    scores = [mean_logprob(backend.model, prompt_ids, leaf) for leaf in leaves]
    assert len(result.candidates) == len(leaves)
    best = max(range(len(leaves)), key=lambda i: scores[i])
    assert result.completion.token_ids == leaves[best]
    assert result.scores == pytest.approx(sorted(scores, reverse=True)[: len(result.scores)], abs=1e-4)


def test_narrow_beam_pruning_matches_an_independent_simulation(backend):
    """W = 2, E = 3 with early finishing: re-run the selection rule on the recorded expansions."""
    prompts = ["Alpha beta", "One two three"]
    W, E = 2, 3
    final = lambda text: len(text) % 4 == 0  # noqa: E731  deterministic in the text: some beams finish early
    strategy = BeamSearch(W, E, step_stop=" ", max_steps=2, max_step_tokens=2, max_new_tokens=30,
                          final_answer=final, seed=8)
    results = strategy.run(backend, prompts)
    prompt_ids = [backend.encode(p) for p in prompts]
    active = {p: [[]] for p in range(2)}
    finished = {p: [] for p in range(2)}
    pruned = finished_early = 0
    for _, call_prompts, rows in backend.calls:
        expected_prompts = [prompt_ids[p] + beam for p in range(2) for beam in active[p]]
        assert call_prompts == expected_prompts
        owners = [p for p in range(2) for _ in active[p]]
        children = {p: [] for p in range(2)}
        for p, parent, row in zip(owners, call_prompts, rows):
            for c in row:
                ids = parent[len(prompt_ids[p]):] + c.token_ids
                if ids not in [child for child, _ in children[p]]:
                    children[p].append((ids, c.finish_reason == "eos" or final(backend.decode(ids))))
        for p in range(2):
            scored = [(mean_logprob(backend.model, prompt_ids[p], ids), -i, ids, ended)
                      for i, (ids, ended) in enumerate(children[p])]
            kept = sorted(scored, reverse=True)[: W - len(finished[p])]
            active[p] = [ids for _, _, ids, ended in kept if not ended]
            finished[p] += [(score, ids) for score, _, ids, ended in kept if ended]
            pruned += len(scored) - len(kept)
            finished_early += sum(1 for *_, ended in kept if ended) if active[p] else 0
    assert len(backend.calls) == 2 and pruned > 0 and finished_early > 0  # the setting exercises both rules
    for p, result in enumerate(results):
        ranked = sorted(finished[p] + [(None, ids) for ids in active[p]], key=lambda x: x[0] if x[0] is not None
                        else mean_logprob(backend.model, prompt_ids[p], x[1]), reverse=True)
        assert [c.token_ids for c in result.candidates] == [ids for _, ids in ranked]
        assert 1 <= result.attempts <= W


def test_beam_oracle_stops_at_the_first_correct_ranked_beam(backend):
    strategy = BeamSearch(2, 2, step_stop="\n", max_steps=2, max_step_tokens=2, max_new_tokens=12, seed=2)
    (free,) = strategy.run(backend, ["Go:"])
    assert free.attempts == len(free.candidates) and trial_index(free) is None
    target = free.candidates[1].text
    strategy.check = lambda text, gold: text == gold
    (judged,) = strategy.run(backend, ["Go:"], golds=[target])
    expected = next(i + 1 for i, c in enumerate(free.candidates) if c.text == target)
    assert trial_index(judged) == expected and judged.attempts == expected and judged.text == target


# ------------------------------------------------------------------ token beam search (HF)


def test_token_beam_search_halves_width_on_injected_oom(backend, monkeypatch):
    model = backend.model
    real_generate = model.generate
    widths = []

    def generate_with_small_memory(*args, **kwargs):
        widths.append(kwargs["num_beams"])
        if kwargs["num_beams"] > 2:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate_with_small_memory)
    strategy = TokenBeamSearch(8, max_new_tokens=4)
    (result,) = strategy.run(backend, ["Hello"])
    assert widths == [8, 4, 2] and result.trace[0] == {"width": 8, "effective_width": 2}
    assert result.attempts == 2 and len(result.candidates) == 2
    ids = torch.tensor([backend.encode("Hello")])
    direct = real_generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=2, num_return_sequences=2,
                           do_sample=False, max_new_tokens=4, pad_token_id=backend.pad_token_id,
                           eos_token_id=list(backend.eos_token_ids))
    assert [c.token_ids for c in result.candidates] == [row[ids.shape[1]:].tolist()[: len(c.token_ids)]
                                                        for row, c in zip(direct, result.candidates)]
    target = result.candidates[1].text
    (judged,) = TokenBeamSearch(2, check=lambda t, g: t == g, max_new_tokens=4).run(backend, ["Hello"], golds=[target])
    assert trial_index(judged) == 1 + [c.text for c in result.candidates].index(target)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("make", [
    lambda k: BestOfN(k), lambda k: SelfConsistency(k), lambda k: Revision(k), lambda k: SelfRefine(k),
    lambda k: BeamSearch(k), lambda k: BeamSearch(2, k), lambda k: TokenBeamSearch(k),
    lambda k: RationaleStepSearch(k),
])
@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_budgets_below_one_or_not_integers_are_rejected(make, k):
    with pytest.raises(StrategyError, match=">= 1"):
        make(k)


def test_other_bad_input_names_the_problem(backend):
    with pytest.raises(StrategyError, match="no gold answers"):
        Revision(2, check=lambda t, g: True).run(backend, ["q"])
    with pytest.raises(StrategyError, match="golds for"):
        Revision(2).run(backend, ["q"], golds=["a", "b"])
    with pytest.raises(StrategyError, match="temperature"):
        BeamSearch(2, 2, temperature=0)
    with pytest.raises(StrategyError, match="feedback"):
        Revision(2, feedback="  ")
    with pytest.raises(StrategyError, match="critique"):
        SelfRefine(2, critique="")
    with pytest.raises(StrategyError, match="equivalence"):
        SelfConsistency(2, equivalence="fuzzy")
    with pytest.raises(StrategyError, match="empty question"):
        Revision(2).run(backend, [""])


# ------------------------------------------------------------------ the feedback-loop controller


def test_feedback_loop_oracle_reports_attempts_up_to_the_solving_one(backend):
    from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier

    prompts, n = ["Say something:", "Another thing:"], 4
    samples = backend.sample(prompts, n, max_new_tokens=3, temperature=1.0, seed=11)
    golds = [samples[0][2].text, "no sample says this"]
    loop = FeedbackLoop(backend, Verifier.oracle(lambda text, gold: text == gold), budget=n, strategy="best_of_n",
                        temperature=1.0, seed=11, max_new_tokens=3)
    before = backend.stats.counters()
    solved, unsolved = loop.run(prompts, golds)
    spent = backend.stats.since(before)
    first_hit = next(i for i, c in enumerate(samples[0]) if c.text == golds[0]) + 1
    assert solved["solved_at"] == first_hit and unsolved["solved_at"] is None
    assert [a["text"] for a in solved["attempts"]] == [c.text for c in samples[0][:first_hit]]
    assert [a["verdict"] for a in solved["attempts"]] == [False] * (first_hit - 1) + [True]
    assert [a["text"] for a in unsolved["attempts"]] == [c.text for c in samples[1]]
    assert all(a["verdict"] is False for a in unsolved["attempts"])
    assert solved["text"] == golds[0] and solved["verifier"] == "oracle"
    assert solved["cost"]["generated_tokens"] * 2 == spent["generated_tokens"] > 0


def test_feedback_loop_without_a_verifier_votes_and_judges_nothing(backend):
    from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier

    loop = FeedbackLoop(backend, Verifier.none(), budget=3, strategy="self_consistency", temperature=1.0, seed=3,
                        max_new_tokens=4, extractor=lambda text: text[:1] or None, equivalence="exact")
    (report,) = loop.run(["Pick a letter:"])
    texts = [a["text"] for a in report["attempts"]]
    assert len(texts) == 3 and all(a["verdict"] is None for a in report["attempts"])
    firsts = [t[:1] for t in texts if t[:1]]
    # the voted answer is the most frequent first character (ties: the earliest)
    assert report["answer"] == max(firsts, key=lambda c: (firsts.count(c), -firsts.index(c)))
    assert report["solved_at"] is None and report["verifier"] == "none"


def test_feedback_loop_reward_model_ranks_beams(backend):
    from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier
    from guidedecode.strategies.scorers import MeanLogProbScorer

    loop = FeedbackLoop(backend, Verifier.reward_model(MeanLogProbScorer()), budget=2, strategy="step_beam",
                        expansions=2, step_stop="\n", max_steps=2, max_step_tokens=3, seed=0, max_new_tokens=6)
    (report,) = loop.run(["Count:"])
    assert 1 <= len(report["attempts"]) <= 2 and report["verifier"] == "reward_model"
    assert report["text"] == report["attempts"][0]["text"]  # no oracle: the top-ranked beam


def test_feedback_loop_bad_input_is_named(backend):
    from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier
    from guidedecode.strategies.scorers import MeanLogProbScorer

    with pytest.raises(StrategyError, match="unknown strategy 'nope'"):
        FeedbackLoop(backend, Verifier.none(), strategy="nope")
    with pytest.raises(StrategyError, match="only best_of_n and step_beam"):
        FeedbackLoop(backend, Verifier.reward_model(MeanLogProbScorer()), strategy="revision")
    with pytest.raises(StrategyError, match="only best_of_n and step_beam"):
        FeedbackLoop(backend, Verifier.reward_model(MeanLogProbScorer()), strategy="beam")
    with pytest.raises(StrategyError, match="token-level beam search at temperature 0.*temperature"):
        FeedbackLoop(backend, Verifier.none(), strategy="beam", temperature=0.7)
    with pytest.raises(StrategyError, match="needs a Verifier"):
        FeedbackLoop(backend, "oracle")
    with pytest.raises(StrategyError, match="callable scorer"):
        Verifier.reward_model(3)
    with pytest.raises(StrategyError, match="pass golds="):
        FeedbackLoop(backend, Verifier.oracle(), budget=2).run(["Q:"])
    assert FeedbackLoop(backend, Verifier.none(), budget=2).run([]) == []


def test_feedback_loop_beam_is_the_fttt_token_beam_search_at_temperature_0(backend):
    """FTTT's beam-search baseline is HF token-level beam search without sampling: ``strategy="beam"`` runs
    exactly that (the returned beams are transformers' own, best first); the sampled step-level search is
    ``strategy="step_beam"``."""
    from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier

    loop = FeedbackLoop(backend, Verifier.none(), budget=2, strategy="beam", max_new_tokens=4)
    assert isinstance(loop.strategy, TokenBeamSearch) and loop.strategy.temperature == 0.0
    assert isinstance(FeedbackLoop(backend, Verifier.none(), budget=2, strategy="step_beam").strategy, BeamSearch)
    (report,) = loop.run(["Hello"])
    ids = torch.tensor([backend.encode("Hello")])
    direct = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=2,
                                    num_return_sequences=2, do_sample=False, max_new_tokens=4,
                                    pad_token_id=backend.pad_token_id, eos_token_id=list(backend.eos_token_ids))
    expected = [backend._completion(row[ids.shape[1]:].tolist(), [], 4).text for row in direct]
    assert [a["text"] for a in report["attempts"]] == expected
    assert report["text"] == expected[0]  # no verifier: the top beam
    (again,) = loop.run(["Hello"])
    assert again["attempts"] == report["attempts"]  # T = 0: deterministic
