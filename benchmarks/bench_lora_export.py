"""LoRA hand-off error: an OpTune edit compressed to rank r (PEFT adapter, loaded by peft) vs the injector.

One question of the synthetic task, one greedy attempt of the model, the edit computed from
``chat(q) ‖ attempt ‖ "Your answer is incorrect."``; the exported adapter at each rank r is loaded with
``peft.PeftModel.from_pretrained`` and the per-token log-probs of the attempt (teacher forced after the
prompt) are compared with the model under the full-rank edit through ``DeltaInjector``. Reported: max and
mean |Δ log p| over the attempt's tokens, and the edit's own effect (injector vs base) for scale.

    python benchmarks/bench_lora_export.py --editor runs/optune-synthetic-q14/editor
    python benchmarks/bench_lora_export.py --eta 5e-3      # an untrained editor with a larger step
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--editor", default=None, help="trained OpTune editor (default: untrained, --eta)")
    ap.add_argument("--eta", type=float, default=5e-3, help="η of the untrained editor")
    ap.add_argument("--ranks", default="1,2,4,8,16,32,64,full")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from peft import PeftModel

    from guidedecode.bench import write_result
    from guidedecode.deltas import DeltaInjector, OpTuneEditor, export_lora
    from guidedecode.models import load_model
    from guidedecode.tasks import get_task

    model, tokenizer = load_model(args.model)
    model.eval()
    task = get_task("synthetic")
    problem = task.load(split="test", limit=1)[0]
    messages = task.messages(problem)
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False)
    attempt_ids = out[:, prompt_ids.shape[1]:]
    attempt = tokenizer.decode(attempt_ids[0], skip_special_tokens=True)
    editor = (OpTuneEditor.from_pretrained(args.editor, model) if args.editor
              else OpTuneEditor.for_model(model, eta_init=args.eta).eval())
    (edit,) = editor.edit(model, torch.tensor([editor.edit_sequence(tokenizer, messages, attempt)]))
    edit = {name: type(d)(d.A.detach(), d.B.detach(), float(d.scale)) for name, d in edit.items()}
    tokens = edit[next(iter(edit))].rank

    def logprobs(m):
        with torch.no_grad():
            logits = m(input_ids=out).logits[0, prompt_ids.shape[1] - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, attempt_ids[0][:, None])[:, 0]

    base = logprobs(model)
    with DeltaInjector(model, edit):
        edited = logprobs(model)
    rows = []
    for r in args.ranks.split(","):
        rank = tokens if r == "full" else int(r)
        with tempfile.TemporaryDirectory() as directory:
            export_lora(edit, directory, rank)
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
            err = (logprobs(peft_model) - edited).abs()
        rows.append({"rank": rank, "max_abs_logprob_error": err.max().item(), "mean_abs_logprob_error": err.mean().item()})
        print(f"rank {rank:4d}: max |dlogp| {rows[-1]['max_abs_logprob_error']:.2e}  "
              f"mean {rows[-1]['mean_abs_logprob_error']:.2e}")
    effect = (edited - base).abs()
    figures = {"model": args.model, "editor": args.editor or f"untrained (eta {args.eta:g})", "edit_rank_tokens": tokens,
               "attempt_tokens": int(attempt_ids.shape[1]), "targets": sorted(edit),
               "edit_effect_vs_base": {"max_abs_logprob": effect.max().item(), "mean_abs_logprob": effect.mean().item()},
               "rows": rows}
    print(f"edit effect vs base: max {effect.max().item():.2e}, mean {effect.mean().item():.2e}")
    if args.no_write:
        return

    def plot(ax):
        ax.loglog([r["rank"] for r in rows], [max(r["max_abs_logprob_error"], 1e-9) for r in rows], "o-", label="max")
        ax.loglog([r["rank"] for r in rows], [max(r["mean_abs_logprob_error"], 1e-9) for r in rows], "o-", label="mean")
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel("|log p(PEFT adapter) - log p(injector)| on the attempt")
        ax.legend()

    print("wrote", write_result("lora-export", figures, plot=plot))


if __name__ == "__main__":
    main()
