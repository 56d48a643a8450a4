"""Meta-training of the OpTune editor (Li, Lyu, Wang, arXiv 2502.15771, section 4; reference LaVi-Lab/FTTT).

Stages of a run directory (each resumes after a kill; rerunning the same command continues it):

``attempts``  ``attempts.jsonl``: K sampled attempts per training question from the base model (T 0.6,
              top-p 0.95 by default), each judged against the gold answer by the task's checker; sampled
              with transformers or, with ``backend="vllm"``, on a vLLM engine.
``stats``     ``stats.safetensors``: running (Welford) mean / std of the captured ``x_t`` and ``δ_t`` over all
              tokens of all training edit sequences, computed in one pass at the base weights, then frozen.
``train``     ``train/``: the editor's transforms and steps η trained on
                  L = NLL_{W + ΔW(φ, η)}(gold solution | question)   (solution tokens only)
              where ΔW is the edit computed from ``chat(q) ‖ attempt ‖ feedback`` (one inner step; the captured
              factors are constants, so no second-order terms). AdamW, constant lr after a 3% warm-up,
              gradient accumulation, a dev split by question; checkpoints and bit-identical resume come from
              :func:`guidedecode.training.common.fit`. Micro-batches whose loss or gradient is not finite
              contribute nothing (counted in ``metrics.json``).
``editor/``   the trained editor (:meth:`OpTuneEditor.save_pretrained`), ``metrics.json``.

Examples: every failed, complete attempt (truncated ones are dropped, as in the reference). The feedback
follows the verdict: correct attempts are used only with ``include_correct`` and then get the *positive*
feedback string (the reference appends "incorrect" to them). The edit sequence and the target are built by
the same chat-template functions as at test time (no BOS in the middle).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from guidedecode.backends.hf import left_pad
from guidedecode.deltas.injector import DeltaInjector
from guidedecode.deltas.optune import INCORRECT, Captured, OpTuneConfig, OpTuneEditor, _key
from guidedecode import validation as v
from guidedecode.errors import TrainingError
from guidedecode.training.common import (FitConfig, check_collection_backend, check_ready_backend, check_settings,
                                         collect_resumable, collection_backend, describe_backend, fit, split_dev)

CORRECT = "Your answer is correct."


@dataclass
class OpTuneTrainConfig:
    model: str = "smollm2-135m-instruct"
    task: str = "gsm8k"
    task_options: dict = field(default_factory=dict)
    data: str | None = None
    questions: int | None = None
    attempts: int = 10
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 512
    include_correct: bool = False
    drop_truncated: bool = True
    positive_feedback: str = CORRECT
    feedback: str = INCORRECT
    modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list = field(default_factory=lambda: [-2, -1])
    rank: int = 16
    dropout: float = 0.1
    eta_init: float = 1e-4
    epochs: int = 3
    lr: float = 1e-5
    batch_size: int = 1
    grad_accum: int = 20
    warmup: float = 0.03
    max_length: int = 1024
    dev_fraction: float = 0.1
    seed: int = 0
    save_every: int = 20
    generate_batch: int = 8
    device: str | None = None
    backend: str = "hf"  # where the attempts are sampled: "hf" or "vllm" (a vLLM engine of ``model``)

    def validate(self) -> None:
        error = TrainingError
        check_collection_backend(self.backend)
        for name in ("attempts", "epochs", "batch_size", "grad_accum", "max_new_tokens", "max_length", "rank",
                     "generate_batch"):
            v.positive_int(name, getattr(self, name), error=error)
        v.optional(v.positive_int, "questions", self.questions, error=error)
        v.integer("seed", self.seed, minimum=0, error=error)
        v.integer("save_every", self.save_every, minimum=0, error=error)
        v.temperature("temperature", self.temperature, error=error)
        v.probability("top_p", self.top_p, error=error)
        for name in ("lr", "eta_init"):
            if v.number(name, getattr(self, name), error=error) <= 0:
                raise error(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        for name, value in (("dev_fraction", self.dev_fraction), ("dropout", self.dropout), ("warmup", self.warmup)):
            if not 0 <= v.number(name, value, error=error) < 1:
                raise error(f"{name} must be in [0, 1), got {value}")
        for name in ("feedback", "positive_feedback"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise error(f"{name} must be a non-empty text (the user turn appended after an attempt), got {value!r}")
        if not self.modules or not all(isinstance(m, str) and m.strip() for m in self.modules):
            raise error(f"modules must be a non-empty list of linear-layer name patterns, got {self.modules!r}")
        if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise error(f"layers must be a non-empty list of decoder-layer indices, got {self.layers!r}")


def gold_solution(problem) -> str:
    """The problem's worked solution ending with the task's answer phrase ("The answer is X.")."""
    solution = problem.meta.get("solution")
    if not solution:
        raise TrainingError(f"problem {problem.id} has no worked solution (meta['solution']): OpTune trains on it")
    if "####" in solution:  # GSM8K: drop calculator annotations, end with the answer phrase
        body, answer = solution.rsplit("####", 1)
        body = re.sub(r"<<[^>]*>>", "", body).strip()
        solution = f"{body}\nThe answer is {answer.strip()}."
    return solution


def build_examples(editor: OpTuneEditor, tokenizer, task, problems, records, config: OpTuneTrainConfig) -> list[dict]:
    """``{"id", "edit", "target", "start"}`` per usable attempt (see the module docstring)."""
    examples = []
    for problem, record in zip(problems, records):
        messages = task.messages(problem)
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": gold_solution(problem)}],
                                             tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = tokenizer(full, add_special_tokens=False)["input_ids"]
        if target[:len(prompt_ids)] != prompt_ids:
            raise TrainingError("the chat template's generation prompt is not a prefix of the rendered solution turn")
        for j, attempt in enumerate(record["attempts"]):
            if attempt["finish"] == "length" and config.drop_truncated:
                continue  # truncated: dropped, as in the reference
            if attempt["correct"] and not config.include_correct:
                continue
            feedback = config.positive_feedback if attempt["correct"] else config.feedback
            edit = editor.edit_sequence(tokenizer, messages, attempt["text"], feedback)
            if len(edit) > config.max_length or len(target) > config.max_length:
                continue
            examples.append({"id": f"{problem.id}#{j}", "edit": edit, "target": target, "start": len(prompt_ids)})
    return examples


class MetaObjective(nn.Module):
    """The editor (trainable) and the frozen base model; :meth:`loss` is the outer NLL of the gold solution."""

    def __init__(self, editor: OpTuneEditor, model: nn.Module, pad_token_id: int):
        super().__init__()
        self.editor, self.lm, self.pad_token_id = editor, model, pad_token_id
        for p in model.parameters():
            p.requires_grad_(False)
        self.skipped = 0
        # the captured factors of an example are computed at the base weights, so they are the same in
        # every epoch: kept (on the CPU) after the first capture instead of a forward + backward per step
        self.captured: dict[str, tuple[torch.Tensor, ...]] = {}

    def capture(self, batch: list[dict]) -> Captured:
        device = next(self.lm.parameters()).device
        missing = [e for e in batch if e["id"] not in self.captured]
        if missing:
            ids, mask = left_pad([e["edit"] for e in missing], self.pad_token_id, device)
            got = self.editor.capture(self.lm, ids, mask)  # at the base weights
            for row, e in enumerate(missing):
                self.captured[e["id"]] = {name: tuple(t.cpu() for t in got.tokens(name, row)) for name in got.x}
        names = list(self.editor.config.targets)
        width = max(self.captured[e["id"]][names[0]][0].shape[0] for e in batch)
        mask = torch.zeros(len(batch), width, dtype=torch.long, device=device)
        xs, deltas = {}, {}
        for name in names:
            x = torch.zeros(len(batch), width, self.captured[batch[0]["id"]][name][0].shape[1], device=device)
            d = torch.zeros(len(batch), width, self.captured[batch[0]["id"]][name][1].shape[1], device=device)
            for row, e in enumerate(batch):
                xe, de = self.captured[e["id"]][name]
                x[row, : xe.shape[0]], d[row, : de.shape[0]] = xe.to(device), de.to(device)
                mask[row, : xe.shape[0]] = 1
            xs[name], deltas[name] = x, d
        return Captured(xs, deltas, mask, torch.zeros(()))

    def loss(self, batch: list[dict]) -> tuple[torch.Tensor, int]:
        device = next(self.lm.parameters()).device
        edits = self.editor.deltas_from(self.capture(batch))
        target, target_mask = left_pad([e["target"] for e in batch], self.pad_token_id, device)
        labels = torch.full_like(target, -100)
        for r, e in enumerate(batch):
            offset = target.shape[1] - len(e["target"])
            labels[r, offset + e["start"]:] = target[r, offset + e["start"]:]
        positions = (target_mask.cumsum(-1) - 1).clamp(min=0)
        with DeltaInjector(self.lm, {name: [edit[name] for edit in edits] for name in edits[0]}):
            logits = self.lm(input_ids=target, attention_mask=target_mask, position_ids=positions).logits
        keep = labels[:, 1:] != -100
        nll = nn.functional.cross_entropy(logits[:, :-1][keep].float(), labels[:, 1:][keep], reduction="sum")
        count = int(keep.sum())
        if not torch.isfinite(nll):
            self.skipped += 1
            return sum(p.sum() for p in self.editor.parameters()) * 0.0, 0
        return nll, count


def _finite_or_zero(objective: MetaObjective):
    def hook(grad):
        if torch.isfinite(grad).all():
            return grad
        objective.skipped += 1
        return torch.zeros_like(grad)

    return hook


def run(config: OpTuneTrainConfig, out: str | os.PathLike, *, progress: bool = True, on_step=None,
        backend=None) -> dict:
    """All stages (see the module docstring); returns the metrics written to ``out/metrics.json``.
    ``on_step(global_step)`` runs after every optimizer step (and its checkpoint); ``backend``: a ready
    backend of ``config.model`` for the attempts (default: built from ``config.backend``)."""
    from guidedecode.models import load_model
    from guidedecode.tasks import get_task

    config.validate()
    out = v.output_dir("--out", out, error=TrainingError)
    check_settings(out / "config.json", asdict(config), may_change=("save_every", "generate_batch", "device"))
    model, tokenizer = load_model(config.model, device=config.device)
    model.eval()
    task = get_task(config.task, **config.task_options)
    problems = task.load(config.data, split="train", limit=config.questions)
    if not problems:
        raise TrainingError("no training questions")

    # the editor first: modules / layers that match nothing fail here, before hours of attempts; its random
    # initialisation comes from the run's seed (the same whether or not this call samples the attempts)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        editor = OpTuneEditor.for_model(model, OpTuneConfig(modules=list(config.modules), layers=list(config.layers),
                                                            rank=config.rank, dropout=config.dropout,
                                                            eta_init=config.eta_init, feedback=config.feedback))
    editor.to(next(model.parameters()).device)

    # ---- attempts
    check_ready_backend(config.backend, backend, config.model)
    if backend is None:
        backend = collection_backend(config.backend, config.model, load=lambda: (model, tokenizer),
                                     batch_size=max(config.generate_batch, config.attempts), seed=config.seed,
                                     device=config.device)

    def attempts(chunk, index):
        rendered = [backend.chat_prompt(task.messages(p)) for p in chunk]
        rows = backend.sample(rendered, config.attempts, max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p,
                              seed=config.seed * 1_000_003 + index)
        verdicts = task.check_many([c.text for row in rows for c in row],
                                   [p for p in chunk for _ in range(config.attempts)])
        records, k = [], 0
        for problem, row in zip(chunk, rows):
            records.append({"id": problem.id, "attempts": [
                {"text": c.text, "correct": bool(verdicts[k + j]), "finish": c.finish_reason}
                for j, c in enumerate(row)]})
            k += len(row)
        return records

    records = collect_resumable(problems, out / "attempts.jsonl", attempts, key=lambda p: p.id,
                                chunk_size=max(1, config.generate_batch // config.attempts) or 1,
                                progress=progress, desc="attempts")

    # ---- examples, split by question
    train_ids, dev_ids = split_dev([p.id for p in problems], config.dev_fraction, config.seed)
    pairs = list(zip(problems, records))
    train = build_examples(editor, tokenizer, task, *_unzip([x for x in pairs if x[0].id in set(train_ids)]), config)
    dev = build_examples(editor, tokenizer, task, *_unzip([x for x in pairs if x[0].id in set(dev_ids)]), config)
    if not train:
        raise TrainingError("no training examples: every attempt was correct or truncated (try more attempts, "
                            "a larger --max-new-tokens or --include-correct)")

    # ---- statistics over all training tokens, frozen afterwards
    objective = MetaObjective(editor, model, backend.pad_token_id)
    stats_file = out / "stats.safetensors"
    stats_keys = [k for k in editor.state_dict() if ".stats_" in k]
    if stats_file.is_file():
        from safetensors.torch import load_file

        editor.load_state_dict({**editor.state_dict(), **load_file(str(stats_file))})
    else:
        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        for example in tqdm(train, desc="stats", disable=not progress):
            captured = objective.capture([example])
            for name, shape in editor.config.targets.items():
                x, delta = captured.tokens(name, 0)
                editor.transforms[_key(shape)].stats_x.update(x)
                editor.transforms[_key(shape)].stats_delta.update(delta)
        state = editor.state_dict()
        tmp = out / "stats.safetensors.tmp"
        save_file({k: state[k].detach().cpu().contiguous() for k in stats_keys}, str(tmp))
        os.replace(tmp, stats_file)
    for transform in editor.transforms.values():
        transform.update_stats = False

    # ---- meta-training
    for p in editor.parameters():
        p.register_hook(_finite_or_zero(objective))
    fit_config = FitConfig(epochs=config.epochs, batch_size=config.batch_size, grad_accum=config.grad_accum,
                           lr=config.lr, schedule="constant_with_warmup", warmup=config.warmup, seed=config.seed,
                           save_every=config.save_every, select="last")
    base_dev = _base_dev_loss(model, dev, backend.pad_token_id) if dev else None
    result = fit(objective, train, dev, out / "train", fit_config, collate_fn=list,
                 loss_fn=lambda m, batch: m.loss(batch), progress=progress, desc="optune", on_step=on_step,
                 settings={"examples": [e["id"] for e in train]})
    editor.eval()
    editor.save_pretrained(out / "editor")
    metrics = {"questions": len(problems), "attempts_sampled_with": describe_backend(backend),
               "train_examples": len(train), "dev_examples": len(dev),
               "attempts": sum(len(r["attempts"]) for r in records),
               "correct_attempts": sum(a["correct"] for r in records for a in r["attempts"]),
               "truncated_attempts": sum(a["finish"] == "length" for r in records for a in r["attempts"]),
               "dev_nll_base": base_dev, "history": result.history, "skipped_micro_batches": objective.skipped,
               "editor_parameters": editor.num_parameters(), "etas": {k: float(v.detach()) for k, v in editor.etas.items()}}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    return metrics


def _unzip(pairs):
    return [p for p, _ in pairs], [r for _, r in pairs]


@torch.no_grad()
def _base_dev_loss(model, dev: list[dict], pad_token_id: int) -> float:
    """Token-weighted NLL of the dev solutions under the unedited model (the reference point of the dev loss)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for e in dev:
        ids = torch.tensor([e["target"]], device=device)
        logits = model(input_ids=ids).logits[0, e["start"] - 1:-1]
        total += float(nn.functional.cross_entropy(logits.float(), ids[0, e["start"]:], reduction="sum"))
        count += len(e["target"]) - e["start"]
    return total / max(count, 1)
