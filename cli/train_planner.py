"""``guidedecode train planner``: fine-tune a planning-token model (memory/reason, k-means or arithmetic types).

Mounted by cli/train.py under the ``train`` group; the stages live in :mod:`guidedecode.training.planner`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from guidedecode.cli.train_dots import METHOD_HELP, MethodDispatch
from guidedecode.errors import TrainingError
from guidedecode.training.planner import SCHEMES, PlannerConfig, export_checkpoint, train_planner


@click.command(name="planner", cls=MethodDispatch, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--method", type=click.Choice(("planning-tokens", "dots")), default="planning-tokens",
              show_default=True, expose_value=False, help=METHOD_HELP)
@click.option("--scheme", type=click.Choice(SCHEMES), default="memreason", show_default=True,
              help="step types: memreason ([rag]/[reason] labels -> memory/reason), kmeans (clusters of step "
                   "embeddings), sqvae (a soft-quantised VAE over step embeddings), arith (the operators of each "
                   "step), tfidf (each step's top TF-IDF keyword); none = plain chain-of-thought LoRA baseline")
@click.option("--model", default="smollm2-135m-instruct", show_default=True,
              help="base model: embedded name or local HF directory")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="memreason JSON (question, answer, cot_steps) or GSM8K JSONL; "
                   "default: <data dir>/strategyqa_memreason/StrategyQA_train_clean.json")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="run directory (config.json, planning_tokens.json, train/, adapter/, merged/, metrics.json); "
                   "rerunning the same command resumes it")
@click.option("--examples", "-n", type=int, default=None, help="a seeded subset of N rows (without replacement)")
@click.option("--n-prefix", default=3, show_default=True, help="general (prefix) tokens before every step")
@click.option("--n-special", default=2, show_default=True, help="tokens per type block (0: general block only)")
@click.option("--k", default=4, show_default=True,
              help="number of types: k-means clusters, SQ-VAE codes or TF-IDF keywords (--scheme kmeans|sqvae|tfidf)")
@click.option("--epochs", default=3, show_default=True, help="epochs; the one with the lowest dev loss is kept")
@click.option("--max-steps", type=int, default=None, help="stop after N optimizer steps (equal-step comparisons)")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--grad-accum", default=4, show_default=True, help="micro-batches per optimizer step")
@click.option("--lr", default=2e-4, show_default=True, help="AdamW learning rate (cosine schedule, 3% warm-up)")
@click.option("--lora-r", default=16, show_default=True, help="LoRA rank on the MLP projections (alpha = r)")
@click.option("--max-length", default=768, show_default=True, help="longest example in tokens (longer dropped)")
@click.option("--dev-fraction", default=0.1, show_default=True, help="dev split carved from the training rows")
@click.option("--save-every", default=20, show_default=True, help="optimizer steps between checkpoints")
@click.option("--seed", default=0, show_default=True, help="subset, dev split, data order, LoRA and row init")
@click.option("--device", default=None, help="torch device (cpu, cuda); default: where the model loads")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--export-step", type=int, default=None,
              help="instead of training: export --out's checkpoint at this optimizer step (a running or stopped "
                   "run, with its recorded settings) to --export-dir as adapter/ and merged/")
@click.option("--export-dir", type=click.Path(path_type=Path), default=None, help="target of --export-step")
def planner(scheme, model, data, out, examples, n_prefix, n_special, k, epochs, max_steps, batch_size, grad_accum,
            lr, lora_r, max_length, dev_fraction, save_every, seed, device, quiet, export_step, export_dir) -> None:
    """Train a planning-token model (Wang et al. arXiv 2310.05707; Jin et al. arXiv 2411.13504).

    \b
    Every step of the training answers is written as  <prefix_0..> <type_0..> step text\\n
    and the answer as  <prefix_0..> <answer_0..> The answer is: X ; the model learns to choose
    the type block itself. peft LoRA on the MLP plus the new token rows only; the epoch with the
    lowest dev loss is exported as out/adapter (peft) and out/merged (plain HF checkpoint).
    Decode with guidedecode.PlanningTokenGuide (block completion, type steering).
    """
    if export_step is not None or export_dir is not None:
        if export_step is None or export_dir is None:
            raise TrainingError("--export-step and --export-dir go together")
        click.echo(json.dumps(export_checkpoint(out, export_step, export_dir), indent=2))
        return
    config = PlannerConfig(model=model, data=str(data) if data else None, scheme=scheme, n_prefix=n_prefix,
                           n_special=n_special, k=k, examples=examples, max_length=max_length,
                           dev_fraction=dev_fraction, lora_r=lora_r, lora_alpha=lora_r, epochs=epochs,
                           max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, seed=seed,
                           save_every=save_every, device=device)
    started = time.perf_counter()
    metrics = train_planner(config, out, progress=not quiet)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"done in {time.perf_counter() - started:.1f}s; merged planner in {out / 'merged'}", err=True)
