"""DeltaInjector against models whose weights were edited in place (W + ΔW), row by row.

Tiny random Llama / Qwen2 / Mistral models of the real architectures (guidedecode.testing); prefill,
cached decode and ``generate`` with mixed rows (different deltas, no delta) and expanded rows.
"""

import copy

import pytest
import torch

from guidedecode.deltas import DeltaError, DeltaInjector, LowRankDelta, find_targets
from guidedecode.testing import tiny_model

TOL = 2e-5


def _delta(module, rank, seed, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rank, module.in_features, generator=g) * 0.3
    B = torch.randn(module.out_features, rank, generator=g) * 0.3
    return LowRankDelta(A, B, scale)


def _edited(model, deltas: dict):
    """A deep copy with W <- W + ΔW for every (name, delta)."""
    edited = copy.deepcopy(model)
    modules = dict(edited.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += delta.dense()
    return edited


def _batch(seed=0, rows=3, vocab=512):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 8, 3, 7][:rows]
    width = max(lengths)
    ids = torch.full((rows, width), 1)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _row_deltas(model, names, rows):
    """Per-row deltas: row 0 and 2 get different deltas, row 1 none."""
    modules = dict(model.named_modules())
    per_row = {}
    for k, name in enumerate(names):
        per_row[name] = [_delta(modules[name], 3 + k, 10 * k + 1), None, _delta(modules[name], 2, 10 * k + 2)][:rows]
    return per_row


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("attn,backend", [("sdpa", "auto"), ("eager", "torch")])
def test_prefill_and_cached_decode_equal_edited_weights(arch, attn, backend):
    """``auto``: the Triton kernel (interpreted on CPU); ``torch``: the torch path."""
    model = tiny_model(arch, seed=1, attn_implementation=attn)
    names = find_targets(model, ("q_proj", "v_proj"), layers=[-1]) + find_targets(model, "down_proj", layers=[0])
    per_row = _row_deltas(model, names, 3)
    ids, mask = _batch()
    steps = torch.tensor([[7], [9], [11]])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
        with DeltaInjector(model, per_row, backend=backend):
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            step = model(input_ids=steps, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                         past_key_values=cache).logits
        for row in range(3):
            deltas = {name: per_row[name][row] for name in names if per_row[name][row] is not None}
            reference = _edited(model, deltas) if deltas else model
            ref = reference(input_ids=ids, attention_mask=mask, use_cache=True)
            ref_step = reference(input_ids=steps, attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1),
                                 past_key_values=ref.past_key_values).logits
            keep = mask[row].bool()
            err = (out.logits[row][keep] - ref.logits[row][keep]).abs().max().item()
            assert err <= TOL, (arch, attn, row, err)
            assert (step[row] - ref_step[row]).abs().max().item() <= TOL
            if deltas:
                assert (out.logits[row][keep] - base[row][keep]).abs().max() > 1e-2  # the delta matters
            else:
                assert torch.equal(out.logits[row][keep], base[row][keep])  # untouched row: bit-identical
        # removed cleanly: base outputs exactly
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)


def test_cached_decode_equals_full_forward_and_zero_delta_is_exact():
    model = tiny_model("mistral", seed=2)
    names = find_targets(model, ("q_proj", "v_proj"), layers=[-2, -1])
    modules = dict(model.named_modules())
    deltas = {n: _delta(modules[n], 4, i) for i, n in enumerate(names)}
    ids = torch.randint(2, 512, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with DeltaInjector(model, deltas):
            full = model(input_ids=ids).logits
            pre = model(input_ids=ids[:, :6], use_cache=True)
            cache, logits = pre.past_key_values, [pre.logits]
            for t in range(6, 9):
                step = model(input_ids=ids[:, t:t + 1], past_key_values=cache)
                cache = step.past_key_values
                logits.append(step.logits)
        assert (torch.cat(logits, 1) - full).abs().max() <= TOL
        base = model(input_ids=ids).logits
        zero = {n: LowRankDelta(torch.zeros(3, m.in_features), torch.zeros(m.out_features, 3))
                for n, m in ((n, modules[n]) for n in names)}
        with DeltaInjector(model, zero):
            assert torch.equal(model(input_ids=ids).logits, base)
        # dense and factored forms give the same outputs
        with DeltaInjector(model, {n: d.dense() for n, d in deltas.items()}):
            dense = model(input_ids=ids).logits
        assert (dense - full).abs().max() <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_with_expanded_rows_matches_edited_models(arch):
    """num_return_sequences expands each request's rows; each request's delta follows them."""
    model = tiny_model(arch, seed=4)
    names = find_targets(model, ("q_proj", "v_proj"), layers=[0, 1])
    per_row = _row_deltas(model, names, 2)
    ids, mask = _batch(seed=5, rows=2)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=2,
                  output_logits=True, return_dict_in_generate=True)
    with DeltaInjector(model, per_row):
        torch.manual_seed(0)
        out = model.generate(ids, **kwargs)
    logits = torch.stack(out.logits, 1)  # [4, steps, V]
    for row in range(2):
        deltas = {n: per_row[n][row] for n in names if per_row[n][row] is not None}
        reference = _edited(model, deltas) if deltas else model
        torch.manual_seed(0)
        ref = reference.generate(ids, **kwargs)
        assert torch.equal(out.sequences[2 * row:2 * row + 2], ref.sequences[2 * row:2 * row + 2])
        assert (logits[2 * row:2 * row + 2] - torch.stack(ref.logits, 1)[2 * row:2 * row + 2]).abs().max() <= 1e-4


