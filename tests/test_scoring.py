"""``HFBackend.score`` / ``score_many``: shared-prefix batched scoring against brute force.

Every check compares with an independent computation written here: the joined candidate run alone
through the full model, ``log_softmax`` over the whole vocabulary, then a gather of the continuation
tokens (``brute_force``). Tiny random-weight real architectures (``guidedecode.testing``) paired
with the embedded model's real BPE tokenizer, so text boundaries are real.
"""

import pytest
import torch

import guidedecode.kernels.logprobs as K
from guidedecode.backends.hf import HFBackend, _Candidate, _shared_prefix_units
from guidedecode.errors import StrategyError
from guidedecode.models import load_tokenizer
from guidedecode.testing import TINY_ARCHS, tiny_model

FP32_TOL = 1e-5
PREFIX = "Question: what is 3 + 4?\nAnswer: Hello wor"
# different lengths, a boundary-spanning token ("wor" + "ld" -> " world"), an empty continuation
CONTINUATIONS = ["ld and more", " 7", "ld", " seven, clearly not eight or nine", "", "k", " 7."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: on a busy shared CPU, intra-op threads cost far more in synchronisation than
    they save (a 64-wide linear takes ~25 ms with 2 contended threads, ~10 us with one)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module", params=TINY_ARCHS)
def backend(request, tokenizer):
    """Every tiny architecture (the core equalities run on each)."""
    model = tiny_model(request.param, seed=3, vocab_size=len(tokenizer))
    return HFBackend(model, tokenizer, batch_size=3)


@pytest.fixture(scope="module")
def llama(tokenizer):
    """One architecture for the edge cases (they exercise code that does not depend on it)."""
    return HFBackend(tiny_model("llama", seed=4, vocab_size=len(tokenizer)), tokenizer, batch_size=3)


def brute_force(model, ids, first):
    """Full forward of ``ids`` alone, log_softmax over the vocabulary, gather tokens ``first:``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return torch.tensor([logp[t - 1, ids[t]].item() for t in range(first, len(ids))])


def assert_scores(scores, model, joined):
    assert len(scores) == len(joined)
    for score, (ids, first) in zip(scores, joined):
        assert score.token_ids == ids[first:]
        assert score.logprobs.dtype == torch.float32 and score.logprobs.shape == (len(ids) - first,)
        torch.testing.assert_close(score.logprobs, brute_force(model, ids, first), atol=FP32_TOL, rtol=0)


# ------------------------------------------------------------------------------ shared prefix


def test_shared_prefix_equals_alone_and_brute_force(backend):
    assert backend.scoring_plan.fused and backend.scoring_plan.temperature == 1.0
    joined = [backend.join(PREFIX, c) for c in CONTINUATIONS]
    # the boundary really merges: the continuation owns a token that starts inside the prefix
    ids, first = backend.join(PREFIX, "ld")
    assert backend.tokenizer.decode(ids[first:first + 1]) == " world"
    before = backend.stats.prompt_tokens
    scores = backend.score(PREFIX, CONTINUATIONS)  # 7 candidates in chunks of 3
    forwarded = backend.stats.prompt_tokens - before
    assert_scores(scores, backend.model, joined)
    # the prefix ran once: far fewer tokens than running every joined candidate
    assert forwarded < sum(len(ids) for ids, _ in joined) - 4 * len(backend.encode("Question: what is 3 + 4?"))
    for cont, shared in zip(CONTINUATIONS, scores):
        (alone,) = backend.score(PREFIX, [cont])  # one candidate: nothing shared with others
        assert alone.token_ids == shared.token_ids
        torch.testing.assert_close(shared.logprobs, alone.logprobs, atol=FP32_TOL, rtol=0)


def test_token_id_prompts_and_single_token_continuations(llama):
    prefix = llama.encode("Count: one two")
    conts = [[318], [9, 88, 4000], [17], []]  # single tokens only need the prefix forward
    scores = llama.score(prefix, conts)
    assert_scores(scores, llama.model, [(prefix + c, len(prefix)) for c in conts])
    assert scores[3].token_ids == [] and scores[3].total == 0.0 and scores[3].mean == 0.0
    assert llama.score(prefix, []) == []


def test_candidates_sharing_no_token(llama):
    """'hello' + 'able' -> [hello, able] but 'hello' + 'ing' -> [hell, oing]: the joins differ at token 0."""
    joined = [llama.join("hello", c) for c in ["able", "ing", "s"]]
    assert joined[0][0][0] != joined[1][0][0] and all(first >= 1 for _, first in joined)
    assert_scores(llama.score("hello", ["able", "ing", "s"]), llama.model, joined)
    # a longer prefix shares its first words but not the last one
    joined = [llama.join("Say hello", c) for c in ["able", "ing"]]
    assert_scores(llama.score("Say hello", ["able", "ing"]), llama.model, joined)


def test_shared_prefix_units():
    def cand(i, ids, first):
        return _Candidate(0, i, ids, first)

    (unit,) = _shared_prefix_units([cand(0, [5, 6, 7, 8], 3), cand(1, [5, 6, 9], 2), cand(2, [5, 6, 7], 3)])
    assert unit.length == 2  # common prefix [5, 6], capped by the earliest start 2
    (unit,) = _shared_prefix_units([cand(0, [5, 6, 7, 8], 2), cand(1, [5, 6, 7, 8, 9], 3)])
    assert unit.length == 2  # the cap, not the longer common prefix [5, 6, 7, 8]
    (unit,) = _shared_prefix_units([cand(0, [5, 6, 7], 3)])
    assert unit.length == 3
    units = _shared_prefix_units([cand(0, [5, 6], 1), cand(1, [4, 6], 1)])
    assert [u.length for u in units] == [1, 1] and [u.candidates[0].index for u in units] == [0, 1]
    assert _shared_prefix_units([]) == []


def test_empty_prefix_and_bad_arguments_are_clear_errors(llama):
    with pytest.raises(StrategyError, match="empty prefix"):
        llama.score("", ["abc"])
    with pytest.raises(StrategyError, match="empty prompt"):
        llama.score([], [[5, 6]])
    with pytest.raises(StrategyError, match="continuations must be a list"):
        llama.score("Hello", "world")
    with pytest.raises(StrategyError, match="pairs"):
        llama.score_many(["Hello"])


# --------------------------------------------------------------------------- padding, batching


def test_padding_side_invariance(llama):
    right = llama.score(PREFIX, CONTINUATIONS)
    saved_side = llama.tokenizer.padding_side
    try:
        llama.score_suffix_padding = "left"
        llama.tokenizer.padding_side = "right" if saved_side == "left" else "left"
        left = llama.score(PREFIX, CONTINUATIONS)
        llama.score_suffix_padding = "middle"
        with pytest.raises(StrategyError, match="score_suffix_padding"):
            llama.score(PREFIX, CONTINUATIONS)
    finally:
        llama.score_suffix_padding = "right"
        llama.tokenizer.padding_side = saved_side
    for a, b in zip(right, left):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=FP32_TOL, rtol=0)


def test_score_many_across_prefixes_of_different_lengths(backend):
    """Prefixes of different lengths are left-padded into one prefix forward; candidates of different
    requests share suffix forwards (batch_size 3 over 4 requests: two prefix waves, mixed chunks)."""
    requests = [
        ("Q: 2 + 2?\nA:", [" 4", " four", " 5 or so"]),
        ("A much longer question about apples and pears goes here?\nA: Hello wor", ["ld", "k", " x"]),
        (backend.encode("Tokens"), [[11, 12, 13], [14]]),
        ("Empty request follows", []),
        ("Last", [" one"]),
    ]
    many = backend.score_many(requests)
    assert [len(s) for s in many] == [3, 3, 2, 0, 1]
    for (prefix, conts), scores in zip(requests, many):
        alone = backend.score(prefix, conts)
        assert_scores(scores, backend.model, [backend.join(prefix, c) for c in conts])
        for a, b in zip(scores, alone):
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=FP32_TOL, rtol=0)


def test_batch_size_does_not_change_scores(llama, tokenizer):
    wide = HFBackend(llama.model, tokenizer, batch_size=64)
    narrow = HFBackend(llama.model, tokenizer, batch_size=1)
    for a, b in zip(wide.score(PREFIX, CONTINUATIONS), narrow.score(PREFIX, CONTINUATIONS)):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=FP32_TOL, rtol=0)


# ------------------------------------------------------------------- heads: tied, scaled, capped


def _small_model(config_cls, vocab, **kwargs):
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    config = config_cls(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **kwargs,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _ids_requests(vocab):
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(2, vocab, (9,), generator=gen).tolist()
    conts = [torch.randint(2, vocab, (k,), generator=gen).tolist() for k in (1, 4, 7, 2)]
    return prefix, conts


def test_gpt2_tied_embeddings_use_the_embedding_matrix(tokenizer):
    model = tiny_model("gpt2", seed=0, vocab_size=509)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    backend = HFBackend(model, tokenizer)
    prefix, conts = _ids_requests(509)
    assert backend.scoring_plan.fused
    assert_scores(backend.score(prefix, conts), model, [(prefix + c, len(prefix)) for c in conts])


@pytest.mark.parametrize(
    "name, kwargs, temperature",
    [
        ("GraniteConfig", dict(logits_scaling=4.0), 4.0),  # logits / logits_scaling
        ("CohereConfig", dict(logit_scale=0.25), 4.0),  # logits * logit_scale, tied embeddings
    ],
)
def test_logit_scaling_becomes_a_temperature(tokenizer, name, kwargs, temperature):
    import transformers

    model = _small_model(getattr(transformers, name), 509, **kwargs)
    backend = HFBackend(model, tokenizer)
    assert backend.scoring_plan.fused and backend.scoring_plan.temperature == pytest.approx(temperature)
    prefix, conts = _ids_requests(509)
    assert_scores(backend.score(prefix, conts), model, [(prefix + c, len(prefix)) for c in conts])


def test_softcapped_logits_fall_back_to_model_logits(tokenizer):
    """Gemma-2 soft-caps its logits (tanh): the LM head alone cannot reproduce them."""
    from transformers import Gemma2Config

    model = _small_model(Gemma2Config, 509, head_dim=16, final_logit_softcapping=0.5, sliding_window=4)
    backend = HFBackend(model, tokenizer, batch_size=2)
    assert not backend.scoring_plan.fused and "softcapping" in backend.scoring_plan.reason
    prefix, conts = _ids_requests(509)
    joined = [(prefix + c, len(prefix)) for c in conts]
    scores = backend.score(prefix, conts)
    assert_scores(scores, model, joined)
    # the fused head path would be wrong here: this test can fail
    ids, first = joined[2]
    with torch.no_grad():
        hidden = model.base_model(torch.tensor([ids])).last_hidden_state[0]
    head = model.lm_head.weight
    uncapped = K.linear_target_logprobs_reference(hidden[first - 1 : -1], head, torch.tensor(ids[first:]))
    assert (uncapped - scores[2].logprobs).abs().max() > 1e-2


def test_unknown_logit_processing_is_detected_by_the_probe(tokenizer):
    """A forward hook on the LM head (steering, a library's patch) changes the logits in a way no
    config names: the probe sees that the bare head does not reproduce them, scoring uses the logits."""
    model = tiny_model("qwen2", seed=2, vocab_size=509)
    bias = torch.linspace(-2.0, 2.0, 509)
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    try:
        backend = HFBackend(model, tokenizer)
        assert not backend.scoring_plan.fused and "does not reproduce" in backend.scoring_plan.reason
        prefix, conts = _ids_requests(509)
        assert_scores(backend.score(prefix, conts), model, [(prefix + c, len(prefix)) for c in conts])
    finally:
        handle.remove()
    assert HFBackend(model, tokenizer).scoring_plan.fused  # without the hook: the fused path again


# -------------------------------------------------------------- Triton kernels inside the backend


@pytest.mark.skipif(not (K.INTERPRETED or torch.cuda.is_available()),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 before triton's import")  # fmt: skip
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_triton_scoring_path_odd_vocabulary(tokenizer, arch):
    """Fused (llama) and logits (gemma2) paths through the Triton kernels, V = 509, padded candidates:
    equal to eager log_softmax + gather within 1e-5 (under TRITON_INTERPRET=1 on CPU)."""
    from transformers import Gemma2Config

    if arch == "llama":
        model = tiny_model("llama", seed=5, vocab_size=509)
    else:
        model = _small_model(Gemma2Config, 509, head_dim=16, final_logit_softcapping=0.5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    backend = HFBackend(model, tokenizer, batch_size=4)
    backend.score_kernel_backend = "triton"
    prefix, conts = _ids_requests(509)
    scores = backend.score(prefix, conts)
    assert backend.scoring_plan.fused == (arch == "llama")
    for score, cont in zip(scores, conts):
        ids = prefix + cont
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu()
        eager = torch.log_softmax(logits, -1)[len(prefix) - 1 : -1].gather(-1, torch.tensor(cont)[:, None])[:, 0]
        torch.testing.assert_close(score.logprobs, eager, atol=FP32_TOL, rtol=0)


# ------------------------------------------------------------------------------ cost counters


def test_cost_counters_count_prompt_tokens_and_forward_passes(llama):
    """Scoring: one prefix forward + one suffix forward per chunk; the tokens fed count as prompt tokens.
    Sampling: every returned sequence carries its prompt; one forward per decoding step."""
    before = llama.stats.counters()
    llama.score(PREFIX, CONTINUATIONS[:3])  # 3 candidates, batch_size 3: one chunk
    spent = llama.stats.since(before)
    assert spent["forward_passes"] == 2 and spent["score_calls"] == 1
    # fed: the shared prefix once (the longest common token prefix, capped at the earliest continuation
    # start), then each candidate's remaining tokens but its last (which predicts nothing)
    joined = [llama.join(PREFIX, c) for c in CONTINUATIONS[:3]]
    shared = 0
    while shared < min(f for _, f in joined) and len({ids[shared] for ids, _ in joined}) == 1:
        shared += 1
    assert shared > 0  # the three joins do share a prefix here
    assert spent["prompt_tokens"] == shared + sum(len(ids) - 1 - shared for ids, _ in joined)
    assert spent["prompt_tokens"] < sum(len(ids) for ids, _ in joined)  # the shared prefix ran once

    prompts = ["Say a number:", "Count to three please:"]
    before = llama.stats.counters()
    rows = llama.sample(prompts, 2, max_new_tokens=5, temperature=1.0, seed=0)
    spent = llama.stats.since(before)
    lengths = [[c.num_tokens for c in row] for row in rows]
    # one shared prefill per prompt (all but its last token), then the last token on each of the 2 rows
    assert spent["prompt_tokens"] == sum(len(llama.encode(p)) - 1 + 2 for p in prompts)
    assert spent["generated_tokens"] == sum(map(sum, lengths)) and spent["sample_calls"] == 1
    # batch_size 3 holds one prompt x 2 samples per generate call: two calls of a prefill + up to 5 steps each
    assert sum(map(max, lengths)) + 2 <= spent["forward_passes"] <= 2 * (1 + 5)
    if all(c.finish_reason == "length" for row in rows for c in row):
        assert spent["forward_passes"] == 2 * (1 + 5)
