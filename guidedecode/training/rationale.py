"""Training data and fine-tuning for a RATIONALYST rationale model (``guidedecode train rationale``).

RATIONALYST (D. Jiang et al., arXiv 2410.01044, ACL 2025) mines the implicit rationales between
consecutive text segments and trains a model to write them. The pipeline has four stages, each a
function with files between them in one output directory (``spec: rationalyst.md`` Sections 4-5):

1. **extract** - the document with its unstated rationales marked as ``<BOT>rationale<EOT>``,
   written by an instruct model in one of two modes:

   - ``rewrite`` (the paper's): the model rewrites the whole document unchanged but inserts the
     rationales (our own system prompt + two GSM8K-style demos). Needs a capable instruct model.
   - ``insert`` (ours, for small models): the document is cut into segments (lines; sentences for
     a one-line text) and for each of the first M boundaries the model is shown only the text
     *before* the boundary and writes one rationale, its reply prefilled with ``<BOT>`` and stopped
     at ``<EOT>`` or a line break. We insert the rationales ourselves, so the output is the
     original text plus the rationales (edit similarity 1.0 in step 2).

   Output: ``extract.jsonl`` (one row per document: ``id, source, text, output, finish_reason``;
   insert mode adds ``mode`` and the per-boundary ``insertions``).
2. **align** - strip every ``<BOT>..<EOT>`` span; keep the document iff
   ``1 - levenshtein(text, stripped) / len(text) >= 0.9``; split the output at each rationale into
   ``{preceding, rationale, following}`` where ``preceding`` is all text before the rationale
   (rationales removed) and ``following`` is only the next segment (up to the next ``<BOT>``).
   Output: ``aligned.jsonl``.
3. **filter** - with a scorer M and the next segment's tokens f (length L), gamma = 0.9::

       S_without = sum_{i<L} gamma^i * log P_M(f_i | [system: S_f, user: preceding], f_<i)
       S_with    = sum_{i<L} gamma^i * log P_M(f_i | [system: S_f, user: preceding + " <BOT>r<EOT>"], f_<i)
       keep  <=>  Delta = S_with - S_without >= tau(source)

   (unnormalised weights, as the reference). Output: ``scored.jsonl`` (every record with its
   scores; the resumable work file) and ``filtered.jsonl`` (the kept records).
4. **sft** - causal-LM fine-tuning on ``[user: preceding] -> [assistant: rationale]`` with the prompt
   masked (label -100), AdamW, cosine schedule with 3% warm-up, full or LoRA (peft), 5% dev split
   with a dev loss per epoch, checkpoints that resume bit-identically (the shared loop
   :func:`guidedecode.training.common.fit`). Output: ``sft/`` (``checkpoint-N/``, ``final/`` = a
   loadable HF model directory, ``adapter/`` for LoRA, ``history.json``).

The work files of extract and filter are appended per batch and fsynced
(:func:`guidedecode.training.common.collect_resumable`), every other file is written atomically
(temporary file, fsync, ``os.replace``); rerunning a stage skips the documents/records/steps already
done. ``metrics.json`` collects the counts of every stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from guidedecode.errors import TrainingError
from guidedecode.records import atomic_write_text, read_json, write_jsonl
from guidedecode.records import read_jsonl as _read_records
from guidedecode.training.common import (
    ADDED_SETTINGS,
    FitConfig,
    LMExample,
    atomic_dir,
    collect_resumable,
    fit,
    masked_loss_sum,
    describe_backend,
    split_dev,
)

BOT, EOT = "<BOT>", "<EOT>"
GAMMA = 0.9
SIMILARITY_THRESHOLD = 0.9
DEV_FRACTION = 0.05
WARMUP_FRACTION = 0.03
# Per-source usefulness thresholds from the paper (tuned for 95% precision,
# unverified); sources not listed use the reference default 0.
DEFAULT_TAUS: dict[str, float] = {"gsm8k": 1.2, "ecqa": 0.5, "pile": 0.0}
DEFAULT_TAU = 0.0
LORA_TARGETS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("c_attn",))

_SPAN = re.compile(re.escape(BOT) + "(.*?)" + re.escape(EOT), re.DOTALL)


# =============================================================================================
# Files: atomic writes, JSONL, metrics


def read_jsonl(path: Path, *, key: str | None = None) -> list[dict]:
    """Rows of an input JSONL file, read as is; a line that is not a JSON object, or lacks ``key`` or
    repeats it, is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"file not found: {path}")
    return _read_records(path, key=key, repair=False, error=TrainingError)


def update_metrics(out: Path, stage: str, values: dict) -> None:
    """Set ``metrics.json[stage] = values`` (read, modify, atomic write)."""
    path = Path(out) / "metrics.json"
    metrics = read_json(path, error=TrainingError) if path.is_file() else {}
    metrics[stage] = values
    atomic_write_text(path, json.dumps(metrics, indent=2) + "\n")


def check_settings(out: Path, stage: str, settings: dict) -> None:
    """Record a stage's settings in ``settings.json``; refuse to resume a stage under other settings."""
    path = Path(out) / "settings.json"
    recorded = read_json(path, error=TrainingError) if path.is_file() else {}
    previous = recorded.get(stage)
    if previous is not None:  # a setting added later reads as the value older runs used
        previous = {**{k: v for k, v in ADDED_SETTINGS.items() if k in settings}, **previous}
    if previous is not None and previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        raise TrainingError(
            f"{out} holds a '{stage}' stage made with other settings ({', '.join(changed)}): "
            f"use a new --out directory or delete that stage's files"
        )
    recorded[stage] = settings
    atomic_write_text(path, json.dumps(recorded, indent=2) + "\n")


