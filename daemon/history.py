"""The daemon's record of what it made: one JSON line per finished input, beside the status file.

Each line says which input (its inbox path), where its original went (done/ path, with the
`-1` a name clash gave it), which output it made, sizes, stage times and the model. The status
file's `recent` list goes with the daemon; this file stays, so the web page can pair an output
with its own original (never by guessing from names) and show an older output's details after a
restart. Lines are appended (O_APPEND: whole lines); a reader skips a torn last line. Past MAX_BYTES the newest half is kept (temp file,
fsync, rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loguru import logger

from core.atomic import atomic_write_bytes

MAX_BYTES = 2_000_000  # ~8000 lines


def path_for(status: Path) -> Path:
    """Beside the status file (data/status.json -> data/status-history.jsonl): the daemon's own
    folder, not the inbox's work folder, which must hold nothing once the inbox is done."""
    return status.with_name(f"{status.stem}-history.jsonl")


def append(path: Path, entry: dict[str, Any]) -> None:
    """Add one record; a failure to write it is logged, never fatal (the output is made)."""
    line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            if end and os.pread(fd, 1, end - 1) != b"\n":
                line = b"\n" + line  # after a line torn by a crash: start a fresh one
            os.write(fd, line)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > MAX_BYTES:
            _trim(path)
    except OSError as e:
        logger.warning("cannot record {} in {}: {}", entry.get("file"), path, e.strerror or e)


def _trim(path: Path) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    keep = lines[len(lines) // 2:]
    atomic_write_bytes(path, b"".join(keep))  # a line appended meanwhile by another daemon is lost


def read(path: Path) -> list[dict[str, Any]]:
    """All records, oldest first; unreadable lines are skipped."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out = []
    for raw in data.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue  # a torn line (a crash mid-append) or junk
        if isinstance(entry, dict):
            out.append(entry)
    return out
