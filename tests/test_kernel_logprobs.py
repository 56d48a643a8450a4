"""Fused target log-prob scoring (``guidedecode.kernels.logprobs``) against the torch reference.

On a CPU-only machine the Triton kernels run in the NumPy interpreter. ``TRITON_INTERPRET`` has to be
in the environment before the *first* ``import triton`` of the process: triton decorates its own
``@jit`` standard library (``tl.max``, ``tl.sum``) at that moment, and ``from transformers import
LlamaForCausalLM`` or ``import guidedecode`` already import triton. ``tests/conftest.py`` sets it on
machines without CUDA; this module sets it too (for runs without that conftest) when triton is not
imported yet. If it came too late (triton imported earlier in compiled mode), the in-process kernel
tests are skipped and ``test_suite_in_fresh_process`` re-runs this file in a fresh interpreter with the
flag set. On a CUDA machine the same tests run compiled on the GPU, plus the production-shape test.
Compiled-mode facts (no CUDA initialisation at import, torch dispatch on CPU, ahead-of-time compile
for sm_80 / sm_90 / gfx942) are checked in a fresh process without the flag.
"""

import os
import sys

import torch

_ON_CUDA = torch.cuda.is_available()  # does not initialise a CUDA context
if not _ON_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # CPU CI convention (integration spec §9)

import subprocess  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import guidedecode.kernels.logprobs as K  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
# The kernels can run here in the mode this machine needs: interpreted on CPU, compiled on CUDA.
IN_PROCESS = K.KERNELS_USABLE and (K.INTERPRETED != _ON_CUDA)
_FRESH_ENV_FLAG = "GUIDEDECODE_LOGPROBS_FRESH"  # set in the re-run: never recurse
needs_kernels = pytest.mark.skipif(
    not IN_PROCESS,
    reason="triton was imported in this process before TRITON_INTERPRET=1 could take effect "
    "(or triton is missing); test_suite_in_fresh_process runs these tests in a fresh interpreter",
)
FP32_TOL = 1e-5
REPO = Path(__file__).resolve().parents[1]


