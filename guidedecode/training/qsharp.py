"""Q♯ value-model training: collect → combine → train, in DAgger-style rounds.

Paper: Zhou et al., "Q♯: Provably Optimal Distributional RL for LLM Post-Training", arXiv 2502.20548,
Algorithm 1; reference code ``jinpz/q_sharp`` (``collect_training_data.py``, ``combine_training_data.py``,
``train_classifier.py``).

**Collect** (round r, per problem, ``samples`` = K repeats):

1. roll-in: sample a full response y (≤ ``max_new_tokens``, ends at the first EOS of the *full* EOS
   set) from the current guided policy. Round 1 is the pure reference π_ref (eta = 0: the value model
   is never loaded or called); round r > 1 guides π_ref with :class:`QSharpGuide` and round r−1's value
   model at the explicit ``roll_in_eta``, which every record stores.
2. cut: c ~ Uniform{0 .. |y|−1}; keep prompt + y[:c+1] (the last kept token is the *switch token*).
3. roll-out: continue with π_ref only for the remaining budget ``max_new_tokens − (c+1)``; when the cut
   is the last token of y (EOS or budget spent) the continuation is empty, i.e. the roll-in is reused.
4. label: r = task.check(decode(y[:c+1] + continuation)) ∈ {0, 1}.

Sampling runs in transformers ``generate`` (:class:`Policy`) or, with ``backend="vllm"``, in a vLLM engine
(:class:`VLLMPolicy`; the guided roll-in is its Q♯ logits processor); training is transformers either way.

One JSONL line per problem, lists over the K repeats (field names as in the reference).

**Combine**: the union of all finished rounds' records → one :class:`Example` per roll-out.

**Train**: for an example, input = prompt + y[:c] , targets = [y_c] + continuation; the value
of every prefix that ends inside the targets is trained towards the same Monte-Carlo label r:

    L = mean_batch [ (1/|T_b|) Σ_{t ∈ T_b} ℓ(z_{b,t}, r_b) ]

with ℓ = BCE-with-logits (``bce``), (σ(z) − r)² (``mse``) or −log softmax(z)_j, j = round((r − V_min) /
(V_max − V_min) · (A − 1)) (``mle``, NLL of the nearest atom); z from ``ValueModel.token_logits``; fp32.
AdamW (weight decay 0.01, constant learning rate, no warm-up), gradient clipping at 5.0.

Problems are split into train / held-out (90/10, by a seeded hash of the problem id, the same in every
round). ``drop_no_variation`` removes, from the training split only, the (round, problem) groups whose
K labels are all equal. Held-out metrics: BCE of the model, BCE of the constant predictor (the training
split's base rate), accuracy and ROC-AUC.

Output directory (every file written atomically; re-running the same command resumes)::

    config.json              settings (a resumed run must match them; --rounds may grow)
    round-1/data.jsonl       collected records, appended per chunk of problems and fsynced
    round-1/checkpoint/      model/ + trainer.pt while training (optimizer, epoch, step)
    round-1/model/           the trained ValueModel (save_pretrained)
    round-1/metrics.json     training loss, held-out metrics of this round
    metrics.json             all finished rounds and the last one's numbers
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from guidedecode import validation as v
from guidedecode.errors import GuideError, TrainingError
from guidedecode.records import read_json, write_json
from guidedecode.records import read_jsonl as _read_jsonl
from guidedecode.training.common import (ADDED_SETTINGS, atomic_dir, check_collection_backend, check_ready_backend,
                                         collect_resumable, collection_backend, describe_backend)

HEADS = ("v", "q")
LOSSES = ("bce", "mse", "mle")
INITS = ("zero", "reuse", "normal")
# Settings that may differ between a run and its resumption.
RESUMABLE_CHANGES = ("rounds", "device")


# ----------------------------------------------------------------------------------- settings


@dataclass
class QSharpTrainConfig:
    """Settings of a Q♯ training run (CLI: ``guidedecode train qsharp --help``).

    ``lr`` defaults to 1e-4, five times the reference's 2e-5: small CPU runs make only tens of
    optimiser steps. Use ``lr=2e-5`` for reference-scale runs (thousands of steps).
    """

    model: str = "smollm2-135m-instruct"
    task: str = "synthetic"
    value_backbone: str | None = None  # default: the same as ``model`` (loaded as a separate copy)
    value_layers: int | None = None  # keep only the backbone's first N decoder layers (a smaller value model)
    train_layers: int | None = None  # train the head and the top N backbone layers only (0 = head only)
    data: str | None = None
    split: str = "train"
    task_options: dict = field(default_factory=dict)
    rounds: int = 1
    problems: int | None = None
    samples: int = 4
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.9
    roll_in_eta: float = 10.0
    guide_top_k: int = 20
    head: str = "v"
    loss: str = "bce"
    num_atoms: int | None = None
    init: str = "zero"
    epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    batch_size: int = 8
    gen_batch_size: int = 16
    held_out: float = 0.1
    drop_no_variation: bool = True
    warm_start: bool = False
    save_every: int = 0
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # weights dtype of the policy and value model (float32, bfloat16, float16)
    backend: str = "hf"  # where roll-ins and roll-outs are sampled: "hf" (generate) or "vllm" (a vLLM engine)

    def validate(self) -> None:
        error = TrainingError
        check_collection_backend(self.backend)
        for name in ("model", "task", "split"):
            v.string(name, getattr(self, name), error=error)
        for name in ("value_backbone", "data", "device", "dtype"):
            v.optional(v.string, name, getattr(self, name), error=error)
        for name in ("rounds", "samples", "max_new_tokens", "epochs", "batch_size", "gen_batch_size"):
            v.positive_int(name, getattr(self, name), error=error)
        for name in ("problems", "value_layers", "train_layers", "num_atoms"):
            v.optional(v.integer, name, getattr(self, name), error=error)
        v.integer("guide_top_k", self.guide_top_k, error=error)
        v.integer("save_every", self.save_every, error=error)
        v.integer("seed", self.seed, minimum=0, error=error)
        v.temperature("temperature", self.temperature, error=error)
        v.probability("top_p", self.top_p, error=error)
        for name in ("roll_in_eta", "lr", "weight_decay", "grad_clip", "held_out"):
            v.number(name, getattr(self, name), error=error)
        if not isinstance(self.task_options, dict):
            raise error(f"task_options must be a dict, got {type(self.task_options).__name__}")
        if self.head not in HEADS:
            raise TrainingError(f"unknown head {self.head!r}: choose one of {', '.join(HEADS)}")
        if self.loss not in LOSSES:
            raise TrainingError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.init not in INITS:
            raise TrainingError(f"unknown init {self.init!r}: choose one of {', '.join(INITS)}")
        if self.init == "reuse" and self.head != "q":
            raise TrainingError("init 'reuse' copies the LM head into a Q head: use head 'q', or init 'zero'/'normal'")
        positive = {"rounds": self.rounds, "samples": self.samples, "max_new_tokens": self.max_new_tokens,
                    "epochs": self.epochs, "batch_size": self.batch_size, "gen_batch_size": self.gen_batch_size}
        for name, value in positive.items():
            if value < 1:
                raise TrainingError(f"{name} must be >= 1, got {value}")
        if self.problems is not None and self.problems < 1:
            raise TrainingError(f"problems must be >= 1, got {self.problems}")
        if self.temperature <= 0:
            raise TrainingError(f"temperature must be > 0 (collection samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TrainingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (self.roll_in_eta >= 0 and math.isfinite(self.roll_in_eta)):
            raise TrainingError(f"roll_in_eta must be a finite number >= 0, got {self.roll_in_eta}")
        if self.guide_top_k < 1 and self.guide_top_k != -1:
            raise TrainingError(f"guide_top_k must be >= 1 or -1 (whole vocabulary), got {self.guide_top_k}")
        if not self.lr > 0:
            raise TrainingError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise TrainingError("weight_decay and grad_clip must be >= 0 (grad_clip 0 = no clipping)")
        if not 0 <= self.held_out < 1:
            raise TrainingError(f"held_out must be in [0, 1), got {self.held_out}")
        if self.save_every < 0:
            raise TrainingError(f"save_every must be >= 0 (0 = at the end of each epoch only), got {self.save_every}")
        for name, value in (("value_layers", self.value_layers), ("train_layers", self.train_layers)):
            if value is not None and value < (1 if name == "value_layers" else 0):
                raise TrainingError(f"{name} must be >= {1 if name == 'value_layers' else 0}, got {value}")
        if self.num_atoms is not None and self.num_atoms < 1:
            raise TrainingError(f"num_atoms must be >= 1, got {self.num_atoms}")
        if self.num_atoms not in (None, 1) and self.loss != "mle":
            raise TrainingError(f"num_atoms={self.num_atoms} needs loss 'mle' (bce/mse heads have one output)")
        if self.num_atoms == 1 and self.loss == "mle":
            raise TrainingError("loss 'mle' needs num_atoms >= 2")


def read_jsonl(path: Path) -> list[dict]:
    """The records of a collected ``data.jsonl`` (one per problem id; tail repaired, damage refused)."""
    return _read_jsonl(path, key="id", error=TrainingError)


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# --------------------------------------------------------------------------------- collection


class _Sampler:
    """What collection needs around the reference model π_ref, whichever engine samples it.

    ``sample(prompts, n=, max_new_tokens=, temperature=, top_p=, seed=, guide=)`` returns ``n`` continuations
    per prompt (prompt-major rows), each cut after its first EOS of the full EOS set; ``roll_in_guide``
    makes the ``guide`` that steers it with a saved value model (round r > 1)."""

    tokenizer: Any
    eos_token_ids: tuple[int, ...]

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat-templated prompt with the generation prompt, as token ids."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise TrainingError("the tokenizer has no chat template: Q♯ collection prompts with chat messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TrainingError("a prompt tokenised to zero tokens")
        return ids

    def cut_at_eos(self, tokens: Sequence[int]) -> list[int]:
        """Tokens up to and including the first EOS (all of them when there is none)."""
        tokens = list(tokens)
        for i, token in enumerate(tokens):
            if token in self.eos_token_ids:
                return tokens[: i + 1]
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


@dataclass
class Policy(_Sampler):
    """π_ref as a transformers model: sampled with ``generate``, guided by a :class:`QSharpGuide`."""

    model: Any
    tokenizer: Any
    eos_token_ids: tuple[int, ...]
    pad_token_id: int

    @classmethod
    def from_model(cls, model, tokenizer) -> "Policy":
        """Use the full EOS set: ``generation_config.eos_token_id`` (int or list) plus the tokenizer's."""
        from guidedecode.backends.hf import eos_token_ids

        ids = eos_token_ids(model, tokenizer)
        if not ids:
            raise TrainingError("the model and tokenizer define no EOS token: responses could never end")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(ids)
        return cls(model, tokenizer, ids, int(pad))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def roll_in_guide(self, value_model_dir: Path, *, eta: float, top_k: int, temperature: float, top_p: float):
        from guidedecode.guides.qsharp import QSharpGuide

        value_model = _load_value_model(value_model_dir, self.device, self.tokenizer)
        return QSharpGuide(value_model, eta=eta, mode="mle" if value_model.config.loss == "mle" else "bernoulli",
                           top_k=top_k, tokenizer=self.tokenizer, temperature=temperature, top_p=top_p,
                           eos_token_id=list(self.eos_token_ids), pad_token_id=self.pad_token_id)

    def sample(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, guide=None) -> list[list[int]]:
        from guidedecode.backends.hf import left_pad

        ids, mask = left_pad(prompts, self.pad_token_id, self.device)
        torch.manual_seed(seed)
        with torch.no_grad():
            output = self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                num_return_sequences=n, pad_token_id=self.pad_token_id, eos_token_id=list(self.eos_token_ids),
                logits_processor=[guide] if guide is not None else None,
            )
        return [self.cut_at_eos(row) for row in output[:, ids.shape[1]:].tolist()]


