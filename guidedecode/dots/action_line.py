"""``ActionLineGuide``: constrain the ``Required Action:`` line to one of the 12 DOTS trajectories.

Free text is left alone until the generated text ends with the trigger ``Required Action:``. From
there the row follows a token automaton for the regex

    " (" + "|".join(12 action lines) + ")\\n"

built by **outlines-core** (``outlines_core.Index`` over the tokenizer's ``Vocabulary``): at each step
the scores of every token the automaton does not allow at the row's state are set to -inf,

    s'_v = s_v  if v in allowed(state)  else  -inf,

and the state advances with the chosen token. When the automaton reaches its final state (the line
ended with ``\\n``) the guide switches off and free text continues; a later trigger switches it on
again, so every action line is well-formed (a reader takes the last one).

Why outlines-core: it is installed with ``outlines`` (a dependency already) and is vLLM's regex
backend; the action line is a fixed regex, exactly what its ``Index`` compiles (≈50 ms for a 49k
vocabulary); the trigger on/off is ours, since outlines-core has no trigger-scoped tags (xgrammar
has, but would be a new native dependency for one 12-way choice).

Token boundaries: a token that *completes* the trigger and carries more text (e.g. ``": p"``) would
start the line outside the automaton, so while the text ends with a proper prefix of the trigger,
tokens that would complete it with an overrun are masked (they are rare; the same characters remain
reachable through shorter tokens). Nothing else is changed before the trigger or after the line. The
prompt counts as text before: a prompt that ends with the trigger constrains the first tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from guidedecode.dots.actions import ACTION_LINE_TRIGGER, ACTION_LINES
from guidedecode.errors import GuideError
from guidedecode.guides.base import TokenGuide

__all__ = ["ActionLineGuide", "action_line_regex"]

_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_, ")


def action_line_regex(choices: Sequence[str] = ACTION_LINES) -> str:
    """``" (c1|c2|...)\\n"``: one space, one of the choices, the line end."""
    for choice in choices:
        if not choice or set(choice) - _SAFE:
            raise GuideError(f"action-line choice {choice!r} must be non-empty letters, digits, '_', ',' and spaces")
    return " (" + "|".join(choices) + ")\n"


def token_strings(tokenizer) -> list[str | None]:
    """The text of every token id (``None`` for special tokens and ids that are not whole characters)."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    strings: list[str | None] = [None] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        if index in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if text and "\ufffd" not in text:
            strings[index] = text
    return strings


