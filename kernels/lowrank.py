"""Batched per-row low-rank update: ``y[b] += s_i * (x[b] A_i^T) B_i^T`` with ``i = index[b]``.

The in-forward weight delta of FTTT / OpTune (Li, Lyu, Wang, "Learning to Reason from Feedback at
Test-Time", arXiv 2502.15771; reference LaVi-Lab/FTTT) adds ``x ΔW_i^T`` to a linear layer's output,
with a different ``ΔW_i = s_i B_i A_i`` per request and the delta kept factored (``A_i [R, d_in]``,
``B_i [d_out, R]``). Materialising a dense ``d_out x d_in`` matrix per row costs ``d_out * d_in`` memory
traffic per request and step; the factored update costs ``R (d_in + d_out)``. This is the BGMV / SGMV
operation of multi-LoRA serving (Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023): one gather of
each row's factors by ``index``, a shrink ``z = x A^T`` and an expand ``z B^T``.

``lowrank_update(y, x, A, B, scale, index)``
    ``y [Bt, T, d_out]`` (decode: ``T = 1``; prefill: ``T`` tokens), ``x [Bt, T, d_in]``,
    ``A [N, R, d_in]``, ``B [N, d_out, R]``, ``scale [N]`` (fp32), ``index [Bt]`` integer slot of each
    row in ``[0, N)`` or ``-1`` for a row without a delta (left exactly as it was). Returns ``y`` plus
    the update; the Triton path writes into ``y`` in place (``inplace=True``) or a copy.

The Triton kernel fuses shrink and expand: program ``(b, t-block, n-block)`` loops over rank chunks,
forms ``z = x_t A^T`` for the chunk in registers (fp32) and accumulates ``z B^T``; rows with
``index = -1`` return at once. Ranks may be large (OpTune's edits have rank = the edit's token count).
Accumulation is fp32; bf16/fp16 inputs use tensor-core dots on GPU and are upcast to fp32 under the CPU
interpreter (bf16 ``tl.dot`` is wrong there, integration notes on triton #11584); fp32 inputs use
IEEE fp32 dots (no TF32), so fp32 results match the reference to ~1e-6.

Dispatch (``backend="auto"``): Triton on CUDA tensors or under ``TRITON_INTERPRET=1`` (set before
the first ``import triton``), torch otherwise, and torch whenever autograd needs a graph through the
update (OpTune meta-training differentiates through ``A`` and ``B``). Layout as in
``guidedecode.kernels.logprobs``: kernel, torch reference, dispatcher; tests in
``tests/test_kernel_lowrank.py``; benchmark ``benchmarks/bench_lowrank.py``.
"""

from __future__ import annotations

from typing import Literal

import torch

from guidedecode.kernels.logprobs import HAS_TRITON, _decorated_mode

__all__ = ["INTERPRETED", "KERNELS_USABLE", "aot_compile", "lowrank_update", "lowrank_update_reference"]

