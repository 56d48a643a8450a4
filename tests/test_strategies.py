"""Step strategies on a tiny real model: selection rules checked against independent recomputation."""

import pytest
import torch

from guidedecode.backends import HFBackend
from guidedecode.errors import StrategyError
from guidedecode.strategies import BestOfN, MeanLogProbScorer, OracleScorer, SelfConsistency, vote


@pytest.fixture(scope="module")
def backend(tiny_llama_with_tokenizer):
    model, tokenizer = tiny_llama_with_tokenizer
    return HFBackend(model, tokenizer, batch_size=8)


def test_vote_with_known_counts():
    answers = ["4", "5", None, "4.0", "5", "4", "7"]
    groups = vote(answers)  # exact strings only: "4" x2, "5" x2 (tie broken by first index), ...
    assert groups[0] == [0, 5] and groups[1] == [1, 4]
    numeric = vote(answers, lambda pairs: [float(a) == float(b) for a, b in pairs])
    assert numeric[0] == [0, 3, 5] and numeric[1] == [1, 4] and numeric[2] == [6]
    assert vote([None, None]) == []


def test_math_equivalence_classes_through_math_verify():
    groups = vote(["1/2", "0.5", "\\frac{1}{2}", "3", "3"], None)
    assert groups[0] == [3, 4]
    from guidedecode.strategies.self_consistency import math_equivalent_many

    groups = vote(["1/2", "0.5", "\\frac{1}{2}", "3", "3"], math_equivalent_many)
    assert groups[0] == [0, 1, 2]


def test_best_of_n_oracle_picks_the_one_accepted_answer(backend):
    prompts = ["Say something:", "Another thing:"]
    samples = backend.sample(prompts, 4, max_new_tokens=6, temperature=1.0, seed=3)
    # accept exactly the third sample of each prompt
    golds = [row[2].text for row in samples]
    strategy = BestOfN(4, scorer=OracleScorer(lambda text, gold: text == gold), temperature=1.0, seed=3,
                       max_new_tokens=6)
    results = strategy.run(backend, prompts, golds=golds)
    for result, row, gold in zip(results, samples, golds):
        first_accepted = next(i for i, c in enumerate(row) if c.text == gold)
        assert result.completion.text == gold and result.trace[0]["chosen"] == first_accepted
        assert result.attempts == 4 and result.generated_tokens == sum(c.num_tokens for c in row)
    with pytest.raises(StrategyError, match="needs gold answers"):
        strategy.run(backend, prompts)


def test_best_of_n_logprob_scorer_is_the_argmax_of_recomputed_means(backend):
    prompt = "The weather today is"
    strategy = BestOfN(5, scorer=MeanLogProbScorer(), temperature=1.0, seed=9, max_new_tokens=8)
    (result,) = strategy.run(backend, [prompt])
    recomputed = []
    for c in result.candidates:
        ids = backend.encode(prompt) + c.token_ids
        with torch.no_grad():
            logp = torch.log_softmax(backend.model(torch.tensor([ids])).logits[0].float(), -1)
        start = len(ids) - len(c.token_ids)
        recomputed.append(float(torch.stack([logp[t - 1, ids[t]] for t in range(start, len(ids))]).mean()))
    assert result.scores == pytest.approx(recomputed, abs=1e-5)
    assert result.completion is result.candidates[max(range(5), key=lambda i: (recomputed[i], -i))]


def test_self_consistency_majority_with_a_custom_extractor(backend):
    strategy = SelfConsistency(6, extract=lambda text: text.strip()[:1] or None, equivalent_many=None,
                               temperature=1.5, seed=2, max_new_tokens=4)
    (result,) = strategy.run(backend, ["Letters:"])
    firsts = [c.text.strip()[:1] or None for c in result.candidates]
    counts = {a: firsts.count(a) for a in firsts if a}
    best = max(counts.values())
    winner = next(a for a in firsts if a and counts[a] == best)  # earliest among the most frequent
    assert firsts[result.trace[0]["chosen"]] == winner
    assert result.scores[result.trace[0]["chosen"]] == best


def test_custom_generate_path_equals_run(backend):
    model, tokenizer = backend.model, backend.tokenizer
    prompts = ["Hi there", "A longer prompt for the tiny model"]
    strategy = BestOfN(3, temperature=1.0, seed=5, max_new_tokens=6)
    expected = strategy.run(backend, [backend.encode(p) for p in prompts])
    inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**inputs, custom_generate=strategy, strategy_tokenizer=tokenizer, max_new_tokens=6)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :width], inputs["input_ids"])
    for row, result, exp in zip(out, strategy.last_results, expected):
        assert result.completion.token_ids == exp.completion.token_ids
        assert row[width: width + len(exp.completion.token_ids)].tolist() == exp.completion.token_ids
    with pytest.raises(StrategyError, match="needs a tokenizer"):
        model.generate(**inputs, custom_generate=BestOfN(2), max_new_tokens=4)


def test_bad_strategy_parameters():
    with pytest.raises(StrategyError, match="n >= 1"):
        BestOfN(0)
    with pytest.raises(StrategyError, match="n >= 1"):
        SelfConsistency(0)
    with pytest.raises(StrategyError, match="max_new_tokens"):
        BestOfN(2, max_new_tokens=0)
