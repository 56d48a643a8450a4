"""``guidedecode train rationale``: build RATIONALYST training data and fine-tune a rationale model.

Mounted by cli/main.py under the ``train`` group. The stages and their files are described in
:mod:`guidedecode.training.rationale`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from guidedecode.cli.train import backend_option
from guidedecode.training.rationale import (
    DEFAULT_TAUS,
    EXTRACT_MODES,
    INSERT_MAX_NEW_TOKENS,
    REWRITE_MAX_NEW_TOKENS,
    STAGES,
    PipelineConfig,
    SFTConfig,
    TrainingError,
    run_pipeline,
)

DEFAULT_MODEL = "smollm2-135m-instruct"


def parse_taus(values: tuple[str, ...]) -> tuple[float | None, dict[str, float]]:
    """``("1.0", "gsm8k=1.2")`` -> ``(1.0, {"gsm8k": 1.2})``: a bare number applies to every source."""
    default, per_source = None, {}
    for value in values:
        source, _, number = value.rpartition("=")
        try:
            tau = float(number)
        except ValueError:
            raise TrainingError(f"--tau {value!r}: expected a number or SOURCE=NUMBER") from None
        if math.isnan(tau):
            raise TrainingError(f"--tau {value!r} is NaN: give a number")
        if source:
            per_source[source.strip()] = tau
        else:
            default = tau
    return default, per_source


TAU_HELP = (
    "usefulness threshold: keep a rationale iff Delta = S_with - S_without >= tau. A number applies to every "
    "source; SOURCE=NUMBER sets one source (repeatable). Default per source from the paper: "
    + ", ".join(f"{k} {v}" for k, v in DEFAULT_TAUS.items())
    + ", others 0."
)


@click.command(name="rationale", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", default=DEFAULT_MODEL, show_default=True,
              help="instruct model for extraction and scoring (embedded name or local HF directory)")
@click.option("--base-model", default=None, help="model to fine-tune (default: --model)")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="JSONL of GSM8K rows (question/answer) or documents (text[, id, source]); "
                   "default: <data dir>/gsm8k/train.jsonl")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="run directory: extract.jsonl, aligned.jsonl, scored.jsonl, filtered.jsonl, sft/, metrics.json")
@click.option("--records", "-n", type=int, default=None, help="use the first N records of --data")
@click.option("--stage", type=click.Choice(("all",) + STAGES), default="all", show_default=True,
              help="run one stage (reads the previous stage's file) or all")
@click.option("--tau", "taus", multiple=True, help=TAU_HELP)
@click.option("--lora/--full", default=False, show_default=True, help="LoRA adapters (peft) or full fine-tune")
@click.option("--epochs", default=1, show_default=True, help="SFT passes over the training records")
@click.option("--lr", default=2e-5, show_default=True, help="AdamW learning rate (cosine schedule, 3% warm-up)")
@click.option("--batch-size", default=8, show_default=True, help="documents per extraction call and SFT batch size")
@click.option("--extract-mode", type=click.Choice(EXTRACT_MODES), default="insert", show_default=True,
              help="insert: the model writes one rationale per segment boundary from the text before it (works "
                   "with small models such as the embedded one); rewrite: the paper's whole-document rewrite with "
                   "the rationales inserted, for larger instruct models")
@click.option("--max-rationales", default=4, show_default=True,
              help="insert mode: rationales tried per document, at its first N boundaries (0: every boundary)")
@click.option("--max-new-tokens", type=int, default=None,
              help=f"token limit of one generation [default: {INSERT_MAX_NEW_TOKENS} per rationale in insert mode, "
                   f"{REWRITE_MAX_NEW_TOKENS} per document in rewrite mode]")
@click.option("--max-length", default=1024, show_default=True, help="longest SFT example in tokens (longer dropped)")
@click.option("--save-every", default=50, show_default=True, help="SFT optimizer steps between checkpoints")
@click.option("--threshold", default=0.9, show_default=True, help="alignment: minimum edit similarity")
@click.option("--seed", default=0, show_default=True, help="dev split, data order and initialisation seed")
@click.option("--device", default=None, help="torch device (cpu, cuda); default: where the model loads")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="weights dtype of the scorer and the model to fine-tune (default: as stored)")
@backend_option("the extract and filter stages")
@click.option("--quiet", is_flag=True, help="no progress bars")
def rationale(model, base_model, data, out, records, stage, taus, lora, epochs, lr, batch_size, extract_mode,
              max_rationales, max_new_tokens, max_length, save_every, threshold, seed, device, dtype, backend,
              quiet) -> None:
    """Extract, align, filter and fine-tune on implicit rationales (RATIONALYST, arXiv 2410.01044).

    \b
    extract  mark the rationales as <BOT>rationale<EOT> in each record (greedy): insert mode asks
             for one rationale per line boundary, given only the text before it; rewrite mode
             has the model rewrite the whole record with the rationales inserted
    align    keep outputs whose rationale-free text has edit similarity >= 0.9 with the input;
             split into {preceding, rationale, following} records
    filter   keep a record iff S_with - S_without >= tau, S = sum_i 0.9^i log p(following_i | ...)
    sft      fine-tune on [user: preceding] -> [assistant: rationale], prompt masked, 5% dev split

    Every stage resumes: rerunning the same command skips finished records and training steps.
    """
    from guidedecode.tasks.base import data_dir

    if records is not None and records < 1:
        raise TrainingError(f"--records must be >= 1, got {records}")
    if max_rationales < 0:
        raise TrainingError(f"--max-rationales must be >= 0 (0: every boundary), got {max_rationales}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise TrainingError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    default_tau, per_source = parse_taus(taus)
    data = data or data_dir() / "gsm8k" / "train.jsonl"
    if stage in ("all", "extract") and not Path(data).is_file():
        raise TrainingError(f"data file not found: {data}")
    sft = SFTConfig(lora=lora, epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                    save_every=save_every)
    config = PipelineConfig(out=out, data=Path(data), model=model, base_model=base_model, records=records,
                            taus=per_source, default_tau=default_tau, extract_mode=extract_mode,
                            max_rationales=max_rationales or None, max_new_tokens=max_new_tokens,
                            extract_batch_size=batch_size, threshold=threshold, device=device, dtype=dtype,
                            backend=backend, sft=sft)
    started = time.perf_counter()
    metrics = run_pipeline(config, STAGES if stage == "all" else (stage,), progress=not quiet)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"done in {time.perf_counter() - started:.1f}s; files in {out}", err=True)
