"""Shared pieces of the trainers, so that each trainer module reads as its stages.

Every ``guidedecode train <scorer>`` run is a directory that a killed run resumes from. The pieces:

* **Files**: :func:`atomic_dir` builds a directory next to its target, fsyncs it and renames it into
  place; :func:`check_settings` records a run's settings and refuses to resume under other ones.
  (JSONL/JSON records: :mod:`guidedecode.records`.)
* **Resumable collection**: :func:`collect_resumable` maps a batched function over fixed chunks of
  items and appends each chunk's records to a JSONL file (fsynced), skipping the items already there;
  the chunk index is passed on so per-chunk seeds make a resumed run write the same records; at the
  end the file must hold every item's record.
* **Collection backend**: :func:`collection_backend` is what a trainer generates (and scores) its data
  with: ``HFBackend`` on the loaded model, or ``VLLMBackend`` on a vLLM engine (``--backend vllm``).
* **Examples and losses**: an :class:`LMExample` is ``(input_ids, labels)`` with ``-100`` on the
  tokens outside the loss; :func:`collate` right-pads a batch; :func:`masked_loss_sum` returns
  ``(sum_t -log p(y_t | y_<t), #labelled tokens)`` computing logits only where a label is;
  :func:`held_out_loss` is the token-weighted mean of that over a dev set.
* **Dev split**: :func:`split_dev` carves a seeded dev split out of the training items.
* **The loop**: :func:`fit` trains the parameters with ``requires_grad`` (AdamW, a transformers
  schedule, gradient accumulation and clipping), evaluates the dev loss after every epoch, keeps the
  best epoch's weights, and checkpoints every ``save_every`` optimizer steps and at every epoch end:
  the trainable tensors (safetensors), optimizer, scheduler, RNG and loop state. A rerun of the same
  command resumes from the newest checkpoint and ends with weights bit-identical to an uninterrupted
  run (the epoch order is a function of ``(seed, epoch)``; checkpoints are written atomically, so a
  kill at any point leaves the previous one intact). ``stop_after_steps`` ends a call early with a
  checkpoint (tests, time-boxed runs).

A minimal trainer::

    model = get_peft_model(base, LoraConfig(...))          # whatever makes the right tensors trainable
    train, dev = split_dev(examples, 0.1, seed=0)
    result = fit(model, train, dev, out / "train", FitConfig(epochs=3, lr=2e-4),
                 settings={"data": data_hash}, pad_token_id=tokenizer.pad_token_id, progress=True)
    model.save_pretrained(out / "adapter")                  # model holds the selected epoch's weights
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from guidedecode.errors import TrainingError
from guidedecode.hf_compat import kept_logits
from guidedecode.records import append_jsonl, check_complete, read_jsonl, write_json

__all__ = [
    "ADDED_SETTINGS",
    "COLLECTION_BACKENDS",
    "COLLECTION_GPU_MEMORY",
    "FitConfig",
    "FitResult",
    "LMExample",
    "atomic_dir",
    "check_settings",
    "collate",
    "collect_resumable",
    "check_collection_backend",
    "check_ready_backend",
    "collection_backend",
    "describe_backend",
    "fit",
    "held_out_loss",
    "load_trainable",
    "masked_loss_sum",
    "save_trainable",
    "split_dev",
    "trainable_state",
]


# =============================================================================================
# Files


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def atomic_dir(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(staging)`` on a fresh sibling directory, fsync it, then rename it to ``target``
    (replacing an old one), so ``target`` is always either the old or the complete new directory."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise TrainingError(f"{target} is a file, not a directory: give a directory path")
    if target.parent.exists() and not target.parent.is_dir():
        raise TrainingError(f"{target.parent} is a file, not a directory: give a directory path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(staging)
        _fsync_tree(staging)
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


ADDED_SETTINGS = {"backend": "hf"}
"""Settings added after runs existed, with the value those runs used: a run recorded without one resumes."""


def _holds_output(settings_file: Path) -> bool:
    return any(p != settings_file for p in settings_file.parent.iterdir())


def check_settings(path: str | os.PathLike, settings: dict, *, may_change: Sequence[str] = ()) -> None:
    """Write ``settings`` to the JSON file ``path``; if it already holds settings that differ in a key
    not in ``may_change``, raise a TrainingError naming the keys (a run resumes only as itself). Settings
    alone in their directory (a run stopped by a bad input before it wrote anything) are replaced."""
    path = Path(path)
    if path.is_file() and _holds_output(path):  # only the settings of a run that stopped before any output: new ones
        try:
            recorded = json.loads(path.read_text())
        except ValueError as error:
            raise TrainingError(f"{path} is not valid JSON ({error}): use a new --out directory") from error
        changed = sorted(k for k in set(recorded) | set(settings)
                         if k not in may_change and recorded.get(k, ADDED_SETTINGS.get(k)) != settings.get(k))
        if changed:
            raise TrainingError(f"{path.parent} holds a run made with other settings ({', '.join(changed)}): "
                                "use a new --out directory or delete it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, settings)


# =============================================================================================
# Resumable collection


def collect_resumable(items: Sequence, path: str | os.PathLike, work: Callable[[list, int], list[dict]], *,
                      key: Callable[[Any], str], chunk_size: int = 8, progress: bool = False,
                      desc: str = "collect", on_chunk: Callable[[int], None] | None = None) -> list[dict]:
    """Records for ``items``, computed chunk by chunk and appended to the JSONL file ``path``.

    ``items`` are cut into fixed chunks of ``chunk_size`` (by position); ``work(chunk, chunk_index)``
    returns one record per item of the chunk, each with ``record["id"] == key(item)``. Chunks whose
    items are all in ``path`` already are skipped, so a rerun after a kill computes only the rest;
    ``on_chunk(chunk_index)`` runs after each computed chunk is on disk. At the end the file is read
    back and must hold a record of every item (a TrainingError otherwise); returns the records of
    ``items`` in their order.
    """
    from tqdm.auto import tqdm

    if chunk_size < 1:
        raise TrainingError(f"chunk size must be >= 1, got {chunk_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = [key(item) for item in items]
    if len(set(keys)) != len(keys):
        raise TrainingError(f"collect {path.name}: the items have duplicate ids")
    done = {record["id"]: record for record in read_jsonl(path, key="id", error=TrainingError)}
    bar = tqdm(total=len(items), initial=sum(k in done for k in keys), desc=desc, disable=not progress)
    try:
        for index, start in enumerate(range(0, len(items), chunk_size)):
            chunk, chunk_keys = list(items[start:start + chunk_size]), keys[start:start + chunk_size]
            todo = [k for k in chunk_keys if k not in done]
            if not todo:
                continue
            records = work(chunk, index)
            got = [r.get("id") for r in records] if isinstance(records, list) else None
            if got != chunk_keys:
                raise TrainingError(f"collect {path.name}: chunk {index} returned records with ids {got}, "
                                    f"expected {chunk_keys}")
            fresh = [r for r in records if r["id"] not in done]
            append_jsonl(path, fresh)
            done.update((r["id"], r) for r in fresh)
            bar.update(len(fresh))
            if on_chunk is not None:
                on_chunk(index)
    finally:
        bar.close()
    check_complete(path, read_jsonl(path, key="id", error=TrainingError), keys, error=TrainingError)
    return [done[k] for k in keys]


# =============================================================================================
# Examples, batches, losses


COLLECTION_BACKENDS = ("hf", "vllm")
"""Where a trainer's data collection runs: transformers ``generate`` or a vLLM engine."""


