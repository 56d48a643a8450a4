"""Fused Q♯ guidance kernel (guidedecode.kernels.guidance) vs its torch reference.

On a CPU-only machine the Triton kernels run under ``TRITON_INTERPRET=1``. Triton reads that variable when
*triton itself* is first imported (its @jit standard library, ``tl.sum``/``tl.max``, is decorated then), so
it is set here before anything in this module imports triton; the kernel module imports triton lazily.
If another test module imported triton earlier in the same pytest process (the flag then comes too late),
the in-process kernel tests are skipped and ``test_suite_in_fresh_process`` re-runs this file in a fresh
interpreter with the flag set. On a CUDA machine the same parity tests run compiled on the GPU (the flag is
not forced there, so other modules' GPU tests stay compiled), plus the production-shape test.
"""

from __future__ import annotations

import os
import sys

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from guidedecode.kernels import guidance as G  # noqa: E402

_INTERPRET = G.interpreter_enabled()
if _INTERPRET:
    DEVICE = "cpu"
    IN_PROCESS = G._HAS_TRITON and G.triton_stdlib_interpreted()
else:
    DEVICE = "cuda" if _HAS_CUDA else "cpu"
    IN_PROCESS = _HAS_CUDA and G._HAS_TRITON

needs_kernels = pytest.mark.skipif(
    not IN_PROCESS,
    reason="no GPU and triton was imported before TRITON_INTERPRET=1 could be set in this process; "
           "test_suite_in_fresh_process runs these tests in a fresh interpreter",
)

REPO = Path(__file__).resolve().parents[1]
NEG_INF = float("-inf")
ATOL = 1e-5  # fused vs reference, fp32 math (bf16 inputs: the same fp32 math on upcast values)


# ------------------------------------------------------------------------------------------------ helpers