def _fresh_python(code: str, *, interpret: bool, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
    env[_FRESH_ENV_FLAG] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _close(a, b, atol=FP32_TOL):
    """Elementwise |a - b| <= atol, with equal positions of NaN and of +-inf."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), "NaN positions differ"
    assert torch.equal(torch.isinf(a), torch.isinf(b)) and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)])
    fin = torch.isfinite(a)
    err = (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol, f"max |diff| {err:.3e} > {atol:.1e}"
    return err


def _targets(shape, vocab, gen, ignore_every=4, ignore_index=-100):
    t = torch.randint(0, vocab, shape, generator=gen)
    flat = t.view(-1)
    flat[1::ignore_every] = ignore_index  # padding / prompt positions
    return t


def _both_paths(fn, *args, **kwargs):
    """Run the Triton kernel path and the torch fallback path of ``fn``."""
    return fn(*args, backend="triton", **kwargs), fn(*args, backend="torch", **kwargs)


@needs_kernels
def test_autotune_guard_and_mode():
    assert K.triton_enabled_for(torch.empty(1, device=DEVICE))
    if not _ON_CUDA:
        assert K.INTERPRETED and len(K._ROW_CONFIGS) == 1  # >1 config crashes under the interpreter


@pytest.mark.skipif(IN_PROCESS or bool(os.environ.get(_FRESH_ENV_FLAG)) or not K.HAS_TRITON,
                    reason="the kernel tests run in this process")  # fmt: skip
def test_suite_in_fresh_process():
    """Fallback when this process cannot run the kernels in the needed mode: re-run the file fresh."""
    code = f"import sys, pytest; sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(Path(__file__))!r}]))"
    proc = _fresh_python(code, interpret=not _ON_CUDA, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ target_logprobs


@needs_kernels
@pytest.mark.parametrize("n,v", [(37, 4099), (5, 1001), (4, 9001), (3, 17), (1, 1)])
def test_target_fp32_odd_shapes(n, v):
    gen = torch.Generator().manual_seed(n * 7919 + v)
    x = (torch.randn(n, v, generator=gen) * 4).to(DEVICE)
    t = _targets((n,), v, gen).to(DEVICE)
    ref = K.target_logprobs_reference(x, t)
    got, got_torch = _both_paths(K.target_logprobs, x, t)
    _close(got, ref)
    _close(got_torch, ref)
    assert got.dtype == torch.float32 and (got[t == -100] == 0).all()
    # the default dispatcher picks the kernel here (CUDA, or interpreter on CPU)
    assert torch.equal(K.target_logprobs(x, t), got)


@needs_kernels
def test_target_3d_and_strided_view():
    b, t_len, v = 3, 11, 2053
    gen = torch.Generator().manual_seed(1)
    full = (torch.randn(b, t_len + 1, v, generator=gen) * 3).to(DEVICE)
    ids = torch.randint(0, v, (b, t_len + 1), generator=gen).to(DEVICE)
    ids[0, :4] = -100  # prompt-masked positions
    ids[2, -3:] = -100  # right padding
    # 3-D contiguous input, [B, T] output
    x, t = full[:, :-1].contiguous(), ids[:, 1:]
    ref = K.target_logprobs_reference(x, t)
    got, got_torch = _both_paths(K.target_logprobs, x, t)
    assert got.shape == (b, t_len)
    _close(got, ref)
    _close(got_torch, ref)
    # the shifted slice logits[:, :-1] is a strided view: scored in place, same result
    view = full[:, :-1]
    assert not view.is_contiguous()
    _close(K.target_logprobs(view, t, backend="triton"), ref)
    # a view that skips rows along T as well
    view2, t2 = full[:, ::2], ids[:, ::2]
    _close(K.target_logprobs(view2, t2, backend="triton"), K.target_logprobs_reference(view2, t2))
    # a vocabulary dim that is not contiguous (column-major logits) is copied, not misread
    xcm = x[0].T.contiguous().T
    assert xcm.stride(-1) != 1
    for got in _both_paths(K.target_logprobs, xcm, t[0]):
        _close(got, ref[0])


@needs_kernels
def test_scoring_batch_with_garbage_padding_matches_eager():
    """The shape HFBackend.score hands over: right-padded candidates of different lengths, odd V.
    Padded slots hold whatever the model left there (here NaN / +-inf hidden rows and logits); their
    target is ignore_index, so they give 0.0 and never leak into a scored row. Both variants equal
    eager ``log_softmax(...).gather(...)`` computed on the unpadded rows alone."""
    b, t_len, h, v = 4, 9, 24, 1013
    lengths = [9, 3, 6, 1]
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(b, t_len, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.4
    ids = torch.randint(0, v, (b, t_len), generator=gen)
    targets = torch.full((b, t_len), -100)
    for row, n in enumerate(lengths):
        targets[row, :n] = ids[row, :n]
        hidden[row, n:] = float("nan") if row % 2 else float("inf")
    logits = torch.nn.functional.linear(hidden, weight)
    assert not torch.isfinite(logits[1, 3:]).any()
    got_row = _both_paths(K.target_logprobs, logits.to(DEVICE), targets.to(DEVICE))
    got_lin = _both_paths(K.linear_target_logprobs, hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE),
                          chunk_size=250)  # fmt: skip
    for got in (*got_row, *got_lin):
        got = got.cpu()
        for row, n in enumerate(lengths):
            eager = torch.log_softmax(weight @ hidden[row, :n].T, dim=0).T.gather(-1, ids[row, :n, None])[:, 0]
            _close(got[row, :n], eager)
            assert torch.equal(got[row, n:], torch.zeros(t_len - n))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_target_half_inputs(dtype):
    n, v = 9, 3001
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(n, v, generator=gen) * 5).to(dtype).to(DEVICE)
    t = _targets((n,), v, gen).to(DEVICE)
    ref = K.target_logprobs_reference(x.float(), t)  # fp32 math on the upcast values
    got, got_torch = _both_paths(K.target_logprobs, x, t)
    _close(got, ref)
    _close(got_torch, ref)


@needs_kernels
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy sees -inf - -inf
def test_target_masked_vocabulary():
    n, v = 6, 9000  # several blocks per row (BLOCK_V is 4096 under the interpreter)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, v, generator=gen) * 3
    t = torch.randint(0, v, (n,), generator=gen)
    keep = torch.rand(n, v, generator=gen) < 0.05  # grammar mask: ~5% of the vocabulary allowed
    keep[torch.arange(n), t] = True  # targets finite ...
    keep[1, : v // 2] = False  # a whole first block (and more) masked: the running max starts at -inf
    t[1] = v - 1
    keep[1, v - 1] = True
    x = x.masked_fill(~keep, float("-inf"))
    t[4] = -100
    ref = K.target_logprobs_reference(x, t)
    assert torch.isfinite(ref).all()
    got, got_torch = _both_paths(K.target_logprobs, x.to(DEVICE), t.to(DEVICE))
    _close(got, ref)
    _close(got_torch, ref)

    # ... a target that is itself masked gives -inf; a fully masked row gives -inf (reference: NaN)
    x2 = x.clone()
    x2[0, t[0]] = float("-inf")
    x2[2] = float("-inf")
    for out in _both_paths(K.target_logprobs, x2.to(DEVICE), t.to(DEVICE)):
        out = out.cpu()
        assert out[0] == float("-inf") and out[2] == float("-inf")
        _close(out[[1, 3, 5]], ref[[1, 3, 5]])
        assert out[4] == 0.0


@needs_kernels
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_target_temperature(temperature):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(8, 1500, generator=gen) * 3).to(DEVICE)
    t = _targets((8,), 1500, gen).to(DEVICE)
    ref = K.target_logprobs_reference(x, t, temperature=temperature)
    assert not torch.allclose(ref, K.target_logprobs_reference(x, t))
    for got in _both_paths(K.target_logprobs, x, t, temperature=temperature):
        _close(got, ref)
    with pytest.raises(ValueError):
        K.target_logprobs(x, t, temperature=0.0)


@needs_kernels
def test_target_ignore_index_and_bad_targets():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 300, generator=gen).to(DEVICE)
    t = torch.tensor([3, -1, 299, 300, -7, 0], device=DEVICE)  # -1 = ignore; 300, -7 out of range
    for got in _both_paths(K.target_logprobs, x, t, ignore_index=-1):
        got = got.cpu()
        assert got[1] == 0.0 and torch.isnan(got[3]) and torch.isnan(got[4])
        ok = torch.tensor([0, 2, 5])
        _close(got[ok], K.target_logprobs_reference(x[ok], t[ok]).cpu())
    all_ignored = torch.full((6,), -100, device=DEVICE)
    for got in _both_paths(K.target_logprobs, x, all_ignored):
        assert torch.equal(got.cpu(), torch.zeros(6))
    empty = K.target_logprobs(x[:0], t[:0])
    assert empty.shape == (0,)
    with pytest.raises(ValueError):
        K.target_logprobs(x, t[:5])
    with pytest.raises(TypeError):
        K.target_logprobs(x, t.float())


@needs_kernels
def test_target_reads_stay_in_bounds():
    """OOB reads are silent under the interpreter: embed the rows in a NaN-padded buffer."""
    n, v, pad = 7, 4099, 64
    gen = torch.Generator().manual_seed(6)
    buf = torch.full((n, v + pad), float("nan"))
    buf[:, :v] = torch.randn(n, v, generator=gen)
    x = buf[:, :v].to(DEVICE) if DEVICE == "cpu" else buf.to(DEVICE)[:, :v]
    t = _targets((n,), v, gen).to(DEVICE)
    t[0] = v - 1
    got = K.target_logprobs(x, t, backend="triton")
    assert not torch.isnan(got).any()
    _close(got, K.target_logprobs_reference(x[:, :v].contiguous(), t))

    # the per-chunk fold kernel of the linear variant, on the same padded rows
    m = torch.full((n,), float("-inf"), device=DEVICE)
    s = torch.zeros(n, device=DEVICE)
    xt = torch.full((n,), float("nan"), device=DEVICE)
    K._fold_chunk_kernel[(n,)](x, x.stride(0), t, m, s, xt, v, 0, 1.0, -100, **K._LAUNCH_OPTS)
    live = t != -100
    assert torch.isfinite(m[live]).all() and torch.isfinite(s[live]).all()
    lse = torch.logsumexp(x[:, :v].float(), -1)
    _close((m + torch.log(s))[live], lse[live])


@needs_kernels
def test_target_autograd_falls_back_to_torch():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 500, generator=gen, requires_grad=True)
    t = torch.tensor([1, -100, 7, 499])
    K.target_logprobs(x, t).sum().backward()
    g = x.grad.clone()
    x.grad = None
    K.target_logprobs_reference(x, t).sum().backward()
    _close(g, x.grad)


# ----------------------------------------------------------------------------- linear_target_logprobs


@needs_kernels
@pytest.mark.parametrize(
    "n,h,v,chunk",
    [(37, 48, 1000, 333), (5, 64, 4099, 1024), (3, 16, 9001, 5000), (9, 32, 700, None), (4, 16, 300, 5000)],
)
def test_linear_chunked_fp32(n, h, v, chunk):
    gen = torch.Generator().manual_seed(n + v)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) / h**0.5 * 3).to(DEVICE)
    t = _targets((n,), v, gen).to(DEVICE)
    ref = torch.log_softmax(hidden @ weight.T, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
    ref = ref.masked_fill(t == -100, 0.0)
    got, got_torch = _both_paths(K.linear_target_logprobs, hidden, weight, t, chunk_size=chunk)
    _close(got, ref)
    _close(got_torch, ref)


@needs_kernels
def test_linear_3d_bias_temperature_and_bad_target():
    b, t_len, h, v = 2, 7, 40, 1111
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(b, t_len, h, generator=gen).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) * 0.3).to(DEVICE)
    bias = torch.randn(v, generator=gen).to(DEVICE)
    t = _targets((b, t_len), v, gen, ignore_every=3).to(DEVICE)
    ref = K.linear_target_logprobs_reference(hidden, weight, t, bias=bias, temperature=1.3)
    for got in _both_paths(K.linear_target_logprobs, hidden, weight, t, bias=bias, temperature=1.3, chunk_size=256):
        assert got.shape == (b, t_len)
        _close(got, ref)
    # a -inf bias masking the whole first chunk (and a bit more): state starts at max = -inf
    masked_bias = bias.clone()
    masked_bias[:300] = float("-inf")
    ref = K.linear_target_logprobs_reference(hidden, weight, t, bias=masked_bias)
    assert torch.isinf(ref).any() and torch.isfinite(ref).any()
    for got in _both_paths(K.linear_target_logprobs, hidden, weight, t, bias=masked_bias, chunk_size=256):
        _close(got, ref)
    t_bad = t.clone()
    t_bad[0, 0] = v  # out of range: NaN, not a silent score
    for got in _both_paths(K.linear_target_logprobs, hidden, weight, t_bad, chunk_size=256):
        assert torch.isnan(got[0, 0]) and not torch.isnan(got.view(-1)[1:]).any()


@needs_kernels
def test_linear_bf16():
    n, h, v = 11, 64, 2047
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(n, h, generator=gen).to(torch.bfloat16).to(DEVICE)
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(torch.bfloat16).to(DEVICE)
    t = _targets((n,), v, gen).to(DEVICE)
    # the LM head runs in the model dtype (as in the model), the softmax math in fp32 on its output
    ref = K.target_logprobs_reference(torch.nn.functional.linear(hidden, weight), t)
    for got in _both_paths(K.linear_target_logprobs, hidden, weight, t, chunk_size=500):
        _close(got, ref, atol=2e-2)  # bf16 matmul blocking may differ between a chunk and the full head
    exact = K.linear_target_logprobs_reference(hidden.float(), weight.float(), t)
    _close(K.linear_target_logprobs(hidden.float(), weight.float(), t, chunk_size=500), exact)


# ------------------------------------------------------------------------------- real tiny model path


@pytest.fixture(scope="module")
def tiny_llama():
    from guidedecode.testing import tiny_model

    return tiny_model("llama", seed=0, vocab_size=1000).to(DEVICE)


@needs_kernels
def test_tiny_llama_scoring_matches_full_forward(tiny_llama):
    model = tiny_llama
    gen = torch.Generator().manual_seed(10)
    ids = torch.randint(2, 1000, (3, 17), generator=gen).to(DEVICE)
    prompt_len = torch.tensor([5, 9, 3])
    targets = ids[:, 1:].clone()
    for row, p in enumerate(prompt_len.tolist()):
        targets[row, : p - 1] = -100  # score the continuation only
    targets[2, -2:] = -100  # right padding
    with torch.no_grad():
        out = model(ids)
        hidden = model.model(ids).last_hidden_state
        full = torch.log_softmax(out.logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        ref = full.masked_fill(targets == -100, 0.0)
        # logits in hand: the shifted slice is scored in place
        got = K.target_logprobs(out.logits[:, :-1], targets, backend="triton")
        # hidden states only: the LM head is applied chunk by chunk (300 does not divide 1000)
        got_lin = K.linear_target_logprobs(
            hidden[:, :-1], model.lm_head.weight, targets, chunk_size=300, backend="triton"
        )
    _close(got, ref)
    _close(got_lin, ref)
    # per-candidate mean log-prob (RATIONALYST mean_logprob) agrees as well
    mask = targets != -100
    mean_ref = (ref * mask).sum(-1) / mask.sum(-1)
    _close((got_lin * mask).sum(-1) / mask.sum(-1), mean_ref)


# --------------------------------------------------------------------------------- build / import


@pytest.mark.skipif(bool(os.environ.get(_FRESH_ENV_FLAG)), reason="checked by the parent process")
def test_compiled_mode_without_gpu():
    """Fresh process, no TRITON_INTERPRET, no visible GPU: the import does not touch CUDA, CPU inputs
    take the torch path, ``backend="triton"`` refuses CPU tensors, and both kernels compile ahead of
    time for sm_80 / sm_90 / gfx942 (catches compile failures the interpreter cannot see)."""
    code = textwrap.dedent(
        """
        import importlib.util
        import torch
        import guidedecode.kernels.logprobs as K
        assert not K.INTERPRETED
        assert not torch.cuda.is_initialized()
        x = torch.randn(4, 321); t = torch.tensor([0, 5, -100, 320])
        assert not K.triton_enabled_for(x)
        assert (K.target_logprobs(x, t) - K.target_logprobs_reference(x, t)).abs().max() <= 1e-5
        h, w = torch.randn(4, 8), torch.randn(321, 8)
        d = K.linear_target_logprobs(h, w, t, chunk_size=100) - K.linear_target_logprobs_reference(h, w, t)
        assert d.abs().max() <= 1e-5
        assert not torch.cuda.is_initialized()
        if importlib.util.find_spec("triton") is None:
            print("ok (no triton)"); raise SystemExit(0)
        assert K.KERNELS_USABLE
        try:
            K.target_logprobs(x, t, backend="triton")
            raise SystemExit("backend='triton' on CPU tensors should raise without the interpreter")
        except RuntimeError:
            pass
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        row = {"X": "*bf16", "stride_xo": "i64", "stride_xi": "i64", "n_inner": "i32", "TGT": "*i64",
               "OUT": "*fp32", "n_cols": "i32", "inv_temp": "fp32", "ignore_index": "i32", "BLOCK_V": "constexpr"}
        fold = {"X": "*bf16", "stride_x": "i64", "TGT": "*i64", "M": "*fp32", "S": "*fp32", "XT": "*fp32",
                "n_cols": "i32", "col_start": "i32", "inv_temp": "fp32", "ignore_index": "i32",
                "BLOCK_V": "constexpr"}
        kernels = [(K._target_logprobs_kernel.fn, row), (K._fold_chunk_kernel.fn, fold)]
        targets = [(GPUTarget("cuda", 90, 32), "cubin"), (GPUTarget("cuda", 80, 32), "cubin"),
                   (GPUTarget("hip", "gfx942", 64), "hsaco")]
        for target, asm in targets:
            for fn, sig in kernels:
                src = ASTSource(fn, signature=sig, constexprs={"BLOCK_V": 4096})
                c = triton.compile(src, target=target, options={"num_warps": 8, **K._LAUNCH_OPTS})
                assert c.asm[asm], (target, fn)
        assert not torch.cuda.is_initialized()
        print("ok")
        """
    )
    proc = _fresh_python(code, interpret=False)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not _ON_CUDA, reason="needs a CUDA GPU")
def test_gpu_production_shapes():
    gen = torch.Generator(device="cuda").manual_seed(11)
    n, v, h = 8 * 512, 128256, 4096
    x = torch.randn(n, v, device="cuda", generator=gen, dtype=torch.bfloat16) * 4
    t = torch.randint(0, v, (n,), device="cuda", generator=gen)
    t[::7] = -100
    ref = K.target_logprobs_reference(x, t)
    _close(K.target_logprobs(x, t), ref)
    x3, t3 = x.view(8, 512, v)[:, :-1], t.view(8, 512)[:, 1:]  # shifted strided view, scored in place
    _close(K.target_logprobs(x3, t3), K.target_logprobs_reference(x3, t3))
    del x, x3, ref
    hidden = torch.randn(n, h, device="cuda", generator=gen, dtype=torch.bfloat16)
    weight = torch.randn(v, h, device="cuda", generator=gen, dtype=torch.bfloat16) / h**0.5
    ref = K.target_logprobs_reference(torch.nn.functional.linear(hidden, weight), t)
    _close(K.linear_target_logprobs(hidden, weight, t), ref, atol=2e-2)
    exact = K.linear_target_logprobs_reference(hidden[:64].float(), weight.float(), t[:64])
    _close(K.linear_target_logprobs(hidden[:64].float(), weight.float(), t[:64]), exact, atol=1e-4)
