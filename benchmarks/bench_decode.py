"""Plain HF decode throughput of the embedded model: the baseline every guide is compared against.

tokens/s = batch * new_tokens / wall time of `model.generate` (greedy, every row forced to
`new_tokens` tokens with min_new_tokens), after one warm-up call, median of `--repeats` (every repeat
and the spread are recorded). `--model` may name a random-weight architecture of
`guidedecode.bench.MODEL_CONFIGS` (e.g. `llama-3.1-8b`, bf16 on CUDA; prompts of `--prompt-tokens`
random ids), which the GPU suite uses: no weights travel.

    guidedecode bench decode [-- --batches 1 8 32 --new-tokens 64]
    .venv-vllm/bin/guidedecode bench decode -- --backend vllm --batches 8  (HF and vLLM, plain and Q#)
    python benchmarks/bench_decode.py --model llama-3.1-8b --batches 1 8 64 --new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from guidedecode.bench import MODEL_CONFIGS, random_model, write_result
from guidedecode.models import load_model


def measure(model, tokenizer, batch: int, new_tokens: int, repeats: int, prompt_tokens: int | None = None) -> dict:
    if prompt_tokens:  # random-weight model: random prompt ids
        ids = torch.randint(1000, min(model.config.vocab_size, 128000), (batch, prompt_tokens),
                            generator=torch.Generator().manual_seed(batch))
        inputs = {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device)}
    else:
        prompts = [f"Write a short story about the number {i}." for i in range(batch)]
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
        inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    pad = tokenizer.pad_token_id if tokenizer is not None else model.generation_config.pad_token_id
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    model.generate(**inputs, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    median = statistics.median(times)
    return {"batch": batch, "new_tokens": new_tokens, "prompt_tokens": inputs["input_ids"].shape[1],
            "seconds_median": median, "seconds_min": min(times), "seconds_max": max(times), "seconds_all": times,
            "tokens_per_second": batch * new_tokens / median,
            "ms_per_step": 1e3 * median / new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length for random-weight configs")
    parser.add_argument("--shrink", action="store_true", help="toy width/depth of a random-weight config (CPU smoke)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                        help="vllm: HF generate and a vLLM engine, plain and Q# guided, side by side (decode_vllm.py)")
    parser.add_argument("--dtype", default="bfloat16", help="--backend vllm: dtype of both paths")
    parser.add_argument("--eta", type=float, default=3.0, help="--backend vllm: Q# guidance strength")
    parser.add_argument("--value-layers", type=int, default=6, help="--backend vllm: layers of the value model")
    args = parser.parse_args()
    if args.backend == "vllm":
        from decode_vllm import run  # benchmarks/decode_vllm.py, beside this script

        run(args, write_result)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    synthetic = args.model in MODEL_CONFIGS
    if synthetic:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model, tokenizer = random_model(args.model, device=device, dtype=dtype, shrink=args.shrink), None
    else:
        model, tokenizer = load_model(args.model, device=device)
    rows = []
    for batch in args.batches:
        row = measure(model, tokenizer, batch, args.new_tokens, args.repeats,
                      prompt_tokens=args.prompt_tokens if synthetic else None)
        rows.append(row)
        print(f"batch {batch:3d}: {row['tokens_per_second']:8.1f} tokens/s ({row['seconds_median']:.2f} s)")

    def plot(ax):
        ax.bar([str(r["batch"]) for r in rows], [r["tokens_per_second"] for r in rows], color="tab:blue")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (greedy)")

    notes = (f"plain HF generate, random-weight {args.model} in {model.dtype}" if synthetic
             else "plain HF generate, fp32 weights") + "; baseline for guided decoding"
    path = write_result("decode", {"model": args.model, "dtype": str(model.dtype).removeprefix("torch."),
                                   "torch_threads": torch.get_num_threads(), "rows": rows}, plot=plot, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
