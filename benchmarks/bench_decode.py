"""Plain HF decode throughput of the embedded model: the baseline every guide is compared against.

tokens/s = batch * new_tokens / wall time of `model.generate` (greedy, every row forced to
`new_tokens` tokens with min_new_tokens), after one warm-up call, median of `--repeats`.

    guidedecode bench decode [-- --batches 1 8 32 --new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from guidedecode.bench import write_result
from guidedecode.models import load_model


def measure(model, tokenizer, batch: int, new_tokens: int, repeats: int) -> dict:
    prompts = [f"Write a short story about the number {i}." for i in range(batch)]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    inputs = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
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
            "seconds_median": median, "seconds_all": times, "tokens_per_second": batch * new_tokens / median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device=device)
    rows = []
    for batch in args.batches:
        row = measure(model, tokenizer, batch, args.new_tokens, args.repeats)
        rows.append(row)
        print(f"batch {batch:3d}: {row['tokens_per_second']:8.1f} tokens/s ({row['seconds_median']:.2f} s)")

    def plot(ax):
        ax.bar([str(r["batch"]) for r in rows], [r["tokens_per_second"] for r in rows], color="tab:blue")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s (greedy)")

    path = write_result("decode", {"model": args.model, "torch_threads": torch.get_num_threads(), "rows": rows},
                        plot=plot, notes="plain HF generate, fp32 weights; baseline for guided decoding")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
