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

from guidedecode.cli.train import train
from guidedecode.errors import GuidedecodeError

DEFAULT_MODEL = "smollm2-135m-instruct"
PARAM_HELP = "key=value parameter of the guide or strategy (repeatable), e.g. -p alpha=1.5 or -p n=4"


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


@app.command()
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="embedded model name or local HF directory")
@click.option("--prompt", required=True, help="the user message (the chat template is applied)")
@click.option("--guide", default=None, help="token guide name (presence-penalty)")
@click.option("--strategy", default=None, help="step strategy name (best-of-n, self-consistency)")
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.7, show_default=True, help="0 = greedy")
@click.option("--seed", default=0, show_default=True)
def generate(model, prompt, guide, strategy, params, max_new_tokens, temperature, seed) -> None:
    """Generate one answer to PROMPT, optionally through a guide or a strategy."""
    from guidedecode import HFBackend, load_model
    from guidedecode.registry import build_guide, build_strategy, parse_params

    if guide and strategy:
        raise GuidedecodeError("pass either --guide or --strategy, not both")
    if not prompt.strip():
        raise GuidedecodeError("empty prompt")
    parsed = parse_params(params)
    lm, tokenizer = load_model(model)
    processors = [build_guide(guide, tokenizer, parsed)] if guide else None
    backend = HFBackend(lm, tokenizer, logits_processor=processors)
    rendered = backend.chat_prompt(prompt)
    if strategy:
        chosen = build_strategy(strategy, tokenizer, parsed)
        chosen.seed = seed
        click.echo(chosen.run(backend, [rendered])[0].text)
    elif temperature == 0:
        click.echo(backend.greedy([rendered], max_new_tokens=max_new_tokens)[0].text)
    else:
        click.echo(backend.sample([rendered], 1, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=seed)[0][0].text)


@app.command(name="eval")
@click.option("--task", required=True, help="gsm8k, math500, humaneval, mbpp, strategyqa, synthetic, ...")
@click.option("--data", default=None, help="data file or directory (default: $GUIDEDECODE_DATA or ../shared/data)")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="embedded model name or local HF directory")
@click.option("--guide", default=None, help="token guide name")
@click.option("--strategy", default=None, help="step strategy name")
@click.option("-p", "--param", "params", multiple=True, help=PARAM_HELP)
@click.option("-n", "--limit", type=int, default=None, help="evaluate the first N problems")
@click.option("--samples", "-k", default=1, show_default=True, help="samples per problem (pass@k, maj@k)")
@click.option("--seed", default=0, show_default=True)
@click.option("--temperature", default=0.7, show_default=True, help="0 = greedy")
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="sequences per generate call")
@click.option("--split", default="test", show_default=True)
@click.option("--level", type=int, default=None, help="difficulty level (synthetic task)")
@click.option("--out", "out_dir", default=None, help="results directory (default runs/<task>-<model>-<method>)")
@click.option("--quiet", is_flag=True, help="no progress bar")
def eval_command(task, data, model, guide, strategy, params, limit, samples, seed, temperature, top_p,
                 max_new_tokens, batch_size, split, level, out_dir, quiet) -> None:
    """Evaluate a model (plain, guided or with a strategy) on a task; resumes an interrupted run.

    Writes results.jsonl (a line per problem) and summary.json (accuracy with 95% CI, pass@k,
    maj@k, tokens, tokens/s) into --out. Re-running the same command skips finished problems.
    """
    from guidedecode.evaluation import EvalConfig, run_eval
    from guidedecode.registry import parse_params

    config = EvalConfig(task=task, model=model, data=data, split=split, limit=limit, samples=samples, seed=seed,
                        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        guide=guide, strategy=strategy, params=parse_params(params),
                        task_options={"level": level} if level is not None else {})
    method = guide or strategy or "plain"
    out = out_dir or os.path.join("runs", f"{task}-{Path(model).name}-{method}-s{seed}")
    summary = run_eval(config, out, progress=not quiet)
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"results in {out}", err=True)


@app.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("name")
@click.option("--benchmarks-dir", default="benchmarks", show_default=True, help="where the bench_<name>.py scripts are")
@click.pass_context
def bench(ctx, name: str, benchmarks_dir: str) -> None:
    """Run benchmarks/bench_NAME.py; extra arguments go to the script.

    Results (JSON with command, git sha, machine, versions; PNG plot) land in benchmarks/results/.
    """
    directory = Path(benchmarks_dir)
    script = directory / f"bench_{name}.py"
    if not script.is_file():
        known = sorted(p.stem.removeprefix("bench_") for p in directory.glob("bench_*.py"))
        raise GuidedecodeError(f"unknown benchmark '{name}' (no {script}); known: {', '.join(known) or 'none'}")
    env = dict(os.environ, GUIDEDECODE_BENCH_RESULTS=str((directory / "results").resolve()))
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
