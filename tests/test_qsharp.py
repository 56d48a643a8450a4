"""Q♯ guide: offsets against the spec's formulas, generate against brute-force loops, KL against full-vocab sums."""

import math

import pytest
import torch
from transformers import LogitsProcessor

from guidedecode.errors import GuideError
from guidedecode.guides.qsharp import QSharpGuide, qsharp_offsets
from guidedecode.backends.hf import left_pad as pad_rows
from guidedecode.testing import brute_value, random_value_model, tiny_model, tiny_tokenizer
from guidedecode.value_model import ValueModel

EOS = PAD = 1  # tiny models


# ---------------------------------------------------------------------------------------------- helpers
def left_pad(prompts):
    return pad_rows(prompts, PAD)


def strip(row, width, eos):
    out = row[width:].tolist()
    for i, token in enumerate(out):
        if token in eos:
            return out[: i + 1]
    return out


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def offset_formula(z, mode, eta, atoms=None):
    """Spec §4, written directly in float64 per candidate (z: list of floats, or of atom-logit lists)."""
    if mode == "bernoulli":
        return [math.log(1 - sigmoid(v) + sigmoid(v) * math.exp(eta)) for v in z]
    if mode == "cd":
        return [eta * sigmoid(v) for v in z]
    if mode in ("expectation", "fudge"):
        return [math.log(sigmoid(v)) for v in z]
    levels = []
    for logits in z:  # mle
        top = max(logits)
        pmf = [math.exp(x - top) for x in logits]
        total = sum(pmf)
        levels.append(math.log(sum(p / total * math.exp(eta * a) for p, a in zip(pmf, atoms))))
    return [level - min(levels) for level in levels]


def brute_offsets(vm, prefix, logits, k, eta, mode):
    """{token: offset} of the guide for one row, from the raw logits and a full recompute of the value model."""
    if eta == 0:
        return {}
    cands = logits.float().topk(k).indices.tolist()
    z = brute_value(vm, prefix, cands).double()
    if mode == "mle":
        atoms = torch.linspace(vm.config.v_min, vm.config.v_max, vm.config.num_atoms).tolist()
        o = offset_formula(z.tolist(), mode, eta, atoms)
    else:
        o = offset_formula(z[:, 0].tolist(), mode, eta)
    return dict(zip(cands, o))


@torch.no_grad()
def brute_greedy(ref, vm, prompt, eta, mode, k, steps, eos):
    ids = list(prompt)
    for _ in range(steps):
        logits = ref(torch.tensor([ids])).logits[0, -1].double()
        for token, o in brute_offsets(vm, ids, logits, k, eta, mode).items():
            logits[token] += o
        ids.append(int(logits.argmax()))
        if ids[-1] in eos:
            break
    return ids[len(prompt):]


def top_p_probs(logits, top_p):
    """Nucleus of softmax(logits): the fewest most-likely tokens whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.double(), -1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]  # mass of strictly more likely tokens
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[before < top_p]] = True
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def kl(p, q):
    mask = p > 0
    return float((p[mask] * (p[mask].log() - q[mask].log())).sum())


class Recorder(LogitsProcessor):
    """Records the scores it is given (a real processor in the same list as the guide)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append((input_ids.clone(), scores.clone()))
        return scores


class CountCalls:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_pre_hook(lambda *_: setattr(self, "calls", self.calls + 1))


# ---------------------------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("mode", ["bernoulli", "cd", "expectation", "mle", "fudge"])
def test_offsets_equal_spec_formulas(mode):
    gen = torch.Generator().manual_seed(3)
    B, k, A = 3, 7, 5
    z = torch.randn(B, k, A if mode == "mle" else 1, generator=gen) * 4
    eta = torch.tensor([0.5, 3.0, 11.0])
    atoms = torch.linspace(-0.5, 2.0, A) if mode == "mle" else None
    got = qsharp_offsets(z if mode == "mle" else z[..., 0], mode, eta, atoms=atoms)
    assert got.shape == (B, k) and got.dtype == torch.float32
    for row in range(B):
        zs = z[row].double().tolist() if mode == "mle" else z[row, :, 0].double().tolist()
        expected = offset_formula(zs, mode, float(eta[row]), atoms.tolist() if atoms is not None else None)
        torch.testing.assert_close(got[row].double(), torch.tensor(expected, dtype=torch.float64),
                                   atol=1e-5, rtol=1e-5)
    if mode == "mle":
        assert torch.equal(got.min(-1).values, torch.zeros(B)) and bool((got >= 0).all())
    scalar = qsharp_offsets(z if mode == "mle" else z[..., 0], mode, 3.0, atoms=atoms)
    torch.testing.assert_close(scalar[1], got[1])


