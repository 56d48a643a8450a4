"""Fused target log-prob scoring: ``logp[n] = x[n, t_n] - logsumexp(x[n, :])`` without ``log_softmax``.

Teacher-forced scoring of continuations (``score_continuations``, RATIONALYST's mean/decayed/pmi step
scores) only needs, per position, the log-probability of the token that actually follows. The eager
recipe ``log_softmax(logits.float(), -1).gather(-1, targets)`` materialises an fp32 copy of the
logits *and* a full ``[B, T, V]`` log-prob tensor to read one number per row. This module gives:

``target_logprobs(logits, targets)``
    logits ``[N, V]`` or ``[B, T, V]`` (fp32/bf16/fp16, rows may be a strided view such as
    ``logits[:, :-1]``), targets ``[N]`` / ``[B, T]``. One streaming pass per row keeps an online
    max / sum-exp in fp32 (``exp2`` with ``log2(e)`` pre-scaling) and reads the target logit
    directly; nothing of size ``V`` is written. Output fp32 with the shape of ``targets``.

``linear_target_logprobs(hidden, weight, targets)``
    the same from the last hidden states and the LM head: logits are produced in vocabulary chunks
    ``hidden @ weight[c0:c1].T (+ bias)``, each chunk is folded into a running (max, sum-exp,
    target-logit) state and dropped, so at most ``[N, chunk_size]`` logits exist at once.

Conventions shared by both (and by the ``*_reference`` functions, which are the plain-torch
definitions the tests compare against):

* ``temperature``: scores come from ``softmax(logits / temperature)``; must be > 0.
* ``ignore_index`` rows (prompt / padding positions) give exactly ``0.0`` and are skipped.
* ``-inf`` logits (masked vocabulary) are honoured; a target whose logit is ``-inf`` gives ``-inf``.
  A row whose logits are all ``-inf`` gives ``-inf`` (the target is impossible), where
  ``log_softmax`` would give NaN: NaN would poison an ``argmax`` over candidate scores.
* A target outside ``[0, V)`` that is not ``ignore_index`` gives NaN (checked inside the kernel:
  no device synchronisation); the caller sees a marked score, never a silently wrong one.
* Inference only: the Triton paths carry no autograd graph. When autograd is recording and an
  input requires grad, the dispatcher uses the (differentiable) torch path; an LM head's weight
  is a parameter, so call the linear variant under ``torch.no_grad()`` / ``torch.inference_mode()``
  to get the kernel path.

Dispatch (``backend="auto"``): the Triton kernels run when the tensors are on CUDA, or when the
kernels were decorated under ``TRITON_INTERPRET=1`` (CPU interpreter). ``@triton.jit`` reads the flag
at decoration, and triton's own ``@jit`` standard library (``tl.max``, ``tl.sum``) is decorated when
``triton`` is first imported in the process (``from transformers import LlamaForCausalLM`` already
imports it), so the flag must be set before the *first* ``import triton``, not merely before this
module. What decides is how the kernels were actually built (``INTERPRETED``, ``KERNELS_USABLE``),
not the environment at call time: a late ``TRITON_INTERPRET=1`` never routes CPU tensors into
compiled kernels, and a mismatch between our kernels and triton's library disables the kernels
(``auto`` then uses torch; ``backend="triton"`` raises). Otherwise a row-chunked torch
implementation (bounded memory, same numerics as the reference) is used. Importing this module
needs neither a GPU nor triton, and does not initialise CUDA. Under the interpreter the kernels
are slow (~1.4 s for 32 rows of V = 49152 on one core): pass ``backend="torch"`` where a CPU test
only needs the numbers.

Layout follows Liger-Kernel ``ops/cross_entropy.py`` / ``ops/fused_linear_cross_entropy.py``:
``@triton.jit`` kernels, a torch reference, a small wrapper; tests in
``tests/test_kernel_logprobs.py``; benchmark in ``benchmarks/bench_logprobs.py``.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch

__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "KERNELS_USABLE",
    "linear_target_logprobs",
    "linear_target_logprobs_reference",
    "target_logprobs",
    "target_logprobs_reference",
    "triton_enabled_for",
]

Backend = Literal["auto", "triton", "torch"]

# Elements per row-chunk of the torch fallback (fp32 temporaries of at most ~64 MiB each).
_TORCH_ROW_CHUNK_ELEMS = 1 << 24
# Logit elements per vocabulary chunk of the linear variant when chunk_size is None (~128 MiB fp32).
_LINEAR_CHUNK_ELEMS = 1 << 25

try:  # triton is a Linux-only dependency; the torch paths work without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


if HAS_TRITON:
    # Autotune guard: under the interpreter, autotuning more than one config
    # needs a GPU driver for benchmarking and crashes, so exactly one config is offered there.
    if _interpreting():
        # The interpreter's cost is per block operation, so it gets a wide block (V = 49152: 12
        # iterations per row instead of 48; ~4x faster than 1024).
        _ROW_CONFIGS = [triton.Config({"BLOCK_V": 4096}, num_warps=4)]
    else:
        _ROW_CONFIGS = [
            triton.Config({"BLOCK_V": 1024}, num_warps=4),
            triton.Config({"BLOCK_V": 2048}, num_warps=8),
            triton.Config({"BLOCK_V": 4096}, num_warps=8),
            triton.Config({"BLOCK_V": 4096}, num_warps=16),
            triton.Config({"BLOCK_V": 8192}, num_warps=16),
        ]

    @triton.jit
    def _fold_segment(row_ptr, n_cols, inv_temp, m, s, BLOCK_V: tl.constexpr):
        """Fold ``row_ptr[0:n_cols] * inv_temp`` into the online state (m = running max, s = sum-exp).

        ``s = sum(exp(y - m))`` is accumulated as ``exp2((y - m) * log2 e)``: subtracting before
        scaling keeps the dominant terms (y close to m) exact, as eager ``log_softmax`` does. A
        running max of ``-inf`` (nothing finite seen yet) is replaced by 0 in the exponents so
        ``-inf - -inf`` never produces NaN.
        """
        for start in range(0, n_cols, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(tl.float32)
            y = y * inv_temp
            m_new = tl.maximum(m, tl.max(y, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2((m - m_safe) * 1.4426950408889634) + tl.sum(
                tl.exp2((y - m_safe) * 1.4426950408889634), axis=0
            )
            m = m_new
        return m, s

    @triton.autotune(configs=_ROW_CONFIGS, key=["n_cols"])
    @triton.jit
    def _target_logprobs_kernel(
        X,  # logits viewed as [n_outer, n_inner, n_cols], last dim contiguous
        stride_xo,
        stride_xi,
        n_inner,
        TGT,  # [n_rows] integer targets, contiguous
        OUT,  # [n_rows] fp32
        n_cols,
        inv_temp,
        ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(TGT + row).to(tl.int64)
        if t == ignore_index:
            tl.store(OUT + row, 0.0)
            return
        outer = row // n_inner
        inner = row - outer * n_inner
        row_ptr = X + outer * stride_xo + inner * stride_xi

        m0 = tl.full([], float("-inf"), tl.float32)
        s0 = tl.full([], 0.0, tl.float32)
        m, s = _fold_segment(row_ptr, n_cols, inv_temp, m0, s0, BLOCK_V)

        valid = (t >= 0) & (t < n_cols)
        x_t = tl.load(row_ptr + tl.where(valid, t, 0)).to(tl.float32) * inv_temp
        logp = (x_t - m) - tl.log2(s) * 0.6931471805599453
        logp = tl.where(m == float("-inf"), float("-inf"), logp)  # fully masked row
        logp = tl.where(valid, logp, float("nan"))
        tl.store(OUT + row, logp)

    @triton.autotune(configs=_ROW_CONFIGS, key=["n_cols"], restore_value=["M", "S", "XT"])
    @triton.jit
    def _fold_chunk_kernel(
        X,  # one vocabulary chunk of logits [n_rows, n_cols], last dim contiguous
        stride_x,
        TGT,  # [n_rows] integer targets (global vocabulary ids)
        M,  # [n_rows] fp32 running max            (updated in place)
        S,  # [n_rows] fp32 running sum exp(y - M)  (updated in place)
        XT,  # [n_rows] fp32 target logit / temp    (written when the target is in this chunk)
        n_cols,
        col_start,
        inv_temp,
        ignore_index,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        t = tl.load(TGT + row).to(tl.int64)
        if t == ignore_index:
            return
        row_ptr = X + row * stride_x
        m0 = tl.load(M + row)
        s0 = tl.load(S + row)
        m, s = _fold_segment(row_ptr, n_cols, inv_temp, m0, s0, BLOCK_V)
        tl.store(M + row, m)
        tl.store(S + row, s)
        local = t - col_start
        if (local >= 0) & (local < n_cols):
            tl.store(XT + row, tl.load(row_ptr + local).to(tl.float32) * inv_temp)


# FP contraction pinned explicitly (triton 3.9 defaults it on, 3.10 off) so GPU
# results do not change with the triton version; off also silences the 3.9 warning.
_LAUNCH_OPTS = {"enable_fp_fusion": False}


def _decorated_mode(fn) -> str | None:
    """``"interp"`` / ``"compiled"`` for a ``@triton.jit`` object (through autotuner wrappers)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    while fn is not None:
        if isinstance(fn, InterpretedFunction):
            return "interp"
        if isinstance(fn, JITFunction):
            return "compiled"
        fn = getattr(fn, "fn", None)
    return None


