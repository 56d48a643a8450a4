"""Planner training (``guidedecode train planner``): type steps, extend the vocabulary, fine-tune, export.

Papers: Wang et al., "Guiding Language Model Reasoning with Planning Tokens" (arXiv 2310.05707,
reference WANGXinyiLinda/planning_tokens) and Jin et al., "Disentangling Memory and Reasoning Ability
in LLMs" (arXiv 2411.13504, reference MingyuJ666/Disentangling-Memory-and-Reasoning). Stages:

1. **data**: read the rows (memreason JSON or GSM8K JSONL), take a seeded subset without replacement;
2. **type**: the ``--scheme`` typer gives each step its type(s) (k-means / SQ-VAE fitted on the base model's
   step embeddings of the training rows, TF-IDF keywords on their text); ``--scheme none`` is the plain
   chain-of-thought LoRA baseline;
3. **vocabulary**: :func:`~guidedecode.planning.add_planning_tokens` (``n_prefix`` general tokens +
   ``n_special`` per type key), registry and tokenizer written to ``out/``;
4. **fine-tune**: peft LoRA (r=16, alpha=16, dropout 0.05) on the MLP projections plus
   ``trainable_token_indices`` = the new ids (input rows, and output rows when untied), so no other
   row of the embedding matrices changes; causal-LM loss on the target only; AdamW + cosine schedule;
   the epoch with the lowest dev loss (a dev split carved from the training rows) is kept;
   checkpoints resume bit-identically (:func:`guidedecode.training.common.fit`);
5. **export**: ``out/adapter/`` (peft ``save_pretrained``: LoRA + token rows, the extended tokenizer,
   ``planning_tokens.json``) and ``out/merged/`` (a plain HF checkpoint with the extended tokenizer that
   ``AutoModelForCausalLM.from_pretrained`` and vLLM load), then ``out/metrics.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from guidedecode import validation as v
from guidedecode.errors import TrainingError
from guidedecode.planning import (
    PlanningTokenError,
    PlanningVocab,
    add_planning_tokens,
    encode,
    make_typer,
    read_examples,
    trainable_token_modules,
    type_examples,
)
from guidedecode.records import write_json
from guidedecode.training.common import FitConfig, atomic_dir, check_settings, fit, split_dev

SCHEMES = ("memreason", "kmeans", "sqvae", "arith", "tfidf", "none")
MLP_TARGETS = (("gate_proj", "up_proj", "down_proj"), ("c_fc", "c_proj"), ("fc1", "fc2"))


@dataclass
class PlannerConfig:
    """Settings of ``guidedecode train planner`` (defaults: the reference's LoRA and learning rate)."""

    model: str = "smollm2-135m-instruct"
    data: str | None = None  # default: StrategyQA memreason train rows
    scheme: str = "memreason"
    n_prefix: int = 3
    n_special: int = 2
    k: int = 4  # types of the kmeans / sqvae / tfidf schemes
    examples: int | None = None  # a seeded subset of the rows (without replacement)
    max_length: int = 768  # longer encoded examples are dropped (counted)
    dev_fraction: float = 0.1
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 2e-4
    warmup: float = 0.03
    seed: int = 0
    save_every: int = 20
    device: str | None = None

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise TrainingError(f"unknown scheme {self.scheme!r}: choose one of {', '.join(SCHEMES)}")
        v.integer("k", self.k, minimum=1, error=TrainingError)  # >= 2 for kmeans / sqvae: their typers say so
        if self.n_prefix < 0 or self.n_special < 0:
            raise TrainingError(f"n_prefix and n_special must be >= 0, got {self.n_prefix} and {self.n_special}")
        if self.examples is not None and self.examples < 2:
            raise TrainingError(f"examples must be >= 2 (a train and a dev example), got {self.examples}")
        if self.lora_r < 1 or self.max_length < 8:
            raise TrainingError("lora_r must be >= 1 and max_length >= 8")
        if not 0 <= self.lora_dropout < 1:
            raise TrainingError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.fit_config().validate()

    def fit_config(self) -> FitConfig:
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum, lr=self.lr,
                         warmup=self.warmup, max_steps=self.max_steps, seed=self.seed, save_every=self.save_every,
                         select="best_dev")


def default_data() -> Path:
    from guidedecode.tasks.base import data_dir

    return data_dir() / "strategyqa_memreason" / "StrategyQA_train_clean.json"


