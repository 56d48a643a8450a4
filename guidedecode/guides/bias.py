"""Logit biases computed from the token history: the simplest concrete token guides.

``HistoryBias(fn)``: for each row with history h (prompt without padding, then generated tokens),

    z_i = x_i + b_i,   b = fn(h)  (a mapping token id -> bias; tokens not named get 0)

``PresencePenalty(alpha)``: the vectorised special case b_i = -alpha * [token i was generated]
(the OpenAI-style presence penalty; prompt tokens are not penalised).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from guidedecode import validation
from guidedecode.errors import GuideError
from guidedecode.guides.base import TokenGuide


class HistoryBias(TokenGuide):
    """Add ``fn(history)`` (a ``{token_id: bias}`` mapping) to each row's scores, every step."""

    def __init__(self, fn: Callable[[list[int]], Mapping[int, float]], **special_tokens):
        super().__init__(**special_tokens)
        self.fn = fn

    def init_state(self, prompt_ids, prompt_mask):
        return [ids[mask].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]

    def update_state(self, state, tokens, alive):
        for history, token, is_alive in zip(state, tokens.tolist(), alive.tolist()):
            if is_alive:
                history.append(token)
        return state

    def adjust(self, scores, state, active):
        vocab = scores.shape[-1]
        for row, (history, is_active) in enumerate(zip(state, active.tolist())):
            if not is_active:
                continue
            bias = self.fn(list(history))
            if not bias:
                continue
            ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=scores.device)
            if bool(((ids < 0) | (ids >= vocab)).any()):
                raise GuideError(f"HistoryBias function returned token ids outside the vocabulary [0, {vocab})")
            values = torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)
            scores[row].index_add_(0, ids, values)
        return scores


class PresencePenalty(TokenGuide):
    """Subtract ``alpha`` from the score of every token the row has already generated."""

    def __init__(self, alpha: float, **special_tokens):
        alpha = validation.number("presence penalty alpha", alpha, minimum=0, error=GuideError)
        super().__init__(**special_tokens)
        self.alpha = alpha
        self.vocab_size: int | None = None

    def init_state(self, prompt_ids, prompt_mask):
        return None  # the [B, V] mask is allocated on the first adjust, when V is known

    def update_state(self, state, tokens, alive):
        if state is None:
            return None
        rows = alive.nonzero().flatten()
        state[rows, tokens[rows]] = True
        return state

    def adjust(self, scores, state, active):
        if self.state is None:
            self.state = torch.zeros_like(scores, dtype=torch.bool)
            return scores
        penalty = (self.state & active[:, None]).to(scores.dtype) * self.alpha
        return scores - penalty