# =============================================================================================
# Documents


def gsm8k_document(row: dict) -> str:
    """A GSM8K train row as one document: the question, then the solution with the calculator
    annotations ``<<48/2=24>>`` removed and ``#### 72`` written as ``The answer is 72.``"""
    try:
        question, solution = str(row["question"]).strip(), str(row["answer"])
    except KeyError as exc:
        raise TrainingError(f"a GSM8K row needs 'question' and 'answer' fields, missing {exc}") from exc
    solution = re.sub(r"<<[^>]*>>", "", solution)
    if "####" in solution:
        body, answer = solution.rsplit("####", 1)
        solution = body.rstrip() + f"\nThe answer is {answer.strip()}."
    return f"Question: {question}\nAnswer: {solution.strip()}"


def load_documents(path: Path, limit: int | None = None) -> list[dict]:
    """``[{id, source, text}]`` from a JSONL file of GSM8K rows (``question``/``answer``) or of plain
    documents (``text`` with optional ``id`` and ``source``); the first ``limit`` rows."""
    path = Path(path)
    if limit is not None and limit < 1:
        raise TrainingError(f"--records must be >= 1, got {limit}")
    rows = read_jsonl(path)
    if not rows:
        raise TrainingError(f"{path} holds no records")
    documents = []
    for index, row in enumerate(rows[:limit] if limit else rows):
        if "text" in row:
            text, source = str(row["text"]), str(row.get("source") or path.stem)
        elif "question" in row and "answer" in row:
            text, source = gsm8k_document(row), str(row.get("source") or "gsm8k")
        else:
            raise TrainingError(f"{path} row {index + 1} has neither 'text' nor 'question'+'answer'")
        if not text.strip():
            raise TrainingError(f"{path} row {index + 1} has an empty text")
        documents.append({"id": str(row.get("id", f"{path.stem}/{index}")), "source": source, "text": text})
    return documents


# =============================================================================================
# Stage 1: extraction

EXTRACTION_SYSTEM = (
    "You rewrite a text exactly as it is, character for character, but insert the unstated rationales "
    "that help predict what comes next. Put each rationale right before the sentence it explains, "
    f"wrapped as {BOT}rationale{EOT}. A rationale says why the next step follows or what it is for "
    '(for example "To find X, we need to ..."); it never repeats the text. Change nothing else.'
)

EXTRACTION_DEMOS: tuple[tuple[str, str], ...] = (
    (
        "Question: A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?\n"
        "Answer: The baker sells 24 * 3/4 = 18 muffins.\n"
        "So 24 - 18 = 6 muffins are left.\n"
        "The answer is 6.",
        "Question: A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?\n"
        f"Answer: {BOT}To find how many are left, we first need how many were sold.{EOT}"
        "The baker sells 24 * 3/4 = 18 muffins.\n"
        f"{BOT}The muffins left are the total minus the ones sold.{EOT}So 24 - 18 = 6 muffins are left.\n"
        f"{BOT}The question asks for the muffins left, which we just found.{EOT}The answer is 6.",
    ),
    (
        "Question: Tom reads 15 pages a day. How many days does he need for a 120-page book?\n"
        "Answer: He needs 120 / 15 = 8 days.\n"
        "The answer is 8.",
        "Question: Tom reads 15 pages a day. How many days does he need for a 120-page book?\n"
        f"Answer: {BOT}Each day covers 15 pages, so we divide the pages by the daily rate.{EOT}"
        "He needs 120 / 15 = 8 days.\n"
        f"{BOT}The number of days is the final answer.{EOT}The answer is 8.",
    ),
)


def _extracted_ids(path: Path, mode: str) -> set[str]:
    """The ids already in an extraction file; rows of the other extraction mode are refused."""
    rows = _read_records(Path(path), key="id", error=TrainingError)
    other = [row["id"] for row in rows if row.get("mode", "rewrite") != mode]
    if other:
        raise TrainingError(f"{path} holds rows of another extraction mode (e.g. {other[0]}): use a new --out")
    return {row["id"] for row in rows}


def extraction_messages(text: str) -> list[dict]:
    """The chat for one document: system prompt, the two demos, then the document."""
    messages = [{"role": "system", "content": EXTRACTION_SYSTEM}]
    for plain, annotated in EXTRACTION_DEMOS:
        messages += [{"role": "user", "content": plain}, {"role": "assistant", "content": annotated}]
    return messages + [{"role": "user", "content": text}]