def test_bernoulli_range_and_reference_parity():
    z = torch.linspace(-50, 50, 1001).repeat(41, 1)
    eta = torch.linspace(0, 100, 41)
    o = qsharp_offsets(z, "bernoulli", eta)
    assert bool(torch.isfinite(o).all())
    assert bool((o >= 0).all()) and bool((o <= eta[:, None]).all())
    p = torch.sigmoid(z)
    reference = torch.logaddexp(torch.log(p) + eta[:, None], torch.log1p(-p))  # the reference repo's form
    finite = torch.isfinite(reference)  # log1p(-p) is -inf at p = 1 in fp32
    assert finite.float().mean() > 0.5
    assert (o - reference)[finite].abs().max() < 1e-4


def test_eta_zero_offsets_are_exactly_zero():
    z = torch.randn(4, 9) * 30
    for mode in ("bernoulli", "cd"):
        assert torch.equal(qsharp_offsets(z, mode, 0.0), torch.zeros(4, 9))
        assert torch.equal(qsharp_offsets(z, mode, torch.zeros(4)), torch.zeros(4, 9))


# ---------------------------------------------------------------------------------------------- generate
def test_eta_zero_reproduces_plain_sampling_without_running_the_value_model():
    ref = tiny_model("llama", seed=0)
    vm = random_value_model()
    counter = CountCalls(vm.backbone)
    ids, mask = left_pad([[5, 9, 33, 2, 8], [40, 3]])
    kwargs = dict(attention_mask=mask, do_sample=True, temperature=0.7, top_p=0.8, top_k=0, max_new_tokens=8,
                  pad_token_id=PAD, num_return_sequences=2)
    torch.manual_seed(11)
    plain = ref.generate(ids, **kwargs)
    guide = QSharpGuide(vm, eta=0.0, top_k=7, eos_token_id=EOS, pad_token_id=PAD, temperature=0.7, top_p=0.8)
    torch.manual_seed(11)
    guided = ref.generate(ids, logits_processor=[guide], **kwargs)
    assert torch.equal(plain, guided)
    assert counter.calls == 0
    kls = guide.sequence_kl()
    assert torch.equal(kls["kl"], torch.zeros(4))
    assert bool((kls["kl_sample"] > 0).all())  # -log(nucleus mass) > 0 per token (spec §8)


GREEDY_CASES = [
    ("llama", "llama", "v", "bce", None, "bernoulli"),
    ("llama", "llama", "q", "bce", None, "bernoulli"),
    ("llama", "qwen2", "v", "mle", 3, "mle"),
    ("gpt2", "gpt2", "v", "bce", None, "bernoulli"),
    ("gpt2", "gpt2", "q", "mle", 5, "mle"),
    ("llama", "mistral", "v", "bce", None, "bernoulli"),  # sliding-window cache: the scratch-copy candidate pass
    ("qwen2", "llama", "q", "mse", None, "cd"),
    ("llama", "llama", "v", "bce", None, "expectation"),  # log sigmoid(z) != 0 at eta = 0: row 1 must stay unguided
]