def make_case(B, V, K, dtype, *, seed=0, masked=True, off_scale=2.0):
    """Raw logits x [B, V] (row 1 partially masked, row 2 fully masked when B >= 3) and offsets:
    dense [B, V] when K is None, else sparse on the top-K raw-logit candidates (as Q♯ does)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 4.0
    if masked and B >= 3:
        x[1, ::3] = NEG_INF
        x[1, 7:40] = NEG_INF
        x[2] = NEG_INF
    x = x.to(dtype)
    if K is None:
        off = (torch.randn(B, V, generator=g) * off_scale).to(dtype)
        idx = None
    else:
        idx = torch.topk(x.float(), K, dim=-1).indices
        off = torch.randn(B, K, generator=g) * off_scale
    return x.to(DEVICE), off.to(DEVICE), (idx.to(DEVICE) if idx is not None else None)


def assert_close(actual, expected, atol=ATOL, what=""):
    assert actual is not None and expected is not None, what
    assert not torch.isnan(actual).any(), f"{what}: NaN in fused output {actual}"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_out_close(f, r, atol=ATOL, top_p=False):
    assert_close(f.lse_p, r.lse_p, atol, "lse_p")
    assert_close(f.lse_q, r.lse_q, atol, "lse_q")
    assert_close(f.kl, r.kl, atol, "kl")
    assert (f.kl >= 0).all()
    if top_p:
        assert_close(f.kl_top_p, r.kl_top_p, atol, "kl_top_p")


def explicit_kl64(x, off, idx=None, T=1.0, keep=None):
    """Σ_v a_v (log a_v - log p_v) in float64, a = softmax(z/T) restricted to `keep` (None: all), p = softmax(x/T)."""
    o = G.dense_offsets(x, off, idx).double()
    xd = x.double()
    yp, yq = xd / T, (xd + o) / T
    if keep is not None:
        yq = yq.masked_fill(~keep, NEG_INF)
    logp, loga = torch.log_softmax(yp, -1), torch.log_softmax(yq, -1)
    a = loga.exp()
    kl = torch.where(a > 0, a * (loga - logp), torch.zeros((), dtype=a.dtype, device=a.device)).sum(-1)
    return torch.nan_to_num(kl, nan=0.0)


# ------------------------------------------------------------------------------- parity with the reference

CASES = [
    # (B, V, K or None=dense, dtype)
    (3, 4099, 20, torch.float32),
    (3, 4099, None, torch.float32),
    (1, 3001, None, torch.float32),
    (1, 3001, 20, torch.bfloat16),
    (5, 1000, None, torch.bfloat16),
    (5, 1000, 20, torch.float32),
    (5, 1000, None, torch.float32),
]


def _case_id(c):
    B, V, K, dt = c
    return f"B{B}-V{V}-{'dense' if K is None else f'K{K}'}-{str(dt).split('.')[-1]}"


@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fused_matches_reference(case):
    B, V, K, dtype = case
    x, off, idx = make_case(B, V, K, dtype, seed=B * 7 + V)
    r = G.guidance_reference(x, off, idx=idx)
    f = G.fused_guidance(x, off, idx=idx)
    assert_out_close(f, r)
    assert f.logits is None and f.kl_top_p is None
    if B >= 3:  # fully masked row: -inf lse, zero KL, no NaN
        assert f.lse_p[2] == NEG_INF and f.lse_q[2] == NEG_INF and f.kl[2] == 0


@needs_kernels
@pytest.mark.parametrize("T", [0.8, 1.7])
def test_fused_matches_reference_tempered(T):
    x, off, idx = make_case(3, 4099, 20, torch.float32, seed=11, off_scale=4.0)
    assert_out_close(G.fused_guidance(x, off, idx=idx, temperature=T), G.guidance_reference(x, off, idx=idx,
                                                                                            temperature=T))
    temps = torch.tensor([0.5, 1.0, 2.0])
    assert_out_close(G.fused_guidance(x, off, idx=idx, temperature=temps),
                     G.guidance_reference(x, off, idx=idx, temperature=temps))


@needs_kernels
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_split_vocabulary_equals_single_pass(sparse):
    x, off, idx = make_case(3, 4099, 20 if sparse else None, torch.float32, seed=3)
    one = G.fused_guidance(x, off, idx=idx, num_chunks=1)
    for C in (2, 3, 8):
        split = G.fused_guidance(x, off, idx=idx, num_chunks=C)
        assert_out_close(split, one)  # same math, different summation order: a few fp32 ulps
    # chunks smaller than a tile and not multiples of it
    xs, offs, idxs = make_case(5, 1000, 20 if sparse else None, torch.float32, seed=4)
    assert_out_close(G.fused_guidance(xs, offs, idx=idxs, num_chunks=7), G.guidance_reference(xs, offs, idx=idxs))


# --------------------------------------------------------------------------------------------- closed form


@needs_kernels
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_closed_form_kl_equals_explicit_sum(sparse):
    x, off, idx = make_case(3, 4099, 20 if sparse else None, torch.float32, seed=5)
    f = G.fused_guidance(x, off, idx=idx)
    r = G.guidance_reference(x, off, idx=idx)
    kl64 = explicit_kl64(x, off, idx)
    assert_close(f.kl, kl64.float(), ATOL, "fused closed-form KL vs float64 explicit sum")
    assert_close(r.kl, kl64.float(), ATOL, "reference KL vs float64 explicit sum")


@needs_kernels
def test_negative_offsets_on_dominant_candidates_no_cancellation():
    """Candidates hold ~all of p's mass and get large negative offsets (``expectation``/``fudge`` modes): the
    guided normaliser is then dominated by the tail, which a `Z_p - Σ_C e^x` subtraction would lose."""
    g = torch.Generator().manual_seed(6)
    B, V, K = 2, 3001, 20
    x = torch.randn(B, V, generator=g)
    x[:, :K] += 22.0  # top-20 hold 1 - 1e-6 of the mass
    idx = torch.arange(K).repeat(B, 1)
    off = torch.full((B, K), -30.0)
    x, idx, off = x.to(DEVICE), idx.to(DEVICE), off.to(DEVICE)
    f = G.fused_guidance(x, off, idx=idx)
    o = G.dense_offsets(x, off, idx).double()
    lse_q64 = torch.logsumexp(x.double() + o, -1)
    assert_close(f.lse_q, lse_q64.float(), ATOL, "lse_q")
    assert_close(f.kl, explicit_kl64(x, off, idx).float(), ATOL, "kl")


@needs_kernels
def test_spec_normaliser_identity():
    """qsharp.md §10.5: Z_g/Z_ref = 1 + Σ_{v∈C} p_ref,v (e^{o_v/T} - 1) for non-negative (bernoulli) offsets."""
    x, _, idx = make_case(3, 1000, 20, torch.float32, seed=8, masked=False)
    off = torch.rand(idx.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE) * 10.0
    T = 0.8
    f = G.fused_guidance(x, off, idx=idx, temperature=T)
    p_ref = torch.softmax(x.double() / T, -1).gather(1, idx)
    ratio = 1 + (p_ref * torch.expm1(off.double() / T)).sum(-1)
    assert_close(f.lse_q - f.lse_p, torch.log(ratio).float(), ATOL, "log Z_g/Z_ref")


# --------------------------------------------------------------------------------------------------- top-p

TOP_P_CASES = [
    # (B, V, K or None, dtype, top_p, T)
    (3, 4099, 20, torch.float32, 0.9, 0.8),
    (5, 1000, None, torch.bfloat16, 0.5, 1.0),
    (1, 3001, None, torch.float32, 0.99, 0.7),
    (5, 1000, 20, torch.float32, "rows", 0.8),
]


@needs_kernels
@pytest.mark.parametrize("case", TOP_P_CASES, ids=lambda c: f"B{c[0]}-V{c[1]}-{c[2]}-{str(c[3])[6:]}-p{c[4]}")
def test_top_p_kl_matches_reference(case):
    B, V, K, dtype, top_p, T = case
    x, off, idx = make_case(B, V, K, dtype, seed=B + V, off_scale=3.0)
    if top_p == "rows":
        top_p = torch.tensor([0.9, 0.3, 1.0, 0.05, 0.999])[:B]
    r = G.guidance_reference(x, off, idx=idx, temperature=T, top_p=top_p)
    f = G.fused_guidance(x, off, idx=idx, temperature=T, top_p=top_p, num_chunks=2)
    assert_out_close(f, r, top_p=True)
    if B >= 3:
        assert f.kl_top_p[2] == 0


@needs_kernels
def test_top_p_semantics_follow_hf_warpers():
    """The nucleus is HF's (TemperatureLogitsWarper then TopPLogitsWarper on the guided logits) and the
    reported KL(π_sample || softmax(x/T)) equals the explicit float64 sum over HF's processed scores."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    T, top_p = 0.8, 0.9
    x, off, idx = make_case(3, 4099, 20, torch.float32, seed=12, masked=False, off_scale=3.0)
    z = G.dense_offsets(x, off, idx) + x
    scores = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(T)(None, z.clone()))
    hf_keep = torch.isfinite(scores)
    assert torch.equal(G.top_p_keep_mask(z / T, top_p), hf_keep)
    f = G.fused_guidance(x, off, idx=idx, temperature=T, top_p=top_p)
    assert_close(f.kl_top_p, explicit_kl64(x, off, idx, T=T, keep=hf_keep).float(), ATOL, "kl_top_p vs HF")
    # eta = 0 (no offsets): KL = 0 before top-p, and -log(nucleus mass) > 0 after (qsharp.md §8)
    f0 = G.fused_guidance(x, temperature=T, top_p=top_p)
    keep0 = G.top_p_keep_mask(x / T, top_p)
    mass = (torch.softmax(x.double() / T, -1) * keep0).sum(-1)
    assert torch.equal(f0.kl, torch.zeros_like(f0.kl))
    assert_close(f0.kl_top_p, (-torch.log(mass)).float(), ATOL, "-log M_S")
    assert (f0.kl_top_p > 0).all()


