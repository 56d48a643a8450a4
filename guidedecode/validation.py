"""Checks of user input at the boundary: one function per kind of parameter.

The Python API (guides, backends, tasks, configs), the command line and config files all call
these, so a bad value gets the same clear message wherever it enters. Each check returns the
value (converted where that is safe, e.g. an ``int`` temperature to ``float``) or raises
``error`` (default :class:`~guidedecode.errors.ValidationError`) with a one-line message that
names the input and repeats the value it got::

    temperature = validation.temperature("temperature", temperature, error=StrategyError)
    out = validation.output_dir("--out", out)

:func:`click_check` turns a check into a click callback, so a bad option exits with status 2 and
``Invalid value for '--top-p': ...``.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from guidedecode.errors import GuidedecodeError, ValidationError

__all__ = [
    "choice", "click_check", "integer", "number", "optional", "output_dir", "positive_int", "probability",
    "prompts", "string", "temperature", "token_ids",
]

ErrorType = type[GuidedecodeError]


def _shown(value: Any) -> str:
    """``repr`` of the value with its type when the type is the problem (``'2' (str)``)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{text} ({type(value).__name__})"


def integer(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
            error: ErrorType = ValidationError) -> int:
    """An ``int`` (not a bool, float or string) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise error(f"{name} must be an integer, got {_shown(value)}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be <= {maximum}, got {value}")
    return value


def positive_int(name: str, value: Any, *, maximum: int | None = None, error: ErrorType = ValidationError) -> int:
    """An ``int`` >= 1."""
    return integer(name, value, minimum=1, maximum=maximum, error=error)


def number(name: str, value: Any, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, below: float | None = None, error: ErrorType = ValidationError) -> float:
    """A finite real number (int or float, not a bool or string) with inclusive ``minimum``/``maximum``
    and exclusive ``above``/``below`` bounds; returned as ``float``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be <= {maximum}, got {value}")
    if above is not None and not value > above:
        raise error(f"{name} must be > {above}, got {value}")
    if below is not None and not value < below:
        raise error(f"{name} must be < {below}, got {value}")
    return value


def temperature(name: str, value: Any, *, allow_zero: bool = False, error: ErrorType = ValidationError) -> float:
    """A sampling temperature: finite and > 0 (``allow_zero``: >= 0, where 0 means greedy)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {_shown(value)}")
    value = float(value)
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        rule = "a finite number >= 0 (0 = greedy)" if allow_zero else "a finite number > 0"
        raise error(f"{name} must be {rule}, got {value}")
    return value


def probability(name: str, value: Any, *, error: ErrorType = ValidationError) -> float:
    """A probability mass in (0, 1] (top-p: 1 keeps every token, 0 would keep none)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number in (0, 1], got {_shown(value)}")
    value = float(value)
    if not 0 < value <= 1:  # also false for NaN
        raise error(f"{name} must be in (0, 1], got {value}")
    return value


def string(name: str, value: Any, *, allow_empty: bool = False, error: ErrorType = ValidationError) -> str:
    """A ``str`` (non-blank unless ``allow_empty``)."""
    if not isinstance(value, str):
        raise error(f"{name} must be a string, got {_shown(value)}")
    if not allow_empty and not value.strip():
        raise error(f"{name} must not be empty")
    return value


def choice(name: str, value: Any, choices: Sequence[str], *, error: ErrorType = ValidationError) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise error(f"unknown {name} {value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def optional(check: Callable, name: str, value: Any, **options) -> Any:
    """``None``, or ``value`` passed through ``check``."""
    return None if value is None else check(name, value, **options)


def prompts(name: str, value: Any, *, error: ErrorType = ValidationError) -> list:
    """A list of prompts, each a string or a sequence of token ids.

    A bare string is refused (it would be taken as one prompt per character), and so is a flat list
    of ints (one prompt's ids: wrap it as ``[ids]``).
    """
    if isinstance(value, (str, bytes)):
        raise error(f"{name} must be a list of prompts, got one string: wrap it as [{_shown(value).split(' (')[0]}]")
    if not isinstance(value, Sequence):
        raise error(f"{name} must be a list of prompts (strings or token-id lists), got {type(value).__name__}")
    items = list(value)
    for index, item in enumerate(items):
        if isinstance(item, str):
            continue
        if isinstance(item, numbers.Integral):
            raise error(f"{name} is a flat list of token ids: pass one prompt's ids as [ids], not ids")
        if not isinstance(item, Sequence) and not hasattr(item, "tolist"):
            raise error(f"{name}[{index}] must be a string or a list of token ids, got {type(item).__name__}")
    return items


def token_ids(name: str, ids: Sequence[Any], vocab_size: int, *, error: ErrorType = ValidationError) -> list[int]:
    """Token ids as ints, each in ``[0, vocab_size)``."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    out = []
    for position, token in enumerate(values):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise error(f"{name}: token id at position {position} is not an integer, got {_shown(token)}")
        if not 0 <= token < vocab_size:
            raise error(f"{name}: token id {token} at position {position} is outside the vocabulary "
                        f"[0, {vocab_size})")
        out.append(int(token))
    return out


def output_dir(name: str, path: Any, *, error: ErrorType = ValidationError) -> Path:
    """A directory results can be written to: created when missing (empty, so it never blocks a rerun).

    Refused: a path that is a file, lies under a file, or cannot be created or written.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise error(f"{name} must be a directory path, got {_shown(path)}")
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise error(f"{name} {str(directory)!r} is a file, not a directory")
    ancestor = directory
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise error(f"{name} {str(directory)!r} lies under {str(ancestor)!r}, which is a file")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        raise error(f"{name} {str(directory)!r} is not writable ({exc.strerror or exc})") from None
    return directory


def click_check(check: Callable, **options) -> Callable:
    """A click option callback running ``check(option_name, value, **options)`` (``None`` passes):
    a bad value exits with status 2 and a message naming the option."""

    def callback(ctx, param, value):
        import click

        if value is None:
            return None
        try:
            flag = next((o for o in param.opts if o.startswith("--")), param.opts[0])
            return check(flag, value, **options)
        except GuidedecodeError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback
