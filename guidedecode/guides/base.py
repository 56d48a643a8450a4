"""The token-guide plug point: a ``transformers.LogitsProcessor`` with per-row state.

A guide changes the next-token scores of every row at every decode step, from that row's token
history. Subclasses write the method once against four batched hooks; this base class does the
bookkeeping that HF ``generate`` leaves to processors:

* it sees only ``(input_ids [B, T], scores [B, V])``, so it recognises a new ``generate`` call
  (``T`` did not grow by one, or no previous row is a prefix) and starts fresh;
* left padding: leading ``pad_token_id`` positions are masked out of the prompt;
* rows that finish early (EOS emitted, then padding appended) are marked finished and no longer
  advanced or adjusted;
* inside ``generate`` the EOS ids are the ones ``generate`` stops on and a missing pad id is the one it
  pads with (read from the running call, :mod:`guidedecode.guides.generate_call`), so a guide never keeps
  adjusting a row that ``generate`` has finished;
* ``num_return_sequences`` just means more rows;
* beam search reorders rows between steps: state is keyed on token *content*, never on row index,
  so each new row is matched to the previous row that is its prefix (``select_state``).

Hooks (all batched over rows):

``init_state(prompt_ids, prompt_mask) -> state``
    Called on the first step of a generation with the (left-padded) prompts.
``update_state(state, tokens, alive) -> state``
    Called once per decode step with the tokens just appended; ``alive[i]`` is False for rows
    that had already finished (their token is padding).
``select_state(state, rows) -> state``
    Reindex the state when rows were reordered or duplicated (``rows[i]`` = previous row).
``adjust(scores, state, active) -> scores``
    Return adjusted scores; ``active[i]`` is False for finished rows (leave them alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from transformers import LogitsProcessor

from guidedecode.errors import GuideError
from guidedecode.guides.generate_call import find_generate_call


class TokenGuide(LogitsProcessor):
    """Base class of token guides (see the module docstring for the hooks)."""

    supports_continuous_batching = False

    def __init__(self, *, eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None):
        if eos_token_id is None:
            eos = ()
        elif isinstance(eos_token_id, int):
            eos = (eos_token_id,)
        else:
            eos = tuple(int(t) for t in eos_token_id)
        self.eos_token_ids = eos
        self.pad_token_id = pad_token_id
        self.reset()

    # ----------------------------------------------------------------- hooks
    def init_state(self, prompt_ids: torch.LongTensor, prompt_mask: torch.BoolTensor) -> Any:
        return None

    def update_state(self, state: Any, tokens: torch.LongTensor, alive: torch.BoolTensor) -> Any:
        return state

    def select_state(self, state: Any, rows: torch.LongTensor) -> Any:
        if state is None:
            return None
        if isinstance(state, torch.Tensor):
            return state[rows]
        if isinstance(state, list):
            return [_copy_row(state[i]) for i in rows.tolist()]
        raise NotImplementedError(f"{type(self).__name__} must implement select_state for {type(state).__name__}")

    def adjust(self, scores: torch.FloatTensor, state: Any, active: torch.BoolTensor) -> torch.FloatTensor:
        raise NotImplementedError

    # ------------------------------------------------------------ machinery
    def reset(self) -> None:
        """Forget all rows; the next call starts a new generation."""
        self.state: Any = None
        self.generate_call = None  # the GenerateCall running this generation (None: called directly)
        self._eos, self._pad = self.eos_token_ids, self.pad_token_id  # the ids in force for this generation
        self.finished: torch.BoolTensor | None = None
        self._previous_ids: torch.LongTensor | None = None
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if torch.isnan(scores).any():
            raise GuideError(f"{type(self).__name__} received NaN logits from the model")
        self._track(input_ids)
        adjusted = self.adjust(scores, self.state, ~self.finished)
        if torch.isnan(adjusted).any():
            rows = torch.isnan(adjusted).any(-1).nonzero().flatten().tolist()
            raise GuideError(f"{type(self).__name__} produced NaN logits (rows {rows}, decode step {self.steps})")
        return adjusted

    def _track(self, input_ids: torch.LongTensor) -> None:
        """Bring ``self.state`` up to date with ``input_ids`` (new call, next step, or reordered rows)."""
        previous = self._previous_ids
        rows = None
        if previous is not None and input_ids.shape[1] == previous.shape[1] + 1:
            prefix = input_ids[:, :-1]
            if prefix.shape == previous.shape and torch.equal(prefix, previous):
                rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            else:
                rows = _match_rows(prefix, previous)
        if rows is None:  # a new generation
            self.reset()
            self._follow_generate(find_generate_call(self))
            self.state = self.init_state(input_ids, self._prompt_mask(input_ids))
            self.finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        else:
            if not torch.equal(rows, torch.arange(len(rows), device=rows.device)):
                self.state = self.select_state(self.state, rows)
                self.finished = self.finished[rows]
            tokens = input_ids[:, -1]
            alive = ~self.finished
            self.state = self.update_state(self.state, tokens, alive)
            if self._eos:
                eos = torch.tensor(self._eos, device=tokens.device)
                self.finished = self.finished | (alive & torch.isin(tokens, eos))
            self.steps += 1
        self._previous_ids = input_ids.clone()

    def _follow_generate(self, call) -> None:
        """Take the EOS ids ``generate`` stops on (they replace the given ones) and, when no pad id was given,
        the one it pads with."""
        self.generate_call = call
        eos = call.eos_token_ids() if call is not None else None
        self._eos = self.eos_token_ids if eos is None else eos
        self._pad = self.pad_token_id
        if self._pad is None and call is not None:
            self._pad = call.pad_token_id()

    def _prompt_mask(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        """True for real prompt tokens: everything after the leading run of pad tokens."""
        if self._pad is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        is_pad = input_ids == self._pad
        leading = torch.cumprod(is_pad.long(), dim=1).bool()
        return ~leading


def _match_rows(prefix: torch.LongTensor, previous: torch.LongTensor) -> torch.LongTensor | None:
    """For each row of ``prefix``, the index of an identical row of ``previous``; None if any is new."""
    same = (prefix[:, None, :] == previous[None, :, :]).all(-1)  # [B_new, B_old]
    if not bool(same.any(-1).all()):
        return None
    return same.int().argmax(-1)


def _copy_row(row: Any) -> Any:
    if isinstance(row, list):
        return list(row)
    if isinstance(row, (set, dict)):
        return type(row)(row)
    return row
