"""Q♯ decode throughput: unguided vs QSharpGuide (Q head, V head) vs a reference-style loop; kernel vs eager.

Decode part (the embedded model as reference, a value model of the same backbone with a random head;
every row forced to ``--new-tokens`` tokens; sampling at T=0.8, top-p 0.9, k=20, eta=10):

* ``unguided``: ``model.generate`` alone;
* ``qsharp-q`` / ``qsharp-v``: ``model.generate(logits_processor=[QSharpGuide(...)])`` with a Q head
  (gathered over the k candidate rows) or a V head (k candidates in one batched pass, cache cropped);
* ``reference-loop-q`` / ``reference-loop-v``: a plain re-implementation of the reference code's loop
  (jinpz/q_sharp ``eval_ckpt.py``): a hand-written decode loop, the full-vocabulary Q head followed by a
  gather, the V candidate pass on a deep copy of the value cache, offsets and top-p in eager ops.

tokens/s = rows x new tokens / wall time (median of ``--repeats`` after a warm-up). The guidance
overhead is the step time the guide adds beyond the value model's own forward passes:
``(t_guided - t_unguided - t_value_model) / t_guided``, with ``t_value_model`` the time spent inside
``ValueModel.start / advance / candidate_logits`` during the guided run (target <= 10%).

Kernel part: ``benchmarks/bench_guidance_kernel.py`` (fused epilogue vs the eager torch chain; on CUDA
at B=64, V=128256 with the bandwidth floor of integration.md), run in the same process.

    guidedecode bench qsharp [-- --batch 8 --new-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import time
from pathlib import Path

import torch

from guidedecode.bench import write_result
from guidedecode.guides.qsharp import QSharpGuide
from guidedecode.models import load_model
from guidedecode.value_model import ValueModel

K, ETA, TEMPERATURE, TOP_P = 20, 10.0, 0.8, 0.9


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _inputs(tokenizer, batch: int, device):
    prompts = [f"Question {i}: what is {i + 3} times {i + 7}? Think step by step." for i in range(batch)]
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False).to(device)


class _ValueModelTimer:
    """Accumulates the wall time spent inside the value model's inference methods."""

    def __init__(self, vm: ValueModel):
        self.seconds = 0.0
        for name in ("start", "advance", "candidate_logits"):
            setattr(vm, name, self._timed(getattr(vm, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            _sync()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            _sync()
            self.seconds += time.perf_counter() - start
            return result

        return wrapper


def _generate(model, inputs, new_tokens, guide=None, seed=0):
    torch.manual_seed(seed)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                          temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                          logits_processor=[guide] if guide is not None else None)


# ------------------------------------------------------------------------------- reference-style loop
def _sample_top_p(logits: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(logits / TEMPERATURE, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = sorted_probs.cumsum(-1) - sorted_probs > TOP_P
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)
    return order.gather(1, choice).squeeze(1)


@torch.no_grad()
def reference_loop(model, vm: ValueModel, inputs, new_tokens: int, seed: int = 0) -> torch.Tensor:
    """Hand-written guided decode in the reference code's style (see the module docstring)."""
    from transformers import DynamicCache

    torch.manual_seed(seed)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = mask.long().cumsum(-1) - 1
    ref_cache, vm_cache = DynamicCache(config=model.config), DynamicCache(config=vm.backbone.config)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions.clamp(min=0),
                   past_key_values=ref_cache).logits[:, -1].float()
    hidden = vm.backbone(input_ids=ids, attention_mask=mask, position_ids=positions.clamp(min=0),
                         past_key_values=vm_cache).last_hidden_state[:, -1]
    next_pos = positions[:, -1] + 1
    weight = vm.head.weight.float()
    out = []
    for _ in range(new_tokens):
        top = logits.topk(K, dim=-1).indices
        if vm.config.head == "q":
            z = (hidden.float() @ weight.T).gather(1, top)  # the full-vocabulary head, then a gather
        else:
            scratch = copy.deepcopy(vm_cache)  # candidate pass on a copied cache
            B, L = mask.shape
            allowed = torch.cat([mask.bool()[:, None, :].expand(B, K, L),
                                 torch.eye(K, dtype=torch.bool, device=top.device).expand(B, K, K)], -1)[:, None]
            additive = torch.zeros(allowed.shape, dtype=weight.dtype, device=top.device)
            additive.masked_fill_(~allowed, torch.finfo(weight.dtype).min)
            cand_hidden = vm.backbone(input_ids=top, attention_mask=additive,
                                      position_ids=next_pos[:, None].expand(B, K),
                                      past_key_values=scratch).last_hidden_state
            z = (cand_hidden.float() @ weight.T).squeeze(-1)
        p = torch.sigmoid(z)
        offsets = torch.log(1 - p + p * torch.exp(torch.tensor(ETA)))
        guided = logits.clone()
        guided.scatter_add_(1, top, offsets)
        token = _sample_top_p(guided)
        out.append(token)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step = token[:, None]
        logits = model(input_ids=step, attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=ref_cache).logits[:, -1].float()
        hidden = vm.backbone(input_ids=step, attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=vm_cache).last_hidden_state[:, -1]
        next_pos = next_pos + 1
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------- measurement
def _median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    fn(4)  # warm-up (short)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        fn(None)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def decode_rows(model, tokenizer, batch: int, new_tokens: int, repeats: int) -> list[dict]:
    inputs = _inputs(tokenizer, batch, model.device)
    value_models = {head: ValueModel.from_backbone(model, head=head, init="normal", tokenizer=tokenizer)
                    for head in ("q", "v")}
    rows = []

    def record(name, fn):
        median, times = _median_seconds(fn, repeats)
        rows.append({"method": name, "batch": batch, "new_tokens": new_tokens, "seconds_median": median,
                     "seconds_all": times, "tokens_per_second": batch * new_tokens / median})
        print(f"{name:18s} batch {batch:3d}: {rows[-1]['tokens_per_second']:8.1f} tokens/s ({median:.2f} s)",
              flush=True)

    record("unguided", lambda n: _generate(model, inputs, n or new_tokens))
    for head, vm in value_models.items():
        guide = QSharpGuide(vm, eta=ETA, top_k=K, tokenizer=tokenizer, temperature=TEMPERATURE, top_p=TOP_P)
        timer = _ValueModelTimer(vm)
        runs = []

        def guided(n, guide=guide, timer=timer, runs=runs):
            before = timer.seconds
            _generate(model, inputs, n or new_tokens, guide)
            if n is None:
                runs.append(timer.seconds - before)

        median, times = _median_seconds(guided, repeats)
        vm_seconds = statistics.median(runs)
        rows.append({"method": f"qsharp-{head}", "batch": batch, "new_tokens": new_tokens,
                     "seconds_median": median, "seconds_all": times,
                     "tokens_per_second": batch * new_tokens / median, "value_model_seconds": vm_seconds})
        print(f"qsharp-{head:11s} batch {batch:3d}: {rows[-1]['tokens_per_second']:8.1f} tokens/s "
              f"({median:.2f} s, value model {vm_seconds:.2f} s)", flush=True)
    for head, vm in value_models.items():
        record(f"reference-loop-{head}", lambda n, vm=vm: reference_loop(model, vm, inputs, n or new_tokens))

    by_name = {r["method"]: r for r in rows}
    base = by_name["unguided"]["seconds_median"]
    for head in ("q", "v"):
        row = by_name[f"qsharp-{head}"]
        row["guidance_overhead_fraction"] = (row["seconds_median"] - base - row["value_model_seconds"]) / row[
            "seconds_median"]
        row["speedup_vs_reference_loop"] = by_name[f"reference-loop-{head}"]["seconds_median"] / row["seconds_median"]
    return rows


def _kernel_rows(smoke: bool) -> list[dict]:
    path = Path(__file__).with_name("bench_guidance_kernel.py")
    spec = importlib.util.spec_from_file_location("bench_guidance_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = module.CPU_SHAPES if (smoke or device == "cpu") else module.GPU_SHAPES[:1]
    rows, _, _ = module.run(shapes, device)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 24 on CPU, 128 on CUDA")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-kernel", action="store_true", help="skip the fused-kernel part")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(args.model, device="cuda" if cuda else "cpu")
    batch = args.batch or (64 if cuda else 8)
    new_tokens = args.new_tokens or (128 if cuda else 24)
    rows = decode_rows(model, tokenizer, batch, new_tokens, args.repeats)
    kernel = [] if args.no_kernel else _kernel_rows(smoke=not cuda)

    def plot(ax):
        ax.bar([r["method"] for r in rows], [r["tokens_per_second"] for r in rows], color="tab:blue")
        ax.set_ylabel(f"decode tokens/s (batch {batch}, {new_tokens} new tokens)")
        ax.tick_params(axis="x", rotation=30)

    notes = ("value model = the reference's own backbone with a random head (same size as the reference, so "
             "the value model's forward roughly doubles the step time); ratios are side by side in one run")
    if not cuda:
        notes += "; CPU: absolute numbers are indicative only, kernel rows are the torch reference (smoke)"
    path = write_result("qsharp", {"model": args.model, "k": K, "eta": ETA, "temperature": TEMPERATURE,
                                   "top_p": TOP_P, "torch_threads": torch.get_num_threads(), "decode": rows,
                                   "kernel": kernel}, plot=plot, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
