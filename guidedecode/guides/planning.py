"""PlanningTokenGuide: block completion and type steering for planning-token models.

Papers: Wang et al., "Guiding Language Model Reasoning with Planning Tokens" (arXiv 2310.05707) and
Jin et al., "Disentangling Memory and Reasoning Ability in LLMs" (arXiv 2411.13504). A planner
(``guidedecode train planner``) writes every step as ``P T(type) " " text "\\n"`` (general block P,
type block T); this guide constrains the planning tokens of each row, with a small state machine
over that row's tokens (prompt included):

* **block completion**: after a block's first token the rest of the block is forced (all other
  scores -inf); after a general block only the first token of a type block is allowed; in step
  text the only planning token allowed is the first token of the general block (or of a type block
  when ``n_prefix = 0``); after the answer block no planning token is allowed.
* **type steering**, applied to the first tokens of type blocks wherever they are allowed:
  ``force_type=t`` allows only ``t`` (and ``answer``), ``ban_types`` removes types, ``before=[(a, b)]``
  (``memory_before_reason=True`` is ``("memory", "reason")``) allows ``b`` only after an ``a`` block,
  ``max_steps=n`` allows only ``answer`` once n step blocks were written. ``answer`` cannot be banned,
  so a choice point always has an allowed token.

With ``complete_blocks=False`` and no steering the guide returns the scores unchanged. It composes
with other guides in one ``logits_processor`` list (masked scores stay -inf under additive offsets).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from guidedecode import validation
from guidedecode.errors import GuideError
from guidedecode.guides.base import TokenGuide
from guidedecode.planning.vocab import ANSWER, PREFIX, PlanningVocab

TEXT, BLOCK, CHOOSE, AFTER_TYPE, DONE = "text", "block", "choose", "after_type", "done"


@dataclass
class _Row:
    mode: str = TEXT
    key: str | None = None  # the open block's key (mode BLOCK)
    position: int = 0  # tokens of the open block written so far
    steps: int = 0  # step type blocks written (answer excluded)
    seen: set = field(default_factory=set)  # types written
    step_types: list = field(default_factory=list)  # types of the current step
    malformed: int = 0  # planning tokens outside the block grammar (only possible unguided)

    def copy(self) -> "_Row":
        return _Row(self.mode, self.key, self.position, self.steps, set(self.seen), list(self.step_types),
                    self.malformed)


class PlanningTokenGuide(TokenGuide):
    """Per-row planning-token constraints (see the module docstring).

    ``vocab``: the planner's :class:`~guidedecode.planning.PlanningVocab` (``PlanningVocab.from_pretrained(dir)``);
    ``tokenizer`` (optional) is checked against it. ``multi_type``: allow several type blocks in one
    step (the arithmetic scheme). ``eos_token_id`` / ``pad_token_id`` as for every :class:`TokenGuide`.
    """

    def __init__(self, vocab: PlanningVocab, *, tokenizer=None, complete_blocks: bool = True,
                 force_type: str | None = None, ban_types: Iterable[str] = (), memory_before_reason: bool = False,
                 before: Sequence[tuple[str, str]] = (), max_steps: int | None = None, multi_type: bool = False,
                 eos_token_id: int | Iterable[int] | None = None, pad_token_id: int | None = None):
        if not isinstance(vocab, PlanningVocab):
            raise GuideError(f"PlanningTokenGuide needs a PlanningVocab, got {type(vocab).__name__}")
        if tokenizer is not None:
            vocab.check_tokenizer(tokenizer)
        self.vocab = vocab
        steerable = [k for k in vocab.type_keys if k != ANSWER]
        for flag, value in (("complete_blocks", complete_blocks), ("memory_before_reason", memory_before_reason),
                            ("multi_type", multi_type)):
            if value not in (True, False):  # also admits 0 and 1
                raise GuideError(f"{flag} must be True/False (or 1/0), got {value!r}")
        for option, value in (("ban_types", ban_types), ("before", before)):
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise GuideError(f"{option} must be a list{' of type names' if option == 'ban_types' else ''}, "
                                 f"got {value!r}")
        ban_types = tuple(ban_types)
        before = list(before)
        for pair in before:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise GuideError(f"before must be a list of (earlier type, later type) pairs, got {pair!r}")
        before = [tuple(pair) for pair in before] + ([("memory", "reason")] if memory_before_reason else [])
        named = ([force_type] if force_type else []) + list(ban_types) + [t for pair in before for t in pair]
        if named and not vocab.n_special:
            raise GuideError("type steering needs type blocks, but this vocabulary has n_special = 0")
        for name in named:
            if name == ANSWER:
                raise GuideError("the answer block cannot be forced, banned or ordered (it ends every generation)")
            if name not in steerable:
                raise GuideError(f"unknown step type {name!r}; this planner's types: {', '.join(steerable)}")
        max_steps = validation.optional(validation.integer, "max_steps", max_steps, minimum=0, error=GuideError)
        self.complete_blocks = bool(complete_blocks)
        self.force_type, self.ban_types, self.before = force_type, ban_types, tuple(before)
        self.max_steps, self.multi_type = max_steps, bool(multi_type)
        self.steered = bool(named) or max_steps is not None
        self._table = vocab.id_table()
        self._first = {key: vocab.ids(key)[0] for key in vocab.keys}
        self._planning = torch.tensor(vocab.new_ids, dtype=torch.long)
        self._last_id = int(self._planning[-1])  # read every step: not rebuilt from the vocabulary
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    # ------------------------------------------------------------------ the grammar
    def allowed_types(self, row: _Row) -> list[str]:
        """Type keys whose block may start now (steering applied); always contains ``answer``."""
        keys = list(self.vocab.type_keys)
        if self.force_type is not None:
            keys = [k for k in keys if k in (self.force_type, ANSWER)]
        keys = [k for k in keys if k not in self.ban_types]
        keys = [k for k in keys if all(k != b or a in row.seen for a, b in self.before)]
        if self.max_steps is not None and row.steps >= self.max_steps:
            keys = [ANSWER]
        return keys

    def advance(self, row: _Row, token: int) -> bool:
        """Move ``row`` past ``token``; False if the token breaks the block grammar."""
        hit = self._table.get(int(token))
        if row.mode == BLOCK:
            if hit == (row.key, row.position):
                row.position += 1
                if row.position == self.vocab.block_size(row.key):
                    self._close(row)
                return True
            row.mode, row.key, row.position = TEXT, None, 0  # a broken block; read the token afresh
            self._start(row, hit)
            return False
        return self._start(row, hit)

    def _start(self, row: _Row, hit: tuple[str, int] | None) -> bool:
        """An ordinary token (``hit`` None) or a planning token outside an open block."""
        if hit is None:
            ok = row.mode != CHOOSE
            if row.mode != DONE:
                row.mode = TEXT
            return ok
        key, position = hit
        if position != 0 or row.mode == DONE:
            if row.mode != DONE:
                row.mode = TEXT
            return False
        if key == PREFIX:
            ok = row.mode in (TEXT, AFTER_TYPE)
        elif row.mode == CHOOSE:
            ok = True
        elif row.mode == AFTER_TYPE:
            ok = self.multi_type and key != ANSWER
        else:
            ok = not self.vocab.n_prefix
        if key not in (PREFIX, ANSWER):
            if row.mode != AFTER_TYPE:
                row.step_types = []
            row.step_types.append(key)
        row.mode, row.key, row.position = BLOCK, key, 1
        if self.vocab.block_size(key) == 1:
            self._close(row)
        return ok

    def _close(self, row: _Row) -> None:
        key = row.key
        row.key, row.position = None, 0
        if key == PREFIX:
            row.mode = CHOOSE if self.vocab.n_special else TEXT
            row.step_types = []
        elif key == ANSWER:
            row.mode = DONE
        else:
            row.steps += 1
            row.seen.add(key)
            row.mode = AFTER_TYPE

    def allowed_planning(self, row: _Row) -> tuple[list[int] | None, list[int]]:
        """``(only, planning)``: ``only`` = the token ids the row may emit (None: any ordinary token),
        ``planning`` = the planning-token ids it may emit besides ordinary tokens."""
        starters = [self._first[k] for k in self.allowed_types(row)]
        if not self.complete_blocks:
            banned_starters = {self._first[k] for k in self.vocab.type_keys} - set(starters)
            return None, [t for t in self.vocab.new_ids if t not in banned_starters]
        if row.mode == BLOCK:
            return [self.vocab.ids(row.key)[row.position]], []
        if row.mode == CHOOSE:
            return starters, []
        if row.mode == DONE:
            return None, []
        if row.mode == AFTER_TYPE:
            if not self.multi_type:
                return None, []
            more = [k for k in self.allowed_types(row) if k != ANSWER and k not in row.step_types]
            return None, [self._first[k] for k in more]
        # TEXT: only a new step may start
        return None, [self._first[PREFIX]] if self.vocab.n_prefix else starters

    # ------------------------------------------------------------------ TokenGuide hooks
    def init_state(self, prompt_ids, prompt_mask):
        rows = []
        for index, (ids, mask) in enumerate(zip(prompt_ids.tolist(), prompt_mask.tolist())):
            row = _Row()
            for token, real in zip(ids, mask):
                if real and not self.advance(row, token) and self.complete_blocks:
                    raise GuideError(f"prompt {index} has a malformed planning-token block (at token {token}): "
                                     "blocks must be written whole, a general block followed by a type block")
            rows.append(row)
        return rows

    def update_state(self, state, tokens, alive):
        for row, token, is_alive in zip(state, tokens.tolist(), alive.tolist()):
            if is_alive and not self.advance(row, token):
                row.malformed += 1
        return state

    def select_state(self, state, rows):
        return [state[i].copy() for i in rows.tolist()]

    def adjust(self, scores, state, active):
        if not self.complete_blocks and not self.steered:
            return scores
        if scores.shape[-1] <= self._last_id:
            raise GuideError(f"the scores cover {scores.shape[-1]} tokens, but the planning tokens go up to id "
                             f"{self._last_id}: use the planner's model (its vocabulary was extended)")
        planning = self._planning.to(scores.device)
        for index, (row, is_active) in enumerate(zip(state, active.tolist())):
            if not is_active:
                continue
            only, allowed = self.allowed_planning(row)
            if only is not None:
                keep = scores[index, only].clone()
                scores[index] = float("-inf")
                scores[index, only] = keep
            else:
                banned = planning[~torch.isin(planning, torch.tensor(allowed, dtype=torch.long,
                                                                     device=scores.device))]
                scores[index, banned] = float("-inf")
        return scores

    def malformed_counts(self) -> list[int]:
        """Planning tokens outside the grammar per row of the last generation (0 when guided)."""
        return [row.malformed for row in self.state or []]
