"""Result files that survive a crash: JSONL appended and fsynced per batch, JSON replaced atomically.

Long jobs (eval, data collection, training) append one batch of records at a time with
:func:`append_jsonl`; :func:`read_jsonl` drops a torn (partially written) last line, so a killed
job resumes from the records it finished. :func:`write_json` writes a temporary file, fsyncs it and
renames it over the target, so readers see the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn (partially written) last line is cut off the file."""
    path = Path(path)
    if not path.exists():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except ValueError:
                break
            good_bytes += len(line)
    if good_bytes != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    return records


def append_jsonl(path: Path, records: Sequence[dict]) -> None:
    """Append ``records`` in one write, flushed and fsynced."""
    if not records:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())


def write_json(path: Path, payload: Any) -> None:
    """Atomic JSON write: temporary file, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
