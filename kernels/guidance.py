"""Fused Q♯ guidance epilogue: one streaming pass over the vocabulary.

Q♯ (Zhou et al., arXiv 2502.20548): the guide epilogue, its closed-form KL and the KL under top-p, fused so
the vocabulary is read once (memory-bound: the bandwidth floor is one read of the logits).

Per row ``b`` of raw logits ``x[b, :]`` (fp32, bf16 or fp16; ``-inf`` entries are masked tokens) and
guidance offsets ``o`` (dense ``off[b, :]``, or sparse: ``off[b, k]`` added to token ``idx[b, k]``, every
other token offset 0), with guided logits ``z = x + o`` and temperature ``T``::

    lse_p = logsumexp(x / T)                      p = softmax(x / T)   (tempered reference)
    lse_q = logsumexp(z / T)                      q = softmax(z / T)   (tempered guided)
    kl    = KL(q || p) = E_q[o / T] + lse_p - lse_q                    (closed form, O(1) extra state)

``T = 1`` (the default) gives exactly the un-tempered quantities. With ``top_p`` the kernel also reports the
KL the paper reports: ``KL(π_sample || p)`` where ``π_sample`` is ``q`` truncated to its
nucleus ``S`` (HF ``TopPLogitsWarper`` semantics) and renormalised by the kept mass ``M_S``::

    kl_top_p = (1 / M_S) Σ_{v∈S} q_v o_v / T  - log M_S + lse_p - lse_q

Optionally ``z`` (un-tempered guided logits) is written in place into ``x`` (or into ``out``) so that HF's
temperature / top-p warpers, which run after the logits processor, see the guided logits.

Conventions (both paths):

* A fully masked row (all ``-inf``) gives ``lse_p = lse_q = -inf`` and ``kl = kl_top_p = 0``, never NaN.
  Tokens with ``q = 0`` contribute nothing to ``E_q[o]`` (so ``-inf`` offsets are allowed as masks).
* ``kl`` and ``kl_top_p`` are clamped at 0 (rounding can otherwise give ``-1e-9``).
* Sparse ids outside ``[0, V)`` (e.g. ``-1`` padding for rows with fewer candidates) are ignored;
  duplicate ids add up, like ``torch.scatter_add``.
* The written ``z`` has ``x``'s dtype (bf16 ``x`` gets ``z`` rounded to bf16); all statistics use the
  unrounded fp32 ``z``.

Implementation (``fused_guidance``):

1. ``_stats_kernel``: programs = ``B * C``; program ``(b, c)`` streams its chunk of row ``b`` in ``BLOCK``
   tiles keeping online ``(m_p, s_p)`` and ``(m_q, s_q, s_qd)``; rescaling on a new running max uses
   ``exp2((y - m) * log2e)``; all accumulation in fp32; the running max is guarded so an all ``-inf`` tile or
   row never forms ``-inf - -inf``. Sparse offsets are matched in the stream by comparing each tile's
   column ids with the row's ``K`` candidate ids (only in the <= K tiles holding one), so only ``x`` and ``K``
   (id, offset) pairs are read and the tail needs no ``Z_p - Σ_C`` subtraction (no cancellation when
   offsets are negative). ``C = 1`` writes the final row outputs directly; ``C > 1`` (split vocabulary, for
   small batches on a GPU) writes partial ``(m_p, s_p, m_q, s_q, s_qd)`` that ``_combine_kernel`` merges.
   ``C`` comes from :func:`choose_num_chunks`.
2. Only with ``top_p``: ``_top_p_kernel`` (programs = ``B``) finds the nucleus threshold exactly by a
   16-way bisection over the order-preserving integer key of the fp32 tempered guided logit ``(x+o)/T``
   (computed with a correctly rounded division, bitwise as HF's warpers see it): at most 8 passes over the
   row (4 bits each), fewer when the search range ``[lse_q + log((1-p)/V) - 1, max]`` (the mass below its
   lower end is < 1-p) is narrow; then one more pass sums the kept mass and ``Σ q o / T`` and, when asked,
   writes ``z``. Ties at the threshold keep just enough tokens to reach ``p`` (HF's count; HF's unstable
   sort decides *which* tied tokens, we average their ``o`` contribution: exact when the tied tokens share
   ``o``, e.g. tail tokens; with exact ties between tokens of different offsets, HF's own result depends on
   its sort order). Not bandwidth-optimal (``B`` programs, up to 9 reads of the row): a reporting metric.

``guidance`` dispatches: Triton for CUDA tensors or under ``TRITON_INTERPRET=1``, else the torch reference.
Sparse inputs with more than ``_MAX_SPARSE_K`` candidates are scattered into dense offsets first.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

# triton is imported lazily (first kernel use), never at module import: importing this module stays light
# (vLLM imports logits-processor modules in its frontend process), touches no GPU, and leaves the
# interpreter decision open. TRITON_INTERPRET is read by triton when *triton itself* is imported (its
# standard library, tl.sum / tl.max, is @jit-decorated then), so the variable must be set before the first
# `import triton` anywhere in the process; _kernels() raises a clear error when that order was violated.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
triton = None  # bound by _import_triton()
tl = None

__all__ = [
    "GuidanceOut",
    "guidance_reference",
    "fused_guidance",
    "guidance",
    "choose_num_chunks",
    "interpreter_enabled",
    "aot_compile",
    "top_p_keep_mask",
    "dense_offsets",
]

LOG2E = 1.4426950408889634
_MIN_CHUNK = 8192  # elements per split-vocabulary chunk, at least
_NPIV = 16  # pivots per bisection pass in the top-p kernel (4 bits per pass)
_MAX_SPARSE_K = 1024  # more candidates than this are scattered into dense offsets first


class GuidanceOut(NamedTuple):
    """Per-row outputs, fp32 ``[B]`` each (``logits`` is the written ``[B, V]`` tensor or ``None``)."""

    lse_p: torch.Tensor
    lse_q: torch.Tensor
    kl: torch.Tensor
    logits: torch.Tensor | None = None
    kl_top_p: torch.Tensor | None = None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------------------
# argument handling shared by both paths
# ----------------------------------------------------------------------------------------------------------


def _check_args(x, off, idx, out):
    if x.dim() != 2:
        raise ValueError(f"x must be [B, V], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor, got {x.dtype}")
    B, V = x.shape
    if V == 0:
        raise ValueError("x has an empty vocabulary dimension")
    if idx is not None:
        if off is None:
            raise ValueError("sparse guidance needs both idx [B, K] and off [B, K]")
        if idx.dim() != 2 or idx.shape[0] != B or off.shape != idx.shape:
            raise ValueError(f"idx and off must both be [B={B}, K], got {tuple(idx.shape)} and {tuple(off.shape)}")
        if idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be int64 or int32, got {idx.dtype}")
        if not off.dtype.is_floating_point:
            raise ValueError(f"off must be floating, got {off.dtype}")
    elif off is not None:
        if off.shape != x.shape:
            raise ValueError(f"dense off must have x's shape {tuple(x.shape)}, got {tuple(off.shape)} "
                             "(pass idx= for sparse offsets on K candidates)")
        if not off.dtype.is_floating_point:
            raise ValueError(f"off must be floating, got {off.dtype}")
    if out is not None and out.shape != x.shape:
        raise ValueError(f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")


def _row_param(value, B, device, name):
    """Scalar or [B] tensor -> fp32 [B] tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        if t.numel() != B:
            raise ValueError(f"{name} must be a scalar or have one value per row ({B}), got {t.numel()}")
        return t.contiguous()
    return torch.full((B,), float(value), dtype=torch.float32, device=device)