def check_collection_backend(kind: str, *, used: bool = True) -> str:
    """``kind`` if it is a known backend and (``used``: a stage that runs will generate with it) for
    ``"vllm"`` a supported vLLM is installed."""
    if kind not in COLLECTION_BACKENDS:
        raise TrainingError(f"unknown backend {kind!r}: choose from {', '.join(COLLECTION_BACKENDS)}")
    if kind == "vllm" and used:
        from guidedecode.vllm import require_vllm

        require_vllm()
    return kind


COLLECTION_GPU_MEMORY = 0.4
"""Fraction of a GPU a trainer's vLLM engine reserves: the transformers copy that trains shares the card."""


def collection_backend(kind: str, model: str, *, load: Callable[[], tuple], batch_size: int, seed: int = 0,
                       dtype: str | None = None, device: str | None = None, processors: Sequence = ()):
    """The backend a trainer collects its data with (both give ``sample`` / ``greedy`` / ``score``).

    ``"hf"``: :class:`~guidedecode.backends.HFBackend` on ``load()`` (``(model, tokenizer)``), ``batch_size``
    sequences per ``generate`` call. ``"vllm"``: :class:`~guidedecode.vllm.VLLMBackend` on a new vLLM engine
    of ``model`` with ``processors`` as its logits processors (vLLM batches by itself; a clear error when
    vLLM is missing or unsupported); on a GPU it reserves :data:`COLLECTION_GPU_MEMORY` of it. ``dtype``:
    the weights' dtype (default: as stored), for both. ``device``: where the transformers copy runs; vLLM
    places its engine itself, so a device it would not use is refused.
    """
    check_collection_backend(kind)
    if kind == "vllm":
        from guidedecode.vllm.engine import build_backend

        cuda = torch.cuda.is_available()
        if device is not None and str(device).startswith("cpu") == cuda:
            raise TrainingError(f"--device {device} with --backend vllm: the vLLM engine runs on "
                                f"{'the GPU' if cuda else 'the CPU'} here (it places itself); use --backend hf")
        name = str(dtype).removeprefix("torch.") if dtype is not None else None
        engine_args = {"gpu_memory_utilization": COLLECTION_GPU_MEMORY} if cuda else {}
        return build_backend(model, processors=processors, dtype=name, seed=seed, **engine_args)
    from guidedecode.backends import HFBackend

    return HFBackend(*load(), batch_size=batch_size)


