"""HFBackend primitives on a tiny real Llama with the embedded (real BPE) tokenizer."""

import pytest
import torch

from guidedecode.backends import HFBackend
from guidedecode.errors import StrategyError


@pytest.fixture(scope="module")
def backend(tiny_llama_with_tokenizer):
    model, tokenizer = tiny_llama_with_tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return HFBackend(model, tokenizer, batch_size=4)


def hand_logprobs(model, ids, first):
    """log_softmax over the full vocabulary, then gather the continuation tokens."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(first, len(ids))])


def test_score_equals_hand_computed_log_softmax_gather(backend):
    prefix = "Question: what is 3 + 4?\nAnswer:"
    continuations = [" It is 7.", " 7", " seven, clearly"]
    scores = backend.score(prefix, continuations)
    for cont, score in zip(continuations, scores):
        ids = backend.tokenizer(prefix + cont, add_special_tokens=False)["input_ids"]
        first = len(ids) - len(score.token_ids)
        assert backend.decode(ids[first:]) == cont
        torch.testing.assert_close(score.logprobs, hand_logprobs(backend.model, ids, first), atol=1e-5, rtol=0)


def test_score_with_a_token_spanning_the_boundary(backend):
    """'Hello wor' + 'ld': joint tokenisation merges ' world' into one token, which the continuation owns."""
    prefix, cont = "Hello wor", "ld and more"
    joint = backend.tokenizer(prefix + cont, add_special_tokens=False)["input_ids"]
    separate = backend.tokenizer(prefix, add_special_tokens=False)["input_ids"]
    assert joint[: len(separate)] != separate  # the boundary really merges
    (score,) = backend.score(prefix, [cont])
    first = len(joint) - len(score.token_ids)
    assert backend.decode([joint[first]]).startswith(" wor")
    torch.testing.assert_close(score.logprobs, hand_logprobs(backend.model, joint, first), atol=1e-5, rtol=0)


def test_score_token_ids_and_batches_agree_with_single_scoring(backend):
    prefix = backend.encode("Count: one two")
    conts = [backend.encode(" three four"), backend.encode(" five"), backend.encode(" six seven eight nine")] * 2
    batched = backend.score(prefix, conts)
    for cont, score in zip(conts, batched):
        (alone,) = backend.score(prefix, [cont])
        assert score.token_ids == cont
        torch.testing.assert_close(score.logprobs, alone.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(score.logprobs, hand_logprobs(backend.model, prefix + cont, len(prefix)),
                                   atol=1e-5, rtol=0)


def test_sample_shapes_stops_and_seeds(backend):
    prompts = ["Once upon a time", "The list: a, b,"]
    first = backend.sample(prompts, 3, max_new_tokens=12, temperature=1.0, stop=[" the", ","], seed=1)
    again = backend.sample(prompts, 3, max_new_tokens=12, temperature=1.0, stop=[" the", ","], seed=1)
    assert [[c.token_ids for c in row] for row in first] == [[c.token_ids for c in row] for row in again]
    assert [len(row) for row in first] == [3, 3]
    for row in first:
        for c in row:
            assert c.text == backend.decode(c.token_ids)[: len(c.text)]
            if c.finish_reason == "stop":
                assert c.text.endswith(" the") or c.text.endswith(",")
                # the stop string first appears at the end
                assert " the" not in c.text[:-4] and "," not in c.text[:-1]
            elif c.finish_reason == "length":
                assert c.num_tokens == 12


def test_greedy_equals_model_generate(backend):
    prompt = "A tiny model says"
    (completion,) = backend.greedy([prompt], max_new_tokens=10)
    ids = torch.tensor([backend.encode(prompt)])
    out = backend.model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=backend.pad_token_id)
    expected = out[0, ids.shape[1]:].tolist()
    eos = backend.tokenizer.eos_token_id
    expected = expected[: expected.index(eos)] if eos in expected else expected
    assert completion.token_ids == expected


def test_bad_prompts_are_clear_errors(backend, tiny_llama_with_tokenizer):
    with pytest.raises(StrategyError, match="empty prompt"):
        backend.greedy([""])
    with pytest.raises(StrategyError, match="n must be >= 1"):
        backend.sample(["x"], 0)
    with pytest.raises(StrategyError, match="empty prefix"):
        backend.score("", ["abc"])
    model, tokenizer = tiny_llama_with_tokenizer
    saved = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(StrategyError, match="no chat template"):
            HFBackend(model, tokenizer).chat_prompt("hi")
    finally:
        tokenizer.chat_template = saved


# ---------------------------------------------------------------------- one prefill for n samples
class _History(torch.nn.Module):
    """A logits processor that records the ``input_ids`` it is shown at each step (the guides' view)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


def _pair(arch):
    from guidedecode.testing import tiny_model, tiny_tokenizer

    model = tiny_model(arch, seed=3)
    return HFBackend(model, tiny_tokenizer(), batch_size=16)


PROMPTS = [[5, 9, 13, 7, 21, 8, 30], [11, 4], [17, 3, 99, 42]]  # different lengths: left padding


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prefill_matches_num_return_sequences(arch):
    """n rows from one prefill: identical greedy (top_k=1) and seeded samples, guides see each row's history."""
    backend = _pair(arch)
    results = {}
    for shared in (True, False):
        backend.share_prefill = shared
        history = _History()
        backend.logits_processor = [history]
        greedy = backend.sample(PROMPTS, 3, max_new_tokens=6, top_k=1, seed=0)
        sampled = backend.sample(PROMPTS, 3, max_new_tokens=6, temperature=1.0, seed=7)
        results[shared] = ([[c.token_ids for c in row] for row in greedy], [[c.token_ids for c in row] for row in sampled],
                           history.seen)
    assert results[True][0] == results[False][0]
    assert all(len({tuple(ids) for ids in row}) == 1 for row in results[True][0])  # top_k=1: every row the same
    assert results[True][1] == results[False][1]
    assert len({tuple(ids) for row in results[True][1] for ids in row}) > 3  # real samples, not one repeated row
    seen_shared, seen_plain = results[True][2], results[False][2]
    assert len(seen_shared) == len(seen_plain)
    for a, b in zip(seen_shared, seen_plain):
        assert torch.equal(a, b)  # the same rows, in the same order, with the whole history at every step
    width = max(map(len, PROMPTS))
    first = seen_shared[0]
    assert first.shape == (9, width) and first[3:6, -2:].tolist() == [PROMPTS[1]] * 3


def test_shared_prefill_counts_each_prompt_once():
    backend = _pair("llama")
    spent = {}
    for shared in (True, False):
        backend.share_prefill = shared
        before = backend.stats.counters()
        backend.sample(PROMPTS, 4, max_new_tokens=3, top_k=1, seed=0)
        spent[shared] = backend.stats.since(before)
    total = sum(map(len, PROMPTS))
    assert spent[False]["prompt_tokens"] == 4 * total
    assert spent[True]["prompt_tokens"] == total - len(PROMPTS) + 4 * len(PROMPTS)
    assert spent[True]["forward_passes"] == spent[False]["forward_passes"] + 1  # the prefill


def test_shared_prefill_with_a_token_guide_and_qsharp():
    """A stateful guide (Q#, value model cache per row) gives the same rows and KLs on both paths."""
    from guidedecode.guides.qsharp import QSharpGuide
    from guidedecode.testing import random_value_model, tiny_tokenizer

    backend = _pair("llama")
    vm = random_value_model("llama", head="v")
    out = {}
    for shared in (True, False):
        backend.share_prefill = shared
        backend.logits_processor = [QSharpGuide(vm, eta=3.0, top_k=6, temperature=0.9, tokenizer=tiny_tokenizer())]
        rows = backend.sample(PROMPTS, 2, max_new_tokens=5, temperature=0.9, seed=1)
        out[shared] = ([[c.token_ids for c in row] for row in rows], [[c.info["kl"] for c in row] for row in rows])
    assert out[True][0] == out[False][0]
    torch.testing.assert_close(torch.tensor(out[True][1]), torch.tensor(out[False][1]), atol=1e-5, rtol=1e-5)