def _check_scalar_params(temperature, top_p):
    if not isinstance(temperature, torch.Tensor) and not (float(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_p is not None and not isinstance(top_p, torch.Tensor) and not (0 < float(top_p)):
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# ----------------------------------------------------------------------------------------------------------
# torch reference (the definition)
# ----------------------------------------------------------------------------------------------------------


def dense_offsets(x: torch.Tensor, off: torch.Tensor | None, idx: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``[B, V]`` offsets: ``off`` itself (dense) or scatter-added on valid ``idx`` (sparse)."""
    B, V = x.shape
    if off is None:
        return torch.zeros(B, V, dtype=torch.float32, device=x.device)
    if idx is None:
        return off.float()
    idx = idx.to(device=x.device, dtype=torch.int64)
    valid = (idx >= 0) & (idx < V)
    o = torch.zeros(B, V, dtype=torch.float32, device=x.device)
    src = torch.where(valid, off.to(device=x.device, dtype=torch.float32), torch.zeros((), device=x.device))
    return o.scatter_add_(1, idx.clamp(0, V - 1), src)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ_v a_v (log a_v - log b_v) per row, terms with a_v = 0 (or NaN rows) dropped."""
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype, device=a.device))
    return terms.sum(-1)


def top_p_keep_mask(y: torch.Tensor, top_p) -> torch.Tensor:
    """Bool ``[B, V]``: tokens HF's ``TopPLogitsWarper(top_p)`` keeps for (tempered) logits ``y``.

    Same ops as transformers: sort ascending, ``softmax().cumsum()``, drop where ``cum <= 1 - top_p``,
    always keep the largest. ``top_p`` may be a float or a ``[B]`` tensor.
    """
    sorted_y, sorted_idx = torch.sort(y, descending=False, dim=-1)
    cum = sorted_y.softmax(dim=-1).cumsum(dim=-1)
    if isinstance(top_p, torch.Tensor):
        thr = (1 - top_p.to(y.device, torch.float32)).reshape(-1, 1)
    else:
        thr = 1 - top_p
    remove_sorted = cum <= thr
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return ~remove


def guidance_reference(
    x: torch.Tensor,
    off: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    write: bool = False,
    out: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor | None = None,
    num_chunks: int | None = None,
) -> GuidanceOut:
    """Plain eager torch, fp32 math: the definition :func:`fused_guidance` is tested against.

    ``kl`` is the explicit sum ``Σ q (log q - log p)`` (not the closed form); ``kl_top_p`` builds the
    nucleus exactly like HF's ``TopPLogitsWarper`` and sums ``Σ π_s (log π_s - log p)``.
    ``num_chunks`` is accepted (and ignored) so both paths share one signature.
    """
    del num_chunks
    _check_args(x, off, idx, out)
    _check_scalar_params(temperature, top_p)
    B, V = x.shape
    xf = x.float()
    o = dense_offsets(x, off, idx)
    z = xf + o
    T = _row_param(temperature, B, x.device, "temperature").view(B, 1)
    yp = xf / T
    yq = z / T
    lse_p = torch.logsumexp(yp, dim=-1)
    lse_q = torch.logsumexp(yq, dim=-1)
    logp = torch.log_softmax(yp, dim=-1)
    logq = torch.log_softmax(yq, dim=-1)
    kl = _kl_rows(logq, logp)
    dead = torch.isneginf(lse_q) | torch.isneginf(lse_p)
    kl = torch.where(dead, torch.zeros_like(kl), kl).clamp_min(0.0)

    kl_tp = None
    if top_p is not None:
        keep = top_p_keep_mask(yq, top_p)
        ys = yq.masked_fill(~keep, float("-inf"))
        logs = torch.log_softmax(ys, dim=-1)
        kl_tp = _kl_rows(logs, logp)
        kl_tp = torch.where(dead, torch.zeros_like(kl_tp), kl_tp).clamp_min(0.0)

    logits = None
    if out is not None or write:
        target = out if out is not None else x
        target.copy_(z.to(target.dtype))
        logits = target
    return GuidanceOut(lse_p, lse_q, kl, logits, kl_tp)


# ----------------------------------------------------------------------------------------------------------
# fast eager torch path (CPU decoding)
# ----------------------------------------------------------------------------------------------------------
_NUCLEUS_WIDTH = 256  # first number of top tokens searched for the nucleus (x4 while too few)
_NUCLEUS_MARGIN = 0.9  # the tail is cut only when its mass is below 0.9 (1 - top_p): rounding never decides


def guidance_torch(
    x: torch.Tensor,
    off: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    write: bool = False,
    out: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor | None = None,
    num_chunks: int | None = None,
) -> GuidanceOut:
    """The outputs of :func:`guidance_reference` in a few eager passes: the decode-loop path off CUDA.

    Written by hand because the reference is the *definition* (explicit log-softmaxes, a full sort for the
    nucleus) and costs a guided CPU decode step about 10% on top of the model. Here:

    * ``kl = E_q[o] / T + lse_p - lse_q`` in closed form; with sparse offsets everything but ``lse_p`` reads
      only the ``K`` candidates: ``lse_q = lse_p + log1p(Σ_C p_v expm1(o_v / T))`` (no second pass over the
      row, and no cancellation between two large logsumexps) and ``q_k = exp((x_k + o_k) / T - lse_q)``;
    * the nucleus of ``softmax(y)``, ``y = z / T``, from the top ``w`` tokens only (``topk``, ``w = 256``,
      x4 while needed): when the mass outside them is at most ``0.9 (1 - top_p)``, HF's ``TopPLogitsWarper``
      drops every one of those tokens (the ascending cumulative mass up to any of them is at most that), so
      ``cum = outside mass + cumsum`` of the top ``w`` in ascending order, dropped where ``cum <= 1 - top_p``,
      the largest always kept; ``kl_top_p = Σ_S q o / (T M_S) - log M_S + lse_p - lse_q``. Flat rows (a
      nucleus wider than half the vocabulary) use the full sort. Exact ties at the nucleus edge may keep other
      tied tokens than HF's sort (as in the Triton kernel).
    """
    del num_chunks
    _check_args(x, off, idx, out)
    _check_scalar_params(temperature, top_p)
    B, V = x.shape
    xf = x.float()
    T = _row_param(temperature, B, x.device, "temperature").view(B, 1)
    sparse = off is not None and idx is not None
    if sparse:
        idx = idx.to(device=x.device, dtype=torch.int64)
        valid = (idx >= 0) & (idx < V)
        ids = idx.clamp(0, V - 1)
        src = torch.where(valid, off.to(device=x.device, dtype=torch.float32), torch.zeros((), device=x.device))
        into_out = out is not None and out.dtype == torch.float32 and not _overlaps(out, x)
        z = out if into_out else torch.empty_like(xf)
        z.copy_(xf)
        z.scatter_add_(1, ids, src)
    elif off is not None:
        z = xf + off.float()
    else:
        z = xf
    zero = torch.zeros((), device=x.device)
    # logsumexp as max + log(sum exp(y - max)), kept apart: exp(y_v - lse) = exp((y_v - max) - log_sum), whose
    # first difference is exact, stays accurate when |y| is large (a forced token at logit 1e4: lse ~ 1e4 has
    # an fp32 rounding error of 1e-3, which exp(y_v - lse) would turn into a 1e-3 error of p_v). For the same
    # reason offsets enter as d = y - yp, the offsets as rounded into the logits HF samples from.
    yp, y = xf / T, z / T  # exactly the tempered logits HF's warpers see (fp32)
    m_p, log_s_p = _max_and_log_sum(yp)
    lse_p = m_p + log_s_p.float()
    if sparse:
        # With d_v = y_v - yp_v (the tempered offset as rounded in y; 0 off the candidates):
        # lse_q - lse_p = log(1 + Σ_C p_v expm1(d_v)), q_v = p_v e^{d_v} / (1 + Σ_C p_v expm1(d_v)): K terms in
        # float64, no second pass over the row and no cancellation of two large logsumexps
        same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # [B, K, K]
        first = valid & ~(same & torch.ones_like(same[0]).tril(-1)).any(-1)  # count each distinct id once
        yp_tok = yp.gather(1, ids).double()
        d = y.gather(1, ids).double() - yp_tok
        p_tok = torch.exp((yp_tok - m_p.double()[:, None]) - log_s_p[:, None])
        use = first & (p_tok > 0)
        gain = torch.where(use, p_tok * torch.expm1(d), 0.0).sum(-1)
        delta64 = torch.log1p(gain)
        q_tok = p_tok * torch.exp(d) / (1 + gain[:, None])
        e_qd = torch.where(use & (q_tok > 0), q_tok * d, 0.0).sum(-1)
        shift, rest = m_p, log_s_p + delta64  # log q_v = (y_v - shift) - rest
        lse_q = lse_p + delta64.float()
    else:
        m_q, log_s_q = _max_and_log_sum(y)
        alive = ~(torch.isneginf(m_p) | torch.isneginf(m_q))
        delta64 = torch.where(alive, (m_q.double() - m_p.double()) + (log_s_q - log_s_p), 0.0)
        shift, rest = m_q, log_s_q
        lse_q = m_q + log_s_q.float()
        if off is None:
            e_qd = torch.zeros(B, device=x.device, dtype=torch.float64)
        else:
            q = torch.exp((y - m_q[:, None]) - log_s_q.float()[:, None])
            e_qd = torch.where(q > 0, q * (y - yp), zero).sum(-1).double()
    dead = torch.isneginf(m_p) | torch.isneginf(lse_q)
    kl = (e_qd - delta64).float()  # E_q[o] / T + lse_p - lse_q
    kl = torch.where(dead, zero, kl).clamp_min(0.0)

    kl_tp = None
    if top_p is not None:
        mass, qd = _nucleus_stats(y, yp, shift, rest, dead, top_p)
        kl_tp = (qd / mass - torch.log(mass) - delta64).float()  # Σ_S q o / (T M_S) - log M_S + lse_p - lse_q
        kl_tp = torch.where(dead, zero, kl_tp).clamp_min(0.0)

    logits = None
    if out is not None or write:
        target = out if out is not None else x
        if target is not z:
            target.copy_(z.to(target.dtype))
        logits = target
    return GuidanceOut(lse_p, lse_q, kl, logits, kl_tp)


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _max_and_log_sum(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max ``m`` (fp32, ``-inf`` for a fully masked row) and ``log Σ exp(y - m)`` (float64)."""
    m = y.max(dim=-1).values
    finite_m = torch.where(torch.isneginf(m), torch.zeros((), device=y.device), m)
    return m, torch.exp(y - finite_m[:, None]).sum(-1).double().log()


def _nucleus_stats(y, yp, shift, rest, dead, top_p):
    """Kept mass ``M_S`` and ``Σ_S q_v d_v`` (``d = y - yp``, float64) of HF's top-p nucleus ``S`` of
    ``softmax(y)``, with ``log q_v = (y_v - shift) - rest`` (see guidance_torch)."""
    B, V = y.shape
    device = y.device
    thr = (1 - top_p.to(device, torch.float64)).reshape(-1, 1) if isinstance(top_p, torch.Tensor) else \
        torch.full((B, 1), 1 - float(top_p), device=device, dtype=torch.float64)
    ys = torch.where(dead[:, None], torch.zeros((), device=device), y)  # dead rows: any finite row; zeroed later
    shift = torch.where(dead, torch.zeros((), device=device), shift).double()[:, None]
    rest = torch.where(dead, torch.zeros((), device=device, dtype=torch.float64), rest)[:, None]
    width = min(_NUCLEUS_WIDTH, V)
    while True:
        top, ids = ys.topk(width, dim=-1, sorted=True)  # descending
        q_top = torch.exp((top.double() - shift) - rest)
        outside = (1 - q_top.sum(-1, keepdim=True)).clamp_min(0.0)
        if bool((outside <= _NUCLEUS_MARGIN * thr).all()) or width == V:
            break
        if 4 * width > V // 2:  # a flat row: the full sort costs no more
            keep = top_p_keep_mask(ys, top_p)
            q = torch.exp((ys.double() - shift) - rest)
            d = (y - yp).double()
            return (torch.where(keep, q, 0.0).sum(-1),
                    torch.where(keep & (q > 0), q * d, 0.0).sum(-1))
        width *= 4
    if width == V:  # the whole row is in hand: no tail to reason about
        outside = torch.zeros_like(outside)
    cum = outside + q_top.float().flip(-1).cumsum(-1).double()  # ascending (fp32 sums, as HF's cumsum)
    keep = cum > thr
    keep[:, -1] = True  # the largest token is always kept (min_tokens_to_keep = 1)
    keep = keep.flip(-1)
    d_top = y.gather(1, ids).double() - yp.gather(1, ids).double()
    mass = torch.where(keep, q_top, 0.0).sum(-1)
    qd = torch.where(keep & (q_top > 0), q_top * d_top, 0.0).sum(-1)
    return mass, qd


# ----------------------------------------------------------------------------------------------------------
# Triton kernels. Written as plain functions and decorated lazily (see _kernels) so that TRITON_INTERPRET is
# read when the kernels are first used, not when this module is imported: a test (or CI job) that sets the
# variable after something else imported guidedecode.kernels.guidance still gets interpreted kernels.
# The @jit helpers they call (_to_out, _candidate_ids, _tile_offsets) are bound as module globals by
# _bind_helpers().
# ----------------------------------------------------------------------------------------------------------


def _to_out_src(z, OUT_TY: tl.constexpr):
    """fp32 -> output dtype with round-to-nearest-even. bf16 is rounded explicitly (bit trick, identical to
    the hardware RTNE conversion on a GPU) because the interpreter truncates fp32 -> bf16 casts."""
    if OUT_TY == tl.bfloat16:
        b = z.to(tl.int32, bitcast=True)
        r = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
        return tl.where(z == z, r, z).to(tl.bfloat16)
    else:
        return z.to(OUT_TY)


def _candidate_ids_src(idx_row, K, V, K_PAD: tl.constexpr, SPARSE: tl.constexpr):
    """Sparse: the row's candidate ids as a [K_PAD] vector (-1 for padding and out-of-range ids), used only to
    skip tiles without candidates. Dense: a placeholder (0)."""
    if SPARSE:
        kk = tl.arange(0, K_PAD)
        ids = tl.load(idx_row + kk, mask=kk < K, other=-1).to(tl.int64)
        return tl.where((ids >= 0) & (ids < V), ids, -1).to(tl.int32)
    else:
        return 0


def _tile_offsets_src(cols, msk, blk, ids, idx_row, off_row, K, V, BLOCK: tl.constexpr, SPARSE: tl.constexpr):
    """Offsets of one vocabulary tile, and the mask of its candidate columns (sparse only; dense: all False).

    Dense offsets are loaded; sparse ones are matched by a scalar loop over the K (id, offset) pairs
    (L1-resident), run only in tiles that hold a candidate (at most K tiles per row). Duplicate ids add up."""
    hit = cols < 0
    if SPARSE:
        o = tl.zeros((BLOCK,), tl.float32)
        in_blk = (ids >= blk) & (ids < blk + BLOCK)
        if tl.max(in_blk.to(tl.int32), axis=0) > 0:
            for k in range(0, K):
                id_k = tl.load(idx_row + k).to(tl.int64)
                id_k = tl.where((id_k >= 0) & (id_k < V), id_k, -1).to(tl.int32)
                eq = cols == id_k
                o = tl.where(eq, o + tl.load(off_row + k).to(tl.float32), o)
                hit = hit | eq
    else:
        o = tl.load(off_row + cols, mask=msk, other=0.0).to(tl.float32)
    return o, hit


def _stats_kernel_src(
    x_ptr, stride_x, off_ptr, stride_off, idx_ptr, stride_idx, K, z_ptr, stride_z, temp_ptr,
    part_ptr, lse_p_ptr, lse_q_ptr, kl_ptr, mq_ptr,
    V, CHUNK, NUM_CHUNKS,
    SPARSE: tl.constexpr, K_PAD: tl.constexpr, WRITE: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # WRITE: 0 = none, 1 = write z for every column, 2 = write z only at candidate columns (sparse, in place)
    pid = tl.program_id(0)
    row = pid // NUM_CHUNKS
    chunk = pid - row * NUM_CHUNKS
    row64 = row.to(tl.int64)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, V)
    inv_T = tl.math.div_rn(1.0, tl.load(temp_ptr + row))
    LOG2E_: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")

    x_row = x_ptr + row64 * stride_x
    z_row = z_ptr + row64 * stride_z
    off_row = off_ptr + row64 * stride_off  # dense: [V] offsets; sparse: the K candidate offsets
    idx_row = idx_ptr + row64 * stride_idx
    ids = _candidate_ids(idx_row, K, V, K_PAD, SPARSE)

    m_p = tl.full((), NEG_INF, tl.float32)
    s_p = tl.zeros((), tl.float32)
    m_q = tl.full((), NEG_INF, tl.float32)
    s_q = tl.zeros((), tl.float32)
    s_d = tl.zeros((), tl.float32)
    for blk in range(start, end, BLOCK):
        cols = blk + tl.arange(0, BLOCK)
        msk = cols < end
        x = tl.load(x_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
        o, hit = _tile_offsets(cols, msk, blk, ids, idx_row, off_row, K, V, BLOCK, SPARSE)
        if SPARSE and WRITE == 2:
            tl.store(z_row + cols, _to_out(x + o, z_ptr.dtype.element_ty), mask=msk & hit)
        z = x + o
        if WRITE == 1:
            tl.store(z_row + cols, _to_out(z, z_ptr.dtype.element_ty), mask=msk)
        # Statistics only need y to ~1 ulp: multiply by 1/T (the top-p kernel divides, to match HF bitwise).
        yp = x * inv_T
        yq = z * inv_T
        d = o * inv_T
        # reference distribution p: online (max, sum)
        mp_new = tl.maximum(m_p, tl.max(yp, axis=0))
        mp_safe = tl.where(mp_new == NEG_INF, 0.0, mp_new)
        s_p = s_p * tl.math.exp2((m_p - mp_safe) * LOG2E_) + tl.sum(tl.math.exp2((yp - mp_safe) * LOG2E_), axis=0)
        m_p = mp_new
        # guided distribution q: online (max, sum, sum of e * o/T)
        mq_new = tl.maximum(m_q, tl.max(yq, axis=0))
        mq_safe = tl.where(mq_new == NEG_INF, 0.0, mq_new)
        alpha = tl.math.exp2((m_q - mq_safe) * LOG2E_)
        e = tl.math.exp2((yq - mq_safe) * LOG2E_)
        s_q = s_q * alpha + tl.sum(e, axis=0)
        s_d = s_d * alpha + tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)  # q = 0 tokens add nothing
        m_q = mq_new

    if SPLIT:
        base = part_ptr + pid.to(tl.int64) * 5
        tl.store(base + 0, m_p)
        tl.store(base + 1, s_p)
        tl.store(base + 2, m_q)
        tl.store(base + 3, s_q)
        tl.store(base + 4, s_d)
    else:
        dead_p = m_p == NEG_INF
        dead_q = m_q == NEG_INF
        lse_p = tl.where(dead_p, NEG_INF, m_p + tl.log(tl.where(dead_p, 1.0, s_p)))
        lse_q = tl.where(dead_q, NEG_INF, m_q + tl.log(tl.where(dead_q, 1.0, s_q)))
        kl = s_d / tl.where(dead_q, 1.0, s_q) + tl.where(dead_p, 0.0, lse_p) - tl.where(dead_q, 0.0, lse_q)
        kl = tl.where(dead_p | dead_q, 0.0, tl.maximum(kl, 0.0))
        tl.store(lse_p_ptr + row, lse_p)
        tl.store(lse_q_ptr + row, lse_q)
        tl.store(kl_ptr + row, kl)
        tl.store(mq_ptr + row, m_q)


def _combine_kernel_src(part_ptr, lse_p_ptr, lse_q_ptr, kl_ptr, mq_ptr, NUM_CHUNKS, C_PAD: tl.constexpr):
    row = tl.program_id(0)
    LOG2E_: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    cc = tl.arange(0, C_PAD)
    cm = cc < NUM_CHUNKS
    base = part_ptr + (row.to(tl.int64) * NUM_CHUNKS + cc) * 5
    m_p_c = tl.load(base + 0, mask=cm, other=NEG_INF)
    s_p_c = tl.load(base + 1, mask=cm, other=0.0)
    m_q_c = tl.load(base + 2, mask=cm, other=NEG_INF)
    s_q_c = tl.load(base + 3, mask=cm, other=0.0)
    s_d_c = tl.load(base + 4, mask=cm, other=0.0)

    m_p = tl.max(m_p_c, axis=0)
    dead_p = m_p == NEG_INF
    mp_safe = tl.where(dead_p, 0.0, m_p)
    s_p = tl.sum(s_p_c * tl.math.exp2((m_p_c - mp_safe) * LOG2E_), axis=0)
    m_q = tl.max(m_q_c, axis=0)
    dead_q = m_q == NEG_INF
    mq_safe = tl.where(dead_q, 0.0, m_q)
    w = tl.math.exp2((m_q_c - mq_safe) * LOG2E_)
    s_q = tl.sum(s_q_c * w, axis=0)
    s_d = tl.sum(s_d_c * w, axis=0)

    lse_p = tl.where(dead_p, NEG_INF, m_p + tl.log(tl.where(dead_p, 1.0, s_p)))
    lse_q = tl.where(dead_q, NEG_INF, m_q + tl.log(tl.where(dead_q, 1.0, s_q)))
    kl = s_d / tl.where(dead_q, 1.0, s_q) + tl.where(dead_p, 0.0, lse_p) - tl.where(dead_q, 0.0, lse_q)
    kl = tl.where(dead_p | dead_q, 0.0, tl.maximum(kl, 0.0))
    tl.store(lse_p_ptr + row, lse_p)
    tl.store(lse_q_ptr + row, lse_q)
    tl.store(kl_ptr + row, kl)
    tl.store(mq_ptr + row, m_q)


def _top_p_kernel_src(
    x_ptr, stride_x, off_ptr, stride_off, idx_ptr, stride_idx, K, z_ptr, stride_z, temp_ptr, top_p_ptr,
    lse_p_ptr, lse_q_ptr, kl_ptr, mq_ptr, kl_tp_ptr,
    V,
    SPARSE: tl.constexpr, K_PAD: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr, NPIV: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    LOG2E_: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    T = tl.load(temp_ptr + row)
    p = tl.load(top_p_ptr + row)
    lse_p = tl.load(lse_p_ptr + row)
    lse_q = tl.load(lse_q_ptr + row)
    kl_full = tl.load(kl_ptr + row)
    y_max = tl.load(mq_ptr + row)
    active = (lse_q > NEG_INF) & (lse_p > NEG_INF) & (p < 1.0)
    lse_q_safe = tl.where(lse_q > NEG_INF, lse_q, 0.0)

    x_row = x_ptr + row64 * stride_x
    z_row = z_ptr + row64 * stride_z
    off_row = off_ptr + row64 * stride_off  # dense: [V] offsets; sparse: the K candidate offsets
    idx_row = idx_ptr + row64 * stride_idx
    ids = _candidate_ids(idx_row, K, V, K_PAD, SPARSE)

    # Search range in key space. Mass below `bound` is < V * (1-p)/(e*V) < 1-p, so the answer is >= bound.
    p_c = tl.minimum(p, 0.999999)
    bound = lse_q_safe + tl.log((1.0 - p_c) / V) - 1.0
    b_bits = bound.to(tl.int32, bitcast=True)
    lo = tl.where(b_bits >= 0, b_bits, b_bits ^ 0x7FFFFFFF).to(tl.int64)
    h_bits = y_max.to(tl.int32, bitcast=True)
    # +16 keys: y_max comes from the stats pass, which scales by 1/T instead of dividing (<= 2 ulp apart).
    hi = tl.where(h_bits >= 0, h_bits, h_bits ^ 0x7FFFFFFF).to(tl.int64) + 16
    hi = tl.where(active, hi, lo)
    lo = tl.minimum(lo, hi)
    jj = tl.arange(0, NPIV).to(tl.int64)

    # Invariant: M(key >= lo) >= p and M(key >= hi + 1) < p; the threshold is the largest such key.
    while lo < hi:
        step = (hi - lo) // NPIV + 1
        piv = lo + jj * step
        acc = tl.zeros((NPIV,), tl.float32)
        for blk in range(0, V, BLOCK):
            cols = blk + tl.arange(0, BLOCK)
            msk = cols < V
            x = tl.load(x_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
            o, _ = _tile_offsets(cols, msk, blk, ids, idx_row, off_row, K, V, BLOCK, SPARSE)
            yq = tl.math.div_rn(x + o, T)
            bits = yq.to(tl.int32, bitcast=True)
            key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
            pi = tl.math.exp2((yq - lse_q_safe) * LOG2E_)
            ge = key[:, None] >= piv[None, :]
            acc += tl.sum(tl.where(ge, pi[:, None], 0.0), axis=0)
        jstar = tl.max(tl.where(acc >= p, jj, 0), axis=0)
        lo_new = lo + jstar * step
        hi = tl.minimum(hi, lo_new + step - 1)
        lo = lo_new
    tau = lo

    # Final pass: mass and Σ q·o/T strictly above the threshold and at it; optional write of z.
    a_m = tl.zeros((), tl.float32)
    a_d = tl.zeros((), tl.float32)
    t_n = tl.zeros((), tl.float32)
    t_m = tl.zeros((), tl.float32)
    t_d = tl.zeros((), tl.float32)
    for blk in range(0, V, BLOCK):
        cols = blk + tl.arange(0, BLOCK)
        msk = cols < V
        x = tl.load(x_row + cols, mask=msk, other=NEG_INF).to(tl.float32)
        o, hit = _tile_offsets(cols, msk, blk, ids, idx_row, off_row, K, V, BLOCK, SPARSE)
        if SPARSE and WRITE == 2:
            tl.store(z_row + cols, _to_out(x + o, z_ptr.dtype.element_ty), mask=msk & hit)
        z = x + o
        if WRITE == 1:
            tl.store(z_row + cols, _to_out(z, z_ptr.dtype.element_ty), mask=msk)
        yq = tl.math.div_rn(z, T)
        d = tl.math.div_rn(o, T)
        bits = yq.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
        pi = tl.math.exp2((yq - lse_q_safe) * LOG2E_)
        pd = pi * tl.where(pi > 0, d, 0.0)
        gt = msk & (key > tau)
        at = msk & (key == tau)
        a_m += tl.sum(tl.where(gt, pi, 0.0), axis=0)
        a_d += tl.sum(tl.where(gt, pd, 0.0), axis=0)
        t_n += tl.sum(at.to(tl.float32), axis=0)
        t_m += tl.sum(tl.where(at, pi, 0.0), axis=0)
        t_d += tl.sum(tl.where(at, pd, 0.0), axis=0)

    # Tied tokens at the threshold: keep ceil((p - A) / π_τ) of them (at least 1), like HF's cumsum rule.
    t_n_safe = tl.maximum(t_n, 1.0)
    pi_tau = t_m / t_n_safe
    n_keep = tl.math.ceil((p - a_m) / tl.where(pi_tau > 0, pi_tau, 1.0))
    n_keep = tl.minimum(tl.maximum(n_keep, 1.0), t_n_safe)
    frac = tl.where(t_m > 0, n_keep / t_n_safe, 0.0)
    m_s = a_m + frac * t_m
    d_s = a_d + frac * t_d
    m_s_safe = tl.where(m_s > 0, m_s, 1.0)
    kl_tp = d_s / m_s_safe - tl.log(m_s_safe) + (tl.where(active, lse_p, 0.0) - tl.where(active, lse_q, 0.0))
    kl_tp = tl.where(active, tl.maximum(kl_tp, 0.0), kl_full)
    tl.store(kl_tp_ptr + row, kl_tp)


def _stats_configs():
    if interpreter_enabled():
        # One config only: autotuning with > 1 config crashes under the interpreter.
        return [triton.Config({"BLOCK": 1024}, num_warps=4)]
    return [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=8),
        triton.Config({"BLOCK": 4096}, num_warps=16),
    ]


_KERNELS: dict[bool, dict] = {}


def _import_triton():
    global triton, tl
    if triton is None:
        if not _HAS_TRITON:
            raise RuntimeError("triton is not installed; use guidance_reference (or guidance, which falls back)")
        import triton as _triton
        import triton.language as _tl

        triton, tl = _triton, _tl
    return triton, tl


def triton_stdlib_interpreted() -> bool:
    """Whether triton was imported in interpreter mode (its @jit standard library is interpreted)."""
    _import_triton()
    return type(getattr(tl.standard, "sum", None)).__name__ == "InterpretedFunction"


def _bind_helpers():
    """Bind the @jit helpers called by the kernels (module globals) for the current mode."""
    global _to_out, _candidate_ids, _tile_offsets
    want = "InterpretedFunction" if interpreter_enabled() else "JITFunction"
    if type(_to_out).__name__ != want:
        _to_out = triton.jit(_to_out_src)
        _candidate_ids = triton.jit(_candidate_ids_src)
        _tile_offsets = triton.jit(_tile_offsets_src)


_to_out = _candidate_ids = _tile_offsets = None


def _kernels() -> dict:
    """The decorated kernels for the current TRITON_INTERPRET setting (decorated on first use, cached)."""
    _import_triton()
    key = interpreter_enabled()
    if key != triton_stdlib_interpreted():
        raise RuntimeError(
            "TRITON_INTERPRET=%s now, but triton was imported with it %s: set TRITON_INTERPRET=1 before the "
            "first `import triton` in the process (CI environment or the top of conftest.py), or run the "
            "kernels in a fresh process" % ("1" if key else "unset", "unset" if key else "set"))
    ks = _KERNELS.get(key)
    if ks is None:
        _bind_helpers()
        stats = triton.autotune(configs=_stats_configs(), key=["V", "CHUNK", "SPARSE", "K_PAD", "WRITE", "SPLIT"],
                                restore_value=["z_ptr"])(triton.jit(_stats_kernel_src))
        ks = {
            "stats": stats,
            "combine": triton.jit(_combine_kernel_src),
            "top_p": triton.jit(_top_p_kernel_src),
        }
        _KERNELS[key] = ks
    return ks


def _num_sms(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_chunks(B: int, V: int, num_sms: int | None = None) -> int:
    """Split-vocabulary factor C: enough programs (``B * C``) to cover ~2 waves of ``num_sms`` SMs,
    chunks of at least ``_MIN_CHUNK`` elements. ``num_sms=None`` (CPU / interpreter) gives 1.

    B=64, V=128256 on an H100 (132 SMs): C = 5 (320 programs of ~25.6k tokens); B=1: C = 15."""
    if num_sms is None or B <= 0:
        return 1
    want = -(-2 * num_sms // B)
    return max(1, min(want, V // _MIN_CHUNK))


def aot_compile(arch: str = "sm_90") -> dict:
    """Compile every kernel variant for a GPU target on a machine without one: catches lowering errors
    the interpreter cannot see. ``arch``: ``"sm_80"``,
    ``"sm_90"`` or an AMD arch such as ``"gfx942"``. Returns ``{variant: CompiledKernel}``.

    Compilation must not see ``TRITON_INTERPRET=1`` (the interpreter patches ``triton.language``), so the
    variable is removed for the duration of the call and restored afterwards.
    """
    _import_triton()
    if triton_stdlib_interpreted():
        raise RuntimeError("aot_compile needs a process in which triton was imported without "
                           "TRITON_INTERPRET=1 (run it in a subprocess)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if arch.startswith("sm_"):
        target = GPUTarget("cuda", int(arch[3:]), 32)
    else:
        target = GPUTarget("hip", arch, 64)
    common = dict(x_ptr="*fp32", stride_x="i64", off_ptr="*fp32", stride_off="i64", idx_ptr="*i64",
                  stride_idx="i64", K="i32", z_ptr="*fp32", stride_z="i64", temp_ptr="*fp32")
    stats_sig = dict(common, part_ptr="*fp32", lse_p_ptr="*fp32", lse_q_ptr="*fp32", kl_ptr="*fp32",
                     mq_ptr="*fp32", V="i32", CHUNK="i32", NUM_CHUNKS="i32", SPARSE="constexpr",
                     K_PAD="constexpr", WRITE="constexpr", SPLIT="constexpr", BLOCK="constexpr")
    top_p_sig = dict(common, top_p_ptr="*fp32", lse_p_ptr="*fp32", lse_q_ptr="*fp32", kl_ptr="*fp32",
                     mq_ptr="*fp32", kl_tp_ptr="*fp32", V="i32", SPARSE="constexpr", K_PAD="constexpr",
                     WRITE="constexpr", BLOCK="constexpr", NPIV="constexpr")
    combine_sig = dict(part_ptr="*fp32", lse_p_ptr="*fp32", lse_q_ptr="*fp32", kl_ptr="*fp32", mq_ptr="*fp32",
                       NUM_CHUNKS="i32", C_PAD="constexpr")
    variants = {
        # name: (source, signature overrides, constexprs, num_warps)
        "stats_dense_fp32_write_split": (_stats_kernel_src, {}, dict(SPARSE=False, K_PAD=1, WRITE=1, SPLIT=True,
                                                                     BLOCK=4096), 8),
        "stats_dense_bf16": (_stats_kernel_src, dict(x_ptr="*bf16", off_ptr="*bf16", z_ptr="*bf16"),
                             dict(SPARSE=False, K_PAD=1, WRITE=0, SPLIT=False, BLOCK=2048), 8),
        "stats_sparse_inplace": (_stats_kernel_src, {}, dict(SPARSE=True, K_PAD=32, WRITE=2, SPLIT=False,
                                                             BLOCK=4096), 8),
        "stats_sparse_bf16_split": (_stats_kernel_src, dict(x_ptr="*bf16", z_ptr="*bf16"),
                                    dict(SPARSE=True, K_PAD=32, WRITE=0, SPLIT=True, BLOCK=2048), 8),
        "combine": (_combine_kernel_src, None, dict(C_PAD=8), 4),
        "top_p_dense_write": (_top_p_kernel_src, {}, dict(SPARSE=False, K_PAD=1, WRITE=1, BLOCK=1024, NPIV=_NPIV), 8),
        "top_p_sparse_inplace": (_top_p_kernel_src, {}, dict(SPARSE=True, K_PAD=32, WRITE=2, BLOCK=1024,
                                                             NPIV=_NPIV), 8),
    }
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        _bind_helpers()
        compiled = {}
        for name, (src, over, constexprs, warps) in variants.items():
            if src is _combine_kernel_src:
                sig = combine_sig
            else:
                sig = dict(stats_sig if src is _stats_kernel_src else top_p_sig, **over)
            compiled[name] = triton.compile(ASTSource(fn=JITFunction(src), signature=sig, constexprs=constexprs),
                                            target=target, options={"num_warps": warps})
        return compiled
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


# ----------------------------------------------------------------------------------------------------------
# Triton wrapper
# ----------------------------------------------------------------------------------------------------------


def fused_guidance(
    x: torch.Tensor,
    off: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    write: bool = False,
    out: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor | None = None,
    num_chunks: int | None = None,
) -> GuidanceOut:
    """Triton path (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); same contract as
    :func:`guidance_reference`. ``num_chunks`` forces the split-vocabulary factor (default: heuristic).
    No host synchronisation: nothing is read back to the CPU."""
    _check_args(x, off, idx, out)
    _check_scalar_params(temperature, top_p)
    ks = _kernels()
    B, V = x.shape
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    lse_p = torch.empty(B, **f32)
    lse_q = torch.empty(B, **f32)
    kl = torch.empty(B, **f32)
    m_q = torch.empty(B, **f32)
    kl_tp = torch.empty(B, **f32) if top_p is not None else None
    want_write = write or out is not None
    if B == 0:
        logits = (out if out is not None else x) if want_write else None
        return GuidanceOut(lse_p, lse_q, kl, logits, kl_tp)

    xk = x if x.stride(1) == 1 else x.contiguous()
    if idx is not None and idx.shape[1] > _MAX_SPARSE_K:  # (e.g. k = -1, "whole vocabulary") go dense
        off, idx = dense_offsets(x, off, idx), None
    sparse = idx is not None or off is None
    if sparse:
        if off is None:  # no guidance: zero candidates
            K = 0
            idx_k = torch.empty(B, 1, dtype=torch.int64, device=dev)
            off_k = torch.empty(B, 1, **f32)
        else:
            K = idx.shape[1]
            idx_k = idx.to(device=dev).contiguous()
            off_k = off.to(device=dev).contiguous()
            if K == 0:
                idx_k = torch.empty(B, 1, dtype=torch.int64, device=dev)
                off_k = torch.empty(B, 1, **f32)
        K_PAD = triton.next_power_of_2(max(K, 1))
    else:
        K = 0
        K_PAD = 1
        idx_k = torch.empty(1, 1, dtype=torch.int64, device=dev)
        off_k = off if off.stride(1) == 1 else off.contiguous()

    # Where z goes: `tgt`, a tensor with unit column stride, copied back into the caller's buffer if that
    # one is strided. In place (into x): only changed columns are stored (none without offsets, the K
    # candidates when sparse); into a separate `out`: every column.
    tgt = None
    write_mode = 0
    if want_write:
        in_place = out is None or out is x
        dest = x if in_place else out
        if in_place:
            tgt = xk
            write_mode = (2 if K > 0 else 0) if sparse else 1
        else:
            tgt = out if out.stride(1) == 1 else torch.empty(out.shape, dtype=out.dtype, device=dev)
            write_mode = 1
    z_arg = tgt if tgt is not None else xk
    temp = _row_param(temperature, B, dev, "temperature")

    # Stats pass. With top_p, the write happens in the top-p kernel's last pass (it must read the original x).
    stats_write = write_mode if top_p is None else 0
    C = num_chunks if num_chunks is not None else choose_num_chunks(B, V, _num_sms(dev))
    C = max(1, min(int(C), V))
    chunk = -(-V // C)
    if C > 1:
        chunk = -(-chunk // 256) * 256 if chunk > 256 else chunk
        C = -(-V // chunk)
    split = C > 1
    part = torch.empty(B * C * 5 if split else 1, **f32)
    ks["stats"][(B * C,)](
        xk, xk.stride(0), off_k, off_k.stride(0), idx_k, idx_k.stride(0), K, z_arg, z_arg.stride(0), temp,
        part, lse_p, lse_q, kl, m_q,
        V, chunk, C,
        SPARSE=sparse, K_PAD=K_PAD, WRITE=stats_write, SPLIT=split,
    )
    if split:
        ks["combine"][(B,)](part, lse_p, lse_q, kl, m_q, C, C_PAD=triton.next_power_of_2(C))

    if top_p is not None:
        tp = _row_param(top_p, B, dev, "top_p")
        block = 1024
        ks["top_p"][(B,)](
            xk, xk.stride(0), off_k, off_k.stride(0), idx_k, idx_k.stride(0), K, z_arg, z_arg.stride(0), temp, tp,
            lse_p, lse_q, kl, m_q, kl_tp,
            V,
            SPARSE=sparse, K_PAD=K_PAD, WRITE=write_mode, BLOCK=block, NPIV=_NPIV,
            num_warps=8 if dev.type == "cuda" else 4,
        )

    logits = None
    if want_write:
        if tgt is not dest:
            dest.copy_(tgt)
        logits = dest
    return GuidanceOut(lse_p, lse_q, kl, logits, kl_tp)


def guidance(
    x: torch.Tensor,
    off: torch.Tensor | None = None,
    *,
    idx: torch.Tensor | None = None,
    write: bool = False,
    out: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    top_p: float | torch.Tensor | None = None,
    num_chunks: int | None = None,
) -> GuidanceOut:
    """Dispatcher: Triton when ``x`` is on CUDA or ``TRITON_INTERPRET=1`` is set, the torch reference
    otherwise (and whenever triton is not installed)."""
    use_triton = _HAS_TRITON and (x.is_cuda or interpreter_enabled())
    if use_triton and not x.is_cuda and not triton_stdlib_interpreted():
        # TRITON_INTERPRET was set after triton had been imported: the interpreter cannot run; the
        # reference computes the same thing on CPU.
        warnings.warn("TRITON_INTERPRET=1 was set after `import triton`; using the torch reference",
                      RuntimeWarning, stacklevel=2)
        use_triton = False
    fn = fused_guidance if use_triton else guidance_reference
    return fn(x, off, idx=idx, write=write, out=out, temperature=temperature, top_p=top_p,
              num_chunks=num_chunks)
