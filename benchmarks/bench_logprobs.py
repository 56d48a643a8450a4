"""Fused target log-prob scoring vs eager ``log_softmax`` + ``gather``: peak memory and time.

Two operations, each on N = B*T teacher-forced positions:

* ``row``:    logits ``[B, T, V]`` in hand. eager = ``log_softmax(logits.float(), -1).gather(...)``,
              fused = ``target_logprobs(logits, targets)``.
* ``linear``: last hidden states ``[B, T, H]`` and the LM head ``[V, H]``. eager = full logits, then as
              above; fused = ``linear_target_logprobs`` (vocabulary-chunked, never ``[N, V]`` at once).

and, end to end through ``HFBackend.score`` (a tiny random Llama with a real-size vocabulary), N
candidates after one shared prefix:

* ``scoring``: eager = each batch of joined candidates through the full model, ``log_softmax`` over
              ``[n, L, V]``, gather; eager_kept = the same forward with the LM head and ``log_softmax``
              only at continuation positions (the previous ``HFBackend.score``); per_candidate =
              ``score(prefix, [c])`` for each candidate alone (the prefix recomputed every time);
              shared = ``score(prefix, candidates)`` (prefix run once, expanded KV cache, fused
              LM-head scoring).

On CUDA: time by ``triton.testing.do_bench`` (median ms), memory by ``torch.cuda.max_memory_allocated``
above what the inputs already hold. On CPU (smoke run): time by ``torch.utils.benchmark`` and memory as
the analytic byte count of the intermediates each path allocates (labelled ``*_est``); the fused path on
CPU is the row-chunked torch fallback unless ``TRITON_INTERPRET=1`` (not meaningful for timing).

    python benchmarks/bench_logprobs.py            # production shapes on CUDA, smoke shapes on CPU
    python benchmarks/bench_logprobs.py --smoke    # tiny shapes anywhere
    python benchmarks/bench_logprobs.py --part scoring
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from guidedecode.kernels import logprobs as LP

# (B, T, V, H): Llama-3 (V=128256, H=4096) and SmolLM2-135M (V=49152, H=576) heads at B*T = 8*512.
GPU_SHAPES = [(8, 512, 49152, 576), (8, 512, 128256, 4096)]
CPU_SHAPES = [(2, 64, 4099, 64), (2, 64, 49152, 576)]
# Scoring cases (prefix tokens, candidates, tokens per candidate, vocabulary, hidden, layers, batch_size).
GPU_SCORING = [(1024, 32, 64, 128256, 1024, 8, 32), (2048, 64, 32, 49152, 576, 8, 64)]
CPU_SCORING = [(96, 8, 12, 49152, 128, 2, 8), (256, 16, 8, 49152, 128, 2, 8)]


def _eager_row(logits, targets):
    return torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _eager_linear(hidden, weight, targets):
    return _eager_row(torch.nn.functional.linear(hidden, weight), targets)


def _row_bytes_est(n, v, elt, backend):
    """Largest extra allocation (bytes) beyond inputs and the [N] fp32 output."""
    up = n * v * 4 if elt != 4 else 0  # .float() copy
    eager = up + n * v * 4  # + fp32 log_softmax
    if backend == "triton":
        fused = n * 4
    else:  # row-chunked torch: float copy + log_softmax of one row chunk
        rows = min(n, max(1, LP._TORCH_ROW_CHUNK_ELEMS // v))
        fused = rows * v * 4 * (2 if elt != 4 else 1)
    return eager, fused


def _linear_bytes_est(n, v, elt, backend, chunk):
    eager = n * v * elt + _row_bytes_est(n, v, elt, "torch")[0]  # logits + upcast + log_softmax
    chunk_logits = n * chunk * elt
    # torch fold: (y - m) and exp(.) fp32 temporaries per chunk, plus the .float() copy for half inputs
    fused = chunk_logits if backend == "triton" else chunk_logits + n * chunk * 4 * (3 if elt != 4 else 2)
    return eager, fused


def _cuda_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def _time_ms(fn, device):
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=0.5).median * 1e3


def measure(b, t, v, h, dtype, device, chunk_size=None):
    gen = torch.Generator(device=device).manual_seed(0)
    n = b * t
    logits = (torch.randn(b, t, v, generator=gen, device=device) * 4).to(dtype)
    targets = torch.randint(0, v, (b, t), generator=gen, device=device)
    hidden = torch.randn(b, t, h, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=gen, device=device) / h**0.5).to(dtype)
    backend = "triton" if LP.triton_enabled_for(logits) else "torch"
    chunk = chunk_size or LP._default_chunk_size(n, v)
    elt = logits.element_size()
    rows = []

    cases = {
        "row": (lambda: _eager_row(logits, targets), lambda: LP.target_logprobs(logits, targets)),
        "linear": (
            lambda: _eager_linear(hidden, weight, targets),
            lambda: LP.linear_target_logprobs(hidden, weight, targets, chunk_size=chunk),
        ),
    }
    for op, (eager, fused) in cases.items():
        with torch.no_grad():
            diff = (eager().float() - fused().float()).abs().max().item()
            row = {"op": op, "B": b, "T": t, "N": n, "V": v, "H": h if op == "linear" else None,
                   "dtype": str(dtype).removeprefix("torch."), "fused_backend": backend,
                   "chunk_size": chunk if op == "linear" else None, "max_abs_diff": diff,
                   "eager_ms": _time_ms(eager, device), "fused_ms": _time_ms(fused, device)}  # fmt: skip
            if device == "cuda":
                row["eager_peak_bytes"] = _cuda_peak(eager)
                row["fused_peak_bytes"] = _cuda_peak(fused)
            else:
                if op == "row":
                    est = _row_bytes_est(n, v, elt, backend)
                else:
                    est = _linear_bytes_est(n, v, elt, backend, chunk)
                row["eager_peak_bytes_est"], row["fused_peak_bytes_est"] = est
        row["speedup"] = row["eager_ms"] / row["fused_ms"]
        key = "peak_bytes" if device == "cuda" else "peak_bytes_est"
        row["memory_ratio"] = row[f"eager_{key}"] / max(row[f"fused_{key}"], 1)
        rows.append(row)
        print(
            f"{op:6s} B={b} T={t} V={v:6d} H={h:4d} {row['dtype']:8s} [{backend}] "
            f"eager {row['eager_ms']:8.3f} ms  fused {row['fused_ms']:8.3f} ms  x{row['speedup']:.2f}  "
            f"{key} {row[f'eager_{key}'] / 2**20:9.1f} MiB -> {row[f'fused_{key}'] / 2**20:7.2f} MiB  "
            f"|diff| {diff:.1e}"
        )
    return rows


def _eager_scoring(model, pad_id, joined, batch_size):
    """The eager way: full forward of each batch of joined sequences, log_softmax over [n, L, V], gather."""
    out = []
    for start in range(0, len(joined), batch_size):
        batch = joined[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (row, _) in enumerate(batch):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        device = next(model.parameters()).device
        logp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        for r, (row, first) in enumerate(batch):
            targets = torch.tensor(row[first:], device=device)
            out.append(logp[r, first - 1 : len(row) - 1].gather(-1, targets[:, None])[:, 0].cpu())
    return out


def _eager_kept_scoring(model, pad_id, joined, batch_size):
    """The previous HFBackend.score: full forward of each batch of joined sequences, but the LM head and an
    eager log_softmax only at the continuation positions ([K, V], K = scored tokens of the batch)."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(joined), batch_size):
        batch = joined[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        keep = torch.zeros_like(ids, dtype=torch.bool)
        for r, (row, first) in enumerate(batch):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
            keep[r, first - 1 : len(row) - 1] = True
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        logp = torch.log_softmax(model.lm_head(hidden[keep.to(device)]).float(), -1)
        targets = torch.roll(ids, -1, dims=1)[keep].to(device)
        lp = logp.gather(-1, targets[:, None])[:, 0].cpu()
        out.extend(torch.split(lp, keep.sum(-1).tolist()))
    return out


def measure_scoring(prefix_len, n_cands, cont_len, vocab, hidden, layers, batch_size, dtype, device):
    from guidedecode.backends.hf import HFBackend
    from guidedecode.bench import synthetic_tokenizer
    from guidedecode.testing import tiny_model

    model = tiny_model("llama", seed=0, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers).to(device=device, dtype=dtype)  # fmt: skip
    backend = HFBackend(model, synthetic_tokenizer(vocab, pad_token_id=1, eos_token_id=1), batch_size=batch_size)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(2, vocab, (prefix_len,), generator=gen).tolist()
    conts = [torch.randint(2, vocab, (cont_len,), generator=gen).tolist() for _ in range(n_cands)]
    joined = [(prefix + c, prefix_len) for c in conts]
    paths = {
        "eager": lambda: _eager_scoring(model, backend.pad_token_id, joined, batch_size),
        "eager_kept": lambda: _eager_kept_scoring(model, backend.pad_token_id, joined, batch_size),
        "per_candidate": lambda: [backend.score(prefix, [c])[0].logprobs for c in conts],
        "shared": lambda: [s.logprobs for s in backend.score(prefix, conts)],
    }
    with torch.no_grad():
        results = {name: fn() for name, fn in paths.items()}
        diff = max((a - b).abs().max().item() for name in ("eager_kept", "per_candidate", "shared")
                   for a, b in zip(results[name], results["eager"]))  # fmt: skip
        row = {"op": "scoring", "prefix_tokens": prefix_len, "candidates": n_cands, "tokens_per_candidate": cont_len,
               "V": vocab, "H": hidden, "layers": layers, "batch_size": batch_size,
               "dtype": str(dtype).removeprefix("torch."), "scoring_plan": backend.scoring_plan.reason,
               "max_abs_diff_vs_eager": diff,
               "forward_tokens": {"eager": n_cands * (prefix_len + cont_len),
                                  "per_candidate": n_cands * (prefix_len + cont_len - 1),
                                  "shared": prefix_len + n_cands * (cont_len - 1)}}  # fmt: skip
        for name, fn in paths.items():
            row[f"{name}_ms"] = _time_ms(fn, device)
            if device == "cuda":
                row[f"{name}_peak_bytes"] = _cuda_peak(fn)
    if device != "cuda":
        # analytic: the largest vocabulary-sized intermediates (KV cache and activations are alike)
        width, rows = prefix_len + cont_len, min(batch_size, n_cands)
        elt = torch.finfo(dtype).bits // 8
        eager = rows * width * vocab * (elt + 4 + (4 if elt != 4 else 0))  # logits, (fp32 copy), log_softmax
        kept = rows * cont_len * vocab * (elt + 4 + (4 if elt != 4 else 0))
        fold = 1 if LP.triton_enabled_for(torch.empty(0, device=device)) else 3  # torch fold: y, y - m, exp
        scored = rows * cont_len
        shared = scored * LP._default_chunk_size(scored, vocab) * 4 * fold
        single = cont_len * LP._default_chunk_size(cont_len, vocab) * 4 * fold
        row.update(eager_peak_bytes_est=eager, eager_kept_peak_bytes_est=kept,
                   per_candidate_peak_bytes_est=single, shared_peak_bytes_est=shared)  # fmt: skip
    key = "peak_bytes" if device == "cuda" else "peak_bytes_est"
    row["speedup_shared_vs_eager"] = row["eager_ms"] / row["shared_ms"]
    row["speedup_shared_vs_eager_kept"] = row["eager_kept_ms"] / row["shared_ms"]
    row["speedup_shared_vs_per_candidate"] = row["per_candidate_ms"] / row["shared_ms"]
    row["memory_ratio_eager_vs_shared"] = row[f"eager_{key}"] / max(row[f"shared_{key}"], 1)
    row["memory_ratio_eager_kept_vs_shared"] = row[f"eager_kept_{key}"] / max(row[f"shared_{key}"], 1)
    print(
        f"scoring P={prefix_len} N={n_cands} L={cont_len} V={vocab} H={hidden} [{row['dtype']}] "
        f"eager {row['eager_ms']:8.1f} ms  eager-kept {row['eager_kept_ms']:8.1f} ms  "
        f"per-candidate {row['per_candidate_ms']:8.1f} ms  "
        f"shared {row['shared_ms']:8.1f} ms  (x{row['speedup_shared_vs_eager']:.2f} vs eager, "
        f"x{row['speedup_shared_vs_per_candidate']:.2f} vs per-candidate)  {key} "
        f"{row[f'eager_{key}'] / 2**20:8.1f} MiB -> {row[f'shared_{key}'] / 2**20:7.2f} MiB  |diff| {diff:.1e}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--part", choices=["all", "kernels", "scoring"], default="all")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    shapes = CPU_SHAPES if (args.smoke or device == "cpu") else GPU_SHAPES
    chunk_size = args.chunk_size
    if device == "cpu":
        # Shared 2-core machines make multi-threaded timings noisy; the default chunk (~32 M logits)
        # would cover the whole vocabulary at smoke sizes, so a small one shows the chunking at work.
        torch.set_num_threads(1)
        chunk_size = chunk_size or 4096
    rows = []
    if args.part in ("all", "kernels"):
        for b, t, v, h in shapes:
            rows.extend(measure(b, t, v, h, dtype, device, chunk_size))
    if args.part in ("all", "scoring"):
        for case in CPU_SCORING if (args.smoke or device == "cpu") else GPU_SCORING:
            rows.append(measure_scoring(*case, dtype, device))
    notes = (
        "CUDA: do_bench median ms, max_memory_allocated above the inputs"
        if device == "cuda"
        else "CPU smoke run, 1 thread: torch.utils.benchmark median ms; *_peak_bytes_est = analytic bytes of the "
        "intermediates (no allocator statistics on CPU; tracemalloc does not see torch's allocations); "
        "fused path = row-chunked torch fallback. scoring rows: eager = full forward + log_softmax over [n, L, V] "
        "+ gather; eager_kept = same forward, LM head + log_softmax only at continuation positions (the previous "
        "HFBackend.score); per_candidate = HFBackend.score of each candidate alone; shared = HFBackend.score of all "
        "(prefix once, expanded KV cache, fused LM-head scoring); *_peak_bytes_est = vocabulary-sized "
        "intermediates only"
    )
    figures = {"device": device, "notes": notes, "rows": rows}
    try:
        from guidedecode.bench import write_result
    except ImportError:  # the bookkeeping helper is missing: plain JSON
        out = Path(__file__).resolve().parent / "results" / f"logprobs-{device}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"benchmark": "logprobs", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                   "figures": figures}, indent=2))  # fmt: skip
    else:
        out = write_result("logprobs", figures)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