def check_ready_backend(kind: str, backend, model: str) -> None:
    """A backend handed to a trainer must be the kind its settings record (and, for vLLM, serve ``model``)."""
    if backend is None:
        return
    is_vllm = _is_vllm(backend)
    if is_vllm != (kind == "vllm"):
        raise TrainingError(f"the given backend is a {type(backend).__name__} but the run's backend setting is "
                            f"{kind!r}: give backend={'vllm' if is_vllm else 'hf'!r} in the settings")
    if is_vllm:
        from guidedecode.models import model_source

        served = backend.llm.llm_engine.model_config.model
        wanted = model_source(model)
        if os.path.realpath(served) != os.path.realpath(wanted) and served != wanted:
            raise TrainingError(f"the given vLLM engine serves {served!r}, but the run's model is {model!r}")


def _is_vllm(backend) -> bool:
    """A backend (or Q♯ sampler) on a vLLM engine: it holds the ``vllm.LLM`` as ``.llm`` (checked without
    importing vLLM, which the main environment may lack)."""
    return hasattr(backend, "llm")


def describe_backend(backend) -> dict:
    """What a trainer records about the backend its data came from: kind, weights' dtype, device (anything
    holding ``.llm``, a vLLM engine, or ``.model``, a torch model)."""
    if _is_vllm(backend):
        engine = backend.llm.llm_engine
        return {"backend": "vllm", "dtype": str(engine.model_config.dtype).removeprefix("torch."),
                "device": str(engine.vllm_config.device_config.device)}
    weights = next(backend.model.parameters())
    return {"backend": "hf", "dtype": str(weights.dtype).removeprefix("torch."), "device": str(weights.device)}


class LMExample(NamedTuple):
    """One causal-LM example: token ids and per-token labels (the id, or -100 outside the loss)."""

    input_ids: list[int]
    labels: list[int]


def split_dev(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """``(train, dev)``: shuffle with ``seed``; the first ``round(fraction * n)`` items (at least one
    when fraction > 0 and n >= 2, never all) are dev, the rest train."""
    if not 0 <= fraction < 1:
        raise TrainingError(f"dev fraction must be in [0, 1), got {fraction}")
    order = list(items)
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(fraction * len(order))) if fraction > 0 and len(order) >= 2 else 0
    n_dev = min(n_dev, max(0, len(order) - 1))
    return order[n_dev:], order[:n_dev]