Backend = Literal["auto", "triton", "torch"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lowrank_kernel(
        Y, X, A, Bm, S, IDX,
        T, D_IN, D_OUT, R,
        sy_b, sy_t, sx_b, sx_t, sa_n, sa_r, sb_n, sb_o,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(IDX + row).to(tl.int64)
        if slot < 0:
            return  # a row without a delta stays bit-identical
        s = tl.load(S + slot).to(tl.float32)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_t = offs_t < T
        mask_n = offs_n < D_OUT
        x_row = X + row * sx_b
        a_slot = A + slot * sa_n
        b_slot = Bm + slot * sb_n
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            z = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, D_IN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < D_IN
                xk = tl.load(x_row + offs_t[:, None] * sx_t + offs_k[None, :],
                             mask=mask_t[:, None] & mask_k[None, :], other=0.0)
                ak = tl.load(a_slot + offs_r[None, :] * sa_r + offs_k[:, None],
                             mask=mask_r[None, :] & mask_k[:, None], other=0.0)  # [BLOCK_K, BLOCK_R] = A^T
                if UPCAST:
                    xk = xk.to(tl.float32)
                    ak = ak.to(tl.float32)
                if IEEE:
                    z += tl.dot(xk, ak, input_precision="ieee")
                else:
                    z += tl.dot(xk, ak)
            bk = tl.load(b_slot + offs_n[None, :] * sb_o + offs_r[:, None],
                         mask=mask_n[None, :] & mask_r[:, None], other=0.0)  # [BLOCK_R, BLOCK_N] = B^T
            if UPCAST:
                acc += tl.dot(z, bk.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(z.to(bk.dtype), bk)
        y_ptr = Y + row * sy_b + offs_t[:, None] * sy_t + offs_n[None, :]
        mask = mask_t[:, None] & mask_n[None, :]
        y = tl.load(y_ptr, mask=mask, other=0.0)
        tl.store(y_ptr, (y.to(tl.float32) + s * acc).to(y.dtype), mask=mask)

    _KERNEL_MODE, _STDLIB_MODE = _decorated_mode(_lowrank_kernel), _decorated_mode(tl.sum)
else:  # pragma: no cover - triton is absent
    _KERNEL_MODE = _STDLIB_MODE = None

#: Whether the Triton kernel can run in this process (decorated in the same mode as triton's library).
KERNELS_USABLE: bool = HAS_TRITON and _KERNEL_MODE == _STDLIB_MODE
#: True when the kernel runs in the CPU interpreter (``TRITON_INTERPRET=1`` before the first triton import).
INTERPRETED: bool = KERNELS_USABLE and _KERNEL_MODE == "interp"


def _check(y, x, A, B, scale, index) -> None:
    if x.dim() != 3 or y.dim() != 3:
        raise ValueError(f"x and y must be [Bt, T, d], got x {tuple(x.shape)} and y {tuple(y.shape)}")
    if x.shape[:2] != y.shape[:2]:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} disagree on [Bt, T]")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"A must be [N, R, d_in] and B [N, d_out, R], got {tuple(A.shape)} and {tuple(B.shape)}")
    n, r, d_in = A.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"A's d_in {d_in} does not match x's last dim {x.shape[-1]}")
    if tuple(B.shape) != (n, y.shape[-1], r):
        raise ValueError(f"B must be [N={n}, d_out={y.shape[-1]}, R={r}], got {tuple(B.shape)}")
    if tuple(scale.shape) != (n,):
        raise ValueError(f"scale must be [N={n}], got {tuple(scale.shape)}")
    if tuple(index.shape) != (x.shape[0],) or index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"index must be an integer [Bt={x.shape[0]}] tensor, got {index.dtype} {tuple(index.shape)}")


def lowrank_update_reference(y, x, A, B, scale, index) -> torch.Tensor:
    """Plain-torch definition, one row at a time: ``y[b] + s_i (x[b] A_i^T) B_i^T`` (fp32 math)."""
    _check(y, x, A, B, scale, index)
    out = y.clone()
    for b, i in enumerate(index.tolist()):
        if i >= 0:
            delta = (x[b].float() @ A[i].float().T) @ B[i].float().T
            out[b] = (y[b].float() + float(scale[i]) * delta).to(y.dtype)
    return out


