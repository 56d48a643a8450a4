"""``guidedecode train optune``: meta-train an OpTune editor (attempts -> statistics -> training).

Mounted by cli/train.py under the ``train`` group; the stages live in :mod:`guidedecode.training.optune`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from guidedecode.cli.train import backend_option
from guidedecode.training.optune import OpTuneTrainConfig, run


def _task_options(values: tuple[str, ...]) -> dict:
    options = {}
    for value in values:
        key, sep, raw = value.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{value!r}: expected KEY=VALUE", param_hint="--task-option")
        try:
            options[key] = json.loads(raw)
        except ValueError:
            options[key] = raw
    return options


@click.command(name="optune", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="base model: embedded name or local HF directory")
@click.option("--task", default="gsm8k", show_default=True, help="training task (its train split and solutions)")
@click.option("--task-option", "task_options", multiple=True, help="task setting KEY=VALUE, e.g. level=2 (repeatable)")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="data file (default: the task's train file)")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="run directory (config.json, attempts.jsonl, stats.safetensors, train/, editor/, metrics.json); "
                   "rerunning the same command resumes it")
@click.option("--questions", "-n", type=int, default=None, help="the first N training questions")
@click.option("--attempts", "-k", default=10, show_default=True, help="sampled attempts per question (K)")
@click.option("--temperature", default=0.6, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--max-new-tokens", default=512, show_default=True, help="attempt length limit (truncated: dropped)")
@click.option("--include-correct", is_flag=True, help="also edit from correct attempts (with --positive-feedback)")
@click.option("--positive-feedback", default="Your answer is correct.", show_default=True)
@click.option("--modules", default="q_proj,v_proj", show_default=True, help="edited linear layers (name patterns)")
@click.option("--layers", default="-2,-1", show_default=True, help="edited decoder layers (negative: from the end)")
@click.option("--rank", default=16, show_default=True, help="GradientTransform rank")
@click.option("--eta-init", default=1e-4, show_default=True, help="initial step size per edited matrix")
@click.option("--epochs", default=3, show_default=True)
@click.option("--lr", default=1e-5, show_default=True, help="AdamW learning rate (constant after 3% warm-up)")
@click.option("--batch-size", default=1, show_default=True, help="examples per micro-batch (edits stay per sample)")
@click.option("--grad-accum", default=20, show_default=True, help="micro-batches per optimizer step")
@click.option("--max-length", default=1024, show_default=True, help="longest edit sequence / target in tokens")
@click.option("--dev-fraction", default=0.1, show_default=True, help="questions held out for the dev loss")
@click.option("--save-every", default=20, show_default=True, help="optimizer steps between checkpoints")
@click.option("--seed", default=0, show_default=True, help="sampling, split, order and dropout seed")
@click.option("--device", default=None, help="torch device (cpu, cuda); default: where the model loads")
@backend_option("the attempts stage")
@click.option("--quiet", is_flag=True, help="no progress bars")
def optune(model, task, task_options, data, out, questions, attempts, temperature, top_p, max_new_tokens,
           include_correct, positive_feedback, modules, layers, rank, eta_init, epochs, lr, batch_size, grad_accum,
           max_length, dev_fraction, save_every, seed, device, backend, quiet) -> None:
    """Meta-train an OpTune editor (Li, Lyu, Wang, arXiv 2502.15771).

    \b
    attempts  K sampled attempts per training question, judged against the gold answer
    stats     running mean / std of the captured x_t, delta_t over all training tokens
    train     editor on NLL_{W + dW}(gold solution | question), dW from chat(q) + attempt + feedback
    The trained editor lands in OUT/editor (OpTuneEditor.from_pretrained).
    """
    try:
        layer_list = [int(v) for v in layers.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{layers!r}: expected comma-separated integers", param_hint="--layers") from None
    config = OpTuneTrainConfig(model=model, task=task, task_options=_task_options(task_options),
                               data=str(data) if data else None, questions=questions, attempts=attempts,
                               temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                               include_correct=include_correct, positive_feedback=positive_feedback,
                               modules=[m.strip() for m in modules.split(",") if m.strip()], layers=layer_list,
                               rank=rank, eta_init=eta_init, epochs=epochs, lr=lr, batch_size=batch_size,
                               grad_accum=grad_accum, max_length=max_length, dev_fraction=dev_fraction,
                               save_every=save_every, seed=seed, device=device, backend=backend)
    started = time.perf_counter()
    metrics = run(config, out, progress=not quiet)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"done in {time.perf_counter() - started:.1f}s; editor in {out / 'editor'}", err=True)