class VLLMPolicy(_Sampler):
    """π_ref in a vLLM engine (:class:`~guidedecode.vllm.VLLMBackend`): every prompt its own seed, EOS = the
    full EOS set (``stop_token_ids``); the guided roll-in is the engine's :class:`guidedecode.vllm.QSharp`
    processor with the value model named per request (the engine must be built with it)."""

    def __init__(self, backend):
        self.llm = backend.llm
        self.tokenizer = backend.tokenizer
        self.eos_token_ids = tuple(backend.eos_token_ids)
        if not self.eos_token_ids:
            raise TrainingError("the served model and tokenizer define no EOS token: responses could never end")
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(self.eos_token_ids))  # as Policy.from_model

    def roll_in_guide(self, value_model_dir: Path, *, eta: float, top_k: int, temperature: float, top_p: float):
        _require_qsharp_processor(self.llm)
        mode = "mle" if _saved_loss(value_model_dir) == "mle" else "bernoulli"
        return {"qsharp_eta": float(eta), "qsharp_top_k": int(top_k),
                "qsharp_value_model": str(Path(value_model_dir).resolve()), "qsharp_mode": mode}

    def sample(self, prompts: list[list[int]], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, guide=None) -> list[list[int]]:
        from vllm import SamplingParams

        from guidedecode.vllm.backend import prompt_seed

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
                                 seed=prompt_seed(seed, i), stop_token_ids=list(self.eos_token_ids),
                                 detokenize=False, extra_args=dict(guide) if guide else None)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [self.cut_at_eos(o.token_ids) for output in outputs
                for o in sorted(output.outputs, key=lambda o: o.index)]


