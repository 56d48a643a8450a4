"""The benchmark tasks over the files in the data dir, or their Hugging Face Hub datasets.

| task | splits | gold ``Problem.answer`` | checked by | Hub dataset (3) |
|---|---|---|---|---|
| ``gsm8k`` | train, test | text after ``####``, commas removed | math-verify | ``openai/gsm8k`` (main) |
| ``math500`` | test | ``answer`` (LaTeX) | math-verify | ``HuggingFaceH4/MATH-500`` |
| ``humaneval`` | test | canonical solution | sandbox: prompt + completion, ``test``, ``check(entry_point)`` | ``openai/openai_humaneval`` |
| ``mbpp`` | test, prompt, validation, train, all (1) | reference code | sandbox: completion, setup, asserts | ``google-research-datasets/mbpp`` (full) |
| ``strategyqa`` | train, test (memreason); dev, orig-train (eladsegal) (2) | ``"yes"``/``"no"`` | exact match | none |
| ``commonsenseqa`` | test | option letter | exact match | ``tau/commonsense_qa`` (validation) |
| ``truthfulqa`` | train, test | option letter | exact match | none |

(1) by ``task_id``: test 11-510, prompt 1-10, validation 511-600, train 601-974, all 1-974.
(2) memreason: the 2290 official train questions re-split, with labelled steps; eladsegal: the
original format, a 90/10 split of the same questions.
(3) used when no local copy is given or found (:meth:`guidedecode.tasks.base.Task.read`). The
memreason re-splits (StrategyQA with step labels, TruthfulQA) exist only as files in the
MingyuJ666/Disentangling-Memory-and-Reasoning repository. The Hub's MBPP is the google-research
copy, which differs from the data dir's in a few tasks (e.g. 341 and 642).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from guidedecode.errors import TaskError
from guidedecode.tasks.base import HubSource, MathTask, Problem, Task, check_lengths, register_task
from guidedecode.tasks.extract import extract_choice, extract_code, normalize_number

__all__ = [
    "ChoiceTask",
    "CodeTask",
    "CommonsenseQA",
    "GSM8K",
    "HumanEval",
    "MATH500",
    "MBPP",
    "StrategyQA",
    "TruthfulQA",
    "normalize_yes_no",
    "split_choices",
]

NUMBER_INSTRUCTION = (
    "Solve the following math problem step by step. "
    "End your response with 'The answer is N.' where N is the final number."
)


@register_task
class GSM8K(MathTask):
    """Grade-school math word problems; gold = the number after ``####``."""

    name = "gsm8k"
    files = {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}
    hub = {split: HubSource("openai/gsm8k", "main", split) for split in ("test", "train")}
    answer_kind = "number"
    instruction = NUMBER_INSTRUCTION

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        solution = row["answer"]
        if "####" not in solution:
            raise TaskError(f"gsm8k: row {index} of {source} has no '#### answer' line")
        gold = normalize_number(solution.rsplit("####", 1)[1])
        return Problem(f"gsm8k/{source.stem}/{index}", row["question"], gold, {"solution": solution})


@register_task
class MATH500(MathTask):
    """The 500-problem MATH test subset; gold = ``answer``, answers expected in ``\\boxed{}``."""

    name = "math500"
    files = {"test": "math500/test.jsonl"}
    hub = {"test": HubSource("HuggingFaceH4/MATH-500", None, "test")}
    answer_kind = "math"
    instruction = "Solve the following math problem step by step. Put your final answer within \\boxed{}."

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        meta = {"solution": row["solution"], "subject": row["subject"], "level": row["level"]}
        problem_id = row.get("unique_id") or f"math500/{index}"
        return Problem(problem_id, row["problem"], row["answer"], meta)


# ---------------------------------------------------------------------------------------------
# Yes/no and multiple choice


def normalize_yes_no(value: Any) -> str:
    """``True``/``"True"``/``"yes"`` -> ``"yes"``; ``False``/``"False"``/``"no"`` -> ``"no"``."""
    text = str(value).strip().lower()
    if text in ("true", "yes"):
        return "yes"
    if text in ("false", "no"):
        return "no"
    raise TaskError(f"not a yes/no answer: {value!r}")


_STEP_RE = re.compile(r"^\[(rag|reason)\][^:]*:\s*", re.IGNORECASE)
_STEP_LABELS = {"rag": "memory", "reason": "reason"}


def _labelled_step(step: str) -> tuple[str, str]:
    """``"[rag]: text"`` -> ``("memory", "text")``; ``"[reason]: ..."`` -> ``("reason", ...)``.

    The two steps tagged ``[reason] and [rag]`` take their first tag's label.
    """
    match = _STEP_RE.match(step)
    if match is None:
        raise TaskError(f"step without a [rag]/[reason] tag: {step[:60]!r}")
    return _STEP_LABELS[match.group(1).lower()], step[match.end() :].strip()


