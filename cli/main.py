"""The ``guidedecode`` command line: demo, generate, eval, bench, train.

Errors the user can fix (unknown names, missing files, bad parameters, NaN logits) print as one
line ``error: ...`` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click

from guidedecode import validation as v
from guidedecode.cli.train import train
from guidedecode.errors import GuidedecodeError

DEFAULT_MODEL = "smollm2-135m-instruct"
PARAM_HELP = ("KEY=VALUE parameter of the chosen guide or strategy (repeatable), e.g. -p alpha=1.5 or -p n=4; "
              "the keys each one takes are listed below")
MODEL_HELP = "embedded model name, local HF directory or Hugging Face Hub model id"
DEVICE_HELP = "torch device: cpu, cuda, cuda:1, mps, ... (default: cuda when available, else cpu)"
DTYPE_HELP = "weights dtype (default: as stored; bf16 is the usual choice on a GPU)"
DTYPES = ("float32", "bfloat16", "float16")


class RegistryHelp(click.Command):
    """A command whose --help ends with the registry's guides and strategies and each one's -p keys."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from guidedecode.registry import describe

        for kind, flag in (("guide", "--guide"), ("strategy", "--strategy")):
            title = "Guides" if kind == "guide" else "Strategies"
            with formatter.section(f"{title} ({flag} NAME; -p KEY=VALUE, shown with defaults)"):
                formatter.write_dl(describe(kind))
        super().format_epilog(ctx, formatter)


def _device_and_dtype(device: str | None, dtype: str | None) -> dict:
    """``load_model`` keyword arguments for --device / --dtype (default device: cuda when available)."""
    import torch

    options = {"device": device or ("cuda" if torch.cuda.is_available() else "cpu")}
    if dtype:
        options["dtype"] = getattr(torch, dtype)
    return options


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guidedecode")
def app() -> None:
    """guidedecode: inference-time decoding plugins for LLM reasoning.

    Token guides (logits processors), step strategies (best-of-N, self-consistency, ...), an eval
    harness and benchmarks, on the embedded SmolLM2-135M-Instruct model or any local HF model.
    """


