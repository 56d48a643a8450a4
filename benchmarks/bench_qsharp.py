"""Q♯ decode throughput: unguided vs QSharpGuide (Q head, V head) vs a reference-style loop; kernel vs eager.

Decode part (the embedded model as reference, a value model of the same backbone with a random head;
every row forced to ``--new-tokens`` tokens; sampling at T=0.8, top-p 0.9, k=20, eta=10):

* ``unguided``: ``model.generate`` alone;
* ``qsharp-q`` / ``qsharp-v``: ``model.generate(logits_processor=[QSharpGuide(...)])`` with a Q head
  (gathered over the k candidate rows) or a V head (k candidates in one batched pass, cache cropped);
* ``reference-loop-q`` / ``reference-loop-v``: a plain re-implementation of the reference code's loop
  (jinpz/q_sharp ``eval_ckpt.py``): a hand-written decode loop, the full-vocabulary Q head followed by a
  gather, the V candidate pass on a deep copy of the value cache, offsets and top-p in eager ops.

tokens/s = rows x new tokens / wall time. Every variant is warmed up once, then the variants are timed
in turn within each repeat (interleaved, so load on a shared machine hits them alike); every repeat is
recorded by the wall clock and by the process's CPU time, with the median and the spread (min, max).
Ratios are taken per repeat from the side-by-side times (``speedup_vs_reference_loop`` = loop time / guide
time of the same repeat; reported: the median and every repeat), by CPU time on CPU (run with
``OMP_NUM_THREADS=1``: on a shared machine the wall clock mostly measures the other jobs) and by the wall
clock on CUDA (``ratio_clock``). The guidance overhead is the step time the guide adds beyond the value model's own
forward passes: ``(t_guided - t_unguided - t_value_model) / t_guided``, with ``t_value_model`` the time
spent inside ``ValueModel.start / advance / candidate_logits`` during that guided run (target <= 10%).

``--reference`` / ``--value-model`` may name an architecture of ``guidedecode.bench.MODEL_CONFIGS``
(``llama-3.1-8b``, ``llama-3.2-1b``): the model is built with random weights (no download; a decode step
costs the same with any weights) and the prompts are random token ids of ``--prompt-tokens`` tokens.
The GPU suite runs ``--reference llama-3.1-8b --value-model llama-3.2-1b`` in bf16.

    guidedecode bench qsharp [-- --batch 8 --new-tokens 24 --repeats 3]
    python benchmarks/bench_qsharp.py --reference llama-3.1-8b --value-model llama-3.2-1b --batch 64 --no-kernel
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
        self.seconds = 0.0  # wall
        self.cpu_seconds = 0.0  # this process's CPU time
        for name in ("start", "advance", "candidate_logits"):
            setattr(vm, name, self._timed(getattr(vm, name)))

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            _sync()
            start, cpu = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            _sync()
            self.seconds += time.perf_counter() - start
            self.cpu_seconds += time.process_time() - cpu
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
def _spread(times: list[float]) -> dict:
    return {"seconds_median": statistics.median(times), "seconds_min": min(times), "seconds_max": max(times),
            "seconds_all": times}


def interleaved(variants: dict, repeats: int, *, warmup_tokens: int = 4):
    """Warm each variant up once (``fn(warmup_tokens)``), then time ``fn(None)`` for every variant in turn
    within each of ``repeats`` rounds; returns ``(wall, cpu)``: the seconds of every round per variant, by
    the wall clock and by this process's CPU time (``time.process_time``)."""
    for fn in variants.values():
        fn(warmup_tokens)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for r in range(repeats):
        for name, fn in variants.items():
            _sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(None)
            _sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"  repeat {r + 1}/{repeats} {name:18s} {wall[name][-1]:7.3f} s wall, {cpu[name][-1]:7.3f} s CPU",
                  flush=True)
    return wall, cpu