@needs_kernels
def test_top_p_ties_at_the_threshold_keep_hf_count():
    """Tied tail tokens straddling the nucleus edge: HF keeps just enough of them to reach top_p (which ones
    is its sort's business; tail tokens share p, q and o, so the KL does not depend on it)."""
    V = 1001
    x = torch.full((2, V), -2.0)
    x[:, 0] = 3.0
    x[:, 1:200] = 1.0  # 199 exactly tied tokens
    idx = torch.tensor([[0, 500], [3, 0]])
    off = torch.tensor([[0.7, 0.3], [0.0, -0.5]])
    x, idx, off = x.to(DEVICE), idx.to(DEVICE), off.to(DEVICE)
    for top_p in (0.3, 0.5, 0.77):
        r = G.guidance_reference(x, off, idx=idx, top_p=top_p, temperature=0.9)
        f = G.fused_guidance(x, off, idx=idx, top_p=top_p, temperature=0.9)
        assert_out_close(f, r, top_p=True)


# ----------------------------------------------------------------------------------------- writing logits


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_write_in_place(sparse, dtype):
    x, off, idx = make_case(5, 1000, 20 if sparse else None, dtype, seed=13)
    xr, xf = x.clone(), x.clone()
    r = G.guidance_reference(xr, off, idx=idx, write=True)
    f = G.fused_guidance(xf, off, idx=idx, write=True, num_chunks=3)
    assert f.logits is xf and r.logits is xr
    assert torch.equal(xf, xr), (xf - xr).abs().max()
    assert_out_close(f, r)
    # separate output buffer: x untouched
    buf = torch.full_like(x, 7.0)
    f2 = G.fused_guidance(x, off, idx=idx, out=buf)
    assert f2.logits is buf and torch.equal(buf, xr)
    assert torch.equal(x, make_case(5, 1000, 20 if sparse else None, dtype, seed=13)[0])
    # with top-p the write happens in the top-p kernel's last pass
    xt = x.clone()
    f3 = G.fused_guidance(xt, off, idx=idx, write=True, top_p=0.9, temperature=0.8)
    assert torch.equal(xt, xr)
    # (bf16 x with bf16 dense offsets has exact ties between tokens with different offsets at the nucleus
    # edge, where HF's pick is arbitrary: kl_top_p is compared in the fp32 and tie tests instead)
    assert_out_close(f3, G.guidance_reference(x, off, idx=idx, top_p=0.9, temperature=0.8),
                     top_p=dtype == torch.float32)