def _saved_loss(directory: Path) -> str | None:
    """The training loss recorded in a saved value model's ``config.json``."""
    config = read_json(Path(directory) / "config.json", error=TrainingError)
    return config.get("loss") if isinstance(config, dict) else None


def draw_cuts(seed: int, round_index: int, problem_id: str, lengths: Sequence[int]) -> list[int]:
    """Cut points c_i ~ Uniform{0 .. lengths[i] − 1}, one stream per (seed, round, problem)."""
    rng = random.Random(derive_seed(seed, round_index, problem_id, "cut"))
    cuts = []
    for length in lengths:
        if length < 1:
            raise TrainingError(f"problem {problem_id}: empty roll-in response (max_new_tokens must be >= 1)")
        cuts.append(rng.randrange(length))
    return cuts


def collect_chunk(policy: _Sampler, task, problems: Sequence, *, round_index: int, chunk_index: int,
                  config: QSharpTrainConfig, guide=None, roll_in_eta: float = 0.0) -> list[dict]:
    """Roll-in, cut, roll-out and label ``config.samples`` repeats of each problem; one record each."""
    k, budget = config.samples, config.max_new_tokens
    prompts = [policy.prompt_ids(task.messages(p)) for p in problems]
    responses = policy.sample(prompts, n=k, max_new_tokens=budget, temperature=config.temperature,
                              top_p=config.top_p, seed=derive_seed(config.seed, round_index, chunk_index, "roll-in"),
                              guide=guide)
    cuts = [draw_cuts(config.seed, round_index, p.id, [len(r) for r in responses[i * k:(i + 1) * k]])
            for i, p in enumerate(problems)]
    rows = []  # (prompt index, repeat, prefix, remaining budget)
    for i in range(len(problems)):
        for j in range(k):
            response, c = responses[i * k + j], cuts[i][j]
            rows.append((i, j, response[: c + 1], budget - (c + 1)))
    # roll-out with the reference only, for the rows whose cut is not the response's last token
    open_rows = [r for r in rows if r[3] > 0 and r[2][-1] not in policy.eos_token_ids]
    continuations: dict[tuple[int, int], list[int]] = {}
    if open_rows:
        outs = policy.sample([prompts[i] + prefix for i, _, prefix, _ in open_rows], n=1,
                             max_new_tokens=max(r[3] for r in open_rows), temperature=config.temperature,
                             top_p=config.top_p, seed=derive_seed(config.seed, round_index, chunk_index, "roll-out"))
        for (i, j, _, left), out in zip(open_rows, outs):
            continuations[(i, j)] = out[:left]
    partial_texts, full_texts, check_problems = [], [], []
    for i, j, prefix, _ in rows:
        partial_texts.append(policy.decode(prefix + continuations.get((i, j), [])))
        full_texts.append(policy.decode(responses[i * k + j]))
        check_problems.append(problems[i])
    verdicts = task.check_many(partial_texts + full_texts, check_problems + check_problems)
    partial_ok, full_ok = verdicts[: len(rows)], verdicts[len(rows):]
    records = []
    for i, problem in enumerate(problems):
        span = range(i * k, (i + 1) * k)
        records.append({
            "id": problem.id,
            "gold": problem.answer,
            "round": round_index,
            "roll_in_eta": float(roll_in_eta),
            "prompt_num_tokens": len(prompts[i]),
            "partial_guided_prompts_tokenized": [prompts[i] + rows[s][2] for s in span],
            "num_response_tokens_in_partial_guided_prompts": [len(rows[s][2]) for s in span],
            "partial_guided_responses_tokenized": [continuations.get((i, s - i * k), []) for s in span],
            "partial_guided_predictions": [task.extract(partial_texts[s]) for s in span],
            "partial_guided_predictions_correctness": [bool(partial_ok[s]) for s in span],
            "fully_guided_responses_tokenized": [responses[s] for s in span],
            "fully_guided_predictions": [task.extract(full_texts[s]) for s in span],
            "fully_guided_predictions_correctness": [bool(full_ok[s]) for s in span],
        })
    return records


