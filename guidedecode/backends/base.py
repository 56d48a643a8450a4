"""The backend primitives every step strategy is written against.

A prompt is either rendered text (``str``, chat template already applied, tokenised without extra
special tokens) or a list of token ids. Three primitives:

``sample(prompts, n, ...) -> list[list[Completion]]``
    n sampled continuations per prompt, each up to a stop string, EOS or ``max_new_tokens``.
``greedy(prompts, ...) -> list[Completion]``
    one greedy continuation per prompt.
``score(prefix, continuations) -> list[ContinuationScore]``
    teacher-forced per-token log-probs log p(c_t | prefix, c_<t) of each continuation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, Union

import torch

Prompt = Union[str, Sequence[int]]


@dataclass
class Completion:
    """One generated continuation."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (a stop string), "eos", or "length"
    info: dict = field(default_factory=dict)  # per-sequence figures from the guides, e.g. {"kl": 0.8}

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class ContinuationScore:
    """Teacher-forced log-probs of one continuation; ``token_ids`` are its tokens in context."""

    token_ids: list[int]
    logprobs: torch.Tensor  # [len(token_ids)] float32

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def mean(self) -> float:
        return float(self.logprobs.mean()) if len(self.token_ids) else 0.0


@dataclass
class BackendStats:
    """Running cost counters of the policy model (what a strategy spent).

    ``generated_tokens``: tokens sampled; ``prompt_tokens``: context tokens the model processed
    without generating them (a sampling call's prompts, once per returned sequence as ``generate``
    expands them; a scoring call's inputs after shared-prefix reuse); ``scored_tokens``: tokens whose
    log-prob was returned; ``forward_passes``: batched model calls (one per decoding step of a
    ``generate`` call, one per scoring forward); ``*_calls``: backend calls.
    """

    generated_tokens: int = 0
    prompt_tokens: int = 0
    scored_tokens: int = 0
    forward_passes: int = 0
    sample_calls: int = 0
    score_calls: int = 0
    extra: dict = field(default_factory=dict)

    COUNTERS = ("generated_tokens", "prompt_tokens", "scored_tokens", "forward_passes", "sample_calls", "score_calls")

    def count_generate(self, *, prompt_tokens: int = 0, steps: int = 0, generated_tokens: int = 0,
                       calls: int = 0) -> None:
        """Account for ``generate`` work: prompt tokens fed, decoding steps (one forward pass each),
        tokens kept, backend calls."""
        self.prompt_tokens += prompt_tokens
        self.forward_passes += steps
        self.generated_tokens += generated_tokens
        self.sample_calls += calls

    def counters(self) -> dict[str, int]:
        """The counters as a plain dict (for ``since`` and for records)."""
        return {name: getattr(self, name) for name in self.COUNTERS}

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """What was spent after ``before = stats.counters()``."""
        return {name: getattr(self, name) - before[name] for name in self.COUNTERS}


class Backend(Protocol):
    tokenizer: object
    stats: BackendStats

    def sample(
        self,
        prompts: Sequence[Prompt],
        n: int = 1,
        *,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
        seed: int | None = None,
    ) -> list[list[Completion]]: ...

    def greedy(
        self,
        prompts: Sequence[Prompt],
        *,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
    ) -> list[Completion]: ...

    def score(self, prefix: Prompt, continuations: Sequence[Prompt]) -> list[ContinuationScore]: ...

    def chat_prompt(self, messages: str | list[dict]) -> str: ...
