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