@register_task
class StrategyQA(Task):
    """Yes/no questions needing implicit multi-step knowledge.

    Reads both formats: memreason (``cot_steps`` -> ``meta["steps"]``, a list of
    ``("memory" | "reason", text)``) and the original eladsegal one (``qid``, ``facts``,
    ``decomposition``, ``evidence``). Gold is ``"yes"`` or ``"no"``.
    """

    name = "strategyqa"
    files = {
        "train": "strategyqa_memreason/StrategyQA_train_clean.json",
        "test": "strategyqa_memreason/StrategyQA_test_clean.json",
        "dev": "strategyqa/dev.json",
        "orig-train": "strategyqa/train.json",
    }
    answer_kind = "yesno"
    instruction = (
        "Answer the following yes/no question. Think step by step, "
        "then end your response with 'The answer is yes.' or 'The answer is no.'"
    )

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        gold = normalize_yes_no(row["answer"])
        if "cot_steps" in row:
            meta = {"format": "memreason", "steps": [_labelled_step(s) for s in row["cot_steps"] or []]}
            return Problem(f"strategyqa/{source.stem}/{index}", row["question"], gold, meta)
        meta = {
            "format": "original",
            "term": row.get("term"),
            "description": row.get("description"),
            "facts": list(row.get("facts") or []),
            "decomposition": list(row.get("decomposition") or []),
        }
        return Problem(row["qid"], row["question"], gold, meta)

    def prompt(self, problem: Problem) -> str:
        return f"{self.instruction}\n\nQuestion: {problem.question}"


def split_choices(text: str, letters: str = string.ascii_uppercase) -> tuple[str, list[tuple[str, str]]]:
    """``"Question: q? Options: A.x B.y"`` -> ``("q?", [("A", "x"), ("B", "y")])``.

    Option markers are looked for in order (``A.`` then ``B.`` ...), each at the start or after
    whitespace; fewer than two found gives ``(text, [])``.
    """
    starts = []
    position = 0
    for letter in letters:
        match = re.compile(rf"(?:^|(?<=\s)){letter}\.\s*").search(text, position)
        if match is None:
            break
        starts.append((letter, match.start(), match.end()))
        position = match.end()
    if len(starts) < 2:
        return text.strip(), []
    stem = re.sub(r"^\s*Question:\s*", "", text[: starts[0][1]])
    stem = re.sub(r"\s*Options:\s*$", "", stem).strip()
    choices = []
    for k, (letter, _, body_start) in enumerate(starts):
        body_end = starts[k + 1][1] if k + 1 < len(starts) else len(text)
        choices.append((letter, text[body_start:body_end].strip()))
    return stem, choices