def decode_rows(model, inputs, value_models: dict, batch: int, new_tokens: int, repeats: int, *,
                tokenizer=None, eos_token_id=None) -> list[dict]:
    """Unguided, QSharpGuide with each value model and the reference-style loop, interleaved per repeat."""
    variants = {"unguided": lambda n: _generate(model, inputs, n or new_tokens)}
    timers, vm_runs, vm_cpu = {}, {}, {}
    for head, vm in value_models.items():
        guide = QSharpGuide(vm, eta=ETA, top_k=K, tokenizer=tokenizer, temperature=TEMPERATURE, top_p=TOP_P,
                            eos_token_id=eos_token_id)
        timers[head], vm_runs[head], vm_cpu[head] = _ValueModelTimer(vm), [], []

        def guided(n, guide=guide, timer=timers[head], runs=vm_runs[head], cpu_runs=vm_cpu[head]):
            before, before_cpu = timer.seconds, timer.cpu_seconds
            _generate(model, inputs, n or new_tokens, guide)
            if n is None:
                runs.append(timer.seconds - before)
                cpu_runs.append(timer.cpu_seconds - before_cpu)

        variants[f"qsharp-{head}"] = guided
    for head, vm in value_models.items():
        variants[f"reference-loop-{head}"] = lambda n, vm=vm: reference_loop(model, vm, inputs, n or new_tokens)
    wall, cpu = interleaved(variants, repeats)
    # On CPU the ratios use this process's CPU time: on a machine shared with other jobs the wall clock
    # mostly measures their load (one thread: CPU time = the work done); on CUDA the wall clock.
    clock = "wall" if torch.cuda.is_available() else "cpu"
    times, vm_times = (wall, vm_runs) if clock == "wall" else (cpu, vm_cpu)

    rows = {name: {"method": name, "batch": batch, "new_tokens": new_tokens, **_spread(t),
                   **{f"cpu_{k}": v for k, v in _spread(cpu[name]).items()}, "ratio_clock": clock,
                   "tokens_per_second": batch * new_tokens / statistics.median(t)} for name, t in wall.items()}
    base = times["unguided"]
    for head in value_models:
        row, guided, loop, vm_s = rows[f"qsharp-{head}"], times[f"qsharp-{head}"], times[
            f"reference-loop-{head}"], vm_times[head]
        overhead = [(g - u - v) / g for g, u, v in zip(guided, base, vm_s)]
        speedup = [lo / g for lo, g in zip(loop, guided)]
        wall_speedup = [lo / g for lo, g in zip(wall[f"reference-loop-{head}"], wall[f"qsharp-{head}"])]
        row.update(value_model_seconds_all=vm_runs[head], value_model_seconds=statistics.median(vm_runs[head]),
                   value_model_cpu_seconds_all=vm_cpu[head],
                   guidance_overhead_fraction=statistics.median(overhead), guidance_overhead_all=overhead,
                   speedup_vs_reference_loop=statistics.median(speedup), speedup_vs_reference_loop_all=speedup,
                   speedup_vs_reference_loop_wall_all=wall_speedup)
        print(f"qsharp-{head}: x{row['speedup_vs_reference_loop']:.3f} vs the loop by {clock} time "
              f"(repeats {', '.join(f'{s:.3f}' for s in speedup)}; wall {', '.join(f'{s:.3f}' for s in wall_speedup)}), "
              f"overhead {100 * row['guidance_overhead_fraction']:.1f}% "
              f"(repeats {', '.join(f'{100 * o:.1f}' for o in overhead)})", flush=True)
    return list(rows.values())


def _kernel_rows(smoke: bool) -> list[dict]:
    path = Path(__file__).with_name("bench_guidance_kernel.py")
    spec = importlib.util.spec_from_file_location("bench_guidance_kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = module.CPU_SHAPES if (smoke or device == "cpu") else module.GPU_SHAPES[:1]
    rows, _, _ = module.run(shapes, device)
    return rows


def _random_inputs(vocab: int, batch: int, prompt_tokens: int, device):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(vocab, 128000), (batch, prompt_tokens), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def main() -> None:
    from guidedecode.bench import MODEL_CONFIGS, SYNTHETIC_PAD_ID, random_model, synthetic_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", "--model", dest="reference", default="smollm2-135m-instruct",
                        help=f"embedded model / local directory, or a random-weight config: {', '.join(MODEL_CONFIGS)}")
    parser.add_argument("--value-model", default=None,
                        help="random-weight config of the value model's backbone (default: the reference's own)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 for random-weight configs on CUDA, else float32")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 8 on CPU, 64 on CUDA)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 24 on CPU, 64 on CUDA")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="random prompts (random-weight configs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", nargs="+", choices=["q", "v"], default=["q", "v"])
    parser.add_argument("--no-kernel", action="store_true", help="skip the fused-kernel part")
    parser.add_argument("--shrink", action="store_true", help="toy width/depth of the random-weight configs (CPU smoke)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    synthetic = args.reference in MODEL_CONFIGS
    dtype = getattr(torch, args.dtype or ("bfloat16" if synthetic and cuda else "float32"))
    batch = args.batch or (64 if cuda else 8)
    new_tokens = args.new_tokens or (64 if cuda else 24)
    if synthetic:
        model = random_model(args.reference, device=device, dtype=dtype, seed=0, shrink=args.shrink)
        eos = model.generation_config.eos_token_id
        tokenizer = synthetic_tokenizer(model.config.vocab_size, pad_token_id=SYNTHETIC_PAD_ID, eos_token_id=eos[-1])
        inputs = _random_inputs(model.config.vocab_size, batch, args.prompt_tokens, device)
    else:
        model, tokenizer = load_model(args.reference, device=device, dtype=dtype)
        inputs, eos = _inputs(tokenizer, batch, model.device), None
    if args.value_model is None:
        backbone = model
    elif args.value_model in MODEL_CONFIGS:
        backbone = random_model(args.value_model, device=device, dtype=dtype, seed=1, shrink=args.shrink)
    else:
        raise SystemExit(f"--value-model must be one of {', '.join(MODEL_CONFIGS)} (or left out)")
    value_models = {head: ValueModel.from_backbone(backbone, head=head, init="normal", tokenizer=tokenizer)
                    for head in args.heads}
    if backbone is not model:
        del backbone
    rows = decode_rows(model, inputs, value_models, batch, new_tokens, args.repeats, tokenizer=tokenizer,
                       eos_token_id=eos)
    kernel = [] if args.no_kernel else _kernel_rows(smoke=not cuda)

    def plot(ax):
        ax.bar([r["method"] for r in rows], [r["tokens_per_second"] for r in rows], color="tab:blue")
        for i, r in enumerate(rows):
            ax.plot([i] * len(r["seconds_all"]), [batch * new_tokens / s for s in r["seconds_all"]], "k.")
        ax.set_ylabel(f"decode tokens/s (batch {batch}, {new_tokens} new tokens)")
        ax.tick_params(axis="x", rotation=30)

    value_desc = (f"value model = random-weight {args.value_model} backbone with a random head" if args.value_model
                  else "value model = the reference's own backbone with a random head (same size as the reference, "
                       "so the value model's forward roughly doubles the step time)")
    notes = (f"{value_desc}; reference = {args.reference}{' (random weights)' if synthetic else ''}, {dtype}; "
             "variants interleaved within each repeat, ratios per repeat side by side")
    if not cuda:
        notes += "; CPU: absolute numbers are indicative only, kernel rows are the torch reference (smoke)"
    path = write_result("qsharp", {"reference": args.reference, "value_model": args.value_model or args.reference,
                                   "dtype": str(dtype).removeprefix("torch."), "k": K, "eta": ETA,
                                   "temperature": TEMPERATURE, "top_p": TOP_P, "repeats": args.repeats,
                                   "torch_threads": torch.get_num_threads(), "decode": rows, "kernel": kernel},
                        plot=plot, notes=notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