@needs_kernels
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_write_into_strided_rows(sparse):
    """x a column slice of a wider buffer (row stride != V): only the slice is written."""
    x0, off, idx = make_case(3, 1000, 20 if sparse else None, torch.float32, seed=14)
    big = torch.full((3, 1013), 123.0, device=DEVICE)
    big[:, 5:1005] = x0
    view = big[:, 5:1005]
    r = G.guidance_reference(x0.clone(), off, idx=idx, write=True)
    f = G.fused_guidance(view, off, idx=idx, write=True)
    assert torch.equal(big[:, 5:1005], r.logits)
    assert (big[:, :5] == 123.0).all() and (big[:, 1005:] == 123.0).all()
    assert_out_close(f, r)


# ------------------------------------------------------------------------------------------- edge cases


@needs_kernels
def test_masked_rows_and_masking_offsets():
    B, V = 4, 1000
    x, off, _ = make_case(B, V, None, torch.float32, seed=15)  # row 1 partial, row 2 fully -inf
    off = off.clone()
    off[0, :500] = NEG_INF  # masking by offsets
    off[3] = NEG_INF  # every guided logit masked: lse_q = -inf, kl = 0
    r = G.guidance_reference(x, off, top_p=0.9)
    f = G.fused_guidance(x, off, top_p=0.9)
    assert_out_close(f, r, top_p=True)
    assert f.lse_q[3] == NEG_INF and f.kl[3] == 0 and f.kl_top_p[3] == 0
    for t in f[:3] + (f.kl_top_p,):
        assert not torch.isnan(t).any()