@app.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="embedded model name or local HF directory")
@click.option("--max-new-tokens", default=96, show_default=True)
@click.option("--seed", default=0, show_default=True)
def demo(model: str, max_new_tokens: int, seed: int) -> None:
    """Load the model, run one token-guided generation and one step strategy, print both."""
    import torch

    from guidedecode import PresencePenalty, SelfConsistency, load_model
    from guidedecode.tasks import SyntheticArithmetic

    click.echo(f"loading {model} ...")
    lm, tokenizer = load_model(model)
    question = "Write two sentences about the sea."
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    guide = PresencePenalty(1.5, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    out = lm.generate(**inputs, logits_processor=[guide], do_sample=True, temperature=0.7, top_k=0,
                      max_new_tokens=max_new_tokens)
    click.echo(f"\n== token guide: PresencePenalty(alpha=1.5) via model.generate(logits_processor=[guide])\n"
               f"Q: {question}\nA: {tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")

    task = SyntheticArithmetic(level=1, seed=seed)
    problem = task.load(limit=1)[0]
    inputs = tokenizer.apply_chat_template(task.messages(problem), add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    strategy = SelfConsistency(n=4, extract=task.extract, temperature=0.7, seed=seed, max_new_tokens=max_new_tokens * 2)
    out = lm.generate(**inputs, custom_generate=strategy, strategy_tokenizer=tokenizer,
                      max_new_tokens=max_new_tokens * 2)
    (result,) = strategy.last_results
    answers = result.trace[0]["answers"]
    click.echo(f"\n== step strategy: SelfConsistency(n=4) via model.generate(custom_generate=strategy)\n"
               f"Q: {problem.question}\nvotes: {answers}  gold: {problem.answer}\n"
               f"A: {tokenizer.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}\n"
               f"correct: {task.check(result.text, problem)}")


@app.command(cls=RegistryHelp)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--prompt", required=True, help="the user message (the chat template is applied)")
@click.option("--guide", default=None, help="token guide name (listed below)")
@click.option("--strategy", default=None, help="step strategy name (listed below)")
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("--max-new-tokens", default=128, show_default=True, callback=v.click_check(v.positive_int),
              help="token budget of the answer (a strategy's per-generation budget, unless -p max_new_tokens=)")
@click.option("--temperature", default=0.7, show_default=True, callback=v.click_check(v.temperature, allow_zero=True),
              help="0 = greedy")
@click.option("--seed", default=0, show_default=True, callback=v.click_check(v.integer, minimum=0))
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=DTYPE_HELP)
def generate(model, prompt, guide, strategy, params, max_new_tokens, temperature, seed, device, dtype) -> None:
    """Generate one answer to PROMPT, optionally through a guide or a strategy."""
    from guidedecode import HFBackend, load_model
    from guidedecode.registry import build_guide, build_strategy, check_params, parse_params

    if guide and strategy:
        raise GuidedecodeError("pass either --guide or --strategy, not both")
    if not prompt.strip():
        raise GuidedecodeError("empty prompt: --prompt needs some text")
    parsed = parse_params(params)
    if guide or strategy:
        check_params("guide" if guide else "strategy", guide or strategy, parsed)  # before the model loads
    elif parsed:
        raise GuidedecodeError(f"-p {' -p '.join(params)} given without a --guide or --strategy to take it")
    lm, tokenizer = load_model(model, **_device_and_dtype(device, dtype))
    context = {"model": lm, "max_new_tokens": max_new_tokens}
    processors = [build_guide(guide, tokenizer, parsed, context=context)] if guide else None
    backend = HFBackend(lm, tokenizer, logits_processor=processors)
    rendered = backend.chat_prompt(prompt)
    if strategy:
        chosen = build_strategy(strategy, tokenizer, parsed, context=context)
        chosen.seed = seed
        # strategies that add chat turns of their own take the messages, the others the rendered prompt
        given = [[{"role": "user", "content": prompt}]] if getattr(chosen, "takes_messages", False) else [rendered]
        click.echo(chosen.run(backend, given)[0].text)
    elif temperature == 0:
        click.echo(backend.greedy([rendered], max_new_tokens=max_new_tokens)[0].text)
    else:
        click.echo(backend.sample([rendered], 1, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed)[0][0].text)


@app.command(name="eval", cls=RegistryHelp)
@click.option("--task", required=True, help="gsm8k, math500, humaneval, mbpp, strategyqa, synthetic, ...")
@click.option("--data", default=None, help="data file or directory (default: $GUIDEDECODE_DATA, ~/.cache/guidedecode/data, "
              "else the task's Hugging Face Hub dataset)")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--guide", default=None, help="token guide name (listed below)")
@click.option("--strategy", default=None, help="step strategy name (listed below)")
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("-n", "--limit", type=int, default=None, callback=v.click_check(v.positive_int),
              help="evaluate the first N problems of the task (not a strategy's budget: that is -p n=K)")
@click.option("--samples", "-k", default=1, show_default=True, callback=v.click_check(v.positive_int),
              help="independent samples per problem (pass@k, maj@k)")
@click.option("--seed", default=0, show_default=True, callback=v.click_check(v.integer, minimum=0))
@click.option("--temperature", default=0.7, show_default=True, callback=v.click_check(v.temperature, allow_zero=True),
              help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True, callback=v.click_check(v.probability),
              help="nucleus mass in (0, 1]")
@click.option("--max-new-tokens", default=256, show_default=True, callback=v.click_check(v.positive_int))
@click.option("--batch-size", default=16, show_default=True, callback=v.click_check(v.positive_int),
              help="sequences per generate call")
@click.option("--split", default="test", show_default=True)
@click.option("--level", type=int, default=None, callback=v.click_check(v.positive_int),
              help="difficulty level (synthetic task)")
@click.option("--out", "out_dir", default=None, callback=v.click_check(v.output_dir),
              help="results directory (default runs/<task>-<model>-<method>)")
@click.option("--device", default=None, help=DEVICE_HELP)
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help=DTYPE_HELP)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="hf: transformers generate; vllm: a vLLM engine (guides as its logits processors)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def eval_command(task, data, model, guide, strategy, params, limit, samples, seed, temperature, top_p,
                 max_new_tokens, batch_size, split, level, out_dir, device, dtype, backend, quiet) -> None:
    """Evaluate a model (plain, guided or with a strategy) on a task; resumes an interrupted run.

    Writes results.jsonl (a line per problem) and summary.json (accuracy with 95% CI, pass@k,
    maj@k, tokens, tokens/s) into --out. Re-running the same command skips finished problems.

    -n/--limit is how many problems are evaluated; a strategy's own budget (best-of-N's N, a
    beam's width) is a -p parameter, e.g. -n 50 --strategy best-of-n -p n=8.
    """
    from guidedecode.evaluation import EvalConfig, run_eval
    from guidedecode.registry import parse_params

    config = EvalConfig(task=task, model=model, data=data, split=split, limit=limit, samples=samples, seed=seed,
                        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        guide=guide, strategy=strategy, params=parse_params(params),
                        task_options={"level": level} if level is not None else {}, backend=backend)
    method = guide or strategy or "plain"
    out = out_dir or os.path.join("runs", f"{task}-{Path(model).name}-{method}-s{seed}")
    summary = run_eval(config, out, progress=not quiet, **_device_and_dtype(device, dtype))
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"results in {out}", err=True)


