"""Fused target log-prob scoring vs eager ``log_softmax`` + ``gather``: peak memory and time.

Two operations, each on N = B*T teacher-forced positions:

* ``row``:    logits ``[B, T, V]`` in hand. eager = ``log_softmax(logits.float(), -1).gather(...)``,
              fused = ``target_logprobs(logits, targets)``.
* ``linear``: last hidden states ``[B, T, H]`` and the LM head ``[V, H]``. eager = full logits, then as
              above; fused = ``linear_target_logprobs`` (vocabulary-chunked, never ``[N, V]`` at once).

On CUDA: time by ``triton.testing.do_bench`` (median ms), memory by ``torch.cuda.max_memory_allocated``
above what the inputs already hold. On CPU (smoke run): time by ``torch.utils.benchmark`` and memory as
the analytic byte count of the intermediates each path allocates (labelled ``*_est``); the fused path on
CPU is the row-chunked torch fallback unless ``TRITON_INTERPRET=1`` (not meaningful for timing).

    python benchmarks/bench_logprobs.py            # production shapes on CUDA, smoke shapes on CPU
    python benchmarks/bench_logprobs.py --smoke    # tiny shapes anywhere
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=None)
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
    for b, t, v, h in shapes:
        rows.extend(measure(b, t, v, h, dtype, device, chunk_size))
    notes = (
        "CUDA: do_bench median ms, max_memory_allocated above the inputs"
        if device == "cuda"
        else "CPU smoke run, 1 thread: torch.utils.benchmark median ms; *_peak_bytes_est = analytic bytes of the "
        "intermediates (no allocator statistics on CPU); fused path = row-chunked torch fallback"
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
