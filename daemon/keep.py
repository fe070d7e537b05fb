"""Keeping finished originals for `upscaled learn` (learn.keep_mb > 0).

The daemon keeps its own link to each original it finished, in paths.learn: a hardlink where
the file system allows (no bytes copied, and people may still move or delete their file in
done/), else a copy. Nothing here depends on done/ or ever writes to people's files: the only
files this module creates, renames or deletes are its own, in paths.learn.

A kept file is named `<UTC time>-<content digest><ext>`: the time orders pruning (oldest
first; the file's mtime is the original's, shared through the hardlink, so it cannot be used),
the digest keeps the same image from being kept twice, and `upscaled learn` chooses its
held-out slice by a hash of the digest, so a re-dropped image can never be trained on and
measured on at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from core.atomic import atomic_open, fsync_dir
from imaging.images import EXTENSIONS

NAME = re.compile(r"^(\d{8}T\d{6}\d{6}Z)-([0-9a-f]{20})(\.[a-z0-9]+)$")
STAMP = "%Y%m%dT%H%M%S%fZ"


@dataclass(frozen=True)
class Kept:
    path: Path
    when: datetime
    digest: str
    size: int


def kept_files(folder: Path) -> list[Kept]:
    """The kept originals in `folder`, oldest first (anything not named by us is ignored)."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for e in entries:
        m = NAME.match(e.name)
        if not m or not e.is_file(follow_symlinks=False):
            continue
        try:
            size = e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
        when = datetime.strptime(m.group(1), STAMP).replace(tzinfo=timezone.utc)
        out.append(Kept(Path(e.path), when, m.group(2), size))
    return sorted(out, key=lambda k: (k.when, k.path.name))


def digest_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:20]


def prune(folder: Path, budget_mb: int, days: float, now: datetime | None = None) -> list[Path]:
    """Delete kept originals older than `days`, then the oldest until the rest fit `budget_mb`."""
    now = now or datetime.now(timezone.utc)
    kept = kept_files(folder)
    doomed = [k for k in kept if (now - k.when).total_seconds() > days * 86400]
    rest = [k for k in kept if k not in doomed]
    total, budget = sum(k.size for k in rest), budget_mb << 20
    for k in rest:
        if total <= budget:
            break
        doomed.append(k)
        total -= k.size
    for k in doomed:
        k.path.unlink(missing_ok=True)
    return [k.path for k in doomed]


def keep(source: Path, folder: Path, budget_mb: int, days: float, now: datetime | None = None) -> Path | None:
    """Keep `source` (a finished original, still in the work folder) in `folder`; prune.

    Returns the kept file, or None when nothing was kept (off, not an image extension we read,
    larger than the whole budget, or already kept).
    """
    if budget_mb <= 0:
        return None
    ext = source.suffix.lower()
    if ext not in EXTENSIONS:
        return None
    size = source.stat().st_size
    if size > budget_mb << 20:
        logger.info("{}: {} MB is more than learn.keep_mb ({}); not kept for learning", source.name, size >> 20, budget_mb)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    digest = digest_of(source)
    if any(k.digest == digest for k in kept_files(folder)):
        prune(folder, budget_mb, days, now)
        return None
    now = now or datetime.now(timezone.utc)
    target = folder / f"{now.strftime(STAMP)}-{digest}{ext}"
    tmp = folder / f".{target.name}.{os.getpid()}.tmp"
    try:
        os.link(source, tmp)  # the same inode: no bytes copied
        os.replace(tmp, target)
        fsync_dir(folder)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        with open(source, "rb") as src, atomic_open(target, "wb") as dst:  # another file system: a copy
            shutil.copyfileobj(src, dst, 1 << 20)
    prune(folder, budget_mb, days, now)
    return target


def keep_quietly(source: Path, folder: Path, budget_mb: int, days: float) -> None:
    """`keep`, for the daemon: keeping is a side line, so a problem is logged and never fails a job."""
    if budget_mb <= 0:
        return
    t0 = time.perf_counter()
    try:
        kept = keep(source, folder, budget_mb, days)
    except OSError as e:
        logger.warning("{}: not kept for learning ({})", source.name, e.strerror or e)
        return
    if kept is not None:
        logger.debug("kept {} for learning as {} ({:.3f} s)", source.name, kept.name, time.perf_counter() - t0)
