"""Problems, the Task interface and the task registry.

A task turns data files into :class:`Problem` rows, a problem into chat messages, a completion into an
answer (:meth:`Task.extract`) and a completion into a verdict (:meth:`Task.check`).

Data is read with the ``datasets`` library, from the first of: an explicit ``path`` (the CLI's
``--data``); ``$GUIDEDECODE_DATA``; the default data directory :data:`DEFAULT_DATA_DIR`
(``$GUIDEDECODE_CACHE/data``, else ``~/.cache/guidedecode/data``; a task's files lie there under the
relative paths of :attr:`Task.files`, e.g. ``gsm8k/test.jsonl``); else the task's dataset on the Hugging
Face Hub by its real id (:attr:`Task.hub`, e.g. ``openai/gsm8k``), the path a user with a network and a
fresh clone gets.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from guidedecode import validation
from guidedecode.errors import TaskError
from guidedecode.tasks.checker import MathChecker, default_checker
from guidedecode.tasks.extract import extract_answer

__all__ = [
    "HubSource", "MathTask", "Problem", "Task", "check_lengths", "data_dir", "get_task", "list_tasks", "read_hub_rows",
    "read_rows", "register_task",
]


@dataclass(frozen=True)
class Problem:
    """One evaluation item: ``answer`` is the gold answer as text; ``meta`` holds task-specific fields."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


#: The data dir used when neither a path nor ``$GUIDEDECODE_DATA`` is given (next to the converted models).
DEFAULT_DATA_DIR = Path(os.environ.get("GUIDEDECODE_CACHE") or Path.home() / ".cache" / "guidedecode") / "data"


def data_dir() -> Path:
    """``$GUIDEDECODE_DATA``, else :data:`DEFAULT_DATA_DIR`."""
    env = os.environ.get("GUIDEDECODE_DATA")
    if env:
        return Path(env)
    return DEFAULT_DATA_DIR


@dataclass(frozen=True)
class HubSource:
    """A task split on the Hugging Face Hub: ``datasets.load_dataset(id, config, split=split)``
    (``split`` may join several with ``+``)."""

    id: str
    config: str | None
    split: str


