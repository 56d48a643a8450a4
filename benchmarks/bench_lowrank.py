"""Per-row low-rank weight deltas: fused kernel vs unfused torch vs a dense ΔW per row; decode-step overhead.

Layer level, ``y = x W^T + s_b (x A_b^T) B_b^T`` with a distinct delta on every row:

* ``base``: ``x W^T`` only (no delta);
* ``fused``: base + ``guidedecode.kernels.lowrank.lowrank_update`` (the Triton kernel; on a machine without
  CUDA the dispatcher's torch path, so CPU rows show ``fused == unfused``);
* ``unfused``: base + gather + two ``bmm`` in torch;
* ``dense``: base + ``bmm(x, ΔW_b^T)`` with ``ΔW_b = s_b B_b A_b`` materialised per row beforehand (the
  per-step cost of keeping dense deltas; building them is reported separately as ``dense_build_ms``).

Model level: one cached decode step of a Llama-architecture model (random weights; the step costs the same
with any weights) without deltas and with a distinct delta on every row through ``DeltaInjector`` (q/v of
the last two layers, as OpTune edits, and q/v of all layers). Issue target (GPU): rank 16 on every row
costs <= 1.3x the step without deltas.

    python benchmarks/bench_lowrank.py          # Llama-3.1-8B shapes on CUDA; small shapes on CPU
    python benchmarks/bench_lowrank.py --smoke  # tiny shapes anywhere

On CUDA timings are ``triton.testing.do_bench`` medians (ms, bf16); elsewhere ``torch.utils.benchmark``
medians (fp32), which only give ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import os

import torch

from guidedecode.deltas import DeltaInjector, LowRankDelta, find_targets
from guidedecode.kernels import lowrank as L

# (d_out, d_in) per projection: Llama-3.1-8B q_proj and v_proj (GQA)
GPU_LAYERS = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
CPU_LAYERS = {"q_proj": (1024, 1024), "v_proj": (256, 1024)}
SMOKE_LAYERS = {"q_proj": (64, 64)}
GPU_CASES = [(1, 1, 16), (8, 1, 16), (32, 1, 16), (64, 1, 16), (32, 1, 256), (8, 1, 1024), (4, 256, 16)]
CPU_CASES = [(1, 1, 16), (8, 1, 16), (8, 1, 256), (2, 64, 16)]
SMOKE_CASES = [(2, 1, 4)]
# model-level configs (LlamaConfig overrides); GPU uses the 8B architecture
GPU_MODEL = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
CPU_MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=8192)
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)


def _time_ms(fn, device) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    return benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                           ).blocked_autorange(min_run_time=0.2).median * 1e3


def layer_rows(layers, cases, device, dtype, rounds=3):
    rows = []
    for name, (d_out, d_in) in layers.items():
        g = torch.Generator(device=device).manual_seed(0)
        W = torch.randn(d_out, d_in, device=device, dtype=dtype, generator=g) / d_in ** 0.5
        for batch, T, rank in cases:
            x = torch.randn(batch, T, d_in, device=device, dtype=dtype, generator=g)
            A = torch.randn(batch, rank, d_in, device=device, dtype=dtype, generator=g) / d_in ** 0.5
            B = torch.randn(batch, d_out, rank, device=device, dtype=dtype, generator=g) / rank ** 0.5
            s = torch.rand(batch, device=device, generator=g)
            index = torch.arange(batch, device=device)

            def base():
                return torch.nn.functional.linear(x, W)

            def fused():
                return L.lowrank_update(torch.nn.functional.linear(x, W), x, A, B, s, index, inplace=True)

            def unfused():
                return L.lowrank_update(torch.nn.functional.linear(x, W), x, A, B, s, index, backend="torch")

            def build():
                return torch.bmm(B, A) * s.to(dtype)[:, None, None]

            dense_w = build()

            def dense():
                return torch.nn.functional.linear(x, W) + torch.bmm(x, dense_w.transpose(1, 2))

            with torch.no_grad():
                ref = unfused()
                err = (fused().float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                variants = (("base", base), ("fused", fused), ("unfused", unfused), ("dense", dense),
                            ("dense_build", build))
                runs = [{k: _time_ms(f, device) for k, f in variants} for _ in range(rounds)]  # interleaved
                times = {k: min(run[k] for run in runs) for k, _ in variants}
            row = {"layer": name, "d_out": d_out, "d_in": d_in, "rows": batch, "T": T, "rank": rank,
                   **{f"{k}_ms": round(v, 5) for k, v in times.items()},
                   "fused_over_base": round(times["fused"] / times["base"], 3),
                   "unfused_over_base": round(times["unfused"] / times["base"], 3),
                   "dense_over_base": round(times["dense"] / times["base"], 3),
                   "fused_vs_unfused_rel_err": err}
            rows.append(row)
            print(f"{name} {d_out}x{d_in} rows={batch:3d} T={T:4d} r={rank:5d}  base {times['base']:.4f} ms  "
                  f"fused x{row['fused_over_base']:.2f}  unfused x{row['unfused_over_base']:.2f}  "
                  f"dense x{row['dense_over_base']:.2f}")
    return rows


def model_rows(overrides, batches, rank, device, dtype, context=128, rounds=3):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**overrides, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    rows = []
    target_sets = {"qv-last2": find_targets(model, ("q_proj", "v_proj"), layers=[-2, -1]),
                   "qv-all": find_targets(model, ("q_proj", "v_proj"))}
    modules = dict(model.named_modules())
    for batch in batches:
        ids = torch.randint(2, config.vocab_size, (batch, context + 1), device=device)
        with torch.no_grad():
            cache = model(input_ids=ids[:, :context], use_cache=True).past_key_values

            def step():
                # crop back so every timed step sees the same context length
                out = model(input_ids=ids[:, context:], cache=cache, use_cache=True)
                cache.crop(-1)
                return out.logits

            injectors = {}
            for label, names in target_sets.items():
                deltas = {}
                for name in names:
                    m = modules[name]
                    deltas[name] = [LowRankDelta(torch.randn(rank, m.in_features, device=device, dtype=dtype) * 1e-3,
                                                 torch.randn(m.out_features, rank, device=device, dtype=dtype) * 1e-3)
                                    for _ in range(batch)]
                injectors[label] = DeltaInjector(model, deltas)
            # alternate base and delta steps for a few rounds and keep each variant's best median, so that
            # load from other processes (CPU) hits every variant alike
            times = {"base": [], **{label: [] for label in injectors}}
            for _ in range(rounds):
                times["base"].append(_time_ms(step, device))
                for label, injector in injectors.items():
                    with injector:
                        times[label].append(_time_ms(step, device))
            base = min(times["base"])
            row = {"rows": batch, "context": context, "rank": rank, "base_step_ms": round(base, 4)}
            for label in injectors:
                t = min(times[label])
                row[f"{label}_step_ms"] = round(t, 4)
                row[f"{label}_over_base"] = round(t / base, 3)
            rows.append(row)
            print(f"decode step rows={batch:3d} ctx={context}: base {base:.3f} ms, q/v last 2 layers "
                  f"x{row['qv-last2_over_base']:.3f}, q/v all layers x{row['qv-all_over_base']:.3f}")
    return rows


def _plot(layer, model):
    def draw(ax):
        labels = [f"{r['layer']} b{r['rows']} T{r['T']} r{r['rank']}" for r in layer]
        pos = range(len(layer))
        for k, (key, name) in enumerate((("fused_over_base", "fused"), ("unfused_over_base", "unfused torch"),
                                         ("dense_over_base", "dense ΔW per row"))):
            ax.barh([p + (k - 1) * 0.27 for p in pos], [r[key] for r in layer], height=0.27, label=name)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_yticks(list(pos), labels, fontsize=6)
        ax.set_xlabel("time / base projection (x W^T only)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)

    return draw


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (a check of the script)")
    ap.add_argument("--no-model", action="store_true", help="skip the model-level decode step")
    ap.add_argument("--no-write", action="store_true", help="print only, write no result file")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        layers, cases, model_cfg, batches = SMOKE_LAYERS, SMOKE_CASES, SMOKE_MODEL, [2]
    elif device == "cuda":
        layers, cases, model_cfg, batches = GPU_LAYERS, GPU_CASES, GPU_MODEL, [1, 8, 32, 64]
    else:
        layers, cases, model_cfg, batches = CPU_LAYERS, CPU_CASES, CPU_MODEL, [1, 8]
    fused_backend = "triton" if (device == "cuda" and L.KERNELS_USABLE) else (
        "triton-interpreter" if L.INTERPRETED else "torch (no CUDA: fused == unfused path)")
    layer = layer_rows(layers, cases, device, dtype)
    model = [] if args.no_model else model_rows(model_cfg, batches, 16, device, dtype)
    figures = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dtype": str(dtype),
               "load_average_1_5_15min": [round(v, 2) for v in os.getloadavg()],
               "fused_backend": fused_backend, "layer": layer, "decode_step": model,
               "decode_step_model": model_cfg,
               "timing": "triton.testing.do_bench median" if device == "cuda" else "torch.utils.benchmark median"}
    if args.no_write:
        return None
    from guidedecode.bench import write_result

    notes = None if device == "cuda" else ("CPU run: ratios only, measured side by side; the fused column is the "
                                           "torch path (the Triton kernel needs CUDA)")
    path = write_result("lowrank" + ("-smoke" if args.smoke else ""), figures, plot=_plot(layer, model), notes=notes)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
