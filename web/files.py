"""What the daemon's folders hold, for the Files and Compare views, and Retry.

Everything here is read from what the daemon already writes: the status file's `recent` list
(the last files done, with sizes, stage times and the model that made them), the outbox, done/,
failed/ with each `NAME.error.json`, and the inbox (files waiting). The only write is Retry:
a failed file renamed back into the inbox, where the daemon takes it like any new file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from core.atomic import atomic_open, fsync_dir, numbered, rename_noreplace
from core.config import Config
from daemon.status import read as read_status
from daemon.status import reason_class
from web.security import Refused, clean_relative, resolve_under

ERROR_SUFFIX = ".error.json"
LIST_LIMIT = 200  # rows per list on the page
WALK_LIMIT = 20000  # directory entries looked at per listing, so a huge outbox cannot stall the page
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass(frozen=True)
class Folders:
    inbox: Path
    outbox: Path
    done: Path
    failed: Path
    work: Path
    models: Path
    runs: Path
    status: Path
    originals: str  # daemon.originals: where a processed input's original is (done/, the inbox, nowhere)

    @classmethod
    def of(cls, cfg: Config) -> "Folders":
        p = cfg.path
        return cls(p("inbox"), p("outbox"), p("done"), p("failed"), p("work"), p("models"), p("runs"), p("status"),
                   cfg.daemon.originals)


def status(folders: Folders) -> dict[str, Any] | None:
    return read_status(folders.status)


def _walk(root: Path, skip: Path | None = None, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES):
    """(relative path, stat) of regular files under `root`: hidden names, symlinks and `skip`
    (the work folder inside the inbox) left out, at most WALK_LIMIT entries looked at."""
    seen = 0
    stack = [root]
    while stack and seen < WALK_LIMIT:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if e.name.startswith(".") or (skip is not None and Path(e.path) == skip):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False) and (suffixes is None or e.name.lower().endswith(suffixes)):
                yield Path(e.path).relative_to(root).as_posix(), st


def rel_to(root: Path, path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_dims_cache: dict[tuple[str, int, int], list[int] | None] = {}


def _dims(path: Path) -> list[int] | None:
    """An image's width and height from its header (output.scale may make any size), cached."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _dims_cache:
        from PIL import Image

        from imaging.images import READ_FORMATS

        try:
            with Image.open(path, formats=READ_FORMATS) as im:
                _dims_cache[key] = list(im.size)
        except Exception:  # noqa: BLE001 - not an image we can read: no size shown
            _dims_cache[key] = None
        if len(_dims_cache) > 4096:
            _dims_cache.clear()
    return _dims_cache[key]


def original_of(folders: Folders, input_rel: str | None, output_rel: str) -> str | None:
    """Where the input of an output lies now, relative to done/ (or to the inbox with
    daemon.originals: keep); None when it is not kept. A name taken in done/ made the newcomer
    name-1.ext, so the candidates are tried, newest first."""
    base = folders.inbox if folders.originals == "keep" else folders.done
    if folders.originals == "delete":
        return None
    if input_rel:
        names = [Path(input_rel)]
    else:  # an older output: the same path and stem, any image type
        stem = Path(output_rel).with_suffix("")
        names = [stem.with_suffix(s) for s in IMAGE_SUFFIXES]
    found = []
    for name in names:
        for n in range(10):
            cand = base / numbered(name, n)
            with contextlib.suppress(OSError):
                st = cand.stat()
                if cand.is_file():
                    found.append((st.st_ctime, cand))
    if not found:
        return None
    return max(found)[1].relative_to(base).as_posix()