def collate(examples: Sequence[LMExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        if len(ids) != len(labs):
            raise TrainingError(f"an example has {len(ids)} tokens but {len(labs)} labels")
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, :len(labs)] = torch.tensor(labs, dtype=torch.long)
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def masked_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``(sum over labelled positions t of -log p(label_t | x_<t), number of labelled positions)``.

    Logits are computed only at the positions that predict a labelled token
    (:func:`~guidedecode.hf_compat.kept_logits`), so masked prompt tokens cost no ``[T, V]`` logits.
    """
    device = next(model.parameters()).device
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position p predicts token p + 1
    targets = labels[:, 1:][keep[:, :-1]].to(device)
    if not len(targets):
        raise TrainingError("a training batch has no target tokens (every label is masked)")
    logits = kept_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                         keep.to(device))  # [num_kept, V]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets,
                                             reduction="sum")
    return loss, len(targets)


@torch.no_grad()
def held_out_loss(model, examples: Sequence, *, batch_size: int, collate_fn: Callable[[list], dict],
                  loss_fn: Callable = masked_loss_sum) -> float | None:
    """Token-weighted mean loss over ``examples`` in eval mode (None when there are none)."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            loss, n = loss_fn(model, collate_fn(list(examples[start:start + batch_size])))
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(count, 1)


# =============================================================================================
# Trainable tensors


def trainable_state(model) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters with ``requires_grad`` (what :func:`fit` trains and saves)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path: str | os.PathLike) -> None:
    """The trainable tensors as one safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}, str(path))


def load_trainable(model, path: str | os.PathLike) -> None:
    """Copy the tensors of :func:`save_trainable` back; the names must be exactly the trainable ones."""
    from safetensors.torch import load_file

    try:
        saved = load_file(str(path))
    except Exception as error:
        raise TrainingError(f"{path} is damaged ({type(error).__name__}: {error}): delete it") from error
    params = trainable_state(model)
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise TrainingError(f"{path} does not match the model's trainable parameters "
                            f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            if saved[name].shape != param.shape:
                raise TrainingError(f"{path}: {name} has shape {tuple(saved[name].shape)}, "
                                    f"the model's {tuple(param.shape)}")
            param.copy_(saved[name].to(param.device, param.dtype))


# =============================================================================================
# The training loop


@dataclass
class FitConfig:
    """Settings of :func:`fit`.

    ``schedule``: a ``transformers.get_scheduler`` name (cosine, linear, constant_with_warmup, ...)
    over the run's optimizer steps with ``warmup`` (a fraction of them) warm-up steps.
    ``max_steps`` caps the optimizer steps (for comparisons at equal steps; the dev loss is also taken
    when the cap ends an epoch early). ``select``: ``best_dev`` keeps the epoch with the lowest dev
    loss (ties: the earlier), ``last`` the last one. ``save_every``: optimizer steps between
    checkpoints (one is also written at every epoch end); ``keep_checkpoints`` newest ones are kept.
    ``decay_1d``: weight decay also on 1-D tensors (biases, norm weights); off, as in the HF Trainer.
    """

    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup: float = 0.03
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    select: str = "best_dev"
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 1
    decay_1d: bool = False

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise TrainingError(f"max_steps must be >= 1, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"learning rate must be a positive number, got {self.lr}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainingError("weight_decay and max_grad_norm must be >= 0 (max_grad_norm 0: no clipping)")
        if not 0 <= self.warmup < 1:
            raise TrainingError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.select not in ("best_dev", "last"):
            raise TrainingError(f"select must be 'best_dev' or 'last', got {self.select!r}")
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.schedule not in names:
            raise TrainingError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(names)}")

    def settings(self) -> dict:
        """The settings a resumed run must share (checkpoint spacing may change; ``decay_1d`` is
        listed only when on, so runs made before it existed still resume)."""
        values = asdict(self)
        for volatile in ("save_every", "keep_checkpoints"):
            values.pop(volatile)
        if not values["decay_1d"]:
            values.pop("decay_1d")
        return values


@dataclass
class FitResult:
    """``history``: one ``{"epoch", "steps", "train_loss", "dev_loss"}`` per evaluated epoch;
    ``selected_epoch``: the epoch whose weights the model holds now."""

    history: list[dict]
    selected_epoch: int
    global_step: int
    total_steps: int
    train_examples: int
    dev_examples: int
    resumed_finished: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _LoopState:
    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # optimizer steps done in that epoch
    global_step: int = 0
    loss_sum: float = 0.0  # running training loss of the open epoch (token-weighted)
    loss_count: int = 0
    history: list = field(default_factory=list)
    best_dev: float | None = None
    best_epoch: int | None = None
    settings: dict = field(default_factory=dict)


def _checkpoints(directory: Path) -> list[Path]:
    found = [p for p in directory.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def fit(model, train: Sequence, dev: Sequence, directory: str | os.PathLike, config: FitConfig, *,
        settings: dict | None = None, pad_token_id: int | None = None,
        collate_fn: Callable[[list], dict] | None = None, loss_fn: Callable = masked_loss_sum,
        progress: bool = False, desc: str = "train",
        on_step: Callable[[int], None] | None = None, stop_after_steps: int | None = None) -> FitResult | None:
    """Train ``model``'s ``requires_grad`` parameters on ``train``; resumable; see the module docstring.

    ``train``/``dev``: examples for ``collate_fn`` (default :func:`collate` with ``pad_token_id``,
    for :class:`LMExample`); ``loss_fn(model, batch) -> (loss_sum, count)``, minimised as
    ``loss_sum / count`` per micro-batch (averaged over ``grad_accum`` micro-batches). ``settings``:
    whatever else defines the run (data hash, model name); a directory made with other settings is
    refused. ``on_step(global_step)`` runs after every optimizer step (and after its checkpoint).
    ``stop_after_steps``: stop after that many optimizer steps of this call, with a checkpoint, and
    return None (a rerun continues; for tests and time-boxed runs).

    Files in ``directory``: ``checkpoint-N/`` (``trainable.safetensors``, ``optimizer.pt``,
    ``scheduler.pt``, ``rng.pt``, ``state.json``), ``best.safetensors`` (the best dev epoch so far),
    and when done ``selected.safetensors`` + ``fit.json``. Rerunning a finished fit loads the selected
    weights and returns the recorded result. On return the model holds the selected weights, in
    train mode.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    config.validate()
    directory = Path(directory)
    if not train:
        raise TrainingError("no training examples")
    if collate_fn is None:
        if pad_token_id is None:
            raise TrainingError("fit needs pad_token_id (or a collate_fn)")
        collate_fn = lambda batch: collate(batch, pad_token_id)  # noqa: E731
    params = trainable_state(model)
    if not params:
        raise TrainingError("the model has no trainable parameters (requires_grad)")
    all_settings = {"fit": config.settings(), "train_examples": len(train), "dev_examples": len(dev),
                    "trainable": sorted(params), **(settings or {})}
    all_settings = json.loads(json.dumps(all_settings))  # what state.json will hold (tuples -> lists)

    micro_batches = math.ceil(len(train) / config.batch_size)
    steps_per_epoch = math.ceil(micro_batches / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    finished = directory / "fit.json"
    if finished.is_file():
        record = json.loads(finished.read_text())
        if record.get("settings") != all_settings:
            raise TrainingError(f"{directory} holds a finished run with other settings: use a new --out or delete it")
        load_trainable(model, directory / "selected.safetensors")
        model.train()
        return FitResult(**record["result"], resumed_finished=True)

    state = _LoopState(settings=all_settings)
    latest = (_checkpoints(directory) or [None])[-1]
    if latest is not None:
        try:
            saved = json.loads((latest / "state.json").read_text())
        except (OSError, ValueError) as error:
            raise TrainingError(f"checkpoint {latest} is damaged (state.json: {error}): delete it") from error
        if saved.get("settings") != all_settings:
            raise TrainingError(f"{directory} holds checkpoints made with other settings: use a new --out or "
                                "delete them")
        state = _LoopState(**saved)
        load_trainable(model, latest / "trainable.safetensors")
    else:
        torch.manual_seed(config.seed)  # dropout

    decay = [p for p in params.values() if p.ndim >= 2 or config.decay_1d]
    no_decay = [p for p in params.values() if not (p.ndim >= 2 or config.decay_1d)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    scheduler = get_scheduler(config.schedule, optimizer, num_warmup_steps=int(config.warmup * total_steps),
                              num_training_steps=total_steps)
    if latest is not None:
        try:
            optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
            scheduler.load_state_dict(torch.load(latest / "scheduler.pt", weights_only=True))
            rng = torch.load(latest / "rng.pt", weights_only=True)
        except Exception as error:
            raise TrainingError(f"checkpoint {latest} is damaged (optimizer/scheduler/rng: {error}): "
                                "delete it") from error
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save_checkpoint() -> None:
        def write(staging: Path) -> None:
            save_trainable(model, staging / "trainable.safetensors")
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(scheduler.state_dict(), staging / "scheduler.pt")
            cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
            torch.save({"cpu": torch.get_rng_state(), "cuda": cuda}, staging / "rng.pt")
            (staging / "state.json").write_text(json.dumps(asdict(state), indent=1))

        atomic_dir(directory / f"checkpoint-{state.global_step:07d}", write)
        for old in _checkpoints(directory)[:-config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def close_epoch() -> None:
        dev_loss = held_out_loss(model, dev, batch_size=config.batch_size, collate_fn=collate_fn, loss_fn=loss_fn)
        state.history.append({"epoch": state.epoch, "steps": state.global_step,
                              "train_loss": state.loss_sum / max(state.loss_count, 1), "dev_loss": dev_loss})
        state.loss_sum, state.loss_count = 0.0, 0
        if dev_loss is not None and (state.best_dev is None or dev_loss < state.best_dev):
            state.best_dev, state.best_epoch = dev_loss, state.epoch
            tmp = directory / ".best.safetensors.tmp"
            save_trainable(model, tmp)
            os.replace(tmp, directory / "best.safetensors")
        state.epoch, state.step_in_epoch = state.epoch + 1, 0

    directory.mkdir(parents=True, exist_ok=True)
    model.train()
    bar = tqdm(total=total_steps, initial=state.global_step, desc=desc, disable=not progress)
    steps_this_call = 0
    try:
        while state.epoch < config.epochs and state.global_step < total_steps:
            order = list(range(len(train)))
            random.Random(config.seed * 1_000_003 + state.epoch).shuffle(order)
            batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
            steps = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            for step in steps[state.step_in_epoch:]:
                optimizer.zero_grad(set_to_none=True)
                for micro in step:
                    loss_sum, count = loss_fn(model, collate_fn([train[i] for i in micro]))
                    (loss_sum / max(count, 1) / len(step)).backward()
                    state.loss_sum += float(loss_sum.detach())
                    state.loss_count += count
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                state.step_in_epoch += 1
                state.global_step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{state.loss_sum / max(state.loss_count, 1):.3f}")
                epoch_end = state.step_in_epoch == len(steps) or state.global_step == total_steps
                if epoch_end:
                    close_epoch()
                saved = epoch_end or state.global_step % config.save_every == 0
                if saved:
                    save_checkpoint()
                if on_step is not None:
                    on_step(state.global_step)
                steps_this_call += 1
                if stop_after_steps is not None and steps_this_call >= stop_after_steps \
                        and state.global_step < total_steps and state.epoch < config.epochs:
                    if not saved:
                        save_checkpoint()
                    return None
                if epoch_end:
                    break
    finally:
        bar.close()

    selected = state.epoch - 1
    if config.select == "best_dev" and state.best_epoch is not None:
        selected = state.best_epoch
        load_trainable(model, directory / "best.safetensors")
    model.train()
    result = FitResult(history=state.history, selected_epoch=selected, global_step=state.global_step,
                       total_steps=total_steps, train_examples=len(train), dev_examples=len(dev))
    tmp = directory / ".selected.safetensors.tmp"
    save_trainable(model, tmp)
    os.replace(tmp, directory / "selected.safetensors")
    write_json(finished, {"settings": all_settings, "result": {k: v for k, v in result.to_dict().items()
                                                               if k != "resumed_finished"}})
    return result