@pytest.mark.parametrize("ref_arch,vm_arch,head,loss,atoms,mode", GREEDY_CASES)
def test_greedy_generate_equals_brute_force(ref_arch, vm_arch, head, loss, atoms, mode):
    """Left-padded batch, per-row eta (one row unguided), one row that finishes early: greedy generate with
    the guide = a loop that recomputes the reference and every candidate's value from scratch each step."""
    ref = tiny_model(ref_arch, seed=0)
    vm = random_value_model(vm_arch, head, loss, atoms)
    prompts = [[5, 9, 33, 2, 8], [40, 3], [11, 12, 13]]
    etas = [4.0, 0.0, 10.0]
    k, steps = 7, 6
    free = [brute_greedy(ref, vm, p, e, mode, k, steps, {EOS}) for p, e in zip(prompts, etas)]
    # a token some row emits for the first time at step cut (0 < cut < steps - 1) becomes an extra EOS:
    # that row finishes early
    row, cut = next((r, i) for r in (0, 2, 1) for i in range(1, steps - 1) if free[r][i] not in free[r][:i])
    eos = {EOS, free[row][cut]}
    expected = [brute_greedy(ref, vm, p, e, mode, k, steps, eos) for p, e in zip(prompts, etas)]
    assert len(expected[row]) == cut + 1
    unguided = brute_greedy(ref, vm, prompts[2], 0.0, mode, k, steps, eos)
    assert expected[2] != unguided  # the guidance changes the greedy path (the test can fail)
    guide = QSharpGuide(vm, eta=etas, mode=mode, top_k=k, eos_token_id=sorted(eos), pad_token_id=PAD)
    ids, mask = left_pad(prompts)
    out = ref.generate(ids, attention_mask=mask, logits_processor=[guide], do_sample=False, max_new_tokens=steps,
                       pad_token_id=PAD, eos_token_id=sorted(eos))
    assert [strip(row, ids.shape[1], eos) for row in out] == expected