def collect(policy: _Sampler, task, problems: Sequence, path: Path, *, round_index: int, config: QSharpTrainConfig,
            value_model_dir: Path | None = None, progress: bool = False,
            on_chunk: Callable[[int], None] | None = None) -> list[dict]:
    """Collect round ``round_index`` into ``path`` (JSONL), skipping problems already there; the
    records of ``problems`` in their order (:func:`~guidedecode.training.common.collect_resumable`).

    Problems go in fixed chunks (by index) with per-chunk seeds, so a resumed run writes the same
    records as an uninterrupted one. The value model saved in ``value_model_dir`` guides the roll-in at
    ``config.roll_in_eta`` (round > 1); with eta 0 or no value model the roll-in is π_ref and no value
    model is loaded.
    """
    eta = config.roll_in_eta if (round_index > 1 and value_model_dir is not None) else 0.0
    guide = None
    if eta > 0:
        guide = policy.roll_in_guide(value_model_dir, eta=eta, top_k=config.guide_top_k,
                                     temperature=config.temperature, top_p=config.top_p)

    def work(chunk: list, index: int) -> list[dict]:
        if guide is not None and hasattr(guide, "reset"):
            guide.reset()
        return collect_chunk(policy, task, chunk, round_index=round_index, chunk_index=index, config=config,
                             guide=guide, roll_in_eta=eta)

    return collect_resumable(problems, path, work, key=lambda problem: problem.id,
                             chunk_size=max(1, config.gen_batch_size // config.samples), progress=progress,
                             desc=f"collect round {round_index}", on_chunk=on_chunk)


# ---------------------------------------------------------------------------- combine and split


@dataclass(frozen=True)
class Example:
    """One roll-out: ``input_ids`` = prompt + cut prefix + continuation; the loss covers positions
    ``target_start ..`` (the switch token and the continuation); ``label`` is the final reward."""

    problem_id: str
    round: int
    input_ids: tuple[int, ...]
    target_start: int
    label: float


def record_examples(record: dict) -> list[Example]:
    """The K examples of one collected record (checks that its lists are consistent)."""
    try:
        prompts = record["partial_guided_prompts_tokenized"]
        counts = record["num_response_tokens_in_partial_guided_prompts"]
        continuations = record["partial_guided_responses_tokenized"]
        labels = record["partial_guided_predictions_correctness"]
        problem_id, round_index = str(record["id"]), int(record["round"])
    except (KeyError, TypeError, ValueError) as error:
        raise TrainingError(f"malformed data record (missing or bad field {error})") from error
    if not (len(prompts) == len(counts) == len(continuations) == len(labels)) or not prompts:
        raise TrainingError(f"data record {problem_id}: its per-repeat lists differ in length or are empty")
    examples = []
    for prompt, count, continuation, label in zip(prompts, counts, continuations, labels):
        if not 1 <= count < len(prompt):
            raise TrainingError(f"data record {problem_id}: cut prefix of {count} tokens in a prompt of {len(prompt)}")
        examples.append(Example(problem_id, round_index, tuple(int(t) for t in prompt + continuation),
                                len(prompt) - 1, float(label)))
    return examples


def combine(rounds: Sequence[Sequence[dict]]) -> list[Example]:
    """Aggregate the records of several rounds (DAgger): the union of their examples, in order."""
    return [example for records in rounds for record in records for example in record_examples(record)]


def split_problems(problem_ids: Sequence[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """(train ids, held-out ids): the ``round(fraction·n)`` ids (at least one when fraction > 0 and
    n >= 2; never all) with the smallest seeded hash are held out."""
    ids = list(dict.fromkeys(problem_ids))
    n_held = round(fraction * len(ids))
    if fraction > 0 and len(ids) >= 2:
        n_held = max(1, n_held)
    n_held = min(n_held, max(0, len(ids) - 1))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}/{i}".encode()).hexdigest())
    held = set(ranked[:n_held])
    return set(ids) - held, held


def drop_no_variation(examples: Sequence[Example], keep_ids: set[str] | frozenset = frozenset()) -> list[Example]:
    """Drop the (round, problem) groups whose labels are all equal, except problems in ``keep_ids``."""
    labels: dict[tuple[int, str], set[float]] = {}
    for example in examples:
        labels.setdefault((example.round, example.problem_id), set()).add(example.label)
    return [e for e in examples if e.problem_id in keep_ids or len(labels[(e.round, e.problem_id)]) > 1]


# ------------------------------------------------------------------------------- loss, metrics


def collate(examples: Sequence[Example], pad_token_id: int):
    """Left-padded ``input_ids``, ``attention_mask``, the boolean target mask and the labels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, example in enumerate(examples):
        offset = width - len(example.input_ids)
        ids[b, offset:] = torch.tensor(example.input_ids)
        mask[b, offset:] = 1
        targets[b, offset + example.target_start:] = True
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32)
    return ids, mask, targets, labels


def nearest_atom(labels: torch.Tensor, num_atoms: int, v_min: float = 0.0, v_max: float = 1.0) -> torch.Tensor:
    """j = round((r − V_min) / (V_max − V_min) · (A − 1)), clamped to the atoms."""
    scaled = (labels - v_min) / (v_max - v_min) * (num_atoms - 1)
    return torch.round(scaled).long().clamp(0, num_atoms - 1)


def position_losses(logits: torch.Tensor, labels: torch.Tensor, loss: str, *, v_min: float = 0.0,
                    v_max: float = 1.0) -> torch.Tensor:
    """[B, T] per-position loss of ``logits`` [B, T, A] against the per-row label (fp32)."""
    logits = logits.float()
    target = labels.float()[:, None].expand(logits.shape[:2])
    if loss == "bce":
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[..., 0], target, reduction="none")
    if loss == "mse":
        return (torch.sigmoid(logits[..., 0]) - target) ** 2
    if loss == "mle":
        atoms = nearest_atom(labels, logits.shape[-1], v_min, v_max)
        logp = torch.log_softmax(logits, dim=-1)
        return -logp.gather(-1, atoms[:, None, None].expand(*logits.shape[:2], 1))[..., 0]
    raise TrainingError(f"unknown loss {loss!r}: choose one of {', '.join(LOSSES)}")


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the mean of ``values`` [B, T] over each row's masked positions."""
    mask = mask.to(values.dtype)
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise TrainingError("an example has no target positions")
    return (values * mask).sum(-1) / counts


def value_loss(logits: torch.Tensor, target_mask: torch.Tensor, labels: torch.Tensor, loss: str, *,
               v_min: float = 0.0, v_max: float = 1.0) -> torch.Tensor:
    """The loss: mean over the batch of the mean over each row's target positions."""
    per_position = position_losses(logits, labels, loss, v_min=v_min, v_max=v_max)
    return masked_sequence_mean(per_position, target_mask).mean()


def binary_cross_entropy(p: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Elementwise −[y log p + (1 − y) log(1 − p)], p clamped to [eps, 1 − eps]."""
    p = p.clamp(eps, 1 - eps)
    return -(y * torch.log(p) + (1 - y) * torch.log1p(-p))


def roc_auc(scores: Sequence[float], labels: Sequence[float]) -> float | None:
    """ROC-AUC = P(score of a random positive > score of a random negative), ties count 1/2
    (``sklearn.metrics.roc_auc_score``; a label >= 0.5 is positive); None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    binary = [1 if y >= 0.5 else 0 for y in labels]
    if len(set(binary)) < 2:
        return None
    return float(roc_auc_score(binary, [float(x) for x in scores]))


@torch.no_grad()
def evaluate(value_model, examples: Sequence[Example], *, base_rate: float, pad_token_id: int, batch_size: int = 8,
             constant_rates: dict[str, float] | None = None) -> dict:
    """Held-out metrics, each a mean over examples of a mean over their target positions.

    ``bce``: of the model's P(correct); ``bce_constant``: of the constant ``base_rate``; ``accuracy``:
    of the thresholded P (> 0.5); ``auc``: ROC-AUC of the per-example mean P; ``loss``: the training loss.
    ``constant_rates``: further named constants to report as ``bce_<name>``.
    """
    if not examples:
        return {"examples": 0}
    cfg = value_model.config
    device = next(value_model.parameters()).device
    was_training = value_model.training
    value_model.eval()
    losses, bces, accuracies, scores = [], [], [], []
    for start in range(0, len(examples), batch_size):
        ids, mask, targets, labels = collate(examples[start: start + batch_size], pad_token_id)
        logits = value_model.token_logits(ids.to(device), mask.to(device)).float().cpu()
        p = value_model.probability(logits)
        y = labels[:, None].expand_as(p)
        losses.append(masked_sequence_mean(position_losses(logits, labels, cfg.loss, v_min=cfg.v_min,
                                                           v_max=cfg.v_max), targets))
        bces.append(masked_sequence_mean(binary_cross_entropy(p, y), targets))
        accuracies.append(masked_sequence_mean(((p > 0.5).float() == y).float(), targets))
        scores.append(masked_sequence_mean(p, targets))
    value_model.train(was_training)
    labels = torch.tensor([e.label for e in examples])
    metrics = {
        "examples": len(examples),
        "problems": len({e.problem_id for e in examples}),
        "base_rate": float(labels.mean()),
        "loss": float(torch.cat(losses).mean()),
        "bce": float(torch.cat(bces).mean()),
        "bce_constant": float(binary_cross_entropy(torch.full_like(labels, base_rate), labels).mean()),
        "constant": base_rate,
        "accuracy": float(torch.cat(accuracies).mean()),
        "auc": roc_auc(torch.cat(scores).tolist(), labels.tolist()),
    }
    for name, rate in (constant_rates or {}).items():
        metrics[f"bce_{name}"] = float(binary_cross_entropy(torch.full_like(labels, rate), labels).mean())
        metrics[name] = rate
    return metrics


# ----------------------------------------------------------------------------------- training


def train(value_model, examples: Sequence[Example], directory: Path, *, config: QSharpTrainConfig, round_index: int,
          pad_token_id: int, progress: bool = False, on_step: Callable[[int], None] | None = None) -> dict:
    """Train ``value_model`` in place on ``examples``; checkpoints in ``directory/checkpoint``.

    Each epoch visits the examples in a seeded permutation (seed, round, epoch), so a run resumed
    from a checkpoint (model, AdamW state, epoch, step) takes the same steps as an uninterrupted one.
    Returns ``{"steps", "epochs", "train_loss"}`` (mean loss of the last epoch's steps).
    """
    if not examples:
        raise TrainingError("no training examples")
    cfg = value_model.config
    device = next(value_model.parameters()).device
    try:
        trainable = value_model.freeze_backbone(config.train_layers)
    except GuideError as exc:
        raise TrainingError(str(exc)) from exc
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    checkpoint = directory / "checkpoint"
    state = {"epoch": 0, "step": 0, "global_step": 0, "epoch_losses": [], "last_epoch_loss": None}
    saved = load_checkpoint_state(checkpoint)
    if saved is not None:
        from guidedecode.value_model import ValueModel

        restored = ValueModel.from_pretrained(saved["path"] / "model", device=device)
        value_model.load_state_dict(restored.state_dict())
        try:
            optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError) as error:
            raise TrainingError(f"checkpoint {saved['path']} does not match this model's optimizer: {error}") from error
        state = {key: saved.get(key, state[key]) for key in state}
        if isinstance(saved.get("rng"), torch.Tensor):
            torch.set_rng_state(saved["rng"])  # dropout draws continue where the checkpoint left them
    else:
        torch.manual_seed(derive_seed(config.seed, round_index, "train"))
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    bar = _bar(total, state["global_step"], progress, f"train round {round_index}", "step")
    value_model.train()
    try:
        while state["epoch"] < config.epochs:
            generator = torch.Generator().manual_seed(derive_seed(config.seed, round_index, "epoch", state["epoch"]))
            order = torch.randperm(len(examples), generator=generator).tolist()
            while state["step"] < steps_per_epoch:
                batch = [examples[i] for i in order[state["step"] * config.batch_size:][: config.batch_size]]
                ids, mask, targets, labels = collate(batch, pad_token_id)
                logits = value_model.token_logits(ids.to(device), mask.to(device))
                loss = value_loss(logits, targets.to(device), labels.to(device), cfg.loss, v_min=cfg.v_min,
                                  v_max=cfg.v_max)
                if not torch.isfinite(loss):
                    raise TrainingError(f"non-finite training loss at step {state['global_step']} (lower --lr)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), config.grad_clip)
                optimizer.step()
                state["step"] += 1
                state["global_step"] += 1
                step_loss = float(loss.detach())
                state["epoch_losses"].append(step_loss)
                if state["step"] == steps_per_epoch:
                    state["epoch"] += 1
                    state["step"] = 0
                    last = state["epoch_losses"]
                    state["epoch_losses"] = []
                    state["last_epoch_loss"] = sum(last) / len(last)
                if state["step"] == 0 or (config.save_every and state["global_step"] % config.save_every == 0):
                    save_checkpoint(checkpoint, value_model, optimizer, state)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if on_step is not None:
                    on_step(state["global_step"])
                if state["step"] == 0:
                    break
    finally:
        bar.close()
    value_model.eval()
    return {"steps": state["global_step"], "epochs": config.epochs, "train_loss_last_epoch": state["last_epoch_loss"]}


def save_checkpoint(checkpoint: Path, value_model, optimizer, state: dict) -> None:
    """Write ``model/`` + ``trainer.pt`` into a fresh directory, then swap it in (:func:`atomic_dir`)."""
    def write(fresh: Path) -> None:
        value_model.save_pretrained(fresh / "model")
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), **dict(state)},
                   fresh / "trainer.pt")

    atomic_dir(checkpoint, write)


