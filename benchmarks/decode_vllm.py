"""`bench decode --backend vllm`: guided vs unguided decode on vLLM and on HF `generate`, side by side.

Four variants: HF `generate` plain, HF with `QSharpGuide`, vLLM plain, vLLM with the
`guidedecode.vllm.QSharp` processor. The HF pair runs first (interleaved per repeat), then the engine
starts and the vLLM pair runs (interleaved): a live vLLM CPU engine keeps its worker's threads polling,
which slows any other torch work on the machine (HF beside a live engine measured 1.9 tokens/s here). Same embedded model, same
dtype, same greedy prompts (batch of chat prompts), every row forced to `--new-tokens` tokens (HF
`min_new_tokens`, vLLM `min_tokens`), the same value model (the embedded model's first
`--value-layers` layers, untrained head: the cost of guidance does not depend on the head's weights).
tokens/s = batch * new_tokens / wall time of one call, after a warm-up call; every repeat is recorded.
Run it where vLLM is installed (`.venv-vllm/bin/guidedecode bench decode -- --backend vllm`).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time


def run(args, write_result) -> None:
    import torch
    from vllm import LLM, SamplingParams

    from guidedecode import QSharpGuide, ValueModel, load_model
    from guidedecode.models import model_source
    from guidedecode.vllm import QSharp
    from guidedecode.vllm.processors import VALUE_MODEL_ENV

    dtype = args.dtype
    model, tok = load_model(args.model, dtype=dtype)
    value_dir = tempfile.mkdtemp(prefix="bench-decode-vm-")
    ValueModel.from_backbone(model, tokenizer=tok, num_layers=args.value_layers).save_pretrained(value_dir)
    value_model = ValueModel.from_pretrained(value_dir, dtype=model.dtype)
    os.environ[VALUE_MODEL_ENV] = value_dir
    engine = {}

    figures = {"model": args.model, "dtype": dtype, "value_model_layers": args.value_layers, "eta": args.eta,
               "new_tokens": args.new_tokens, "torch_threads": torch.get_num_threads(), "rows": []}
    for batch in args.batches:
        prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a short story about the number {i}."}],
                                           tokenize=False, add_generation_prompt=True) for i in range(batch)]
        inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

        def hf(guided: bool, tokens: int):
            guide = [QSharpGuide(value_model, eta=args.eta, tokenizer=tok)] if guided else None
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 logits_processor=guide, pad_token_id=tok.pad_token_id)
            assert out.shape[1] - inputs["input_ids"].shape[1] == tokens

        def vllm(guided: bool, tokens: int):
            if "llm" not in engine:  # started only after the HF variants ran (see the module docstring)
                engine["llm"] = LLM(model_source(args.model), dtype=dtype, enforce_eager=True,
                                    kv_cache_memory_bytes=1 << 30, seed=0, logits_processors=[QSharp])
            llm = engine["llm"]
            params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True,
                                    extra_args={"qsharp_eta": args.eta} if guided else None)
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(len(o.outputs[0].token_ids) == tokens for o in outs)

        variants = {"hf_plain": (hf, False), "hf_qsharp": (hf, True), "vllm_plain": (vllm, False),
                    "vllm_qsharp": (vllm, True)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for pair in (("hf_plain", "hf_qsharp"), ("vllm_plain", "vllm_qsharp")):
            for name in pair:
                fn, guided = variants[name]
                fn(guided, 4)  # warm-up
            for _ in range(args.repeats):
                for name in pair:
                    fn, guided = variants[name]
                    start = time.perf_counter()
                    fn(guided, args.new_tokens)
                    times[name].append(time.perf_counter() - start)
        row = {"batch": batch}
        for name, values in times.items():
            median = statistics.median(values)
            row[name] = {"seconds_all": values, "seconds_median": median, "seconds_min": min(values),
                         "seconds_max": max(values), "tokens_per_second": batch * args.new_tokens / median}
        row["vllm_over_hf_plain"] = row["hf_plain"]["seconds_median"] / row["vllm_plain"]["seconds_median"]
        row["vllm_over_hf_qsharp"] = row["hf_qsharp"]["seconds_median"] / row["vllm_qsharp"]["seconds_median"]
        figures["rows"].append(row)
        print(f"batch {batch}: " + ", ".join(f"{n} {row[n]['tokens_per_second']:.1f} tok/s" for n in variants))

    def plot(ax):
        names = list(variants)
        width = 0.8 / len(figures["rows"])
        for i, row in enumerate(figures["rows"]):
            ax.bar([j + i * width for j in range(len(names))], [row[n]["tokens_per_second"] for n in names],
                   width=width, label=f"batch {row['batch']}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_ylabel("decode tokens/s (greedy, median)")
        ax.legend()

    notes = ("HF generate vs a vLLM CPU engine (V1 runner, eager), plain and Q# guided; the HF pair first, then the "
             "vLLM pair (each pair interleaved per repeat), so a live engine does not slow HF; "
             f"value model = the embedded model's first {args.value_layers} layers; vLLM guides one request at "
             "a time (each keeps its own value-model cache), HF guides the whole batch in one value-model call")
    path = write_result("decode-vllm", figures, plot=plot, notes=notes)
    print(f"wrote {path}")
