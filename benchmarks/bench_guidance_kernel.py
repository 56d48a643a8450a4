"""Fused Q♯ guidance epilogue vs the eager torch chain: time, achieved bandwidth, bandwidth floor.

Per decode step, logits ``x [B, V]`` and guidance offsets (dense ``[B, V]`` or sparse on K candidates):

* eager: ``z = x + off`` (``scatter_add`` when sparse), ``log_softmax`` of ``x`` and of ``z``,
  ``KL = Σ q (log q - log p)`` and both logsumexps (as a logits processor would write them);
* fused: ``guidedecode.kernels.guidance.fused_guidance`` (one streaming pass; split vocabulary when the
  batch is small), optionally writing ``z`` in place.

Achieved GB/s counts the bytes the fused kernel must move (x read, offsets read, z written) and is compared
with the arithmetic floor of integration.md §8 at B=64, V=128256 (H100-SXM 3.35 TB/s, H200 4.8 TB/s,
H100-PCIe 2.0 TB/s). On CUDA: ``triton.testing.do_bench`` (median). Elsewhere: ``torch.utils.benchmark``
and the fused column is the torch reference (or the Triton interpreter when ``TRITON_INTERPRET=1`` is set
before launch; interpreter timings mean nothing): a smoke check of the script only.

    python benchmarks/bench_guidance_kernel.py            # B=64, V=128256 on CUDA; tiny shapes on CPU
    python benchmarks/bench_guidance_kernel.py --smoke    # tiny shapes anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from guidedecode.kernels import guidance as G

PEAK_TBPS = {"H100-SXM": 3.35, "H200": 4.8, "H100-PCIe": 2.0}
# integration.md §8 rows at B=64, V=128256 (bytes per decode step)
FLOOR_TABLE_MB = {
    "logits only (values for K<<V candidates)": 32.8,
    "stats only: fp32 logits + bf16 values": 49.3,
    "stats only: fp32 logits + fp32 values": 65.7,
    "+ write guided fp32 logits in place": 98.5,
}
GPU_SHAPES = [(64, 128256), (8, 128256), (1, 128256)]
CPU_SHAPES = [(4, 4099)]
K = 20


def _eager(x, off, idx, write):
    z = x.scatter_add(1, idx, off) if idx is not None else x + off
    lp = torch.log_softmax(x, -1)
    lq = torch.log_softmax(z, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    lse_p, lse_q = torch.logsumexp(x, -1), torch.logsumexp(z, -1)
    if write:
        x.copy_(z)
    return lse_p, lse_q, kl


def _time_ms(fn, device):
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    from torch.utils import benchmark

    m = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return m.blocked_autorange(min_run_time=0.2).median * 1e3


def _fused_bytes(B, V, x_elt, off_kind, write):
    """Bytes the fused kernel has to move: x once, offsets once, z written (dense: all; sparse: K)."""
    n = B * V
    read = n * x_elt
    if off_kind == "sparse":
        read += B * K * (8 + 4)
        written = B * K * x_elt if write else 0
    else:
        read += n * (2 if off_kind == "dense-bf16" else 4)
        written = n * x_elt if write else 0
    return read + written


def _peak_name(device_name: str) -> str | None:
    d = device_name.upper()
    if "H200" in d:
        return "H200"
    if "H100" in d:
        return "H100-PCIe" if "PCIE" in d else "H100-SXM"
    return None


def run(shapes, device, *, top_p=False):
    rows = []
    interp = G.interpreter_enabled()
    backend = "triton" if device == "cuda" else ("triton-interpreter" if interp else "torch-reference")
    dev_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = _peak_name(dev_name)
    fused_fn = G.fused_guidance if backend != "torch-reference" else G.guidance_reference
    for B, V in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        x0 = torch.randn(B, V, device=device, generator=g) * 4.0
        idx = torch.topk(x0, K, dim=-1).indices
        variants = [
            ("dense-fp32", (torch.randn(B, V, device=device, generator=g) * 2.0), None),
            ("dense-bf16", (torch.randn(B, V, device=device, generator=g) * 2.0).to(torch.bfloat16), None),
            ("sparse", torch.randn(B, K, device=device, generator=g) * 3.0, idx),
        ]
        for kind, off, ids in variants:
            for write in (False, True):
                x = x0.clone()
                kw = dict(idx=ids, write=write)
                if top_p:
                    kw.update(top_p=0.9, temperature=0.8)
                fused_fn(x, off, **kw)  # compile / autotune
                t_fused = _time_ms(lambda: fused_fn(x, off, **kw), device)
                t_eager = _time_ms(lambda: _eager(x, off, ids, write), device)
                nbytes = _fused_bytes(B, V, x.element_size(), kind, write)
                row = {
                    "B": B, "V": V, "offsets": kind, "K": K if kind == "sparse" else None, "write": write,
                    "top_p": top_p, "fused_backend": backend,
                    "fused_ms": round(t_fused, 5), "eager_ms": round(t_eager, 5),
                    "speedup": round(t_eager / t_fused, 3),
                    "num_chunks": G.choose_num_chunks(B, V, G._num_sms(x.device)),
                    "fused_bytes": nbytes,
                    "fused_GBps": round(nbytes / (t_fused * 1e-3) / 1e9, 1),
                    "floor_us": {name: round(nbytes / (tb * 1e12) * 1e6, 2) for name, tb in PEAK_TBPS.items()},
                }
                if peak is not None:
                    row["fraction_of_peak"] = round(row["fused_GBps"] / (PEAK_TBPS[peak] * 1e3), 3)
                rows.append(row)
                print(f"B={B:3d} V={V:6d} {kind:10s} write={int(write)} top_p={int(top_p)}  "
                      f"fused {t_fused * 1e3:9.1f} us  eager {t_eager * 1e3:9.1f} us  "
                      f"x{row['speedup']:.2f}  {row['fused_GBps']:8.1f} GB/s")
    return rows, dev_name, peak


def _plot(rows):
    def draw(ax):
        labels = [f"B{r['B']} {r['offsets']}{' w' if r['write'] else ''}{' tp' if r['top_p'] else ''}" for r in rows]
        pos = range(len(rows))
        ax.barh([p + 0.2 for p in pos], [r["eager_ms"] * 1e3 for r in rows], height=0.4, label="eager torch")
        ax.barh([p - 0.2 for p in pos], [r["fused_ms"] * 1e3 for r in rows], height=0.4, label="fused")
        ax.set_yticks(list(pos), labels, fontsize=6)
        ax.set_xlabel("µs per decode step (median)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)

    return draw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU smoke check)")
    ap.add_argument("--no-top-p", action="store_true", help="skip the top-p KL rows")
    ap.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and G.interpreter_enabled() and not G.triton_stdlib_interpreted():
        raise SystemExit("TRITON_INTERPRET must be set before triton is imported")
    shapes = CPU_SHAPES if (args.smoke or device == "cpu") else GPU_SHAPES
    rows, dev_name, peak = run(shapes, device)
    if not args.no_top_p:
        tp_rows, _, _ = run(shapes[:1], device, top_p=True)
        rows += tp_rows
    figures = {
        "device": dev_name,
        "peak_for_fraction": peak,
        "floor_table_B64_V128256_MB": FLOOR_TABLE_MB,
        "floor_table_us": {name: {dev: round(mb * 1e6 / (tb * 1e12) * 1e6, 1) for dev, tb in PEAK_TBPS.items()}
                           for name, mb in FLOOR_TABLE_MB.items()},
        "rows": rows,
        "timing": "triton.testing.do_bench median" if device == "cuda" else "torch.utils.benchmark median",
    }
    notes = None if device == "cuda" else "CPU smoke run: fused column is not a GPU kernel timing"
    if args.no_write:
        return None
    try:
        from guidedecode.bench import write_result
    except ImportError:  # helper not available: plain JSON
        out = Path(__file__).resolve().parent / "results"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"guidance-kernel-{'cpu' if device == 'cpu' else 'cuda'}.json"
        path.write_text(json.dumps({"benchmark": "guidance-kernel", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "notes": notes, "figures": figures}, indent=2))
    else:
        path = write_result("guidance-kernel", figures, plot=_plot(rows), notes=notes)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