def mlp_targets(model) -> list[str]:
    """The MLP projections LoRA adapts: gate/up/down (Llama, Qwen2, Mistral), c_fc/c_proj (GPT-2), fc1/fc2."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in MLP_TARGETS:
        if all(n in names for n in group):
            return list(group)
    raise TrainingError("no MLP projections (gate_proj/up_proj/down_proj, c_fc/c_proj or fc1/fc2) found for LoRA")


def lora_model(model, config: PlannerConfig, vocab: PlanningVocab | None):
    """peft LoRA on the MLP + the new token rows trainable; every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    token_indices = None
    if vocab is not None:
        embed, head = trainable_token_modules(model)
        token_indices = {embed: vocab.new_ids, **({head: vocab.new_ids} if head else {})}
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
                      target_modules=mlp_targets(model), trainable_token_indices=token_indices,
                      task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA initialisation
    return get_peft_model(model, lora)


def _hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class PreparedPlanner:
    """Stages 1-3 and the LoRA wrapping done: everything :func:`fit` and the export need."""

    model: Any  # the peft model (LoRA on the MLP + trainable new-token rows)
    tokenizer: Any
    vocab: PlanningVocab | None
    train: list
    dev: list
    pad_token_id: int
    summary: dict  # data figures for metrics.json


def prepare_planner(config: PlannerConfig, out: str | os.PathLike, *, loader: Callable | None = None,
                    write: bool = True) -> PreparedPlanner:
    """Stages 1-3 and the peft wrapping, deterministic in ``config``; ``write`` records the settings
    and writes the token registry and tokenizer into ``out`` (a resumed run must match them)."""
    from guidedecode.backends.hf import eos_token_ids
    from guidedecode.models import load_model

    config.validate()
    out = v.output_dir("--out", out, error=TrainingError) if write else Path(out)
    if write:
        check_settings(out / "config.json", asdict(config), may_change=("save_every", "device"))
    model, tokenizer = (loader or load_model)(config.model, device=config.device)

    # 1. data: a seeded subset without replacement
    path = Path(config.data) if config.data else default_data()
    rows = read_examples(path)
    if config.examples is not None and config.examples < len(rows):
        picked = sorted(random.Random(config.seed).sample(range(len(rows)), config.examples))
        rows = [rows[i] for i in picked]
    if len(rows) < 2:
        raise TrainingError(f"{path} holds {len(rows)} rows: need at least 2 (train and dev)")
    train_rows, dev_rows = split_dev(rows, config.dev_fraction, config.seed)

    # 2. step types (k-means fitted on the training rows only, with the base model)
    vocab = None
    if config.scheme != "none":
        typer = make_typer(config.scheme, model=model, tokenizer=tokenizer, k=config.k, seed=config.seed)
        typer.fit(train_rows)
        train_rows, dev_rows = type_examples(train_rows, typer), type_examples(dev_rows, typer)
        # 3. vocabulary
        try:
            vocab = add_planning_tokens(model, tokenizer, typer.types, n_prefix=config.n_prefix,
                                        n_special=config.n_special, seed=config.seed)
        except PlanningTokenError as error:
            raise TrainingError(str(error)) from error
        if write:
            vocab.save_pretrained(out)
            tokenizer.save_pretrained(out / "tokenizer")
    else:
        clean = make_typer("memreason").clean  # drops a [rag]/[reason] label when there is one
        train_rows = [{**r, "steps": [clean(s) for s in r["steps"]]} for r in train_rows]
        dev_rows = [{**r, "steps": [clean(s) for s in r["steps"]]} for r in dev_rows]
    eos = eos_token_ids(model, tokenizer)
    if not eos:
        raise TrainingError("the model and tokenizer define no EOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    def encoded(rows_):
        kept = [encode(tokenizer, r, vocab, eos[0]) for r in rows_]
        return [e for e in kept if len(e.input_ids) <= config.max_length], sum(
            len(e.input_ids) > config.max_length for e in kept)

    train, train_long = encoded(train_rows)
    dev, dev_long = encoded(dev_rows)
    if not train:
        raise TrainingError(f"every training example is longer than max_length {config.max_length} tokens")
    type_counts = Counter(t for r in train_rows for types in r.get("types", []) for t in (types or ["assignment"]))
    summary = {"scheme": config.scheme, "data": str(path), "rows": len(rows), "train_examples": len(train),
               "dev_examples": len(dev), "dropped_too_long": train_long + dev_long,
               "train_step_types": dict(type_counts), "new_tokens": len(vocab.new_ids) if vocab else 0}
    return PreparedPlanner(lora_model(model, config, vocab), tokenizer, vocab, train, dev, pad, summary)


def export_planner(prepared: PreparedPlanner, directory: str | os.PathLike) -> None:
    """``directory/adapter`` (peft adapter + token rows, tokenizer, registry) and ``directory/merged``
    (LoRA and rows merged: a plain HF checkpoint with the extended tokenizer), each written atomically."""
    model, tokenizer, vocab = prepared.model, prepared.tokenizer, prepared.vocab
    directory = Path(directory)

    def write_adapter(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        if vocab is not None:
            vocab.save_pretrained(target)

    def write_merged(target: Path) -> None:
        merged = model.merge_and_unload()
        merged.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        if vocab is not None:
            vocab.save_pretrained(target)

    model.eval()
    atomic_dir(directory / "adapter", write_adapter)
    atomic_dir(directory / "merged", write_merged)


def train_planner(config: PlannerConfig, out: str | os.PathLike, *, progress: bool = False,
                  loader: Callable | None = None, on_step: Callable[[int], None] | None = None) -> dict:
    """Run every stage into ``out`` (resumes what is there); returns ``out/metrics.json``'s content.

    ``loader(name, device=) -> (model, tokenizer)`` defaults to :func:`guidedecode.models.load_model`.
    """
    out = Path(out)
    prepared = prepare_planner(config, out, loader=loader)
    model, train, dev = prepared.model, prepared.train, prepared.dev
    # 4. fine-tune
    settings = {"data": _hash([list(e.input_ids) for e in train] + [list(e.input_ids) for e in dev]),
                "model": config.model}
    fitted = fit(model, train, dev, out / "train", config.fit_config(), settings=settings,
                 pad_token_id=prepared.pad_token_id, progress=progress, desc=f"planner ({config.scheme})",
                 on_step=on_step)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 5. export
    export_planner(prepared, out)
    metrics = {
        **prepared.summary, "trainable_parameters": trainable,
        **{k: v for k, v in fitted.to_dict().items() if k not in ("train_examples", "dev_examples")},
        "adapter": str(out / "adapter"), "merged": str(out / "merged"),
    }
    write_json(out / "metrics.json", metrics)
    return metrics


def export_checkpoint(out: str | os.PathLike, step: int, directory: str | os.PathLike, *,
                      loader: Callable | None = None) -> dict:
    """Export the weights of ``out/train/checkpoint-<step>`` (a run in progress or stopped) like a
    finished run (``directory/adapter``, ``directory/merged``); returns the checkpoint's loop state."""
    from guidedecode.training.common import load_trainable

    out = Path(out)
    checkpoint = out / "train" / f"checkpoint-{step:07d}"
    if not (checkpoint / "trainable.safetensors").is_file():
        raise TrainingError(f"{checkpoint} not found (checkpoints: "
                            f"{sorted(p.name for p in (out / 'train').glob('checkpoint-*'))})")
    config = PlannerConfig(**json.loads((out / "config.json").read_text()))
    prepared = prepare_planner(config, out, loader=loader, write=False)
    load_trainable(prepared.model, checkpoint / "trainable.safetensors")
    state = json.loads((checkpoint / "state.json").read_text())
    export_planner(prepared, directory)
    summary = {**prepared.summary, "checkpoint": str(checkpoint), "global_step": state["global_step"],
               "history": state["history"]}
    write_json(Path(directory) / "metrics.json", summary)
    write_json(Path(directory) / "config.json", asdict(config))
    return summary


def load_planner(directory: str | os.PathLike, *, adapter: bool = False, base_model: str | None = None,
                 device: str | None = None):
    """``(model, tokenizer, vocab or None)`` of a trained planner: the merged checkpoint (default), or
    (``adapter=True``) the base model with the peft adapter and token rows on top."""
    from guidedecode.models import load_model

    directory = Path(directory)
    vocab = PlanningVocab.from_pretrained(directory / ("adapter" if adapter else "merged")) \
        if (directory / ("adapter" if adapter else "merged") / "planning_tokens.json").is_file() else None
    if not adapter:
        model, tokenizer = load_model(directory / "merged", device=device)
    else:
        from peft import PeftModel
        from transformers import AutoTokenizer

        config = json.loads((directory / "config.json").read_text())
        model, _ = load_model(base_model or config["model"], device=device)
        tokenizer = AutoTokenizer.from_pretrained(directory / "adapter", local_files_only=True)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        model = PeftModel.from_pretrained(model, directory / "adapter").eval()
    if vocab is not None:
        vocab.check_tokenizer(tokenizer)
    return model, tokenizer, vocab
