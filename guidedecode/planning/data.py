"""Planning-token training data: reading rows, typing their steps, building the target text and ids.

Layout (Wang et al. arXiv 2310.05707; Jin et al. arXiv 2411.13504), with ``P`` the general block and
``T(t)`` the type block of type ``t`` (token strings concatenated, see :mod:`~guidedecode.planning.vocab`)::

    source = "Question: " + question + "\\n "
    target = sum over steps s of  P + T(t_1) + .. + T(t_m) + " " + text(s) + "\\n"     (no type: T(assignment))
             + P + T(answer) + " The answer is: " + answer + "\\n"  + EOS
    prompt = source + P            (generation starts right after the general block)

The plain chain-of-thought baseline (``vocab=None``) drops the blocks:
``target = text(s_1) + "\\n" + .. + "The answer is: " + answer + "\\n" + EOS``.
Source and target are tokenised separately and concatenated, so the prompt ids at inference are a
prefix of the training ids; the loss covers exactly the target tokens (source labels are -100).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from guidedecode.planning.typers import StepTyper
from guidedecode.planning.vocab import ANSWER, ASSIGNMENT, PREFIX, PlanningTokenError, PlanningVocab
from guidedecode.training.common import LMExample

ANSWER_PREFIX = "The answer is: "
_ANSWER_RE = re.compile(r"The answer is:?\s*([^\n]*)")


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """``[{"id", "question", "steps", "answer"}]`` from a memreason JSON file (``question``,
    ``answer``, ``cot_steps``: StrategyQA / CommonsenseQA / TruthfulQA of the Disentangling paper) or
    a GSM8K JSONL file (``question``, ``answer`` with solution lines and ``#### answer``)."""
    from guidedecode.tasks.base import read_rows

    path = Path(path)
    examples = []
    for index, row in enumerate(read_rows(path)):
        if "question" not in row or "answer" not in row:
            raise PlanningTokenError(f"{path} row {index} needs 'question' and 'answer' fields")
        if "cot_steps" in row:
            steps, answer = list(row["cot_steps"] or []), str(row["answer"]).strip()
        else:
            solution = str(row["answer"])
            if "####" not in solution:
                raise PlanningTokenError(f"{path} row {index} has neither 'cot_steps' nor a '#### answer' solution")
            body, answer = solution.rsplit("####", 1)
            steps, answer = [line for line in body.strip().splitlines() if line.strip()], answer.strip()
        examples.append({"id": f"{path.stem}/{index}", "question": str(row["question"]).strip(), "steps": steps,
                         "answer": answer})
    return examples if limit is None else examples[:limit]


def type_examples(examples: Sequence[dict], typer: StepTyper) -> list[dict]:
    """Each example with ``types`` (one list of type names per step) and its steps' text cleaned of labels.
    An example without steps is an error naming it (it would teach no planning)."""
    for example in examples:
        if not example["steps"]:
            raise PlanningTokenError(f"example {example.get('id', '?')} has no reasoning steps to type")
    typed = typer(examples)
    out = []
    for example, types in zip(examples, typed):
        if len(types) != len(example["steps"]):
            raise PlanningTokenError(f"typer {typer.name}: {len(types)} types for {len(example['steps'])} steps "
                                     f"of example {example.get('id', '?')}")
        out.append({**example, "steps": [typer.clean(s) for s in example["steps"]], "types": types})
    return out


def source_text(question: str) -> str:
    return "Question: " + question + "\n "


def prompt_text(question: str, vocab: PlanningVocab | None) -> str:
    """The inference prompt: the source, then the general block (plain: the source)."""
    return source_text(question) + (vocab.block_text(PREFIX) if vocab is not None and vocab.n_prefix else "")


def target_text(example: dict, vocab: PlanningVocab | None) -> str:
    """The target of a typed example (see the module docstring); EOS is added by :func:`encode`."""
    if vocab is None:
        return "".join(step + "\n" for step in example["steps"]) + ANSWER_PREFIX + example["answer"] + "\n"
    general = vocab.block_text(PREFIX) if vocab.n_prefix else ""
    out = ""
    for step, types in zip(example["steps"], example["types"]):
        if vocab.n_special:
            for name in types:
                if name not in vocab.types:
                    raise PlanningTokenError(f"step type {name!r} is not in the planning vocabulary "
                                             f"(types: {', '.join(vocab.types)})")
            blocks = "".join(vocab.block_text(t) for t in (types or [ASSIGNMENT]))
        else:
            blocks = ""
        out += general + blocks + " " + step + "\n"
    answer_block = vocab.block_text(ANSWER) if vocab.n_special else ""
    return out + general + answer_block + " " + ANSWER_PREFIX + example["answer"] + "\n"


def encode(tokenizer, example: dict, vocab: PlanningVocab | None, eos_token_id: int) -> LMExample:
    """``(ids, labels)``: source ids (labels -100) + target ids + EOS (labelled)."""
    source = tokenizer(source_text(example["question"]), add_special_tokens=False)["input_ids"]
    target = tokenizer(target_text(example, vocab), add_special_tokens=False)["input_ids"] + [int(eos_token_id)]
    return LMExample(source + target, [-100] * len(source) + target)


def extract_answer(text: str) -> str | None:
    """The text after the last ``The answer is:`` (stripped of planning tokens and a final period)."""
    found = _ANSWER_RE.findall(re.sub(r"<[a-z][a-z0-9]*_\d+>", "", text))
    return found[-1].strip().rstrip(".").strip() if found else None
