"""Batched per-row low-rank update (guidedecode.kernels.lowrank) against its torch reference.

On CPU the Triton kernel runs under ``TRITON_INTERPRET=1`` (set by ``tests/conftest.py`` before triton is
imported); on CUDA it runs compiled. Odd shapes, decode (T = 1) and prefill, rows without a delta, shared
slots, ranks above one block, bf16.
"""

import os
import sys

import torch

_ON_CUDA = torch.cuda.is_available()
if not _ON_CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from guidedecode.kernels import lowrank as L  # noqa: E402

DEVICE = "cuda" if _ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (L.KERNELS_USABLE and L.INTERPRETED != _ON_CUDA),
                                   reason="triton missing, or imported before TRITON_INTERPRET=1 took effect")

SHAPES = [  # (rows, T, d_in, d_out, slots, rank)
    (3, 1, 37, 29, 2, 5),  # decode
    (4, 7, 65, 131, 3, 19),  # prefill, odd everything
    (2, 33, 70, 40, 2, 40),  # rank above one rank block, T above one token block
    (5, 1, 130, 257, 5, 1),  # rank 1, d_out above two column blocks
]


def _inputs(rows, T, d_in, d_out, slots, rank, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, T, d_in, generator=g)
    y = torch.randn(rows, T, d_out, generator=g)
    A = torch.randn(slots, rank, d_in, generator=g) / d_in ** 0.5
    B = torch.randn(slots, d_out, rank, generator=g) / rank ** 0.5
    s = torch.randn(slots, generator=g)
    index = torch.tensor([(i % (slots + 1)) - 1 for i in range(rows)])  # row 0 has no delta; slots shared
    return [t.to(DEVICE, dtype) for t in (y, x, A, B)] + [s.to(DEVICE), index.to(DEVICE)]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6)).item()


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_fp32(shape):
    y, x, A, B, s, index = _inputs(*shape)
    ref = L.lowrank_update_reference(y, x, A, B, s, index)
    out = L.lowrank_update(y, x, A, B, s, index, backend="triton")
    assert (out - ref).abs().max().item() <= 1e-5
    untouched = index < 0
    assert torch.equal(out[untouched], y[untouched])  # rows without a delta: bit-identical
    assert (ref[~untouched] - y[~untouched]).abs().max() > 0.1  # the update is not trivial
    # in place writes into y and returns it
    y2 = y.clone()
    assert L.lowrank_update(y2, x, A, B, s, index, inplace=True, backend="triton") is y2
    assert torch.equal(y2, out)


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_kernel_matches_reference_bf16(shape):
    y, x, A, B, s, index = _inputs(*shape, dtype=torch.bfloat16)
    ref = L.lowrank_update_reference(y, x, A, B, s, index)
    out = L.lowrank_update(y, x, A, B, s, index, backend="triton")
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) <= 1e-2  # one bf16 rounding of the output


@needs_kernels
def test_strided_views_and_all_rows_empty():
    y, x, A, B, s, index = _inputs(3, 5, 40, 24, 2, 3)
    wide = torch.randn(3, 5, 60, device=DEVICE)
    wide[..., :40] = x
    xv = wide[..., :40]  # last dim contiguous, rows strided
    ref = L.lowrank_update_reference(y, x, A, B, s, index)
    assert (L.lowrank_update(y, xv, A, B, s, index, backend="triton") - ref).abs().max() <= 1e-5
    none = torch.full_like(index, -1)
    assert torch.equal(L.lowrank_update(y, x, A, B, s, none, backend="triton"), y)


@pytest.mark.parametrize("shape", SHAPES)
def test_torch_path_matches_reference_and_differentiates(shape):
    y, x, A, B, s, index = _inputs(*shape)
    ref = L.lowrank_update_reference(y, x, A, B, s, index)
    assert (L.lowrank_update(y, x, A, B, s, index, backend="torch") - ref).abs().max().item() <= 1e-5
    A.requires_grad_(True)
    s.requires_grad_(True)
    out = L.lowrank_update(y, x, A, B, s, index)  # auto -> torch: autograd needs a graph
    out.sum().backward()
    assert A.grad is not None and s.grad is not None and A.grad.abs().sum() > 0


def test_bad_shapes_are_named():
    y, x, A, B, s, index = _inputs(3, 2, 8, 6, 2, 3)
    with pytest.raises(ValueError, match="d_in"):
        L.lowrank_update(y, x[..., :7], A, B, s, index)
    with pytest.raises(ValueError, match="B must be"):
        L.lowrank_update(y, x, A, B[:, :5], s, index)
    with pytest.raises(ValueError, match="index"):
        L.lowrank_update(y, x, A, B, s, index[:2])
    with pytest.raises(ValueError, match="backend"):
        L.lowrank_update(y, x, A, B, s, index, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows,T,rank", [(64, 1, 16), (8, 1, 512), (4, 300, 16)])
def test_production_shapes_on_gpu(rows, T, rank):
    """Llama-3.1-8B q_proj (4096 x 4096) in bf16: kernel vs reference within one bf16 rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, T, 4096, device="cuda", generator=g).bfloat16()
    y = torch.randn(rows, T, 4096, device="cuda", generator=g).bfloat16()
    A = (torch.randn(rows, rank, 4096, device="cuda", generator=g) / 64).bfloat16()
    B = (torch.randn(rows, 4096, rank, device="cuda", generator=g) / rank ** 0.5).bfloat16()
    s = torch.rand(rows, device="cuda", generator=g)
    index = torch.arange(rows, device="cuda")
    index[0] = -1
    ref = L.lowrank_update_reference(y, x, A, B, s, index)
    out = L.lowrank_update(y, x, A, B, s, index, backend="triton")
    assert _rel(out, ref) <= 1e-2 and torch.equal(out[0], y[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90"])
def test_aot_compiles_for_gpus_in_a_fresh_process(arch):
    """Ahead-of-time compile (no GPU needed) of the decode / prefill, bf16 / fp32 variants."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="0")
    code = f"from guidedecode.kernels import lowrank as L; print(sorted(L.aot_compile({arch!r})))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decode_bf16" in done.stdout and "prefill_fp32" in done.stdout