def extract(
    backend,
    documents: Sequence[dict],
    path: Path,
    *,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Greedy-extract rationales for the documents not yet in ``path``, ``batch_size`` documents per
    call, each batch appended to ``path`` (:func:`~guidedecode.training.common.collect_resumable`, so
    an interrupted run resumes at the next unfinished batch)."""
    if max_new_tokens < 1 or batch_size < 1:
        raise TrainingError("--max-new-tokens and --batch-size must be >= 1")
    done = _extracted_ids(path, "rewrite")

    def work(chunk: list[dict], _: int) -> list[dict]:
        prompts = [backend.chat_prompt(extraction_messages(d["text"])) for d in chunk]
        completions = backend.greedy(prompts, max_new_tokens=max_new_tokens)
        return [{**d, "output": c.text, "finish_reason": c.finish_reason} for d, c in zip(chunk, completions)]

    wanted = collect_resumable(documents, path, work, key=lambda d: d["id"], chunk_size=batch_size,
                               progress=progress, desc="extract")
    return {
        "documents": len(wanted),
        "generated_now": sum(d["id"] not in done for d in documents),
        "finish_reasons": dict(Counter(row["finish_reason"] for row in wanted)),
    }


# =============================================================================================
# Stage 1, insert mode: one rationale per segment boundary

EXTRACT_MODES = ("insert", "rewrite")
INSERT_MAX_NEW_TOKENS = 48  # one rationale is one short sentence
REWRITE_MAX_NEW_TOKENS = 384
MAX_RATIONALE_CHARS = 300
INSERT_STOPS = (EOT, "\n")  # a rationale ends at <EOT>; it is one line, so a line break ends it too

INSERTION_SYSTEM = (
    "You read the beginning of a text and write the unstated rationale that leads to its next step: "
    "one short sentence saying what should come next and why "
    '(for example "To find X, we need to ..."). Do not repeat the text. '
    f"Write the rationale between {BOT} and {EOT}."
)

# (text before the boundary, the rationale for what comes next): three short GSM8K-style cases,
# one for each kind of boundary (after "Answer:", between two steps, before the final answer).
INSERTION_DEMOS: tuple[tuple[str, str], ...] = (
    (
        "Question: A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?\nAnswer:",
        "To find how many muffins are left, we first need how many were sold, which is 3/4 of 24.",
    ),
    (
        "Question: Lily has 5 boxes with 8 pencils each. She gives away 12 pencils. How many pencils does "
        "she have now?\nAnswer: Lily has 5 * 8 = 40 pencils.",
        "She gave some pencils away, so we subtract the 12 given pencils from the 40 she had.",
    ),
    (
        "Question: Tom reads 15 pages a day. How many days does he need for a 120-page book?\n"
        "Answer: He needs 120 / 15 = 8 days.",
        "The number of days is what the question asks for, so 8 is the final answer.",
    ),
)

_LINE_LABEL = re.compile(r"(?:Answer|Solution)[ \t]*:[ \t]*")
_SENTENCE_GAP = re.compile(r"(?<=[.!?])\s+(?=\S)")


def segment_boundaries(text: str) -> list[int]:
    """Character offsets at which a rationale can be inserted, increasing, each with text before it.

    A multi-line text is cut at line starts (blank lines skipped); a line that opens with an
    ``Answer:`` / ``Solution:`` label is cut after the label, so ``Question..\\nAnswer: 2+3=5``
    gives one boundary, just before ``2+3=5`` (a line holding only the label gives none). A
    one-line text is cut at sentence starts (after ``.``, ``!`` or ``?`` and whitespace). The
    segments are ``text[b_k:b_{k+1}]``; inserting ``<BOT>r<EOT>`` at ``b_k`` makes ``align``
    recover exactly these segments.
    """
    boundaries = []
    for newline in re.finditer("\n", text):
        start = newline.end()
        line_end = text.find("\n", start)
        line = text[start : line_end if line_end >= 0 else len(text)]
        if not line.strip():
            continue
        label = _LINE_LABEL.match(text, start)
        if label:
            if not text[label.end() : start + len(line)].strip():
                continue  # a bare "Answer:" line: the boundary is at the next line
            start = label.end()
        boundaries.append(start)
    if not boundaries:
        boundaries = [gap.end() for gap in _SENTENCE_GAP.finditer(text)]
    return [b for b in boundaries if text[:b].strip() and text[b:].strip()]


def insertion_messages(preceding: str) -> list[dict]:
    """The chat for one boundary: system prompt, the three demos, then the text before the boundary."""
    messages = [{"role": "system", "content": INSERTION_SYSTEM}]
    for before, rationale in INSERTION_DEMOS:
        messages += [{"role": "user", "content": before},
                     {"role": "assistant", "content": f"{BOT}{rationale}{EOT}"}]
    return messages + [{"role": "user", "content": preceding.strip()}]


def insertion_prompt(backend, preceding: str) -> str:
    """The rendered chat (with the assistant's turn opened) and the reply prefilled with ``<BOT>``."""
    return backend.chat_prompt(insertion_messages(preceding)) + BOT


def clean_rationale(generated: str, next_segment: str, *, finish_reason: str = "stop",
                    max_chars: int = MAX_RATIONALE_CHARS) -> tuple[str, str]:
    """``(rationale, outcome)`` for one generation (the text after the prefilled ``<BOT>``).

    The text is cut at the first ``<EOT>`` or line break (a rationale is inserted inline) and
    stripped. ``outcome`` is ``"kept"`` or why it is skipped: ``unfinished`` (the token limit came
    first: ``finish_reason == "length"``), ``empty``, ``has_bot`` (a nested ``<BOT>``), ``too_long``
    (> ``max_chars``), or ``copies_next`` (the next segment, whitespace-normalised, is the
    rationale or inside it).
    """
    rationale = generated.split(EOT, 1)[0].split("\n", 1)[0].strip()
    if finish_reason == "length":
        return rationale, "unfinished"
    if not rationale:
        return rationale, "empty"
    if BOT in rationale:
        return rationale, "has_bot"
    if len(rationale) > max_chars:
        return rationale, "too_long"
    following = " ".join(next_segment.split())
    if following and following in " ".join(rationale.split()):
        return rationale, "copies_next"
    return rationale, "kept"


def assemble(text: str, insertions: Sequence[tuple[int, str]]) -> str:
    """``text`` with ``<BOT>r<EOT>`` inserted at each ``(offset, r)`` (offsets increasing)."""
    pieces, last = [], 0
    for offset, rationale in insertions:
        if not last <= offset <= len(text):
            raise TrainingError(f"insertion offsets must increase within the text, got {offset} after {last}")
        pieces += [text[last:offset], f"{BOT}{rationale}{EOT}"]
        last = offset
    return "".join(pieces) + text[last:]


def extract_insert(
    backend,
    documents: Sequence[dict],
    path: Path,
    *,
    max_rationales: int | None = 4,
    max_new_tokens: int = INSERT_MAX_NEW_TOKENS,
    max_chars: int = MAX_RATIONALE_CHARS,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Insert-mode extraction for the documents not yet in ``path``; resumable like :func:`extract`.

    For every document, the first ``max_rationales`` boundaries of :func:`segment_boundaries`
    (``None`` or 0: all) each get one greedy generation from :func:`insertion_prompt` (stops
    ``<EOT>`` and line break, ``max_new_tokens``); the boundaries of ``batch_size`` documents go to one
    ``backend.greedy`` call. Kept rationales are inserted with :func:`assemble`; every generation
    is recorded in the row's ``insertions`` (offset, generated text, finish reason, outcome).
    """
    if max_new_tokens < 1 or batch_size < 1 or max_chars < 1:
        raise TrainingError("--max-new-tokens, --batch-size and the rationale length limit must be >= 1")
    if max_rationales is not None and max_rationales < 0:
        raise TrainingError(f"--max-rationales must be >= 0 (0: every boundary), got {max_rationales}")
    done = _extracted_ids(path, "insert")

    def work(chunk: list[dict], _: int) -> list[dict]:
        jobs = []  # (document index in chunk, offset, next segment)
        for index, document in enumerate(chunk):
            text = document["text"]
            boundaries = segment_boundaries(text)
            ends = boundaries[1:] + [len(text)]
            pairs = list(zip(boundaries, ends))[: max_rationales or None]
            jobs += [(index, offset, text[offset:end]) for offset, end in pairs]
        prompts = [insertion_prompt(backend, chunk[index]["text"][:offset]) for index, offset, _ in jobs]
        completions = backend.greedy(prompts, max_new_tokens=max_new_tokens, stop=INSERT_STOPS) if prompts else []
        rows = [{**document, "mode": "insert", "insertions": []} for document in chunk]
        for (index, offset, next_segment), completion in zip(jobs, completions):
            rationale, outcome = clean_rationale(completion.text, next_segment,
                                                 finish_reason=completion.finish_reason, max_chars=max_chars)
            rows[index]["insertions"].append({"offset": offset, "generated": completion.text, "rationale": rationale,
                                              "finish_reason": completion.finish_reason, "outcome": outcome})
        for row in rows:
            kept = [(i["offset"], i["rationale"]) for i in row["insertions"] if i["outcome"] == "kept"]
            row["output"] = assemble(row["text"], kept)
            row["finish_reason"] = ",".join(sorted({i["finish_reason"] for i in row["insertions"]})) or "no_boundary"
        return rows

    wanted = collect_resumable(documents, path, work, key=lambda d: d["id"], chunk_size=batch_size,
                               progress=progress, desc="extract")
    insertions = [i for row in wanted for i in row["insertions"]]
    outcomes = Counter(i["outcome"] for i in insertions)
    return {
        "mode": "insert",
        "documents": len(wanted),
        "generated_now": sum(d["id"] not in done for d in documents),
        "boundaries": len(insertions),
        "rationales": outcomes.pop("kept", 0),
        "skipped": dict(sorted(outcomes.items())),
        "documents_with_rationale": sum(BOT in row["output"] for row in wanted),
        "finish_reasons": dict(Counter(i["finish_reason"] for i in insertions)),
    }


# =============================================================================================
# Stage 2: alignment


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insert, delete, substitute), from rapidfuzz."""
    from rapidfuzz.distance import Levenshtein

    return int(Levenshtein.distance(a, b))


def edit_similarity(source: str, candidate: str) -> Fraction:
    """``1 - levenshtein(source, candidate) / len(source)`` as an exact fraction.

    Exact, so a threshold of 0.9 keeps a 20-character text at distance 2 and drops it at 3 with no
    floating-point doubt. Can be negative when the candidate is much longer than the source.
    """
    if not source:
        raise TrainingError("cannot align an empty source text")
    return 1 - Fraction(edit_distance(source, candidate), len(source))


def strip_rationales(text: str) -> str:
    """The text with every ``<BOT>...<EOT>`` span removed (nothing else changed)."""
    return _SPAN.sub("", text)


def align_document(document: dict, *, threshold: float = SIMILARITY_THRESHOLD) -> tuple[list[dict], str]:
    """``(records, outcome)`` for one extracted document.

    ``outcome`` is ``"aligned"`` or why the document was dropped: ``malformed`` (a ``<BOT>`` or
    ``<EOT>`` without its partner, or nested), ``no_rationale``, ``low_similarity``. Rationales with an
    empty preceding text, rationale or following segment yield no record (counted by the caller).
    """
    output = document["output"]
    parts = _SPAN.split(output)  # [seg_0, r_1, seg_1, r_2, seg_2, ...]
    segments, rationales = parts[0::2], parts[1::2]
    if any(BOT in s or EOT in s for s in parts):
        return [], "malformed"
    if not rationales:
        return [], "no_rationale"
    similarity = edit_similarity(document["text"], "".join(segments))
    if similarity < Fraction(str(threshold)):
        return [], "low_similarity"
    records = []
    for k, rationale in enumerate(rationales, 1):
        record = {
            "id": f"{document['id']}#{k}",
            "doc_id": document["id"],
            "source": document["source"],
            "preceding": "".join(segments[:k]).strip(),
            "rationale": rationale.strip(),
            "following": segments[k].strip(),
            "similarity": float(similarity),
        }
        records.append(record)
    return records, "aligned"


def align(extracted: Sequence[dict], path: Path, *, threshold: float = SIMILARITY_THRESHOLD) -> dict:
    """Align every extracted document, write the records to ``path``; return the counts."""
    outcomes: Counter = Counter()
    skipped: Counter = Counter()
    records = []
    for document in extracted:
        found, outcome = align_document(document, threshold=threshold)
        outcomes[outcome] += 1
        for record in found:
            empty = [key for key in ("preceding", "rationale", "following") if not record[key]]
            if empty:
                skipped[f"empty_{empty[0]}"] += 1
            else:
                records.append(record)
    write_jsonl(path, records)
    return {"documents": len(extracted), **{k: outcomes[k] for k in ("aligned", "malformed", "no_rationale",
                                                                    "low_similarity")},
            "records": len(records), "skipped_rationales": dict(skipped)}


# =============================================================================================
# Stage 3: usefulness filter

FILTER_SYSTEM = (
    "Continue the text: given the preceding text, write the text that comes next. A passage inside "
    f"{BOT} and {EOT} is a rationale that may or may not help."
)


def preceding_of(record: dict) -> str:
    """The ``preceding`` field; the reference's spelling ``preceeding`` is accepted on read."""
    if "preceding" in record:
        return record["preceding"]
    if "preceeding" in record:
        return record["preceeding"]
    raise TrainingError(f"record {record.get('id', '?')} has no 'preceding' field")


def decayed_sum(logprobs: Sequence[float] | torch.Tensor, gamma: float = GAMMA) -> float:
    """``sum_i gamma^i * logprobs[i]`` (i from 0), unnormalised as in the reference."""
    values = torch.as_tensor(logprobs, dtype=torch.float64)
    weights = gamma ** torch.arange(len(values), dtype=torch.float64)
    return float((weights * values).sum())


def filter_user_texts(record: dict) -> tuple[str, str]:
    """The user messages without and with the rationale: ``preceding`` and ``preceding <BOT>r<EOT>``."""
    preceding = preceding_of(record)
    return preceding, f"{preceding} {BOT}{record['rationale']}{EOT}"


def following_logprobs(backend, record: dict, *, system: str = FILTER_SYSTEM) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of ``following`` as the assistant's reply, without and with the rationale.

    One ``backend.score`` call scores both: the two rendered prompts share a prefix (system prompt
    and ``preceding``), the continuations are the differing tails plus ``following``. The tokens of
    ``following`` are those of the jointly tokenised ``prompt + following`` that end after the prompt
    (a token spanning the boundary belongs to ``following``, as in ``HFBackend.join``).
    """
    if not getattr(backend.tokenizer, "is_fast", False):
        raise TrainingError("the usefulness filter needs a fast tokenizer (character offsets)")
    following = record["following"]
    prompts = [
        backend.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": user}])
        for user in filter_user_texts(record)
    ]
    prefix = os.path.commonprefix(prompts)
    if not prefix:
        raise TrainingError("the with/without-rationale prompts share no prefix")
    scores = backend.score(prefix, [p[len(prefix) :] + following for p in prompts])
    result = []
    for prompt, score in zip(prompts, scores):
        count = count_tokens_after(backend.tokenizer, prompt + following, len(prompt))
        if count == 0 or count > len(score.logprobs):
            raise TrainingError(f"record {record.get('id', '?')}: cannot locate the following text's tokens")
        result.append(score.logprobs[-count:])
    return result[0], result[1]


def count_tokens_after(tokenizer, text: str, char: int) -> int:
    """How many tokens of ``text`` (no special tokens added) end after character ``char``."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return sum(1 for _, end in offsets if end > char)


def usefulness(backend, record: dict, *, gamma: float = GAMMA, system: str = FILTER_SYSTEM) -> dict:
    """``{s_without, s_with, delta, n_following}`` for one record."""
    without, with_rationale = following_logprobs(backend, record, system=system)
    s_without, s_with = decayed_sum(without, gamma), decayed_sum(with_rationale, gamma)
    return {"s_without": s_without, "s_with": s_with, "delta": s_with - s_without, "n_following": len(without)}


def tau_for(source: str, taus: dict[str, float] | None = None, default: float | None = None) -> float:
    """The threshold of a source: ``taus[source]``, else ``default``, else the spec's per-source value."""
    if taus and source in taus:
        return taus[source]
    if default is not None:
        return default
    return DEFAULT_TAUS.get(source, DEFAULT_TAU)


def validate_tau(value: float, name: str = "tau") -> float:
    value = float(value)
    if math.isnan(value):
        raise TrainingError(f"{name} is NaN: give a number (the paper uses 1.2 for GSM8K, 0 by default)")
    return value


def score_records(
    backend, records: Sequence[dict], path: Path, *, gamma: float = GAMMA, save_every: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Score every record not yet in ``path`` (appended every ``save_every`` records)."""
    def work(chunk: list[dict], _: int) -> list[dict]:
        return [{**record, **usefulness(backend, record, gamma=gamma)} for record in chunk]

    return collect_resumable(records, path, work, key=lambda r: r["id"], chunk_size=save_every, progress=progress,
                             desc="filter")


def keep_by_tau(scored: Sequence[dict], taus: dict[str, float] | None = None,
                default: float | None = None) -> list[dict]:
    """The records with ``delta >= tau(source)``, each with its ``tau`` attached."""
    kept = []
    for record in scored:
        tau = validate_tau(tau_for(record["source"], taus, default))
        if record["delta"] >= tau:
            kept.append({**record, "tau": tau})
    return kept


def filter_records(
    backend, aligned: Sequence[dict], out: Path, *, taus: dict[str, float] | None = None,
    default_tau: float | None = None, gamma: float = GAMMA, progress: bool = False,
) -> dict:
    """Stage 3: score (``scored.jsonl``, resumable), keep by tau (``filtered.jsonl``); return counts."""
    scored = score_records(backend, aligned, Path(out) / "scored.jsonl", gamma=gamma, progress=progress)
    kept = keep_by_tau(scored, taus, default_tau)
    write_jsonl(Path(out) / "filtered.jsonl", kept)
    deltas = [r["delta"] for r in scored]
    per_source: dict[str, dict] = {}
    for record in scored:
        entry = per_source.setdefault(record["source"], {"scored": 0, "kept": 0,
                                                          "tau": tau_for(record["source"], taus, default_tau)})
        entry["scored"] += 1
    for record in kept:
        per_source[record["source"]]["kept"] += 1
    return {
        "scored": len(scored), "kept": len(kept), "dropped": len(scored) - len(kept), "gamma": gamma,
        "mean_delta": sum(deltas) / len(deltas) if deltas else None, "per_source": per_source,
    }


# =============================================================================================
# Stage 4: supervised fine-tuning


@dataclass
class SFTConfig:
    """Hyper-parameters of the rationale-model fine-tune (defaults scaled for CPU)."""

    lora: bool = False
    epochs: int = 1
    lr: float = 2e-5
    batch_size: int = 2
    max_length: int = 1024
    seed: int = 0
    dev_fraction: float = DEV_FRACTION
    save_every: int = 50  # optimizer steps between checkpoints (plus one at each epoch's end)
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0  # gradient-norm clipping (the HF Trainer default the reference ran with)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_template: str = "{rationale}"  # e.g. "<BOT>{rationale}<EOT>" to train the markers too

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 8 or self.save_every < 1:
            raise TrainingError("epochs, batch size and save-every must be >= 1, max length >= 8")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainingError(f"learning rate must be a positive number, got {self.lr}")
        if not 0 <= self.dev_fraction < 1:
            raise TrainingError(f"dev fraction must be in [0, 1), got {self.dev_fraction}")
        if "{rationale}" not in self.target_template:
            raise TrainingError("the target template must contain {rationale}")

    def fit_config(self) -> FitConfig:
        """The loop: AdamW (torch's weight decay 0.01 on every tensor), cosine schedule with
        ``WARMUP_FRACTION`` warm-up (the HF Trainer schedule the reference uses), the last epoch kept."""
        return FitConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=0.01,
                         decay_1d=True, schedule="cosine", warmup=WARMUP_FRACTION, max_grad_norm=self.max_grad_norm,
                         select="last", seed=self.seed, save_every=self.save_every,
                         keep_checkpoints=self.keep_checkpoints)


def build_example(tokenizer, preceding: str, rationale: str, *, target_template: str = "{rationale}") -> LMExample:
    """``(input_ids, labels)`` of chat ``[user: preceding, assistant: target]``; labels are -100 on
    every prompt token (the rendered ``[user: preceding]`` with generation prompt), the token ids on
    the target (the reply and the template's end-of-turn). A token spanning the boundary is target."""
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingError("the base model's tokenizer has no chat template")
    user = [{"role": "user", "content": preceding}]
    prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    target = target_template.format(rationale=rationale)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": target}], tokenize=False)
    if not full.startswith(prompt):
        raise TrainingError("the chat template renders the prompt differently inside a full conversation")
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [token if end > len(prompt) else -100 for token, (_, end) in zip(ids, encoding["offset_mapping"])]
    return LMExample(ids, labels)


def lora_targets(model) -> list[str]:
    """The attention projections LoRA adapts: q/k/v/o (Llama family) or c_attn (GPT-2)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for group in LORA_TARGETS:
        found = [n for n in group if n in names]
        if found:
            return found
    raise TrainingError("no attention projections (q_proj/k_proj/v_proj/o_proj or c_attn) found for LoRA")


def _data_hash(records: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([preceding_of(record), record["rationale"]]).encode())
    return digest.hexdigest()[:16]


def train_sft(
    load_base: Callable[[], tuple[Any, Any]],
    records: Sequence[dict],
    sft_dir: Path,
    config: SFTConfig,
    *,
    progress: bool = False,
    stop_after_steps: int | None = None,
) -> dict:
    """Stage 4: fine-tune ``load_base()``'s ``(model, tokenizer)`` on the records; resumable.

    The loop is :func:`guidedecode.training.common.fit` in ``sft_dir`` (its ``checkpoint-N/`` hold the
    trainable tensors, optimizer, scheduler and RNG state; a rerun resumes bit-identically). Then
    ``sft_dir/adapter`` (LoRA), ``sft_dir/final`` (a loadable HF model directory, LoRA merged) and
    ``history.json``. ``stop_after_steps`` stops after that many optimizer steps in this call (after
    a checkpoint), for tests.
    """
    config.validate()
    sft_dir = Path(sft_dir)
    if not records:
        raise TrainingError("no records to train on (the filter kept none: see metrics.json)")
    settings = {**asdict(config), "data": _data_hash(records), "records": len(records)}
    for volatile in ("save_every", "keep_checkpoints"):
        settings.pop(volatile)
    final = sft_dir / "final"
    if (sft_dir / "history.json").is_file() and final.is_dir():
        history = read_json(sft_dir / "history.json", error=TrainingError)
        if history.get("settings") != settings:
            raise TrainingError(f"{sft_dir} holds a finished run with other settings: delete it or use a new --out")
        return {**history, "resumed_finished": True}
    old_format = [p for p in sft_dir.glob("checkpoint-*") if (p / "state.json").is_file()
                  and not (p / "trainable.safetensors").is_file()]
    if old_format:
        raise TrainingError(f"{old_format[0]} is a checkpoint of an older guidedecode: delete the "
                            f"checkpoint-* directories in {sft_dir} to restart the SFT stage")

    # examples: [user: preceding] -> [assistant: rationale], prompt masked; a seeded dev split
    model, tokenizer = load_base()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = [build_example(tokenizer, preceding_of(record), record["rationale"],
                              target_template=config.target_template) for record in records]
    too_long = sum(len(e.input_ids) > config.max_length for e in examples)
    train, dev = split_dev([e for e in examples if len(e.input_ids) <= config.max_length], config.dev_fraction,
                           config.seed)
    if not train:
        raise TrainingError(f"no training examples left ({too_long} longer than max length {config.max_length})")

    # the trainable tensors: every weight, or a LoRA adapter on the attention projections
    torch.manual_seed(config.seed)  # LoRA initialisation
    if config.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                                 lora_dropout=config.lora_dropout,
                                                 target_modules=lora_targets(model), task_type="CAUSAL_LM"))

    # the loop (resumes from sft_dir's newest checkpoint)
    steps: list[int] = []
    fitted = fit(model, train, dev, sft_dir, config.fit_config(), settings={"sft": settings}, pad_token_id=pad_id,
                 loss_fn=masked_loss_sum, progress=progress, desc="sft", on_step=steps.append,
                 stop_after_steps=stop_after_steps)
    if fitted is None:  # stopped by stop_after_steps, checkpointed
        return {"interrupted": True, "global_step": steps[-1]}

    # the outputs
    def write_final(directory: Path) -> None:
        merged = model.merge_and_unload() if config.lora else model
        merged.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)

    if config.lora:
        atomic_dir(sft_dir / "adapter", lambda d: model.save_pretrained(d, safe_serialization=True))
    atomic_dir(final, write_final)
    epochs = [{key: entry[key] for key in ("epoch", "train_loss", "dev_loss")} for entry in fitted.history]
    summary = {
        "train_examples": len(train), "dev_examples": len(dev), "too_long": too_long, "steps": fitted.global_step,
        "epochs": epochs, "final_dev_loss": epochs[-1]["dev_loss"], "lora": config.lora, "settings": settings,
    }
    atomic_write_text(sft_dir / "history.json", json.dumps(summary, indent=2) + "\n")
    return summary


# =============================================================================================
# The pipeline

STAGES = ("extract", "align", "filter", "sft")


@dataclass
class PipelineConfig:
    """Everything ``guidedecode train rationale`` needs."""

    out: Path
    data: Path
    model: str
    base_model: str | None = None  # SFT base (default: ``model``)
    records: int | None = None
    taus: dict[str, float] = field(default_factory=dict)  # per-source tau overrides
    default_tau: float | None = None  # one tau for every source (else the spec's per-source values)
    extract_mode: str = "insert"  # "insert" (one rationale per boundary) or "rewrite" (whole document)
    max_rationales: int | None = 4  # insert mode: the first M boundaries of a document (None or 0: all)
    max_new_tokens: int | None = None  # token limit of one generation (None: 48 insert, 384 rewrite)
    max_rationale_chars: int = MAX_RATIONALE_CHARS  # insert mode: longer rationales are skipped
    extract_batch_size: int = 8
    threshold: float = SIMILARITY_THRESHOLD
    gamma: float = GAMMA
    device: str | None = None
    dtype: str | None = None  # weights dtype of the scorer and the SFT base (float32, bfloat16, float16)
    backend: str = "hf"  # where extract generates and filter scores: "hf" or "vllm" (a vLLM engine of ``model``)
    sft: SFTConfig = field(default_factory=SFTConfig)


def run_pipeline(config: PipelineConfig, stages: Sequence[str] = STAGES, *, progress: bool = False,
                 loader: Callable | None = None, backend=None) -> dict:
    """Run the requested stages in order (each reads the previous stage's file); return metrics.json.

    ``backend``: a ready backend of ``config.model`` for extract and filter (default: built from
    ``config.backend`` on first use); ``loader``: what loads a model by name (default ``load_model``)."""
    from guidedecode.models import load_model
    from guidedecode.training.common import check_collection_backend, check_ready_backend, collection_backend

    loader = loader or load_model
    check_collection_backend(config.backend, used=bool({"extract", "filter"} & set(stages)))
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise TrainingError(f"unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    if config.default_tau is not None:
        validate_tau(config.default_tau)
    for source, tau in config.taus.items():
        validate_tau(tau, f"tau for {source}")
    if not 0 < config.gamma <= 1:
        raise TrainingError(f"gamma must be in (0, 1], got {config.gamma}")
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise TrainingError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    if config.extract_mode not in EXTRACT_MODES:
        raise TrainingError(f"unknown extraction mode {config.extract_mode!r}: choose from {', '.join(EXTRACT_MODES)}")
    config.sft.validate()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    placement = {"dtype": config.dtype} if config.dtype else {}

    check_ready_backend(config.backend, backend, config.model)

    def scorer_backend():
        nonlocal backend
        if backend is None:
            backend = collection_backend(config.backend, config.model, batch_size=max(config.extract_batch_size, 2),
                                         load=lambda: loader(config.model, device=config.device, **placement),
                                         dtype=config.dtype, device=config.device)
        return backend

    if "extract" in stages:
        documents = load_documents(config.data, config.records)
        if config.extract_mode == "insert":
            max_new_tokens = config.max_new_tokens or INSERT_MAX_NEW_TOKENS
            check_settings(out, "extract", {"mode": "insert", "model": config.model, "backend": config.backend,
                                            "max_new_tokens": max_new_tokens,
                                            "max_rationales": config.max_rationales or None,
                                            "max_rationale_chars": config.max_rationale_chars,
                                            "prompt": _text_hash(INSERTION_SYSTEM + repr(INSERTION_DEMOS))})
            counts = extract_insert(scorer_backend(), documents, out / "extract.jsonl",
                                    max_rationales=config.max_rationales, max_new_tokens=max_new_tokens,
                                    max_chars=config.max_rationale_chars, batch_size=config.extract_batch_size,
                                    progress=progress)
        else:
            max_new_tokens = config.max_new_tokens or REWRITE_MAX_NEW_TOKENS
            check_settings(out, "extract", {"mode": "rewrite", "model": config.model, "backend": config.backend,
                                            "max_new_tokens": max_new_tokens,
                                            "prompt": _text_hash(EXTRACTION_SYSTEM + repr(EXTRACTION_DEMOS))})
            counts = extract(scorer_backend(), documents, out / "extract.jsonl", max_new_tokens=max_new_tokens,
                             batch_size=config.extract_batch_size, progress=progress)
        update_metrics(out, "extract", {**counts, "generated_with": describe_backend(scorer_backend())})
    if "align" in stages:
        extracted = _stage_input(out / "extract.jsonl", "extract")
        if config.records is not None:
            wanted = {d["id"] for d in load_documents(config.data, config.records)}
            extracted = [row for row in extracted if row["id"] in wanted]
        update_metrics(out, "align", align(extracted, out / "aligned.jsonl", threshold=config.threshold))
    if "filter" in stages:
        aligned = _stage_input(out / "aligned.jsonl", "align")
        check_settings(out, "filter", {"model": config.model, "backend": config.backend, "gamma": config.gamma,
                                       "system": _text_hash(FILTER_SYSTEM)})
        counts = filter_records(scorer_backend(), aligned, out, taus=config.taus, default_tau=config.default_tau,
                                gamma=config.gamma, progress=progress)
        update_metrics(out, "filter", {**counts, "scored_with": describe_backend(scorer_backend())})
    if "sft" in stages:
        kept = _stage_input(out / "filtered.jsonl", "filter")
        if not kept:
            metrics = read_json(out / "metrics.json", error=TrainingError) if (out / "metrics.json").is_file() else {}
            aligned, scored = metrics.get("align", {}), metrics.get("filter", {})
            raise TrainingError(
                f"no records to train on: align kept {aligned.get('aligned', '?')} of {aligned.get('documents', '?')} "
                f"documents ({aligned.get('records', '?')} rationales), the filter kept {scored.get('kept', '?')} of "
                f"{scored.get('scored', '?')}; see {out / 'metrics.json'}"
            )
        base = config.base_model or config.model
        summary = train_sft(lambda: loader(base, device=config.device, **placement), kept, out / "sft", config.sft,
                            progress=progress)
        update_metrics(out, "sft", {k: v for k, v in summary.items() if k != "settings"})
    return read_json(out / "metrics.json", error=TrainingError)


def _stage_input(path: Path, stage: str) -> list[dict]:
    """A stage's output file (appended by this module: a torn last line of a killed run is cut)."""
    if not path.is_file():
        raise TrainingError(f"{path} not found: run the '{stage}' stage first (--stage {stage} or all)")
    return _read_records(path, error=TrainingError)


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