def load_checkpoint_state(checkpoint: Path) -> dict | None:
    """The trainer state of ``checkpoint`` (or of the old one kept during a swap, after a crash
    mid-swap: ``.checkpoint.old``, or ``checkpoint.old`` as older versions named it), or None."""
    for candidate in (checkpoint, checkpoint.with_name(f".{checkpoint.name}.old"),
                      checkpoint.with_name(checkpoint.name + ".old")):
        if candidate.is_dir():
            path = candidate / "trainer.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # missing, truncated, or not a torch file
                raise TrainingError(f"corrupt training checkpoint {candidate} ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''}); delete it to restart "
                                    "this round's training") from error
            if not isinstance(state, dict) or not {"epoch", "step", "global_step", "optimizer"} <= set(state):
                raise TrainingError(f"corrupt training checkpoint {candidate}: trainer.pt lacks the trainer state")
            state["path"] = candidate
            state.setdefault("epoch_losses", [])
            return state
    return None


# ---------------------------------------------------------------------------------- the run


def run(config: QSharpTrainConfig, out_dir: str | os.PathLike, *, progress: bool = True,
        log: Callable[[str], None] | None = None, on_chunk: Callable[[int], None] | None = None,
        on_step: Callable[[int], None] | None = None, backend=None) -> dict:
    """All rounds: collect → combine → train → evaluate; resumes whatever ``out_dir`` already holds.

    ``config.backend == "vllm"``: roll-ins and roll-outs are sampled in a vLLM engine of ``config.model``
    (built here with :class:`guidedecode.vllm.QSharp` loaded, or ``backend``: a ready
    :class:`~guidedecode.vllm.VLLMBackend` whose engine has it); training stays in transformers.
    Returns the content of ``out_dir/metrics.json``.
    """
    from guidedecode.models import load_model, resolve_device
    from guidedecode.tasks import get_task

    config.validate()
    say = log or (lambda message: None)
    out = v.output_dir("out_dir", out_dir, error=TrainingError)
    _check_or_write_config(out / "config.json", config)
    task = get_task(config.task, **config.task_options)
    problems = task.load(config.data, split=config.split, limit=config.problems)
    if not problems:
        raise TrainingError(f"task '{config.task}' loaded no problems (split {config.split!r})")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise TrainingError(f"task '{config.task}' has duplicate problem ids")
    train_ids, held_ids = split_problems(ids, config.held_out, config.seed)
    device = resolve_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_ready_backend(config.backend, backend, config.model)
    guided_rounds = config.rounds > 1 and config.roll_in_eta > 0
    if config.backend == "vllm":
        if backend is None:  # the engine first: on a GPU it takes its share before the transformers copy
            backend = _vllm_backend(config, out, guided=guided_rounds)
        policy = VLLMPolicy(backend)
        if guided_rounds:  # fail now, not after round 1
            _require_qsharp_processor(policy.llm)
    model, tokenizer = load_model(config.model, device=device, dtype=config.dtype)  # also the value backbone
    if config.backend == "vllm":
        check_same_tokenizer(policy.tokenizer, tokenizer)
    else:
        policy = Policy.from_model(model, tokenizer)
    collection = describe_backend(policy)
    say(f"{len(problems)} problems: {len(train_ids)} train, {len(held_ids)} held out; eos ids {policy.eos_token_ids}"
        f"; collecting with {collection}")

    summaries: list[dict] = []
    previous_model = None
    for round_index in range(1, config.rounds + 1):
        directory = out / f"round-{round_index}"
        directory.mkdir(exist_ok=True)
        metrics_path = directory / "metrics.json"
        if metrics_path.exists() and (directory / "model").is_dir():
            summaries.append(read_json(metrics_path, error=TrainingError))
            previous_model = directory / "model"
            say(f"round {round_index}: already finished")
            continue
        # eta 0: pure π_ref, the value model is never loaded
        roll_in_dir = previous_model if round_index > 1 and config.roll_in_eta > 0 else None
        records = collect(policy, task, problems, directory / "data.jsonl", round_index=round_index, config=config,
                          value_model_dir=roll_in_dir, progress=progress, on_chunk=on_chunk)
        wanted = set(ids)  # earlier rounds' files may hold other problems (a run resumed with other --problems)
        all_rounds = [[r for r in read_jsonl(out / f"round-{i}" / "data.jsonl") if r["id"] in wanted]
                      for i in range(1, round_index)] + [records]
        examples = combine(all_rounds)
        train_split = [e for e in examples if e.problem_id in train_ids]
        held_split = [e for e in examples if e.problem_id in held_ids]
        kept = drop_no_variation(train_split) if config.drop_no_variation else train_split
        if not kept:
            raise TrainingError(
                f"no training examples in round {round_index}: all {len(train_ids)} training problems got identical "
                f"labels in every repeat (drop-no-variation); use more --samples or --problems, or --keep-no-variation")
        split_rate = sum(e.label for e in train_split) / len(train_split)
        kept_rate = sum(e.label for e in kept) / len(kept)
        say(f"round {round_index}: {len(kept)} training examples ({len(train_split) - len(kept)} dropped for no "
            f"variation), {len(held_split)} held out; train base rate {split_rate:.3f}")
        value_model = _initial_value_model(config, previous_model, device, model, tokenizer, round_index)
        fit = train(value_model, kept, directory, config=config, round_index=round_index,
                    pad_token_id=policy.pad_token_id, progress=progress, on_step=on_step)
        atomic_dir(directory / "model", value_model.save_pretrained)
        held = evaluate(value_model, held_split, base_rate=split_rate, pad_token_id=policy.pad_token_id,
                        batch_size=config.batch_size, constant_rates={"constant_kept": kept_rate})
        summary = {
            "round": round_index,
            "roll_in_eta": records[0]["roll_in_eta"] if records else 0.0,
            "problems": len(problems),
            "train_examples": len(kept),
            "dropped_no_variation": len(train_split) - len(kept),
            "train_base_rate": split_rate,
            "train_base_rate_kept": kept_rate,
            "roll_in_accuracy": _mean([ok for r in records for ok in r["fully_guided_predictions_correctness"]]),
            "partial_accuracy": _mean([ok for r in records for ok in r["partial_guided_predictions_correctness"]]),
            **fit,
            "held_out": held,
        }
        write_json(metrics_path, summary)
        shutil.rmtree(directory / "checkpoint", ignore_errors=True)
        summaries.append(summary)
        previous_model = directory / "model"
        if held.get("examples"):
            say(f"round {round_index}: held-out BCE {held['bce']:.4f} vs constant {held['bce_constant']:.4f} "
                f"(base rate {split_rate:.3f}); accuracy {held['accuracy']:.3f}; AUC {held['auc']}")
        del value_model
    result = {"rounds": summaries, "final": summaries[-1], "model": str(previous_model), "collection": collection}
    write_json(out / "metrics.json", result)
    return result