class ChoiceTask(Task):
    """Multiple choice with a letter as gold; ``meta["stem"]``, ``meta["choices"]`` = [(letter, text)]."""

    answer_kind = "choice"
    instruction = (
        "Answer the following multiple-choice question. Think step by step, then end your response "
        "with 'The answer is X.' where X is the letter of the correct option."
    )

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        stem, choices = split_choices(row["question"])
        gold = str(row["answer"]).strip().upper()
        meta = {"stem": stem, "choices": choices}
        if row.get("cot_steps"):
            meta["steps"] = [_labelled_step(s) for s in row["cot_steps"]]
        return Problem(f"{self.name}/{source.stem}/{index}", row["question"], gold, meta)

    def prompt(self, problem: Problem) -> str:
        choices = problem.meta.get("choices")
        if not choices:
            return super().prompt(problem)
        lines = "\n".join(f"{letter}. {text}" for letter, text in choices)
        return f"{self.instruction}\n\nQuestion: {problem.meta['stem']}\n{lines}"

    def extract(self, completion: str) -> str | None:
        """The option letter (A-Z; TruthfulQA questions have up to 13 options)."""
        return extract_choice(completion, string.ascii_uppercase)

    def check_many(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[bool]:
        """The letter, looked for among the problem's own option letters, equals the gold."""
        check_lengths(self.name, completions, problems)
        verdicts = []
        for completion, problem in zip(completions, problems):
            letters = "".join(letter for letter, _ in problem.meta.get("choices") or []) or "ABCDE"
            verdicts.append(extract_choice(completion, letters) == problem.answer)
        return verdicts


@register_task
class CommonsenseQA(ChoiceTask):
    """CommonsenseQA validation questions (memreason copy), options A-E."""

    name = "commonsenseqa"
    files = {"test": "commonsenseqa_memreason/commonsense_qa_test_clean_CC.json"}
    hub = {"test": HubSource("tau/commonsense_qa", None, "validation")}

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        """``{question, choices: {label, text}, answerKey}`` -> the memreason row format."""
        options = " ".join(f"{label}.{text}" for label, text in zip(row["choices"]["label"], row["choices"]["text"]))
        return {"question": f"Question: {row['question']} Options: {options} ", "answer": row["answerKey"]}


@register_task
class TruthfulQA(ChoiceTask):
    """TruthfulQA multiple choice (memreason copy); train rows carry labelled ``meta["steps"]``."""

    name = "truthfulqa"
    files = {
        "train": "truthfulqa_memreason/truthful_qa_train_clean_CC.json",
        "test": "truthfulqa_memreason/truthful_qa_test_clean_CC.json",
    }


# ---------------------------------------------------------------------------------------------
# Code


class CodeTask(Task):
    """Programs checked by running them in the sandbox (``guidedecode.tasks.sandbox.run_program``).

    ``timeout`` (s), ``memory_mb``, ``max_output_bytes``: sandbox limits per program; ``workers``:
    programs run at once from a thread pool (default 1: the sandbox sets limits in a ``preexec_fn``,
    which is only safe with few threads in the caller).
    """

    answer_kind = "code"

    def __init__(
        self, *, timeout: float = 10.0, memory_mb: int = 1024, max_output_bytes: int = 65536, workers: int = 1
    ):
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_output_bytes = max_output_bytes
        self.workers = workers

    def program(self, code: str, problem: Problem) -> str:
        """The program to run: the candidate code, then the problem's tests."""
        raise NotImplementedError

    def run(self, code: str | None, problem: Problem) -> bool:
        """Whether ``code`` passes the problem's tests in the sandbox."""
        if code is None or not code.strip():
            return False
        from guidedecode.tasks.sandbox import run_program  # separate module; imported when first needed

        result = run_program(
            self.program(code, problem),
            timeout=self.timeout,
            memory_mb=self.memory_mb,
            max_output_bytes=self.max_output_bytes,
        )
        return result.status == "pass"

    def check_many(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[bool]:
        check_lengths(self.name, completions, problems)
        codes = [extract_code(c) for c in completions]
        if self.workers <= 1:
            return [self.run(code, problem) for code, problem in zip(codes, problems)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:  # each run waits on a subprocess
            return list(pool.map(self.run, codes, problems))


@register_task
class HumanEval(CodeTask):
    """HumanEval: complete a function from its signature and docstring."""

    name = "humaneval"
    files = {"test": "humaneval/HumanEval.jsonl.gz"}
    hub = {"test": HubSource("openai/openai_humaneval", None, "test")}
    instruction = (
        "Complete the following Python function. Reply with the whole function in one ```python code block."
    )

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        meta = {"entry_point": row["entry_point"], "test": row["test"]}
        return Problem(row["task_id"], row["prompt"], row["canonical_solution"], meta)

    def prompt(self, problem: Problem) -> str:
        return f"{self.instruction}\n\n```python\n{problem.question}```"

    def program(self, code: str, problem: Problem) -> str:
        """prompt + completion (a body, or the whole function redefining it), then ``test`` and ``check``."""
        return f"{problem.question}{code}\n\n{problem.meta['test']}\n\ncheck({problem.meta['entry_point']})\n"


_MBPP_SPLITS = {
    "test": range(11, 511),
    "prompt": range(1, 11),
    "validation": range(511, 601),
    "train": range(601, 975),
    "all": range(1, 975),
}


@register_task
class MBPP(CodeTask):
    """MBPP: write a function from a one-line description and its asserts.

    The split picks a ``task_id`` range (the standard test split is 11-510), also from a ``path``.
    """

    name = "mbpp"
    files = {split: "mbpp/mbpp.jsonl" for split in _MBPP_SPLITS}
    # all of "full", then the task_id ranges above pick the split (as for the local file)
    hub = {split: HubSource("google-research-datasets/mbpp", "full", "train+test+validation+prompt") for split in _MBPP_SPLITS}
    instruction = "Reply with the Python code in one ```python code block."

    def load(
        self, path: str | os.PathLike | None = None, *, split: str = "test", limit: int | None = None
    ) -> list[Problem]:
        if split not in _MBPP_SPLITS:
            raise TaskError(f"mbpp: unknown split {split!r}; known splits: {', '.join(_MBPP_SPLITS)}")
        ids = _MBPP_SPLITS[split]
        problems = [p for p in super().load(path, split=split) if p.meta["task_id"] in ids]
        return problems if limit is None else problems[:limit]

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem:
        meta = {
            "task_id": int(row["task_id"]),
            "test_list": list(row["test_list"]),
            "test_setup_code": row.get("test_setup_code") or "",
            "challenge_test_list": list(row.get("challenge_test_list") or []),
        }
        return Problem(f"mbpp/{row['task_id']}", row["text"], row["code"], meta)

    def prompt(self, problem: Problem) -> str:
        tests = "\n".join(problem.meta["test_list"])
        return f"{problem.question}\nYour code should pass these tests:\n\n{tests}\n\n{self.instruction}"

    def program(self, code: str, problem: Problem) -> str:
        """completion, then ``test_setup_code``, then the asserts of ``test_list``."""
        tests = "\n".join(problem.meta["test_list"])
        return f"{code}\n\n{problem.meta['test_setup_code']}\n\n{tests}\n"
