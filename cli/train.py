"""``guidedecode train ...``: one subcommand per trainable scorer, imported only when it is run.

Each subcommand lives in its own module (``train_qsharp.py``, ``train_rationale.py``) so that
``guidedecode --help`` stays fast and a broken optional dependency of one trainer cannot break the
others.
"""

from __future__ import annotations

import importlib

import click

# subcommand name -> (module, click command attribute, one-line help)
TRAINERS = {
    "planner": ("guidedecode.cli.train_planner", "planner",
                "Train a planner: planning tokens (--scheme memreason|kmeans|arith) or DOTS (--method dots)."),
    "optune": ("guidedecode.cli.train_optune", "optune",
               "Meta-train an OpTune weight editor (attempts, statistics, edit training)."),
    "qsharp": ("guidedecode.cli.train_qsharp", "qsharp", "Train a Q# value model (collect roll-outs, fit, rounds)."),
    "rationale": ("guidedecode.cli.train_rationale", "rationale",
                  "Train a RATIONALYST rationale model (extract, align, filter, SFT)."),
}


def backend_option(what: str):
    """``--backend hf|vllm``: where a trainer's data collection (``what``) generates."""
    return click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
                        help=f"where {what} runs: hf (transformers generate on the loaded model) or vllm (a vLLM "
                             "engine of --model; needs the vllm extra)")


class _LazyTrainers(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(TRAINERS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in TRAINERS:
            return None
        module, attribute, _ = TRAINERS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # List the trainers without importing them (their modules pull in torch and transformers).
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in sorted(TRAINERS.items())])


@click.group(cls=_LazyTrainers)
def train() -> None:
    """Train the small scorers the guides and strategies use."""