def test_hf_backend_windows_the_rows():
    """HFBackend chunks prompts (batch_size 2, 2 samples each = one prompt per generate); each chunk sees
    its own request's delta."""
    from guidedecode.backends import HFBackend
    from guidedecode.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=6, vocab_size=len(tokenizer))
    names = find_targets(model, "v_proj")
    modules = dict(model.named_modules())
    prompts = ["1 + 1 =", "The sky is", "Count: 1, 2,"]
    per_row = {n: [_delta(modules[n], 2, 1, scale=2.0), None, _delta(modules[n], 3, 2, scale=2.0)] for n in names}
    backend = HFBackend(model, tokenizer, batch_size=2)
    injector = DeltaInjector(model, per_row)
    backend.deltas = injector
    with injector:
        got = [[c.token_ids for c in row] for row in backend.sample(prompts, 2, max_new_tokens=5, seed=3)]
    base = [[c.token_ids for c in row] for row in backend.sample(prompts, 2, max_new_tokens=5, seed=3)]
    assert got[1] == base[1] and got[0] != base[0] and got[2] != base[2]
    for i, prompt in enumerate(prompts):
        deltas = {n: per_row[n][i] for n in names if per_row[n][i] is not None}
        reference = HFBackend(_edited(model, deltas) if deltas else model, tokenizer, batch_size=2)
        torch.manual_seed(0)
        ref = reference.greedy([prompt], max_new_tokens=5)[0].token_ids
        with injector:
            assert backend.greedy(prompts, max_new_tokens=5)[i].token_ids == ref


def test_bad_input_is_named():
    model = tiny_model("llama", seed=0)
    with pytest.raises(DeltaError, match="matches no nn.Linear"):
        find_targets(model, "c_attn")
    with pytest.raises(DeltaError, match="out of range"):
        find_targets(model, "q_proj", layers=[5])
    with pytest.raises(DeltaError, match="no nn.Linear named"):
        DeltaInjector(model, {"model.layers.9.self_attn.q_proj": torch.zeros(64, 64)})
    name = find_targets(model, "v_proj", layers=[0])[0]  # 64 -> 32 (GQA)
    with pytest.raises(DeltaError, match=r"must be \[d_out=32, d_in=64\]"):
        DeltaInjector(model, {name: torch.zeros(64, 64)})
    injector = DeltaInjector(model, {name: [torch.zeros(32, 64)] * 3})
    with injector, pytest.raises(DeltaError, match="multiple"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long))


def test_bad_delta_scale_factors_layers_backend_and_window_are_named():
    model = tiny_model("llama", seed=0)
    A, B = torch.zeros(2, 64), torch.zeros(64, 2)
    with pytest.raises(DeltaError, match="scale must be a finite number"):
        LowRankDelta(A, B, float("nan"))
    with pytest.raises(DeltaError, match="scale must be a number"):
        LowRankDelta(A, B, "x")
    with pytest.raises(DeltaError, match="scale must be finite"):
        LowRankDelta(A, B, torch.tensor(float("inf")))
    with pytest.raises(DeltaError, match="A of a low-rank delta must be a torch.Tensor, got list"):
        LowRankDelta([[0.0] * 64] * 2, B)
    with pytest.raises(DeltaError, match="layer index must be an integer"):
        find_targets(model, "q_proj", layers=["0"])
    with pytest.raises(DeltaError, match="layers must be a list"):
        find_targets(model, "q_proj", layers=0)
    with pytest.raises(DeltaError, match="unknown backend 'bogus'"):
        DeltaInjector(model, backend="bogus")
    injector = DeltaInjector(model)
    with pytest.raises(DeltaError, match="stop must be > start"):
        with injector.window(2, 1):
            pass
    with pytest.raises(DeltaError, match="window start must be an integer"):
        with injector.window(0.5, 1):
            pass