def _vllm_backend(config: QSharpTrainConfig, out: Path, *, guided: bool):
    """A VLLMBackend for collection; for guided rounds its engine carries the Q# processor and accepts the
    value models this run writes (``$GUIDEDECODE_VALUE_MODEL_ROOT`` = the run directory)."""
    processors = []
    if guided:
        from guidedecode.vllm import QSharp
        from guidedecode.vllm.processors import VALUE_MODEL_ROOT_ENV

        os.environ[VALUE_MODEL_ROOT_ENV] = str(Path(out).resolve())  # before the engine's processes start
        processors = [QSharp]
    return collection_backend("vllm", config.model, load=None, batch_size=config.gen_batch_size, seed=config.seed,
                              dtype=config.dtype, device=config.device, processors=processors)


def _require_qsharp_processor(llm) -> None:
    from guidedecode.errors import GuidedecodeError
    from guidedecode.vllm import QSharp
    from guidedecode.vllm.engine import require_processor

    try:
        require_processor(llm, QSharp)
    except GuidedecodeError as exc:
        raise TrainingError(f"a guided roll-in (round > 1, roll_in_eta > 0) on vLLM: {exc}") from exc


def check_same_tokenizer(served, loaded) -> None:
    """The engine and the transformers copy must read the same token ids (the value model trains on them)."""
    if served.get_vocab() != loaded.get_vocab():
        raise TrainingError("the vLLM engine's tokenizer differs from the model's: collect and train on one model")