@functools.lru_cache(maxsize=8)
def _compiled(tokenizer, regex: str, trigger: str):
    from outlines_core import Index, Vocabulary

    strings = token_strings(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GuideError("ActionLineGuide needs a tokenizer with an EOS token (outlines-core's vocabulary requires one)")
    table: dict[str, list[int]] = {}
    for index, text in enumerate(strings):
        if text is not None and index != eos:
            table.setdefault(text, []).append(index)
    try:
        index = Index(regex, Vocabulary(eos, table))
    except Exception as error:  # outlines-core raises a plain ValueError/RuntimeError
        raise GuideError(f"outlines-core could not build the action-line automaton: {error}") from error
    # tokens that complete the trigger from a proper prefix of length k and carry more text after it
    overrun: dict[int, list[int]] = {}
    for k in range(1, len(trigger)):
        rest = trigger[k:]
        overrun[k] = [i for i, text in enumerate(strings) if text and text.startswith(rest) and len(text) > len(rest)]
    inside = [i for i, text in enumerate(strings) if text and trigger in text and not text.endswith(trigger)]
    return index, strings, overrun, inside


class ActionLineGuide(TokenGuide):
    """Constrain every ``Required Action:`` line to one of ``choices`` (default: the 12 action lines).

    ``self.state[row]["lines"]`` counts the finished action lines of a row. ``stop_after_line=True``
    forces EOS right after the first finished line (an external planner's reply ends there).
    """

    def __init__(self, tokenizer, *, trigger: str = ACTION_LINE_TRIGGER, choices: Sequence[str] = ACTION_LINES,
                 stop_after_line: bool = False, eos_token_id=None, pad_token_id=None):
        self.stop_after_line = stop_after_line
        if not trigger:
            raise GuideError("ActionLineGuide needs a non-empty trigger")
        self.tokenizer = tokenizer
        self.trigger = trigger
        self.regex = action_line_regex(tuple(choices))
        self.index, self.strings, self._overrun, self._inside = _compiled(tokenizer, self.regex, trigger)
        eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        super().__init__(eos_token_id=eos, pad_token_id=pad)

    # ----------------------------------------------------------------- hooks
    def init_state(self, prompt_ids, prompt_mask):
        """Replay the prompt through the same trigger / automaton steps as generated tokens, so a history
        that stops inside an action line continues it constrained: a prompt ending with the trigger (or
        with ``"Required Action: Co"``), or a vLLM request resumed after preemption, whose whole history
        comes back as one prompt. A prompt token the automaton does not accept ends that line as free text
        (a prompt may quote malformed lines); lines finished inside the prompt are not counted."""
        state = []
        for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
            row = {"tail": "", "dfa": None, "lines": 0}
            for token, real in zip(ids, mask):
                if real:
                    self._advance(row, token)
            row["lines"] = 0
            state.append(row)
        return state

    def update_state(self, state, tokens, alive):
        for row, (token, live) in enumerate(zip(tokens.tolist(), alive.tolist())):
            if live and not self._advance(state[row], token):  # only when every allowed token was -inf upstream
                raise GuideError(f"row {row}: token {token} left the action-line automaton")
        return state

    def _advance(self, s: dict, token: int) -> bool:
        """Move one row's state by ``token``; False if the token left the automaton (the row is then free
        text again, the token counted as text)."""
        text = self.strings[token] if token < len(self.strings) else None
        if s["dfa"] is not None:
            following = self.index.get_next_state(s["dfa"], token)
            if following is None:
                s.update(dfa=None, tail=(text or "")[-len(self.trigger):])
                return False
            if self.index.is_final_state(following):
                s.update(dfa=None, tail="", lines=s["lines"] + 1)
            else:
                s["dfa"] = following
            return True
        s["tail"] = (s["tail"] + (text or ""))[-len(self.trigger):]
        if s["tail"].endswith(self.trigger):
            s.update(dfa=self.index.get_initial_state(), tail="")
        return True

    def adjust(self, scores, state, active):
        out = scores
        for row, s in enumerate(state):
            if not bool(active[row]):
                continue
            if self.stop_after_line and s["lines"] and self.eos_token_ids:
                out = out.clone() if out is scores else out
                eos = out[row, self.eos_token_ids[0]].clone()
                out[row] = float("-inf")
                out[row, self.eos_token_ids[0]] = eos if torch.isfinite(eos) else 0.0
                continue
            if s["dfa"] is not None:
                allowed = torch.tensor(self.index.get_allowed_tokens(s["dfa"]), dtype=torch.long, device=scores.device)
                masked = torch.full_like(scores[row], float("-inf"))
                masked[allowed] = scores[row, allowed]
                out = out.clone() if out is scores else out
                out[row] = masked
                continue
            banned = list(self._inside)
            for k, ids in self._overrun.items():
                if s["tail"].endswith(self.trigger[:k]):
                    banned.extend(ids)
            if banned:
                out = out.clone() if out is scores else out
                out[row, torch.tensor(banned, dtype=torch.long, device=scores.device)] = float("-inf")
        return out

    def select_state(self, state, rows):
        return [dict(state[i]) for i in rows.tolist()]

    def active_rows(self) -> list[bool]:
        """Whether each row is inside an action line now."""
        return [s["dfa"] is not None for s in (self.state or [])]
