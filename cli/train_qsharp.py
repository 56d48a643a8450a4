"""``guidedecode train qsharp``: collect roll-outs, train a Q♯ value model, repeat for --rounds.

The command only parses options; the stages live in :mod:`guidedecode.training.qsharp`. Errors the
user can fix raise :class:`~guidedecode.errors.GuidedecodeError` subclasses, which ``cli.main.main``
prints as one line ``error: ...``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from guidedecode.cli.train import backend_option

DEFAULT_MODEL = "smollm2-135m-instruct"


@click.command(name="qsharp", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="reference policy π_ref: embedded model name or local HF directory")
@click.option("--value-backbone", default=None,
              help="backbone of the value model (default: the same as --model, loaded as a separate copy); "
                   "must share the tokenizer")
@click.option("--value-layers", type=int, default=None,
              help="keep only the backbone's first N decoder layers: a smaller, cheaper value model (default: all)")
@click.option("--train-layers", type=int, default=None,
              help="train the head and the top N backbone layers only (0 = the head alone; default: everything)")
@click.option("--task", required=True, help="task to collect on: synthetic, gsm8k, ... (needs a checker)")
@click.option("--data", default=None, help="data file or directory (default: $GUIDEDECODE_DATA, ~/.cache/guidedecode/data, else the Hub)")
@click.option("--split", default="train", show_default=True, help="task split to train on")
@click.option("--level", type=int, default=None, help="difficulty level (synthetic task)")
@click.option("--out", "out_dir", default=None,
              help="output directory (default runs/train-qsharp-<task>-<model>); rerunning resumes it")
@click.option("--rounds", default=1, show_default=True,
              help="collect/train rounds; round r > 1 rolls in with round r-1's value model and trains on all rounds")
@click.option("--problems", type=int, default=None, help="use the first N problems (default: all)")
@click.option("--samples", "-k", default=4, show_default=True, help="roll-outs per problem and round (K)")
@click.option("--max-new-tokens", default=256, show_default=True, help="response budget (roll-in and roll-out)")
@click.option("--temperature", default=0.8, show_default=True, help="sampling temperature of roll-ins and roll-outs")
@click.option("--top-p", default=0.9, show_default=True)
@click.option("--roll-in-eta", default=10.0, show_default=True,
              help="guidance strength (1/eta_paper) of the roll-ins of rounds > 1; recorded in every record; "
                   "0 = pure reference")
@click.option("--guide-top-k", default=20, show_default=True, help="candidates the roll-in guide scores per step")
@click.option("--head", type=click.Choice(["v", "q"]), default="v", show_default=True,
              help="v: one value per prefix; q: one output per vocabulary token")
@click.option("--loss", type=click.Choice(["bce", "mse", "mle"]), default="bce", show_default=True,
              help="bce: cross-entropy on the logit; mse: squared error of sigmoid; mle: NLL of the nearest atom")
@click.option("--num-atoms", type=int, default=None, help="atoms of the mle head (default 11)")
@click.option("--init", type=click.Choice(["zero", "reuse", "normal"]), default="zero", show_default=True,
              help="head initialisation (reuse: copy the LM head, q only)")
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", default=1e-4, show_default=True,
              help="AdamW learning rate (constant); the reference uses 2e-5 for long runs, the larger default "
                   "suits small CPU runs of tens of steps")
@click.option("--weight-decay", default=0.01, show_default=True)
@click.option("--grad-clip", default=5.0, show_default=True, help="gradient-norm clip (0 = off)")
@click.option("--batch-size", default=8, show_default=True, help="training examples per optimiser step")
@click.option("--gen-batch-size", default=16, show_default=True, help="sequences per generate call (collection)")
@click.option("--held-out", default=0.1, show_default=True, help="fraction of problems held out for metrics")
@click.option("--drop-no-variation/--keep-no-variation", default=True, show_default=True,
              help="drop training problems whose K labels are all equal (never the held-out ones)")
@click.option("--warm-start/--no-warm-start", default=False, show_default=True,
              help="start round r > 1 from round r-1's model instead of a fresh head")
@click.option("--save-every", default=0, show_default=True, help="checkpoint every N steps (0 = each epoch end)")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="weights dtype of the policy and value model (default: as stored)")
@backend_option("collection (roll-ins and roll-outs)")
@click.option("--quiet", is_flag=True, help="no progress bars or log lines")
def qsharp(task, level, out_dir, quiet, **options) -> None:
    """Train a Q♯ value model for guided decoding (paper arXiv 2502.20548, Algorithm 1).

    Each round: roll in with the current guided policy (round 1: the reference model alone), cut
    each response at a uniform random token, roll out with the reference, label the text with the
    task's checker; then train on every round's data (loss at the switch token and every roll-out
    token, all with the final label) and report held-out BCE against the constant base-rate
    predictor, accuracy and AUC.

    Writes OUT/round-R/{data.jsonl, model/, metrics.json} and OUT/metrics.json; the trained model
    loads with ValueModel.from_pretrained(OUT/round-R/model). Rerunning the same command resumes
    (finished problems, rounds and epochs are skipped; training continues from its checkpoint).
    """
    from guidedecode.training.qsharp import QSharpTrainConfig, run

    config = QSharpTrainConfig(task=task, task_options={"level": level} if level is not None else {}, **options)
    out = out_dir or os.path.join("runs", f"train-qsharp-{task}-{Path(config.model).name}")
    log = None if quiet else (lambda message: click.echo(message, err=True))
    result = run(config, out, progress=not quiet, log=log)
    final = result["final"]
    click.echo(json.dumps({"model": result["model"], "round": final["round"], "held_out": final["held_out"]}, indent=2))
    click.echo(f"results in {out}", err=True)
