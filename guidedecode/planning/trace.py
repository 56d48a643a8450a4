"""The step structure of a planning-token generation, and its inverse.

``parse_trace(text_or_ids, vocab)`` -> ``[{"type": ..., "text": ...}]``: a step starts at a general
block (or at a type block that follows text); its ``type`` is the type block's key (several blocks:
the keys joined by ``+``; none: None) and its ``text`` the text up to the next step, without the single
space after the blocks and the single line break at its end (the layout of
:func:`guidedecode.planning.data.target_text`). Blocks are recognised by token id when ids are given
(and by their exact strings in text), so ``format_trace(parse_trace(x)) == x`` for well-formed x and
``parse_trace(format_trace(t)) == t``. :func:`trace_stats` counts steps per type and malformed blocks
(a block whose tokens are not exactly ``<key_0> .. <key_{n-1}>`` in order).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from guidedecode.planning.vocab import PREFIX, PlanningVocab


def _pieces(source: str | Sequence[int], vocab: PlanningVocab, tokenizer=None) -> list:
    """``[("tok", key, position) | ("text", str)]`` in order."""
    pieces: list = []
    if isinstance(source, str):
        table = {s: (key, i) for key in vocab.keys for i, s in enumerate(vocab.strings(key))}
        pattern = re.compile("|".join(re.escape(s) for s in sorted(table, key=len, reverse=True)))
        last = 0
        for match in pattern.finditer(source):
            if match.start() > last:
                pieces.append(("text", source[last:match.start()]))
            pieces.append(("tok", *table[match.group()]))
            last = match.end()
        if last < len(source):
            pieces.append(("text", source[last:]))
        return pieces
    if tokenizer is None:
        raise TypeError("parse_trace of token ids needs the tokenizer (to decode the text between blocks)")
    table = vocab.id_table()
    run: list[int] = []
    for token in [int(t) for t in source]:
        if token in table:
            if run:
                pieces.append(("text", tokenizer.decode(run, skip_special_tokens=True)))
                run = []
            pieces.append(("tok", *table[token]))
        else:
            run.append(token)
    if run:
        pieces.append(("text", tokenizer.decode(run, skip_special_tokens=True)))
    return [p for p in pieces if p[0] == "tok" or p[1]]


def _blocks(pieces: list, vocab: PlanningVocab) -> list:
    """Group token pieces into ``("block", key, well_formed)``; text pieces pass through."""
    out: list = []
    for piece in pieces:
        if piece[0] == "text":
            out.append(piece)
            continue
        _, key, position = piece
        last = out[-1] if out else None
        if (last is not None and last[0] == "open" and last[1] == key and position == last[2]
                and position < vocab.block_size(key)):
            out[-1] = ("open", key, position + 1)
        else:
            out.append(("open", key, position + 1 if position == 0 else -1))
    return [("block", p[1], p[2] == vocab.block_size(p[1])) if p[0] == "open" else p for p in out]


def parse_trace(source: str | Sequence[int], vocab: PlanningVocab, tokenizer=None) -> list[dict]:
    """``[{"type", "text"}]`` of a generation given as text or token ids (see the module docstring)."""
    steps: list[dict] = []
    current: dict | None = None
    for item in _blocks(_pieces(source, vocab, tokenizer), vocab):
        if item[0] == "block":
            key = item[1]
            joins = (key != PREFIX and current is not None and not current["text"]
                     and (current["prefix"] or current["types"]))
            if not joins:
                current = {"prefix": key == PREFIX, "types": [], "text": ""}
                steps.append(current)
            if key != PREFIX:
                current["types"].append(key)
        else:
            if current is None:
                current = {"prefix": False, "types": [], "text": ""}
                steps.append(current)
            current["text"] += item[1]
    out = []
    for step in steps:
        text = step["text"]
        if step["prefix"] or step["types"]:
            text = text[1:] if text.startswith(" ") else text
        text = text[:-1] if text.endswith("\n") else text
        out.append({"type": "+".join(step["types"]) or None, "text": text})
    return out


def format_trace(trace: Sequence[dict], vocab: PlanningVocab) -> str:
    """The text of a trace in the training layout (inverse of :func:`parse_trace`)."""
    general = vocab.block_text(PREFIX) if vocab.n_prefix else ""
    out = ""
    for step in trace:
        blocks = "".join(vocab.block_text(k) for k in step["type"].split("+")) if step["type"] else ""
        out += general + blocks + " " + step["text"] + "\n"
    return out


def trace_stats(source: str | Sequence[int], vocab: PlanningVocab, tokenizer=None) -> dict:
    """``{"steps", "types": {type: count}, "pattern": "memory,reason,..", "blocks", "malformed_blocks",
    "truncated_blocks"}``; a block left incomplete at the very end (cut by the token budget) is
    truncated, not malformed."""
    items = _blocks(_pieces(source, vocab, tokenizer), vocab)
    blocks = [b for b in items if b[0] == "block"]
    # an incomplete block as the very last item was cut by the token budget, not written malformed
    truncated = int(bool(items) and items[-1][0] == "block" and not items[-1][2])
    trace = parse_trace(source, vocab, tokenizer)
    types = [s["type"] for s in trace if s["type"] is not None]
    return {"steps": len(trace), "types": dict(Counter(types)), "pattern": ",".join(types),
            "blocks": len(blocks), "malformed_blocks": sum(not b[2] for b in blocks) - truncated,
            "truncated_blocks": truncated}


def strip_planning_tokens(text: str, vocab: PlanningVocab) -> str:
    """The text without planning-token strings (for showing a generation to users)."""
    pattern = re.compile("|".join(re.escape(s) for s in vocab.all_strings()))
    return pattern.sub("", text)