def _torch_update(y, x, A, B, scale, index) -> torch.Tensor:
    """Batched torch path: gather the factors of the rows that have a delta, two ``bmm``; differentiable."""
    rows = (index >= 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return y
    slots = index[rows].long()
    dtype = torch.promote_types(x.dtype, A.dtype)
    z = torch.bmm(x[rows].to(dtype), A[slots].to(dtype).transpose(1, 2))  # [n, T, R]
    delta = torch.bmm(z, B[slots].to(dtype).transpose(1, 2)) * scale[slots].to(dtype)[:, None, None]
    return y.index_add(0, rows, delta.to(y.dtype))


def _use_triton(backend: Backend, *tensors) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not KERNELS_USABLE:
            raise RuntimeError("backend='triton': triton is missing, or TRITON_INTERPRET changed between the first "
                               "`import triton` and the import of guidedecode.kernels.lowrank")
        if not INTERPRETED and not all(t.is_cuda for t in tensors):
            raise RuntimeError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return KERNELS_USABLE and (INTERPRETED or all(t.is_cuda for t in tensors))


def _blocks(T: int, d_in: int, d_out: int, R: int) -> dict:
    if INTERPRETED:  # the interpreter's cost is per block operation: few, wide blocks
        return dict(BLOCK_T=16 if T <= 16 else 32, BLOCK_N=128, BLOCK_K=128, BLOCK_R=32, num_warps=4)
    return _blocks_compiled(T, R)


def _blocks_compiled(T: int, R: int) -> dict:
    return dict(BLOCK_T=16 if T <= 16 else 64, BLOCK_N=64 if T <= 16 else 128, BLOCK_K=128,
                BLOCK_R=16 if R <= 16 else 32, num_warps=4)


def lowrank_update(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
                   index: torch.Tensor, *, inplace: bool = False, backend: Backend = "auto") -> torch.Tensor:
    """``y[b] + scale[i] * (x[b] @ A[i].T) @ B[i].T`` for every row ``b`` with ``i = index[b] >= 0``.

    Args:
        y: ``[Bt, T, d_out]`` base output (e.g. ``x @ W.T``).
        x: ``[Bt, T, d_in]`` layer input.
        A: ``[N, R, d_in]`` stacked row factors (pad ranks with zero rows).
        B: ``[N, d_out, R]`` stacked column factors.
        scale: ``[N]`` per-slot scale.
        index: integer ``[Bt]``: slot of each row, ``-1`` = no delta (the row is returned unchanged).
        inplace: the Triton path writes into ``y`` (callers that own ``y``, e.g. a forward hook
            under no-grad); the torch path never writes in place.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    _check(y, x, A, B, scale, index)
    if not _use_triton(backend, y, x, A, B):
        return _torch_update(y, x, A, B, scale, index)
    out = y if inplace and y.is_contiguous() else y.clone(memory_format=torch.contiguous_format)
    xc = x if x.stride(-1) == 1 else x.contiguous()
    Ac, Bc = A.contiguous(), B.contiguous()
    bt, t, d_out = out.shape
    d_in, r = xc.shape[-1], Ac.shape[1]
    if bt == 0 or t == 0 or r == 0:
        return out
    blocks = _blocks(t, d_in, d_out, r)
    num_warps = blocks.pop("num_warps")
    grid = (bt, triton.cdiv(t, blocks["BLOCK_T"]), triton.cdiv(d_out, blocks["BLOCK_N"]))
    low = Ac.dtype in (torch.bfloat16, torch.float16) or xc.dtype in (torch.bfloat16, torch.float16)
    upcast = INTERPRETED or not (xc.dtype == Ac.dtype == Bc.dtype)
    _lowrank_kernel[grid](
        out, xc, Ac, Bc, scale.float().contiguous(), index.to(torch.int32).contiguous(),
        t, d_in, d_out, r,
        out.stride(0), out.stride(1), xc.stride(0), xc.stride(1), Ac.stride(0), Ac.stride(1), Bc.stride(0),
        Bc.stride(1),
        UPCAST=upcast, IEEE=upcast or not low, num_warps=num_warps, enable_fp_fusion=False, **blocks,
    )
    if out is not y and inplace:
        y.copy_(out)
        return y
    return out


def aot_compile(arch: str = "sm_90") -> dict:
    """Compile the kernel's decode and prefill variants (bf16 and fp32) for ``arch`` (``"sm_80"``, ``"sm_90"``)
    on a machine without a GPU: catches lowering errors the interpreter cannot see. Needs a process in which
    triton was imported without ``TRITON_INTERPRET=1``. Returns ``{variant: CompiledKernel}``."""
    if not KERNELS_USABLE or INTERPRETED:
        raise RuntimeError("aot_compile needs triton imported without TRITON_INTERPRET=1 (run it in a subprocess)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointers = ("Y", "X", "A", "Bm")
    signature = dict(S="*fp32", IDX="*i32", T="i32", D_IN="i32", D_OUT="i32", R="i32", sy_b="i64", sy_t="i64",
                     sx_b="i64", sx_t="i64", sa_n="i64", sa_r="i64", sb_n="i64", sb_o="i64", BLOCK_T="constexpr",
                     BLOCK_N="constexpr", BLOCK_K="constexpr", BLOCK_R="constexpr", UPCAST="constexpr",
                     IEEE="constexpr")
    compiled = {}
    for dtype, ieee in (("bf16", False), ("fp32", True)):
        for phase, T in (("decode", 1), ("prefill", 256)):
            blocks = dict(_blocks_compiled(T, 16))
            num_warps = blocks.pop("num_warps")
            sig = {**{p: f"*{dtype}" for p in pointers}, **signature}
            source = ASTSource(fn=_lowrank_kernel, signature=sig, constexprs=dict(blocks, UPCAST=False, IEEE=ieee))
            compiled[f"{phase}_{dtype}"] = triton.compile(source, target=GPUTarget("cuda", int(arch[3:]), 32),
                                                          options={"num_warps": num_warps})
    return compiled
