"""Tasks: loading problems, prompting, answer extraction and checking.

>>> task = get_task("gsm8k")
>>> problems = task.load(limit=8)
>>> task.check("... The answer is 18.", problems[0])
True

Tasks: gsm8k, math500, humaneval, mbpp, strategyqa, commonsenseqa, truthfulqa (data files, see
``loaders``) and synthetic (generated, see ``synthetic``). Math answers are checked with math-verify
in a process pool (:class:`MathChecker`); code runs in ``guidedecode.tasks.sandbox``.
"""

from guidedecode.tasks.base import MathTask, Problem, Task, data_dir, get_task, list_tasks, register_task
from guidedecode.tasks.checker import MathChecker, default_checker
from guidedecode.tasks.extract import (
    extract_answer,
    extract_answer_is,
    extract_boxed,
    extract_choice,
    extract_code,
    extract_gsm8k,
    extract_last_number,
    extract_yes_no,
)
from guidedecode.tasks.loaders import (
    GSM8K,
    MATH500,
    MBPP,
    ChoiceTask,
    CodeTask,
    CommonsenseQA,
    HumanEval,
    StrategyQA,
    TruthfulQA,
)
from guidedecode.tasks.synthetic import SyntheticArithmetic

__all__ = [
    "GSM8K",
    "MATH500",
    "MBPP",
    "ChoiceTask",
    "CodeTask",
    "CommonsenseQA",
    "HumanEval",
    "MathChecker",
    "MathTask",
    "Problem",
    "StrategyQA",
    "SyntheticArithmetic",
    "Task",
    "TruthfulQA",
    "data_dir",
    "default_checker",
    "extract_answer",
    "extract_answer_is",
    "extract_boxed",
    "extract_choice",
    "extract_code",
    "extract_gsm8k",
    "extract_last_number",
    "extract_yes_no",
    "get_task",
    "list_tasks",
    "register_task",
]