def _initial_value_model(config: QSharpTrainConfig, previous_model: Path | None, device, reference, tokenizer,
                         round_index: int = 1):
    """A fresh value model on the backbone, or (``warm_start``) the previous round's.

    ``init="normal"`` draws the head from a generator seeded by (seed, round), never from the global
    random state, so a run resumed after collection starts from the same head.

    ``ValueModel.from_backbone`` copies the base model, so the reference model itself can serve as
    the backbone when ``value_backbone`` is not set (its weights are never trained).
    """
    from guidedecode.models import load_model
    from guidedecode.value_model import ValueModel

    if config.warm_start and previous_model is not None:
        return _load_value_model(previous_model, device, tokenizer)
    if config.value_backbone in (None, config.model):
        backbone, backbone_tokenizer = reference, tokenizer
    else:
        backbone, backbone_tokenizer = load_model(config.value_backbone, device=device, dtype=config.dtype)
    try:
        value_model = ValueModel.from_backbone(backbone, head=config.head, loss=config.loss,
                                               num_atoms=config.num_atoms, init=config.init,
                                               tokenizer=backbone_tokenizer, num_layers=config.value_layers,
                                               generator=torch.Generator().manual_seed(
                                                   derive_seed(config.seed, round_index, "init")))
    except GuideError as exc:
        raise TrainingError(f"value model: {exc}") from exc
    value_model.check_tokenizer(tokenizer)
    return value_model.to(device)


def _load_value_model(directory: Path, device, tokenizer):
    from guidedecode.value_model import ValueModel

    value_model = ValueModel.from_pretrained(directory, device=device)
    value_model.check_tokenizer(tokenizer)
    return value_model.eval()


def _mean(values: Sequence) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None


# ------------------------------------------------------------------------------------- files


def _check_or_write_config(path: Path, config: QSharpTrainConfig) -> None:
    wanted = asdict(config)
    # a directory without collected data (e.g. a run that failed before collecting) takes the new settings
    if path.exists() and any(_read_jsonl(p, error=TrainingError) for p in path.parent.glob("round-*/data.jsonl")):
        existing = read_json(path, error=TrainingError)
        if not isinstance(existing, dict):
            raise TrainingError(f"{path} does not hold a settings object: use a new --out directory")
        changed = sorted(k for k in wanted
                         if k not in RESUMABLE_CHANGES and existing.get(k, ADDED_SETTINGS.get(k)) != wanted[k])
        if changed:
            raise TrainingError(f"{path.parent} holds a run with different settings ({', '.join(changed)}): "
                                "use a new --out directory")
    write_json(path, wanted)


def _bar(total: int, initial: int, enabled: bool, description: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=description, unit=unit)
