"""Per-file output requests: the web page's upload asks for another scale or format for one file.

The web process writes `<status stem>-requests/<dev>-<ino>.json` (temp name, fsync, rename)
for the complete temp file in the inbox, BEFORE renaming that file to its inbox name. A rename
keeps the inode, size and mtime, and a claim is a rename too, so the daemon finds the request
by the claimed file's own identity, whatever name (`photo-1.png`) the file ended up with.
Names are never trusted: a request whose size or mtime is not the file's (an inode reused by a
file dropped by other means) is logged and removed, and that file gets the configured defaults.
The folder lies beside the status file, where only the daemon and the web process write.

Values are checked exactly as the config keys are (core.config.OutputConfig), when the web
receives them (a bad one is refused with 400 naming the field) and again when the daemon
applies them (a bad file there is ignored and logged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loguru import logger

from core.atomic import atomic_write_text
from core.config import ConfigError, OutputConfig, replace_checked

FIELDS = ("scale", "long_side", "format")  # the output.* keys one upload may set


def folder_for(status: Path) -> Path:
    """Beside the status file (data/status.json -> data/status-requests/)."""
    return status.with_name(f"{status.stem}-requests")


def _key(st: os.stat_result) -> str:
    return f"{st.st_dev}-{st.st_ino}.json"


def parse(fields: dict[str, str]) -> dict[str, Any]:
    """The form's text fields as output.* overrides ({} when none is set); ConfigError naming
    output.KEY when one is not what the config key takes."""
    req: dict[str, Any] = {}
    for key in FIELDS:
        raw = (fields.get(key) or "").strip()
        if raw in ("", "default"):
            continue
        if key == "format":
            req[key] = raw.lower()
            continue
        try:
            num = float(raw)
        except ValueError:
            raise ConfigError(f"output.{key}", "a number", raw) from None
        req[key] = int(num) if key == "long_side" and num.is_integer() else num
    apply(OutputConfig(), req)  # validates: raises ConfigError
    return req


def apply(out: OutputConfig, req: dict[str, Any]) -> OutputConfig:
    """`out` with the request's keys; scale and long_side replace each other (one or the other)."""
    if not req:
        return out
    changes = {k: req[k] for k in FIELDS if k in req}
    if "scale" in changes and "long_side" not in changes:
        changes["long_side"] = None
    if "long_side" in changes and "scale" not in changes:
        changes["scale"] = None
    return replace_checked(out, "output", changes)


def describe(req: dict[str, Any]) -> str:
    return ", ".join(f"{k} {req[k]}" for k in FIELDS if k in req)


def write(folder: Path, path: Path, req: dict[str, Any], name: str) -> Path:
    """Record `req` for the complete file at `path` (before it is renamed into the inbox)."""
    st = os.stat(path)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / _key(st)
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "name": name, "output": req}
    atomic_write_text(dest, json.dumps(record) + "\n")
    return dest


def take(folder: Path, st: os.stat_result, rel: str) -> dict[str, Any] | None:
    """The request recorded for the file whose stat is `st` (claimed as `rel`), or None. A
    request that does not match the file, or does not validate, is removed and logged."""
    path = folder / _key(st)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logger.warning("{}: unreadable upload request {} ignored ({})", rel, path.name, e)
        drop(folder, st)
        return None
    try:
        if not isinstance(record, dict) or (record.get("size"), record.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
            raise ValueError("it was written for another file (size or mtime differ)")
        req = record.get("output")
        if not isinstance(req, dict) or set(req) - set(FIELDS):
            raise ValueError("it names keys other than output.scale, long_side, format")
        apply(OutputConfig(), req)
    except ValueError as e:  # ConfigError is one
        logger.warning("{}: upload request {} ignored, the configured output applies: {}", rel, path.name, e)
        drop(folder, st)
        return None
    logger.info("{}: uploaded with a request: {}", rel, describe(req))
    return req


def file_for(folder: Path, st: os.stat_result) -> Path:
    return folder / _key(st)


def drop(folder: Path, st: os.stat_result) -> None:
    try:
        os.unlink(file_for(folder, st))
    except FileNotFoundError:
        pass
    except OSError as e:  # left behind; never applied to another file (size and mtime are checked)
        logger.warning("cannot remove the upload request {}: {}", file_for(folder, st), e.strerror or e)
