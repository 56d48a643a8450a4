"""The step-strategy plug point: outer loops that sample, score, select or re-prompt whole steps.

A strategy is written once against the backend primitives (``sample``, ``greedy``, ``score``) and
used two ways:

* ``strategy.run(backend, prompts, golds=None) -> list[StrategyResult]`` on any backend;
* ``model.generate(**inputs, custom_generate=strategy, strategy_tokenizer=tokenizer)``: transformers
  prepares the inputs and calls the strategy with ``(model, input_ids, logits_processor=...,
  stopping_criteria=..., generation_config=..., **model_kwargs)``; the strategy wraps the model in an
  ``HFBackend`` and returns ``[B, T]`` token ids (the left-padded prompts followed by the chosen
  continuations, right-padded), like ``generate`` does. The full results (candidates, scores,
  trace) stay in ``strategy.last_results``.

transformers does not forward ``tokenizer=`` to a ``custom_generate`` callable, hence the
``strategy_tokenizer`` keyword (or a tokenizer given to the strategy's constructor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from guidedecode.backends.base import Completion, Prompt
from guidedecode import validation
from guidedecode.errors import StrategyError


@dataclass
class StrategyResult:
    """What a strategy chose for one prompt, and how."""

    completion: Completion
    candidates: list[Completion] = field(default_factory=list)
    scores: list[float] | None = None
    trace: list[dict] = field(default_factory=list)
    generated_tokens: int = 0
    attempts: int = 0

    @property
    def text(self) -> str:
        return self.completion.text


class StepStrategy:
    """Base class: subclasses implement ``run``; ``__call__`` is the ``custom_generate`` entry."""

    def __init__(self, *, tokenizer=None, max_new_tokens: int = 256, batch_size: int = 16):
        self.tokenizer = tokenizer
        self.max_new_tokens = validation.positive_int("max_new_tokens", max_new_tokens, error=StrategyError)
        self.batch_size = validation.positive_int("batch_size", batch_size, error=StrategyError)
        self.last_results: list[StrategyResult] = []

    def run(self, backend, prompts: Sequence[Prompt], *, golds: Sequence[str] | None = None) -> list[StrategyResult]:
        raise NotImplementedError

    def __call__(
        self,
        model,
        input_ids: torch.LongTensor,
        logits_processor=None,
        stopping_criteria=None,
        generation_config=None,
        strategy_tokenizer=None,
        golds: Sequence[str] | None = None,
        **model_kwargs,
    ) -> torch.LongTensor:
        from guidedecode.backends.hf import HFBackend

        tokenizer = strategy_tokenizer or self.tokenizer
        if tokenizer is None:
            raise StrategyError(
                f"{type(self).__name__} needs a tokenizer: pass strategy_tokenizer=tokenizer to generate() "
                "or tokenizer= to the strategy"
            )
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prompts = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        budget = getattr(generation_config, "max_new_tokens", None)
        saved = self.max_new_tokens
        if budget:
            self.max_new_tokens = budget
        try:
            backend = HFBackend(model, tokenizer, batch_size=self.batch_size)
            self.last_results = self.run(backend, prompts, golds=golds)
        finally:
            self.max_new_tokens = saved
        pad = backend.pad_token_id
        continuations = [r.completion.token_ids for r in self.last_results]
        width = max([len(c) for c in continuations] + [0])
        out = torch.full((input_ids.shape[0], input_ids.shape[1] + width), pad, dtype=torch.long)
        out[:, : input_ids.shape[1]] = input_ids.cpu()
        for i, tokens in enumerate(continuations):
            out[i, input_ids.shape[1] : input_ids.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return out.to(input_ids.device)


def check_golds(prompts: Sequence, golds: Sequence[str] | None) -> list[str | None]:
    """Golds aligned with prompts (None entries when no golds were given)."""
    if golds is None:
        return [None] * len(prompts)
    if len(golds) != len(prompts):
        raise StrategyError(f"got {len(golds)} golds for {len(prompts)} prompts")
    return list(golds)