@needs_kernels
def test_sparse_padding_and_duplicate_ids():
    """ids outside [0, V) are ignored (padding for rows with fewer candidates); duplicates add up."""
    x, _, _ = make_case(3, 1000, 20, torch.float32, seed=16, masked=False)
    idx = torch.tensor([[5, 5, 17, -1, 1000], [999, 0, 0, 0, 4000], [-1, -1, -1, -1, -1]], device=DEVICE)
    off = torch.tensor([[1.0, 2.0, -3.0, 9.0, 9.0], [0.5, 1.0, 1.0, 1.0, 9.0], [9.0] * 5], device=DEVICE)
    xr, xf = x.clone(), x.clone()
    r = G.guidance_reference(xr, off, idx=idx, write=True)
    f = G.fused_guidance(xf, off, idx=idx, write=True, num_chunks=2)
    assert_out_close(f, r)
    torch.testing.assert_close(xf, xr, atol=1e-6, rtol=0)
    assert f.kl[2] == 0
    assert_out_close(G.fused_guidance(x, off, idx=idx.int()), r)  # int32 ids


@needs_kernels
def test_no_offsets():
    x, _, _ = make_case(3, 1000, None, torch.float32, seed=17)
    f = G.fused_guidance(x)
    assert torch.equal(f.lse_p, f.lse_q) and torch.equal(f.kl, torch.zeros_like(f.kl))
    assert_out_close(f, G.guidance_reference(x))
    empty_idx = torch.empty(3, 0, dtype=torch.int64, device=DEVICE)
    f0 = G.fused_guidance(x, torch.empty(3, 0, device=DEVICE), idx=empty_idx)
    assert torch.equal(f0.kl, torch.zeros_like(f0.kl))


@needs_kernels
def test_many_candidates_go_dense():
    """k = -1 style candidate sets (K > _MAX_SPARSE_K) are scattered to dense offsets, same results."""
    x, _, _ = make_case(2, 3001, None, torch.float32, seed=18, masked=False)
    K = G._MAX_SPARSE_K + 1
    idx = torch.stack([torch.randperm(3001, generator=torch.Generator().manual_seed(r))[:K] for r in range(2)])
    off = torch.randn(2, K, generator=torch.Generator().manual_seed(19))
    idx, off = idx.to(DEVICE), off.to(DEVICE)
    xr, xf = x.clone(), x.clone()
    r = G.guidance_reference(xr, off, idx=idx, write=True)
    f = G.fused_guidance(xf, off, idx=idx, write=True)
    assert_out_close(f, r)
    assert torch.equal(xf, xr)


def test_argument_errors():
    x = torch.zeros(2, 10)
    with pytest.raises(ValueError):
        G.guidance_reference(x, torch.zeros(2, 9))
    with pytest.raises(ValueError):
        G.guidance_reference(x, None, idx=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError):
        G.guidance_reference(x, torch.zeros(2, 4), idx=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError):
        G.guidance_reference(x, temperature=0.0)


# --------------------------------------------------------------------------------- dispatch and heuristics


def test_dispatcher(monkeypatch):
    calls = []

    def fake(*a, **k):
        calls.append("fused")
        return G.guidance_reference(*a, **k)

    monkeypatch.setattr(G, "fused_guidance", fake)
    x = torch.randn(2, 50)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    G.guidance(x, torch.randn(2, 50))
    assert calls == []  # CPU tensor, no interpreter: torch reference
    if IN_PROCESS and _INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        G.guidance(x, torch.randn(2, 50))
        assert calls == ["fused"]


