"""``guidedecode train planner --method dots``: DOTS trajectory search -> explanations -> planner SFT.

The ``planner`` command (cli/train_planner.py) uses :class:`MethodDispatch`: with ``--method dots``
the whole command line goes to :data:`dots` below; the stages live in :mod:`guidedecode.training.dots`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from guidedecode.cli.train import backend_option


def _split_method(args: list[str]) -> tuple[str | None, list[str]]:
    """The ``--method`` value (None if absent) and the arguments without it."""
    rest, method, i = [], None, 0
    while i < len(args):
        arg = args[i]
        if arg == "--method" and i + 1 < len(args):
            method, i = args[i + 1], i + 2
            continue
        if arg.startswith("--method="):
            method = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return method, rest


class MethodDispatch(click.Command):
    """A command whose ``--method dots`` hands the command line to the DOTS trainer."""

    def make_context(self, info_name, args, parent=None, **extra):
        method, rest = _split_method(list(args))
        if method == "dots":
            return dots.make_context(info_name, rest, parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        if ctx.command is not self:
            return ctx.command.invoke(ctx)
        return super().invoke(ctx)


METHOD_HELP = ("planning-tokens: the options below; dots: DOTS reasoning-action planner (trajectory search -> "
               "explanations -> SFT; its options: guidedecode train planner --method dots --help)")


@click.command(name="planner", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--task", default="synthetic", show_default=True, help="task whose training questions are searched")
@click.option("--level", type=int, default=None, help="difficulty level (synthetic task)")
@click.option("--data", default=None, help="data file or directory (default: the task's)")
@click.option("--split", default="train", show_default=True)
@click.option("--questions", "-n", type=int, default=None, help="the first N questions of the split (default: all)")
@click.option("--model", "solver", default="smollm2-135m-instruct", show_default=True,
              help="solver model that runs the trajectories (embedded name or local HF directory)")
@click.option("--explainer", default=None, help="model that writes the explanations (default: --model)")
@click.option("--base-model", default=None, help="model fine-tuned as planner (default: --model)")
@click.option("--format", "format_", type=click.Choice(("external", "internal")), default="external",
              show_default=True, help="external: plan only (a separate planner); internal: plan + solution")
@click.option("--target", type=click.Choice(("first_turn", "full_dialogue")), default="first_turn",
              show_default=True, help="internal format: the solver's first turn (paper) or all its turns")
@click.option("--preset", type=click.Choice(("paper", "released")), default="paper", show_default=True,
              help="search settings: paper = Algorithm 1 (K=2, N_eval=4, keep 8/3, T=0.4, iterative verify); "
                   "released = MurongYue/DOTS (3 rounds, 2 samples, T=0.8, one verify round)")
@click.option("--rounds", type=int, default=None, help="override: search rounds K")
@click.option("--samples", type=int, default=None, help="override: runs per trajectory per round N_eval")
@click.option("--keep", default=None, help="override: trajectories kept after each round, e.g. 8,3")
@click.option("--temperature", type=float, default=None, help="override: search sampling temperature")
@click.option("--max-new-tokens", type=int, default=None, help="override: tokens per solver turn [512]")
@click.option("--max-verify-rounds", type=int, default=None, help="override: verify/re-answer rounds")
@click.option("--code-timeout", type=float, default=None, help="override: sandbox seconds per program [15]")
@click.option("--upsample", default=1, show_default=True, help="copies of every SFT record")
@click.option("--lora/--full", default=True, show_default=True, help="peft LoRA adapters or full fine-tune")
@click.option("--lora-r", default=16, show_default=True)
@click.option("--epochs", default=4, show_default=True, help="epochs (paper: 4); the lowest-dev-loss one is kept")
@click.option("--lr", default=2e-4, show_default=True, help="AdamW learning rate (paper, full SFT: 2e-5)")
@click.option("--batch-size", default=4, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--max-length", default=1536, show_default=True, help="longest SFT example in tokens (longer dropped)")
@click.option("--dev-fraction", default=0.1, show_default=True)
@click.option("--save-every", default=20, show_default=True, help="optimizer steps between checkpoints")
@click.option("--seed", default=0, show_default=True)
@click.option("--stage", type=click.Choice(("all", "search", "explain", "sft", "train")), default="all",
              show_default=True, help="run one stage (reads the previous stage's files) or all")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="run directory: search/, explain.jsonl, sft.jsonl, train/, planner/, metrics.json")
@click.option("--device", default=None)
@backend_option("the search and explain stages")
@click.option("--quiet", is_flag=True, help="no progress bars")
def dots(task, level, data, split, questions, solver, explainer, base_model, format_, target, preset, rounds, samples,
         keep, temperature, max_new_tokens, max_verify_rounds, code_timeout, upsample, lora, lora_r, epochs, lr,
         batch_size, grad_accum, max_length, dev_fraction, save_every, seed, stage, out, device, backend,
         quiet) -> None:
    """Train a DOTS planner (Yue et al., arXiv 2410.03864).

    \b
    search   Algorithm 1: every trajectory N_eval times per round, success = the task's checker,
             sort by (success desc, length asc), keep N_k; all-pass / all-fail questions dropped
    explain  one paragraph per kept question on why its best trajectory fits (greedy)
    sft      records [planner prompt] -> [header, explanation, Required Action: <line>(, solution)]
    train    prompt-masked SFT (peft LoRA or full), dev loss per epoch; merged model in OUT/planner

    Rerunning the same command resumes every stage. Use the planner with
    guidedecode eval --strategy dots -p mode=external -p planner=OUT/planner.
    """
    import dataclasses

    from guidedecode.dots.search import PRESETS
    from guidedecode.errors import TrainingError
    from guidedecode.training.dots import STAGES, DotsPlannerConfig, run_dots_pipeline

    overrides = {k: v for k, v in dict(rounds=rounds, samples=samples, temperature=temperature,
                                        max_new_tokens=max_new_tokens, max_verify_rounds=max_verify_rounds,
                                        code_timeout=code_timeout, seed=seed).items() if v is not None}
    if keep is not None:
        try:
            overrides["keep"] = tuple(int(x) for x in keep.split(",") if x.strip())
        except ValueError:
            raise TrainingError(f"--keep {keep!r}: expected comma-separated integers, e.g. 8,3") from None
    search_config = dataclasses.replace(PRESETS[preset], **overrides)
    config = DotsPlannerConfig(task=task, task_options={"level": level} if level is not None else {}, data=data,
                               split=split, questions=questions, solver=solver, explainer=explainer,
                               base_model=base_model, format=format_, target=target, upsample=upsample,
                               search=search_config, lora=lora, lora_r=lora_r, epochs=epochs, lr=lr,
                               batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                               dev_fraction=dev_fraction, seed=seed, save_every=save_every, device=device,
                               backend=backend)
    started = time.perf_counter()
    metrics = run_dots_pipeline(config, out, stages=STAGES if stage == "all" else (stage,), progress=not quiet)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"done in {time.perf_counter() - started:.1f}s; files in {out}", err=True)