def _kernel_modes() -> tuple[str | None, str | None]:
    """(mode of this module's kernels, mode of triton's own @jit standard library such as ``tl.sum``).

    Both are fixed at decoration: triton's library when ``triton`` is first imported in the process,
    ours when this module is. If ``TRITON_INTERPRET`` changed in between, the two differ and the
    kernels cannot run at all (interpreted kernels calling compiled ``tl.max`` fail, and vice versa).
    """
    if not HAS_TRITON:
        return None, None
    return _decorated_mode(_target_logprobs_kernel), _decorated_mode(tl.sum)


_KERNEL_MODE, _STDLIB_MODE = _kernel_modes()
#: Whether the Triton kernels can run in this process (see :func:`_kernel_modes`).
KERNELS_USABLE: bool = HAS_TRITON and _KERNEL_MODE == _STDLIB_MODE
#: True when the kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` was set before import).
INTERPRETED: bool = KERNELS_USABLE and _KERNEL_MODE == "interp"


def triton_enabled_for(*tensors: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` runs the Triton kernels for these tensors."""
    if not KERNELS_USABLE:
        return False
    if INTERPRETED:
        return True
    return all(t.is_cuda for t in tensors)


def _use_triton(backend: Backend, *tensors: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' requested but triton is not installed")
        if not KERNELS_USABLE:
            raise RuntimeError(
                f"the logprobs kernels were decorated {_KERNEL_MODE} but triton's standard library "
                f"{_STDLIB_MODE}: TRITON_INTERPRET changed between `import triton` and the import of "
                "guidedecode.kernels.logprobs; set it before the first `import triton` in the process"
            )
        if not INTERPRETED and not all(t.is_cuda for t in tensors):
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                "guidedecode.kernels.logprobs is imported"
            )
        return True
    if backend != "auto":
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # keep autograd working: only the torch path is differentiable
    return triton_enabled_for(*tensors)


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / temperature


def _check_targets(targets: torch.Tensor, batch_shape: torch.Size, what: str) -> None:
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(batch_shape):
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match {what} {tuple(batch_shape)}")


# --------------------------------------------------------------------------------------------------
# target_logprobs
# --------------------------------------------------------------------------------------------------


def target_logprobs_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Plain-torch definition: ``log_softmax(logits.float() / T, -1).gather(-1, targets)``.

    Rows with ``targets == ignore_index`` give 0.0. Materialises the full fp32 log-softmax: use it
    for tests and small inputs only.
    """
    x = logits.float()
    if temperature != 1.0:
        x = x / temperature
    ignored = targets == ignore_index
    idx = targets.masked_fill(ignored, 0).long().unsqueeze(-1)
    out = torch.log_softmax(x, dim=-1).gather(-1, idx).squeeze(-1)
    return out.masked_fill(ignored, 0.0)


def _target_logprobs_torch(x2: torch.Tensor, t1: torch.Tensor, inv_temp: float, ignore_index: int) -> torch.Tensor:
    """Row-chunked torch path with the module's conventions; ``x2`` is [N, V] (any strides)."""
    n, v = x2.shape
    out = torch.empty(n, dtype=torch.float32, device=x2.device)
    step = max(1, _TORCH_ROW_CHUNK_ELEMS // max(v, 1))
    for r0 in range(0, n, step):
        y = x2[r0 : r0 + step].float()
        if inv_temp != 1.0:
            y = y * inv_temp
        t = t1[r0 : r0 + step].long()
        ignored = t == ignore_index
        valid = (t >= 0) & (t < v)
        idx = torch.where(valid, t, torch.zeros_like(t)).unsqueeze(-1)
        lp = torch.log_softmax(y, dim=-1).gather(-1, idx).squeeze(-1)
        nan = torch.isnan(lp)
        if nan.any():  # rare: a fully masked row (-> -inf) or NaN logits (stay NaN); skips a pass
            lp = lp.masked_fill(nan & (y.amax(dim=-1) == float("-inf")), float("-inf"))
        lp = lp.masked_fill(~valid, float("nan")).masked_fill(ignored, 0.0)
        out[r0 : r0 + step] = lp
    return out


def target_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-row target log-probability ``log softmax(logits / temperature)[target]`` in fp32.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, fp32 / bf16 / fp16. Leading dimensions may be strided
            (e.g. ``logits[:, p:-1]``): no copy is made as long as the vocabulary dim is contiguous.
        targets: integer ``[N]`` / ``[B, T]`` token ids; ``ignore_index`` marks rows to skip.
        ignore_index: rows with this target give exactly 0.0.
        temperature: > 0; scores come from ``softmax(logits / temperature)``.
        backend: ``"auto"`` (Triton on CUDA or under the interpreter, torch otherwise),
            ``"triton"`` or ``"torch"``.

    Returns:
        fp32 tensor with the shape of ``targets``.
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[:-1], "logits leading dims")
    if targets.device != logits.device:
        raise ValueError(f"targets on {targets.device} but logits on {logits.device}")
    inv_temp = _check_temperature(temperature)
    out_shape = targets.shape
    v = logits.shape[-1]
    n = targets.numel()
    if n == 0:
        return torch.zeros(out_shape, dtype=torch.float32, device=logits.device)

    if not _use_triton(backend, logits):
        x2 = logits.reshape(-1, v)  # a view where possible; the torch path accepts any strides
        return _target_logprobs_torch(x2, targets.reshape(-1), inv_temp, ignore_index).reshape(out_shape)

    x = logits if logits.stride(-1) == 1 else logits.contiguous()
    if x.dim() == 3:
        n_inner, stride_xo, stride_xi = x.shape[1], x.stride(0), x.stride(1)
    else:
        n_inner, stride_xo, stride_xi = x.shape[0], 0, x.stride(0)
    t1 = targets.reshape(-1).contiguous()
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    _target_logprobs_kernel[(n,)](
        x, stride_xo, stride_xi, n_inner, t1, out, v, inv_temp, ignore_index, **_LAUNCH_OPTS
    )
    return out.reshape(out_shape)


# --------------------------------------------------------------------------------------------------
# linear_target_logprobs
# --------------------------------------------------------------------------------------------------


def linear_target_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Plain-torch definition: full logits ``hidden @ weight.T (+ bias)``, then the reference above."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return target_logprobs_reference(logits, targets, ignore_index=ignore_index, temperature=temperature)


def _default_chunk_size(n_rows: int, vocab: int) -> int:
    c = _LINEAR_CHUNK_ELEMS // max(n_rows, 1)
    c = 1 << max(c, 1).bit_length() - 1  # round down to a power of two
    return int(min(max(c, 1024), vocab))


def linear_target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Target log-probs of ``hidden @ weight.T (+ bias)`` without holding ``[N, V]`` logits.

    The logits are computed ``chunk_size`` vocabulary rows at a time (a matmul in the input dtype,
    like the model's own LM head) and folded into a running fp32 (max, sum-exp, target-logit) state
    per row, by the Triton fold kernel or by torch ops; peak extra memory is ``[N, chunk_size]``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]`` last hidden states (after the final norm).
        weight: ``[V, H]`` LM-head weight.
        targets: integer ``[N]`` / ``[B, T]``.
        bias: optional ``[V]``.
        chunk_size: vocabulary rows per chunk; ``None`` picks a power of two so that a chunk of
            logits has about 32 M elements (at least 1024, at most V).
        ignore_index, temperature, backend: as in :func:`target_logprobs`.

    Returns:
        fp32 tensor with the shape of ``targets``.
    """
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got shape {tuple(weight.shape)}")
    v = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must be [V={v}], got shape {tuple(bias.shape)}")
    _check_targets(targets, hidden.shape[:-1], "hidden leading dims")
    inv_temp = _check_temperature(temperature)
    out_shape = targets.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = targets.reshape(-1).contiguous()
    n = t1.numel()
    dev = hidden.device
    if n == 0:
        return torch.zeros(out_shape, dtype=torch.float32, device=dev)
    if chunk_size is None:
        chunk_size = _default_chunk_size(n, v)
    chunk_size = int(chunk_size)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    use_triton = _use_triton(backend, *tensors)

    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    s = torch.zeros(n, dtype=torch.float32, device=dev)
    xt = torch.full((n,), float("nan"), dtype=torch.float32, device=dev)  # stays NaN if t out of range
    t_long = t1.long()
    ignored = t_long == ignore_index
    for c0 in range(0, v, chunk_size):
        c1 = min(c0 + chunk_size, v)
        logits = torch.nn.functional.linear(h2, weight[c0:c1], None if bias is None else bias[c0:c1])
        if use_triton:
            _fold_chunk_kernel[(n,)](
                logits, logits.stride(0), t1, m, s, xt, c1 - c0, c0, inv_temp, ignore_index, **_LAUNCH_OPTS
            )
            continue
        y = logits.float()
        if inv_temp != 1.0:
            y = y * inv_temp
        m_new = torch.maximum(m, y.amax(dim=-1))
        m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
        s = s * torch.exp(m - m_safe) + torch.exp(y - m_safe.unsqueeze(-1)).sum(dim=-1)
        m = m_new
        local = t_long - c0
        inside = (local >= 0) & (local < c1 - c0)
        picked = y.gather(-1, local.clamp(0, c1 - c0 - 1).unsqueeze(-1)).squeeze(-1)
        xt = torch.where(inside, picked, xt)

    logp = (xt - m) - torch.log(s)
    logp = logp.masked_fill(m == float("-inf"), float("-inf"))
    logp = logp.masked_fill(torch.isnan(xt), float("nan"))  # target outside [0, V)
    logp = logp.masked_fill(ignored, 0.0)
    return logp.reshape(out_shape)