def test_choose_num_chunks():
    assert G.choose_num_chunks(64, 128256, None) == 1  # CPU / interpreter
    assert G.choose_num_chunks(64, 128256, 132) == 5  # H100: 320 programs of ~25.6k tokens
    assert G.choose_num_chunks(1, 128256, 132) == 15  # capped by the 8192-token minimum chunk
    assert G.choose_num_chunks(512, 128256, 132) == 1
    assert G.choose_num_chunks(4, 5000, 132) == 1


def _run_python(code: str, env_update: dict, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_import_is_light_and_late_interpreter_flag_is_reported():
    """Import touches neither triton nor CUDA; setting TRITON_INTERPRET after `import triton` gives a clear
    error from the kernels and a warning + torch fallback from the dispatcher."""
    code = """
        import sys, os, warnings, torch
        import guidedecode.kernels.guidance as G
        assert "triton" not in sys.modules, "module import pulled in triton"
        assert not torch.cuda.is_initialized()
        if G._HAS_TRITON:
            import triton  # imported without the interpreter flag ...
            os.environ["TRITON_INTERPRET"] = "1"  # ... which then comes too late
            x = torch.randn(2, 100)
            try:
                G.fused_guidance(x)
                raise SystemExit("expected RuntimeError")
            except RuntimeError as e:
                assert "before the first `import triton`" in str(e), e
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                out = G.guidance(x, torch.randn(2, 100))
            assert any("TRITON_INTERPRET" in str(m.message) for m in w)
            assert out.kl.shape == (2,)
        print("ok")
    """
    res = _run_python(code, {"CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(not G._HAS_TRITON, reason="triton not installed")
def test_aot_compile_for_sm90():
    """Every kernel variant lowers to a cubin for sm_90 without a GPU (catches what the interpreter cannot)."""
    code = """
        import guidedecode.kernels.guidance as G
        ks = G.aot_compile("sm_90")
        assert all("cubin" in k.asm for k in ks.values()), list(ks)
        print("compiled", len(ks))
    """
    res = _run_python(code, {"TRITON_DEFAULT_FP_FUSION": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0 and "compiled 7" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.skipif(IN_PROCESS or not G._HAS_TRITON, reason="kernel tests run in this process")
def test_suite_in_fresh_process():
    env = {k: v for k, v in os.environ.items()}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu",
                          "-k", "not aot_compile and not import_is_light", str(Path(__file__).resolve())],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-2000:]


# ---------------------------------------------------------------------------------- GPU production shape


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA or _INTERPRET, reason="needs a CUDA GPU (compiled kernels)")
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_gpu_production_shape(sparse):
    B, V, K = 64, 128256, 20
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, V, device="cuda", generator=g) * 4.0
    x[1, ::3] = NEG_INF
    x[2] = NEG_INF
    if sparse:
        idx = torch.topk(x, K, dim=-1).indices
        off = torch.randn(B, K, device="cuda", generator=g) * 3.0
    else:
        idx = None
        off = (torch.randn(B, V, device="cuda", generator=g) * 2.0).to(torch.bfloat16)
    atol = 5e-5  # fp32 sums over 128k tokens in different orders
    r = G.guidance_reference(x, off, idx=idx, temperature=0.8, top_p=0.9)
    for C in (None, 1):
        xf = x.clone()
        f = G.fused_guidance(xf, off, idx=idx, temperature=0.8, top_p=0.9, write=True, num_chunks=C)
        assert_out_close(f, r, atol=atol, top_p=True)
        assert torch.equal(xf, x + G.dense_offsets(x, off, idx))
        f2 = G.fused_guidance(x, off, idx=idx, num_chunks=C)
        assert_out_close(f2, G.guidance_reference(x, off, idx=idx), atol=atol)


# ---------------------------------------------------------------------------------- eager torch path (CPU decode)


def _torch_case(B, V, kind, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * scale
    if B > 1:
        x[1, ::3] = NEG_INF
    if B > 2:
        x[2] = NEG_INF
    if kind == "none":
        return x, None, None
    if kind == "dense":
        return x, torch.randn(B, V, generator=g) * 2, None
    k = min(20, V)
    idx = torch.topk(torch.where(torch.isinf(x), torch.zeros(()), x), k, dim=-1).indices
    off = torch.rand(B, k, generator=g) * 10
    if kind == "sparse-pad":  # -1 / V padding and a duplicated id, like the kernel's sparse conventions
        idx[:, -1], idx[:, -2], idx[:, 1] = -1, V, idx[:, 0]
        off[:, 0] = -3.0
    return x, off, idx


@pytest.mark.parametrize("kind", ["sparse", "sparse-pad", "dense", "none"])
@pytest.mark.parametrize("B,V,scale", [(1, 7, 1.0), (3, 4099, 4.0), (5, 32768, 0.5), (4, 32768, 12.0)])
@pytest.mark.parametrize("T,top_p", [(1.0, None), (0.7, 0.9), (1.3, 0.5), (0.8, "rows")])
def test_torch_path_matches_reference(kind, B, V, scale, T, top_p):
    """guidance_torch (the CPU decode path: closed form, sparse, top-k nucleus) = guidance_reference."""
    x, off, idx = _torch_case(B, V, kind, scale, seed=B * V)
    if top_p == "rows":
        top_p = torch.linspace(0.3, 0.99, B)
    ref = G.guidance_reference(x, off, idx=idx, temperature=T, top_p=top_p)
    out = torch.empty_like(x)
    got = G.guidance_torch(x, off, idx=idx, out=out, temperature=T, top_p=top_p)
    for name in ("lse_p", "lse_q", "kl", "kl_top_p"):
        a, b = getattr(got, name), getattr(ref, name)
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4, equal_nan=False)
    torch.testing.assert_close(out, x + G.dense_offsets(x, off, idx), atol=0, rtol=0)
    xw = x.clone()
    got_w = G.guidance_torch(xw, off, idx=idx, write=True, temperature=T)
    assert got_w.logits is xw and torch.equal(xw, x + G.dense_offsets(x, off, idx))


def test_torch_path_nucleus_wider_than_the_first_top_k():
    """A flat row (nucleus of thousands of tokens: widening, then the full sort), a peaked row, and top_p
    close to 1: the kept mass and KL still match the reference's full sort."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 20000, generator=g) * torch.tensor([[0.05], [6.0], [1.5]])
    idx = torch.topk(x, 20, dim=-1).indices
    off = torch.rand(3, 20, generator=g) * 5
    for top_p in (0.9, 0.999, 0.2):
        ref = G.guidance_reference(x, off, idx=idx, temperature=0.9, top_p=top_p)
        got = G.guidance_torch(x, off, idx=idx, temperature=0.9, top_p=top_p)
        torch.testing.assert_close(got.kl_top_p, ref.kl_top_p, atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(got.kl, ref.kl, atol=5e-5, rtol=1e-4)


def test_torch_path_is_more_accurate_than_fp32_cancellation():
    """Large logits (|x/T| ~ 60): the sparse closed form stays within 1e-5 of a float64 computation."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 49152, generator=g) * 12
    idx = torch.topk(x, 20, dim=-1).indices
    off = torch.rand(4, 20, generator=g) * 10
    z = (x + G.dense_offsets(x, off, idx)).double()
    lp, lq = torch.log_softmax(x.double() / 0.8, -1), torch.log_softmax(z / 0.8, -1)
    exact = (lq.exp() * (lq - lp)).sum(-1)
    got = G.guidance_torch(x, off, idx=idx, temperature=0.8)
    assert (got.kl.double() - exact).abs().max() < 1e-5
