"""Result files that survive a crash: JSONL appended and fsynced per batch, JSON replaced atomically.

The one module that reads and writes the records of long jobs (eval, Q♯ data collection, the
rationale pipeline). The rules, so a killed job resumes with every record exactly once:

* :func:`append_jsonl` writes a batch of lines in one write, then flushes and fsyncs.
* The tail after the last newline is the only place a kill can leave damage. If it is a complete
  JSON value it is a record whose newline was lost: the newline is added (never glued to the next
  append). Otherwise it is a torn write of the last batch: it is cut off (that batch is redone).
  Both :func:`read_jsonl` and :func:`append_jsonl` repair the tail first.
* Any other damage (a garbage or ``null`` line in the middle, a record without its key, a key
  twice) is refused with :class:`~guidedecode.errors.RecordsError` naming the file and the line:
  records are never dropped or doubled silently.
* :func:`check_complete` verifies at the end of a run that every expected record is there.
* :func:`write_json` / :func:`write_jsonl` / :func:`atomic_write_text` write a temporary file,
  fsync it and rename it over the target, so readers see the old or the new file, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from guidedecode.errors import GuidedecodeError, RecordsError

ErrorType = type[GuidedecodeError]


def read_jsonl(path: Path, *, key: str | None = None, repair: bool = True,
               error: ErrorType = RecordsError) -> list[dict]:
    """The records (JSON objects) of a JSONL file, in order; ``[]`` when the file does not exist.

    ``repair``: fix the tail as described in the module docstring (for files this library appends
    to); without it (input files) a damaged last line is refused like any other. ``key``: every
    record must have this field, and no two records the same value of it. Blank lines are skipped.
    """
    path = Path(path)
    if not path.exists():
        return []
    if repair:
        repair_tail(path)
    records: list[dict] = []
    seen: dict[Any, int] = {}
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
                raise error(f"{path} line {number} is not valid JSON ({reason}): the file is damaged; "
                            f"repair or delete that line, then rerun") from None
            if not isinstance(record, dict):
                raise error(f"{path} line {number} is not a JSON object (got {json.dumps(record)[:40]}): "
                            f"the file is damaged; repair or delete that line, then rerun")
            if key is not None:
                if key not in record:
                    raise error(f"{path} line {number} has no {key!r} field: the file is damaged; "
                                f"repair or delete that line, then rerun")
                value = record[key]
                if not isinstance(value, (str, int, float, bool, type(None))):
                    raise error(f"{path} line {number}: {key!r} must be a string or number, got {value!r}")
                if value in seen:
                    raise error(f"{path} line {number} repeats {key} {value!r} of line {seen[value]}: "
                                f"delete one of the two lines, then rerun")
                seen[value] = number
            records.append(record)
    return records


def repair_tail(path: Path) -> None:
    """Make the file end with a newline: keep a complete last line (add its newline), cut a torn one."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail, start = b"", 0
        position = size
        while position > 0:  # read backwards to the last newline
            step = min(1 << 16, position)
            position -= step
            handle.seek(position)
            block = handle.read(step)
            cut = block.rfind(b"\n")
            if cut >= 0:
                tail, start = block[cut + 1:] + tail, position + cut + 1
                break
            tail = block + tail
        if not tail:
            return
        try:
            json.loads(tail)
            complete = bool(tail.strip())
        except ValueError:
            complete = False
        if complete:
            handle.seek(size)
            handle.write(b"\n")
        else:
            handle.truncate(start)
        handle.flush()
        os.fsync(handle.fileno())


def append_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Append ``records`` in one write, flushed and fsynced (after repairing the file's tail)."""
    if not records:
        return
    path = Path(path)
    if path.exists():
        repair_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def check_complete(path: Path, records: Iterable[dict], expected: Sequence, *, key: str = "id",
                   error: ErrorType = RecordsError) -> None:
    """Raise ``error`` unless a record exists for every value in ``expected`` (the end-of-run check)."""
    have = {record.get(key) for record in records}
    missing = [value for value in expected if value not in have]
    if missing:
        raise error(f"{path} lacks {len(missing)} of {len(expected)} expected records ({key} {missing[0]!r} "
                    f"first): the run is incomplete; rerun the same command to resume it")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` through a temporary file in the same directory: fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Replace ``path`` atomically with one line per row."""
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write: temporary file, fsync, ``os.replace``."""
    atomic_write_text(path, json.dumps(payload, indent=2))


def read_json(path: Path, *, error: ErrorType = RecordsError) -> Any:
    """The JSON value in ``path``; a damaged file is an ``error`` that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        reason = f"line {exc.lineno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise error(f"{path} is not valid JSON ({reason}): repair or delete it") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
