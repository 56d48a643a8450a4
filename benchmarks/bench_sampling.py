"""n samples per prompt: one shared prefill (KV cache expanded to the n rows) vs ``num_return_sequences``.

``HFBackend.sample(prompts, n)`` runs each prompt once and expands its KV cache to the n rows
(``share_prefill=True``, the default); ``share_prefill=False`` is ``generate(num_return_sequences=n)``, which
prefills all n copies (best-of-8 on an 8-shot ~900-token prompt: 7,200 prompt tokens instead of 900).

For each prompt length (default 100 and 900 tokens: a prefix of a fixed few-shot arithmetic text, token ids
passed as is) and n (default 1, 4, 8, 16; the target case n = 8 at 900 tokens runs first, then the cheapest,
and the JSON is rewritten after every case, ``complete`` once all ran): one prompt, ``--new-tokens`` sampled tokens at T=0.8 with the same
seed on both paths. A greedy run of each path (``top_k=1``) checks that both return identical tokens and warms
them up; then the two paths are timed in turn within each repeat (alternating which goes first), every repeat
recorded by the wall clock and by the process's CPU time, and the seeded samples of both are compared too.
``speedup`` = plain time / shared time of the same repeat (median and all), by CPU time on CPU (run with
``OMP_NUM_THREADS=1``: on a shared machine the wall clock mostly measures the other jobs) and by the wall clock
on CUDA (``ratio_clock``). Target (issue 14): >= 1.5x at n = 8 with the 900-token prompt. At n = 1 both paths
are the same code (no sharing).

    guidedecode bench sampling [-- --lengths 100 900 --ns 1 4 8 16 --new-tokens 32 --repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from guidedecode.backends import HFBackend
from guidedecode.bench import write_result
from guidedecode.models import load_model

TEMPERATURE = 0.8


def few_shot_ids(tokenizer, length: int) -> list[int]:
    """The first ``length`` tokens of a few-shot arithmetic prompt (long enough for any length asked)."""
    shots = []
    i = 0
    ids: list[int] = []
    while len(ids) < length:
        a, b = 17 + 7 * i, 23 + 11 * i
        shots.append(f"Question: Tom has {a} apples and buys {b} more, then gives away {i + 2}. How many are "
                     f"left?\nAnswer: {a} + {b} = {a + b}. {a + b} - {i + 2} = {a + b - i - 2}. "
                     f"The answer is {a + b - i - 2}.\n\n")
        ids = tokenizer("".join(shots), add_special_tokens=False)["input_ids"]
        i += 1
    return ids[:length]


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, result


def measure(backend: HFBackend, prompt: list[int], n: int, new_tokens: int, repeats: int) -> dict:
    def run(shared: bool, seed: int, **options):
        backend.share_prefill = shared
        rows = backend.sample([prompt], n, max_new_tokens=new_tokens, temperature=TEMPERATURE, seed=seed, **options)
        return [c.token_ids for c in rows[0]]

    greedy_same = run(True, 0, top_k=1) == run(False, 0, top_k=1)  # also warms both paths up
    times = {"shared": [], "plain": []}
    cpu = {"shared": [], "plain": []}
    same_samples = True
    for r in range(repeats):
        order = ("shared", "plain") if r % 2 == 0 else ("plain", "shared")
        outputs = {}
        for name in order:
            seconds, cpu_seconds, outputs[name] = _timed(lambda name=name: run(name == "shared", seed=100 + r))
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)
        same_samples &= outputs["shared"] == outputs["plain"]
    # CPU: ratios by this process's CPU time (one thread; on a shared machine the wall clock mostly measures
    # the other jobs' load); CUDA: by the wall clock
    clock = "wall" if torch.cuda.is_available() else "cpu"
    basis = times if clock == "wall" else cpu
    speedup = [p / s for p, s in zip(basis["plain"], basis["shared"])]
    row = {"prompt_tokens": len(prompt), "n": n, "new_tokens": new_tokens, "greedy_identical": greedy_same,
           "samples_identical": same_samples, "ratio_clock": clock, "speedup": statistics.median(speedup),
           "speedup_all": speedup, "speedup_wall_all": [p / s for p, s in zip(times["plain"], times["shared"])],
           "prefill_tokens": {"shared": len(prompt) - 1 + n, "plain": n * len(prompt)}}
    for name in times:
        for prefix, values in (("", times[name]), ("cpu_", cpu[name])):
            row[f"{name}_{prefix}seconds_median"] = statistics.median(values)
            row[f"{name}_{prefix}seconds_min"], row[f"{name}_{prefix}seconds_max"] = min(values), max(values)
            row[f"{name}_{prefix}seconds_all"] = values
    print(f"prompt {len(prompt):4d} n {n:2d}: shared {row['shared_seconds_median']:6.2f} s wall "
          f"({row['shared_cpu_seconds_median']:6.2f} CPU), plain {row['plain_seconds_median']:6.2f} s wall "
          f"({row['plain_cpu_seconds_median']:6.2f} CPU), x{row['speedup']:.2f} by {clock} time (repeats "
          f"{', '.join(f'{s:.2f}' for s in speedup)}), identical greedy {greedy_same} samples {same_samples}",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 900])
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(args.model, device=device)
    backend = HFBackend(model, tokenizer, batch_size=max(args.ns))
    cases = [(length, n) for length in args.lengths for n in args.ns]
    target_case = (900, 8)
    if target_case in cases:  # the target first, then the cheapest cases first (a run cut short keeps the most)
        cases.remove(target_case)
        cases.insert(0, target_case)
    cases[1:] = sorted(cases[1:], key=lambda c: c[0] * c[1])
    rows = []
    for length, n in cases:
        rows.append(measure(backend, few_shot_ids(tokenizer, length), n, args.new_tokens, args.repeats))
        _write(args, backend, rows, complete=len(rows) == len(cases))


def _write(args, backend, rows, *, complete: bool) -> None:
    """The result so far (rewritten after every case, so a run cut short keeps its measured cases)."""

    def plot(ax):
        for length in args.lengths:
            sub = sorted((r for r in rows if r["prompt_tokens"] == length), key=lambda r: r["n"])
            ax.plot([r["n"] for r in sub], [r["speedup"] for r in sub], "o-", label=f"{length}-token prompt")
            for r in sub:
                ax.plot([r["n"]] * len(r["speedup_all"]), r["speedup_all"], "k.", markersize=3)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("samples per prompt n")
        ax.set_ylabel("num_return_sequences time / shared-prefill time")
        ax.legend()

    target = next((r for r in rows if r["n"] == 8 and r["prompt_tokens"] == 900), None)
    figures = {"model": args.model, "temperature": TEMPERATURE, "batch_size": backend.batch_size,
               "torch_threads": torch.get_num_threads(), "complete": complete,
               "cases_asked": [[length, n] for length in args.lengths for n in args.ns], "rows": rows,
               "target": {"case": "n=8, 900-token prompt", "speedup_at_least": 1.5,
                          "measured": None if target is None else target["speedup"],
                          "met": None if target is None else target["speedup"] >= 1.5}}
    path = write_result("sampling", figures, plot=plot,
                        notes="HFBackend.sample: shared prefill vs num_return_sequences, same seeds, one prompt")
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