def read_hub_rows(source: HubSource) -> list[dict[str, Any]]:
    """Rows of a Hub dataset split through ``datasets`` (downloads once, then its cache)."""
    import datasets  # heavy; only needed when loading

    dataset = datasets.load_dataset(source.id, source.config, split=source.split)
    return dataset.to_list()


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a local JSON-array, JSONL or gzipped JSONL file, read through ``datasets``."""
    if not path.is_file():
        raise TaskError(f"data file not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(64).strip()
    if head in (b"", b"[]", b"{}"):
        raise TaskError(f"data file {path} holds no rows (it is empty)")
    import datasets  # heavy; only needed when loading

    # Local files are small: the "Generating train split" bar is noise (and would land on stderr
    # in front of one-line CLI errors on a cold cache), so it is switched off while reading.
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for malformed files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TaskError(f"cannot read data file {path}: {first_line}") from error
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return dataset.to_list()


class Task:
    """Base class: subclasses set the class attributes and implement :meth:`to_problem`.

    ``files`` maps split names to paths relative to the data dir; ``answer_kind`` picks the extractor
    (see :func:`guidedecode.tasks.extract.extract_answer`); ``instruction`` heads the user message.
    """

    name: ClassVar[str] = ""
    files: ClassVar[dict[str, str]] = {}
    hub: ClassVar[dict[str, HubSource]] = {}
    answer_kind: ClassVar[str] = "math"
    instruction: ClassVar[str] = ""

    # -- loading ------------------------------------------------------------------------------

    def load(
        self, path: str | os.PathLike | None = None, *, split: str = "test", limit: int | None = None
    ) -> list[Problem]:
        """Problems of ``split`` from ``path`` (a file, or a directory in the data-dir layout or
        holding the split's file), else the data dir, else the Hub (module docstring); the first
        ``limit`` when given."""
        validation.optional(validation.integer, f"{self.name}: limit", limit, minimum=0, error=TaskError)
        file, rows = self.read(path, split)
        problems = []
        for index, row in enumerate(rows):
            try:
                problem = self.to_problem(row, index, file)
            except KeyError as error:
                raise TaskError(f"{self.name}: row {index} of {file} has no field {error}") from error
            if problem is not None:
                problems.append(problem)
        return problems if limit is None else problems[:limit]

    def resolve(self, path: str | os.PathLike | None, split: str) -> Path:
        """The data file for ``split`` under ``path`` (see :meth:`load`)."""
        if path is not None and Path(path).is_file():
            return Path(path)
        if split not in self.files:
            raise TaskError(f"{self.name}: unknown split {split!r}; known splits: {', '.join(self.files)}")
        relative = Path(self.files[split])
        if path is None:
            candidates = [data_dir() / relative]
        elif not Path(path).exists():
            raise TaskError(f"{self.name}: data path {str(path)!r} does not exist (give a {Path(relative).suffix} "
                            f"file or a directory holding {relative})")
        else:
            candidates = [Path(path) / relative, Path(path) / relative.name]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise TaskError(f"{self.name}: data file not found: {candidates[0]} (set GUIDEDECODE_DATA or pass path=)")

    def read(self, path: str | os.PathLike | None, split: str) -> tuple[Path, list[dict[str, Any]]]:
        """``(source, rows)`` of ``split``: the local file when a path or ``$GUIDEDECODE_DATA`` is
        given or the default data dir has it, else the Hub dataset. ``source`` is the local file, or
        for Hub rows the split's file name in the data-dir layout (so problem ids do not change)."""
        given = path is not None or bool(os.environ.get("GUIDEDECODE_DATA"))
        if given or split not in self.files or (DEFAULT_DATA_DIR / self.files[split]).is_file():
            file = self.resolve(path, split)
            return file, read_rows(file)
        local = DEFAULT_DATA_DIR / self.files[split]
        source = self.hub.get(split)
        where = (f"pass a data file or directory (--data / path=), set $GUIDEDECODE_DATA, or put the "
                 f"data dir at {DEFAULT_DATA_DIR}")
        if source is None:
            raise TaskError(f"{self.name}: no data for split {split!r}: {local} does not exist and this "
                            f"split has no Hugging Face Hub copy; {where}")
        try:
            rows = [self.from_hub(row) for row in read_hub_rows(source)]
        except Exception as error:  # datasets/huggingface_hub raise many types (offline, 404, ...)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TaskError(
                f"{self.name}: no data for split {split!r}: {local} does not exist and the Hugging Face "
                f"Hub dataset {source.id!r} (config {source.config!r}, split {source.split!r}) could not be "
                f"loaded ({type(error).__name__}: {first_line}; offline? HF_HUB_OFFLINE is "
                f"{os.environ.get('HF_HUB_OFFLINE', 'unset')}); {where}"
            ) from error
        return Path(self.files[split]), rows

    def from_hub(self, row: dict[str, Any]) -> dict[str, Any]:
        """A Hub row in the local file's format (identity where both are the same)."""
        return row

    def to_problem(self, row: dict[str, Any], index: int, source: Path) -> Problem | None:
        """One data row as a Problem (None drops the row, e.g. outside the split's id range)."""
        raise NotImplementedError

    # -- prompting ----------------------------------------------------------------------------

    def prompt(self, problem: Problem) -> str:
        """The user message: the task's instruction, a blank line, the question."""
        return f"{self.instruction}\n\n{problem.question}"

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages for ``tokenizer.apply_chat_template``."""
        return [{"role": "user", "content": self.prompt(problem)}]

    # -- scoring ------------------------------------------------------------------------------

    def extract(self, completion: str) -> str | None:
        """The answer the completion states, or None."""
        return extract_answer(completion, self.answer_kind)

    def check(self, completion: str, problem: Problem) -> bool:
        """Whether the completion answers the problem correctly."""
        return self.check_many([completion], [problem])[0]

    def check_many(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[bool]:
        """:meth:`check` over aligned lists (subclasses batch the expensive part)."""
        check_lengths(self.name, completions, problems)
        return [self.extract(c) == p.answer for c, p in zip(completions, problems)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class MathTask(Task):
    """A task whose answers are checked with math-verify (:class:`~guidedecode.tasks.checker.MathChecker`).

    ``checker``: the checker to use; by default the process-wide one (one worker, 5 s per pair).
    """

    def __init__(self, *, checker: MathChecker | None = None):
        self._checker = checker

    @property
    def checker(self) -> MathChecker:
        if self._checker is None:
            self._checker = default_checker()
        return self._checker

    def check_many(self, completions: Sequence[str], problems: Sequence[Problem]) -> list[bool]:
        """Extract each answer, then verify all (gold, answer) pairs in one batch through the pool."""
        check_lengths(self.name, completions, problems)
        return self.checker.verify_many([(p.answer, self.extract(c)) for c, p in zip(completions, problems)])


def check_lengths(name: str, completions: Sequence, problems: Sequence) -> None:
    """Raise TaskError unless there is one completion (a string) per problem."""
    if isinstance(completions, str):
        raise TaskError(f"{name}: completions must be a list of strings, got one string")
    if len(completions) != len(problems):
        raise TaskError(f"{name}: {len(completions)} completions for {len(problems)} problems")
    for index, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise TaskError(f"{name}: completion {index} must be a string, got {completion!r:.40} "
                            f"({type(completion).__name__})")
    for index, problem in enumerate(problems):
        if not isinstance(problem, Problem):
            raise TaskError(f"{name}: problem {index} must be a Problem, got {type(problem).__name__}")


_REGISTRY: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make ``cls`` available as ``get_task(cls.name)``."""
    if not cls.name:
        raise TaskError(f"task class {cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def get_task(name: str, **opts: Any) -> Task:
    """A task instance by name; ``opts`` go to its constructor (e.g. ``level=2`` for ``synthetic``)."""
    if name not in _REGISTRY:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}")
    cls = _REGISTRY[name]
    try:
        inspect.signature(cls).bind(**opts)
    except TypeError as error:
        raise TaskError(f"task {name!r}: bad options {sorted(opts)}: {error}") from error
    return cls(**opts)


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_REGISTRY)