def test_sampling_with_return_sequences_scores_and_kl_equal_brute_force():
    """num_return_sequences=2 sampling at T=0.7, top_p=0.8, composed with other processors: the scores after the
    guide are l + o (o from a full recompute), HF's final scores are TopP(softmax((l + o)/T)) (the guide runs
    before the warpers), finished rows are left alone, and sequence_kl equals full-vocabulary sums."""
    T, top_p, k = 0.7, 0.8, 7
    ref = tiny_model("llama", seed=0)
    vm = random_value_model("llama", "q", seed=8)
    prompts = [[5, 9, 33, 2, 8], [40, 3]]
    etas = [6.0, 2.0]  # one per prompt, repeated over its return sequences
    ids, mask = left_pad(prompts)
    width = ids.shape[1]
    before, after = Recorder(), Recorder()
    stop_token = 77
    guide = QSharpGuide(vm, eta=etas, top_k=k, eos_token_id=[EOS, stop_token], pad_token_id=PAD, temperature=T,
                        top_p=top_p)

    class ForceStop(LogitsProcessor):  # row 1 emits a stop token at its 3rd step: it finishes early
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - width == 2:
                scores[1, stop_token] = 1e4
            return scores

    torch.manual_seed(5)
    out = ref.generate(ids, attention_mask=mask, logits_processor=[ForceStop(), before, guide, after],
                       do_sample=True, temperature=T, top_p=top_p, top_k=0, max_new_tokens=6, pad_token_id=PAD,
                       eos_token_id=[EOS, stop_token], num_return_sequences=2, output_scores=True,
                       return_dict_in_generate=True)
    sequences = out.sequences
    assert sequences.shape[0] == 4
    row_prompts = [prompts[0], prompts[0], prompts[1], prompts[1]]
    row_etas = [6.0, 6.0, 2.0, 2.0]
    total_kl, total_sample = [0.0] * 4, [0.0] * 4
    checked = 0
    for step, ((_, l), (_, g), final) in enumerate(zip(before.seen, after.seen, out.scores)):
        for row in range(4):
            generated = sequences[row, width:width + step].tolist()
            if EOS in generated or stop_token in generated:  # finished: the guide leaves the row alone
                assert torch.equal(g[row], l[row])
                continue
            prefix = row_prompts[row] + generated
            expected = l[row].double().clone()
            for token, o in brute_offsets(vm, prefix, l[row], k, row_etas[row], "bernoulli").items():
                expected[token] += o
            torch.testing.assert_close(g[row].double(), expected, atol=1e-4, rtol=1e-5)
            guided = top_p_probs(expected / T, top_p)
            torch.testing.assert_close(torch.softmax(final[row].double(), -1), guided, atol=1e-5, rtol=1e-4)
            reference = torch.softmax(l[row].double() / T, -1)
            total_kl[row] += kl(torch.softmax(expected / T, -1), reference)
            total_sample[row] += kl(guided, reference)
            checked += 1
    assert checked > 15 and sequences[1, width + 2] == stop_token
    kls = guide.sequence_kl()
    torch.testing.assert_close(kls["kl"].double(), torch.tensor(total_kl, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kls["kl_sample"].double(), torch.tensor(total_sample, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert bool((kls["kl_sample"] > kls["kl"]).all())


@pytest.mark.parametrize("mode", ["bernoulli", "fudge"])
def test_masked_tail_scores_and_kl_equal_brute_force(mode):
    """tail="mask" (and fudge, which implies it): the guided row is l + o on the top-k and -inf elsewhere,
    HF samples TopP(softmax(./T)) of it, and the KLs equal full-vocabulary sums against the unmasked
    reference; the eta = 0 row is left bit-exact."""
    T, top_p, k = 0.8, 0.9, 6
    ref = tiny_model("qwen2", seed=0)
    vm = random_value_model("llama", "v", seed=9)
    prompts = [[5, 9, 33, 2, 8], [40, 3]]
    ids, mask = left_pad(prompts)
    width = ids.shape[1]
    before, after = Recorder(), Recorder()
    tail = None if mode == "fudge" else "mask"
    guide = QSharpGuide(vm, eta=[5.0, 0.0], mode=mode, tail=tail, top_k=k, eos_token_id=EOS, pad_token_id=PAD,
                        temperature=T, top_p=top_p)
    torch.manual_seed(2)
    out = ref.generate(ids, attention_mask=mask, logits_processor=[before, guide, after], do_sample=True,
                       temperature=T, top_p=top_p, top_k=0, max_new_tokens=5, pad_token_id=PAD, eos_token_id=EOS,
                       output_scores=True, return_dict_in_generate=True)
    total_kl, total_sample = [0.0, 0.0], [0.0, 0.0]
    for step, ((_, l), (_, g), final) in enumerate(zip(before.seen, after.seen, out.scores)):
        for row in range(2):
            if EOS in out.sequences[row, width:width + step].tolist():
                continue
            if row == 1:
                assert torch.equal(g[row], l[row])
            else:
                prefix = prompts[row] + out.sequences[row, width:width + step].tolist()
                expected = torch.full_like(l[row], float("-inf"), dtype=torch.float64)
                for token, o in brute_offsets(vm, prefix, l[row], k, 5.0, mode).items():
                    expected[token] = l[row, token].double() + o
                assert int(torch.isfinite(g[row]).sum()) == k
                torch.testing.assert_close(g[row].double(), expected, atol=1e-4, rtol=1e-5)
            guided_logits = g[row].double()
            sampled = top_p_probs(guided_logits / T, top_p)
            torch.testing.assert_close(torch.softmax(final[row].double(), -1), sampled, atol=1e-5, rtol=1e-4)
            reference = torch.softmax(l[row].double() / T, -1)
            if row == 0:  # the eta = 0 row's KL before top-p is 0
                total_kl[row] += kl(torch.softmax(guided_logits / T, -1), reference)
            total_sample[row] += kl(sampled, reference)
    kls = guide.sequence_kl()
    torch.testing.assert_close(kls["kl"].double(), torch.tensor(total_kl, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kls["kl_sample"].double(), torch.tensor(total_sample, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)
    assert float(kls["kl"][0]) > 0.5  # masking the tail costs -log π_ref(C) at every step


def test_beam_search_rows_keep_their_own_value_state():
    """Beam search reorders rows between steps: every row's offsets still come from its own prefix."""
    ref = tiny_model("llama", seed=0)
    vm = random_value_model("llama", "v", seed=6)
    prompts = [[5, 9, 33, 2, 8], [40, 3]]
    ids, mask = left_pad(prompts)
    width, beams, k = ids.shape[1], 3, 5
    before, after = Recorder(), Recorder()
    guide = QSharpGuide(vm, eta=3.0, top_k=k, eos_token_id=EOS, pad_token_id=PAD)
    ref.generate(ids, attention_mask=mask, logits_processor=[before, guide, after], do_sample=False,
                 num_beams=beams, max_new_tokens=5, pad_token_id=PAD)
    reordered = 0
    for step, ((input_ids, l), (_, g)) in enumerate(zip(before.seen, after.seen)):
        if step > 0:
            reordered += int(not torch.equal(input_ids[:, :-1], before.seen[step - 1][0]))
        for row in range(input_ids.shape[0]):
            prefix = prompts[row // beams] + input_ids[row, width:].tolist()
            expected = l[row].double().clone()
            for token, o in brute_offsets(vm, prefix, l[row], k, 3.0, "bernoulli").items():
                expected[token] += o
            torch.testing.assert_close(g[row].double(), expected, atol=1e-4, rtol=1e-5)
    assert reordered > 0  # the beams did get reordered, so select_state was exercised


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_gets_clear_errors():
    vm = random_value_model()
    with pytest.raises(GuideError, match="must be finite and >= 0"):
        QSharpGuide(vm, eta=-1.0)
    with pytest.raises(GuideError, match="must be finite and >= 0"):
        QSharpGuide(vm, eta=[1.0, -0.5])
    with pytest.raises(GuideError, match="not both"):
        QSharpGuide(vm, eta=10.0, kl_coef=0.1)
    assert QSharpGuide(vm, kl_coef=0.25).eta == 4.0
    with pytest.raises(GuideError, match="unknown Q# mode"):
        QSharpGuide(vm, mode="fudge2")
    with pytest.raises(GuideError, match="unknown Q# mode"):
        qsharp_offsets(torch.zeros(2, 3), "fudge2")
    with pytest.raises(GuideError, match="does not fit"):
        QSharpGuide(vm, mode="mle")
    with pytest.raises(GuideError, match="unknown tail 'drop'"):
        QSharpGuide(vm, tail="drop")
    with pytest.raises(GuideError, match="fudge' drops the tokens outside"):
        QSharpGuide(vm, mode="fudge", tail="zero")
    assert QSharpGuide(vm, mode="fudge").tail == "mask" and QSharpGuide(vm).tail == "zero"
    for k in (0, -2, 513):
        with pytest.raises(GuideError, match="top_k"):
            QSharpGuide(vm, top_k=k)
    with pytest.raises(GuideError, match="top_p"):
        QSharpGuide(vm, top_p=0.0)
    with pytest.raises(GuideError, match="ValueModel"):
        QSharpGuide(tiny_model("llama"))

    ref = tiny_model("llama", seed=0)
    ids = torch.tensor([[5, 9, 33], [4, 6, 8]])
    guide = QSharpGuide(vm, eta=[1.0, 2.0, 3.0], top_k=5, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(GuideError, match="eta has 3 values but generate runs 2 rows"):
        ref.generate(ids, logits_processor=[guide], do_sample=False, max_new_tokens=2, pad_token_id=PAD)

    with torch.no_grad():
        vm.head.weight[0, 0] = float("nan")
    guide = QSharpGuide(vm, top_k=5, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(GuideError, match="value model produced NaN"):
        ref.generate(ids, logits_processor=[guide], do_sample=False, max_new_tokens=2, pad_token_id=PAD)

    small = ValueModel.from_backbone(tiny_model("llama", seed=1, vocab_size=300), tokenizer=tiny_tokenizer(300))
    guide = QSharpGuide(small, top_k=5, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(GuideError, match="value model knows only 300"):
        ref.generate(ids, logits_processor=[guide], do_sample=False, max_new_tokens=2, pad_token_id=PAD)
    with pytest.raises(GuideError, match="sequence_kl"):
        QSharpGuide(vm).sequence_kl()


# ---------------------------------------------------------------------------------------------- settings from generate
def brute_kls(before, after, sequences, width, eos, T, top_p):
    """Per-row Σ KL(softmax(g/T) || softmax(l/T)) and Σ KL(TopP(softmax(g/T)) || softmax(l/T)) over the steps
    at which a row is alive (not yet past one of ``eos``), from the recorded scores around the guide."""
    rows = sequences.shape[0]
    total, sampled = [0.0] * rows, [0.0] * rows
    for step, ((_, l), (_, g)) in enumerate(zip(before.seen, after.seen)):
        for row in range(rows):
            if set(sequences[row, width:width + step].tolist()) & set(eos):
                continue
            reference = torch.softmax(l[row].double() / T, -1)
            total[row] += kl(torch.softmax(g[row].double() / T, -1), reference)
            sampled[row] += kl(top_p_probs(g[row].double() / T, top_p), reference)
    return torch.tensor(total, dtype=torch.float64), torch.tensor(sampled, dtype=torch.float64)


def test_rows_finish_on_every_eos_id_generate_stops_on():
    """Issue 8.1: the guide was given only the tokenizer's EOS (as the registry did) while generate stops on a
    second EOS id too: the row that stops on it must stop being guided and adding KL (before: it kept feeding
    pad tokens to the value model and its KL kept growing)."""
    T, top_p, k, stop_token = 0.7, 0.8, 7, 77
    ref = tiny_model("llama", seed=0)
    vm = random_value_model("llama", "q", seed=8)
    ids, mask = left_pad([[5, 9, 33, 2, 8], [40, 3]])
    width = ids.shape[1]

    class ForceStop(LogitsProcessor):  # row 1 emits the second EOS id at its 2nd step
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] - width == 1:
                scores[1, stop_token] = 1e4
            return scores

    before, after = Recorder(), Recorder()
    guide = QSharpGuide(vm, eta=6.0, top_k=k, eos_token_id=EOS, pad_token_id=PAD, temperature=T, top_p=top_p)
    torch.manual_seed(5)
    out = ref.generate(ids, attention_mask=mask, logits_processor=[ForceStop(), before, guide, after], do_sample=True,
                       temperature=T, top_p=top_p, top_k=0, max_new_tokens=6, pad_token_id=PAD,
                       eos_token_id=[EOS, stop_token])
    assert out[1, width + 1] == stop_token and out.shape[1] == width + 6  # row 0 ran on, row 1 stopped
    kl_before, kl_sample = brute_kls(before, after, out, width, [EOS, stop_token], T, top_p)
    got = guide.sequence_kl()
    torch.testing.assert_close(got["kl"].double(), kl_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["kl_sample"].double(), kl_sample, atol=1e-5, rtol=1e-5)


def test_kl_uses_the_sampling_settings_generate_applies():
    """Issue 8.2: a guide given no temperature/top-p accounts with the ones generate applies (before: T = 1,
    top-p 1 while generate sampled at 0.7 / 0.8); scores and KL equal the brute force at generate's settings."""
    T, top_p, k = 0.7, 0.8, 7
    ref = tiny_model("llama", seed=0)
    vm = random_value_model("llama", "v", seed=8)
    ids, mask = left_pad([[5, 9, 33, 2, 8], [40, 3]])
    width = ids.shape[1]
    before, after = Recorder(), Recorder()
    guide = QSharpGuide(vm, eta=4.0, top_k=k, pad_token_id=PAD)
    torch.manual_seed(3)
    out = ref.generate(ids, attention_mask=mask, logits_processor=[before, guide, after], do_sample=True,
                       temperature=T, top_p=top_p, top_k=0, max_new_tokens=5, pad_token_id=PAD, eos_token_id=EOS)
    assert (guide.temperature, guide.top_p) == (T, top_p)
    kl_before, kl_sample = brute_kls(before, after, out, width, [EOS], T, top_p)
    got = guide.sequence_kl()
    torch.testing.assert_close(got["kl"].double(), kl_before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["kl_sample"].double(), kl_sample, atol=1e-5, rtol=1e-5)
    # the same guide in a greedy call: no warpers, so T = 1 and no nucleus
    ref.generate(ids, attention_mask=mask, logits_processor=[guide], do_sample=False, max_new_tokens=2,
                 pad_token_id=PAD)
    assert (guide.temperature, guide.top_p) == (1.0, 1.0)


def test_sampling_settings_that_differ_from_generate_are_refused():
    """Issue 8.2: omitting top_k=0 (HF's default top-50 truncates after the guide), a guide temperature or
    top-p other than generate's, or another transformers warper after the guide: a clear error, not a KL
    computed for a distribution that was not sampled."""
    ref = tiny_model("llama", seed=0)
    vm = random_value_model()
    ids, mask = left_pad([[5, 9, 33, 2, 8], [40, 3]])
    common = dict(attention_mask=mask, do_sample=True, max_new_tokens=2, pad_token_id=PAD)

    def run(guide, **kwargs):
        return ref.generate(ids, logits_processor=[guide], **{**common, **kwargs})

    with pytest.raises(GuideError, match="top_k=50: pass top_k=0"):
        run(QSharpGuide(vm, pad_token_id=PAD, temperature=0.8, top_p=0.9), temperature=0.8, top_p=0.9)
    with pytest.raises(GuideError, match="given temperature=0.5 but generate applies temperature=0.8"):
        run(QSharpGuide(vm, pad_token_id=PAD, temperature=0.5), temperature=0.8, top_k=0)
    with pytest.raises(GuideError, match="given top_p=0.9 but generate applies top_p=1.0"):
        run(QSharpGuide(vm, pad_token_id=PAD, temperature=0.8, top_p=0.9), temperature=0.8, top_k=0)
    with pytest.raises(GuideError, match="MinPLogitsWarper"):
        run(QSharpGuide(vm, pad_token_id=PAD), top_k=0, min_p=0.1)
    guide = QSharpGuide(vm, pad_token_id=PAD, temperature=0.8, top_p=0.9)  # the same settings: accepted
    run(guide, temperature=0.8, top_p=0.9, top_k=0)
    assert guide.sequence_kl()["kl_sample"].shape == (2,)


def test_left_padded_prompts_are_masked_with_the_pad_id_generate_uses():
    """Issue 8.3: a guide given no pad id (nor a tokenizer) in a left-padded generate takes generate's pad id:
    the first step's offsets equal the brute force on the unpadded prompts (before: pads were fed to the
    value model). Outside generate, differing prompts with no pad id known are refused."""
    ref = tiny_model("llama", seed=0)
    vm = random_value_model("llama", "v", seed=6)
    prompts = [[5, 9, 33, 2, 8], [40, 3]]
    ids, mask = left_pad(prompts)
    k = 5
    before, after = Recorder(), Recorder()
    guide = QSharpGuide(vm, eta=3.0, top_k=k)
    ref.generate(ids, attention_mask=mask, logits_processor=[before, guide, after], do_sample=False,
                 max_new_tokens=1, pad_token_id=PAD, eos_token_id=EOS)
    (_, l), (_, g) = before.seen[0], after.seen[0]
    for row, prompt in enumerate(prompts):
        expected = l[row].double().clone()
        for token, o in brute_offsets(vm, prompt, l[row], k, 3.0, "bernoulli").items():
            expected[token] += o
        torch.testing.assert_close(g[row].double(), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(GuideError, match="knows no pad token id"):
        QSharpGuide(vm, eta=3.0, top_k=k)(ids, torch.randn(2, 512))
    QSharpGuide(vm, eta=3.0, top_k=k)(ids[:1].repeat(2, 1), torch.randn(2, 512))  # identical rows: no padding
    assert QSharpGuide(vm, tokenizer=tiny_tokenizer()).pad_token_id == 1  # the tokenizer's pad id


def test_registry_guides_get_the_eos_ids_of_the_backend(tmp_path):
    """Issue 8.1, one source: guides built by name (``guidedecode eval`` / ``generate``) get the model's
    generation-config EOS ids plus the tokenizer's, the set HFBackend stops on (before: the tokenizer's only)."""
    from guidedecode.backends import HFBackend
    from guidedecode.registry import build_guide

    ref, tokenizer = tiny_model("llama", seed=0), tiny_tokenizer()
    ref.generation_config.eos_token_id = [EOS, 77]
    random_value_model().save_pretrained(tmp_path / "vm")
    qsharp = build_guide("qsharp", tokenizer, {"value_model": str(tmp_path / "vm")}, context={"model": ref})
    penalty = build_guide("presence-penalty", tokenizer, {"alpha": "1.0"}, context={"model": ref})
    backend = HFBackend(ref, tokenizer)
    assert backend.eos_token_ids == (EOS, 77)
    assert qsharp.eos_token_ids == penalty.eos_token_ids == backend.eos_token_ids
    assert qsharp.pad_token_id == penalty.pad_token_id == backend.pad_token_id == PAD