def _benchmarks_dir(given: str | None) -> Path:
    """--benchmarks-dir, else the repository's benchmarks/ (found from the package, so any cwd works),
    else ./benchmarks."""
    if given:
        return Path(given)
    from guidedecode.bench import REPO

    installed = REPO / "benchmarks"
    return installed if installed.is_dir() else Path("benchmarks")


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("name", required=False)
@click.option("--out", "out_dir", default=None,
              help="results directory (default: $GUIDEDECODE_BENCH_RESULTS or ./bench-results); the committed "
                   "results are rewritten only on purpose, with --out benchmarks/results")
@click.option("--benchmarks-dir", default=None,
              help="where the bench_<name>.py scripts are (default: the repository's benchmarks/)")
@click.pass_context
def bench(ctx, name: str | None, out_dir: str | None, benchmarks_dir: str | None) -> None:
    """Run benchmark NAME (benchmarks/bench_NAME.py); other arguments go to the benchmark.

    `guidedecode bench NAME --help` shows the benchmark's own options. Results (JSON with the
    command, git sha, machine, versions; PNG plot) go to --out.
    """
    directory = _benchmarks_dir(benchmarks_dir)
    known = sorted(p.stem.removeprefix("bench_") for p in directory.glob("bench_*.py"))
    if name is None or name in ("-h", "--help"):
        click.echo(ctx.get_help())
        click.echo(f"\nBenchmarks in {directory}: {', '.join(known) or 'none'}")
        return
    script = directory / f"bench_{name}.py"
    if not script.is_file():
        raise GuidedecodeError(f"unknown benchmark '{name}' (no {script}); known: {', '.join(known) or 'none'}")
    env = dict(os.environ)
    if not {"-h", "--help"} & set(ctx.args):  # the benchmark's own help writes nothing
        out = v.output_dir("--out", out_dir or os.environ.get("GUIDEDECODE_BENCH_RESULTS") or "bench-results")
        env["GUIDEDECODE_BENCH_RESULTS"] = str(out.resolve())
    completed = subprocess.run([sys.executable, str(script), *ctx.args], env=env)
    sys.exit(completed.returncode)


app.add_command(train)  # ``guidedecode train ...`` (trainers are imported only when run)


def main() -> None:
    """Console entry point: one-line errors for problems the user can fix."""
    try:
        app(standalone_mode=False)
    except GuidedecodeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