def done_rows(folders: Folders, st: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The files done, newest first: the status's recent list (with stage times and model), then
    other outputs in the outbox by modification time."""
    rows: list[dict[str, Any]] = []
    listed: set[str] = set()
    for e in reversed((st or {}).get("recent") or []):
        out = rel_to(folders.outbox, e.get("output"))
        size = e.get("size") or []
        row = {
            "file": e.get("file"), "state": "done", "time": e.get("time"), "model_version": e.get("model_version"),
            "output": out, "input_bytes": e.get("input_bytes"),
            "output_bytes": _size(folders.outbox / out) if out else None,
            "size_in": size if len(size) == 2 else None,
            "size_out": _dims(folders.outbox / out) if out else None,
            "seconds": e.get("seconds") or {},
        }
        if out:
            listed.add(out)
            row["original"] = original_of(folders, e.get("file"), out)
            row["in_outbox"] = row["output_bytes"] is not None
        rows.append(row)
    older = sorted(((s.st_mtime, rel, s.st_size) for rel, s in _walk(folders.outbox) if rel not in listed), reverse=True)
    for mtime, rel, nbytes in older[: max(0, LIST_LIMIT - len(rows))]:
        rows.append({"file": None, "state": "done", "time": _iso(mtime), "model_version": None, "output": rel,
                     "input_bytes": None, "output_bytes": nbytes, "size_in": None, "size_out": None, "seconds": {},
                     "original": original_of(folders, None, rel), "in_outbox": True})
    return rows[:LIST_LIMIT]


def failed_rows(folders: Folders) -> list[dict[str, Any]]:
    """Files in failed/, each with what its NAME.error.json says, newest first."""
    rows = []
    for rel, s in _walk(folders.failed, suffixes=(ERROR_SUFFIX,)):
        try:
            rec = json.loads((folders.failed / rel).read_text())
        except (OSError, ValueError):
            rec = {}
        file_rel = rel[: -len(ERROR_SUFFIX)]
        reason = str(rec.get("reason") or "unknown (unreadable error record)")
        rows.append({"file": file_rel, "state": "failed", "reason": reason, "class": reason_class(reason),
                     "stage": rec.get("stage"), "time": rec.get("time") or _iso(s.st_mtime),
                     "model_version": rec.get("model_version"), "exists": (folders.failed / file_rel).is_file(),
                     "_mtime": s.st_mtime})
    rows.sort(key=lambda r: r.pop("_mtime"), reverse=True)
    return rows[:LIST_LIMIT]


def queued_rows(folders: Folders, st: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Files waiting in the inbox (not yet claimed), and those the daemon is retrying."""
    rows = [{"file": r.get("file"), "state": "retrying", "reason": r.get("problem"), "attempts": r.get("attempts"),
             "next_in_s": r.get("next_in_s")} for r in (st or {}).get("retrying") or []]
    waiting = sorted(_walk(folders.inbox, skip=folders.work, suffixes=None), key=lambda rs: rs[1].st_mtime)
    for rel, s in waiting[:LIST_LIMIT]:
        rows.append({"file": rel, "state": "queued", "input_bytes": s.st_size, "time": _iso(s.st_mtime)})
    return rows


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _move_into(src: Path, dst: Path) -> Path:
    """Rename `src` to `dst` or the first free `name-N.ext`, never replacing anything; across file
    systems (or bind mounts under systemd), a copy published the same way, then the unlink."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for n in range(100000):
        cand = numbered(dst, n)
        try:
            rename_noreplace(src, cand)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            with open(src, "rb") as f, atomic_open(dst, "wb", conflict="suffix") as out:
                shutil.copyfileobj(f, out, 1 << 20)
            os.unlink(src)
            return out.published
        fsync_dir(cand.parent)
        return cand
    raise FileExistsError(errno.EEXIST, "no free name", str(dst))


def retry(folders: Folders, rel: str) -> Path:
    """Put failed/REL back into the inbox (same relative path; name-1.ext if taken there) and
    drop its error record. The record is moved aside first, so that a new record the daemon
    writes if the file fails again is never the one removed."""
    rel = clean_relative(rel)
    if rel.endswith(ERROR_SUFFIX):
        raise Refused(400, "name the failed file, not its error record")
    src = resolve_under(folders.failed, rel)
    if Path(os.path.realpath(folders.failed)) / rel != src:
        raise Refused(404, "no such file")  # reached through a symlink: not a file of failed/
    record = src.with_name(src.name + ERROR_SUFFIX)
    aside = record.with_name(f".{record.name}.{secrets.token_hex(4)}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.rename(record, aside)
    try:
        dest = _move_into(src, folders.inbox / rel)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, record)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside)
    logger.info("retry: {} moved from {} back into the inbox as {}", rel, folders.failed, dest)
    return dest


def throughput_history(samples: list[tuple[float, int]], st: dict[str, Any] | None, now: float | None = None,
                       keep: float = 900.0) -> list[tuple[float, int]]:
    """Append (time, processed) from the status to `samples` (the page's throughput chart),
    dropping samples older than `keep` seconds or from before a daemon restart."""
    now = time.time() if now is None else now
    if st and isinstance(st.get("processed"), int):
        if samples and st["processed"] < samples[-1][1]:
            samples.clear()  # the daemon restarted: its counter started over
        if not samples or now - samples[-1][0] >= 5.0 or st["processed"] != samples[-1][1]:
            samples.append((now, st["processed"]))
    while samples and now - samples[0][0] > keep:
        samples.pop(0)
    return samples
