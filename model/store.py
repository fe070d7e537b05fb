"""The models folder: the only thing the trainer and the daemon share besides model/ itself.

Published checkpoints are immutable `<version>.safetensors` files; a small `current` file names
the one to serve and is replaced atomically, so a reader sees either the old or the new name,
never a half-written file. `history` lists the names `current` has pointed to, oldest first,
for rollback. With nothing published, the checkpoint bundled inside this package is served.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.atomic import atomic_open, atomic_write_text
from model.checkpoint import BUNDLED_DEFAULT, CheckpointInfo, load_checkpoint, read_info

CURRENT = "current"
HISTORY = "history"
SUFFIX = ".safetensors"


def current_checkpoint(models_dir: str | os.PathLike) -> Path | None:
    """The published checkpoint the `current` pointer names, or None when nothing is published."""
    pointer = Path(models_dir) / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        return None
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"{pointer}: does not name a checkpoint file in {models_dir} (content {name!r})")
    return Path(models_dir) / name


def select_checkpoint(explicit: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """Which checkpoint to serve and why: an explicit path, the published one, or the bundled default."""
    if explicit:
        return Path(explicit), "configured"
    if models_dir is not None:
        published = current_checkpoint(models_dir)
        if published is not None:
            return published, "published"
    return BUNDLED_DEFAULT, "bundled"


def history(models_dir: str | os.PathLike) -> list[str]:
    try:
        return [line for line in (Path(models_dir) / HISTORY).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def set_current(models_dir: str | os.PathLike, name: str) -> None:
    """Point `current` at an already published file (atomically), and remember it in `history`."""
    models_dir = Path(models_dir)
    if not (models_dir / name).is_file():
        raise FileNotFoundError(f"{models_dir / name}: no such published checkpoint")
    past = [n for n in history(models_dir) if n != name] + [name]
    atomic_write_text(models_dir / HISTORY, "\n".join(past[-100:]) + "\n")
    atomic_write_text(models_dir / CURRENT, name + "\n")


def step_back(models_dir: str | os.PathLike) -> str | None:
    """Drop the current version from the history and point `current` at the one before it that
    is still kept; None (nothing changed) when there is none: the bundled default comes next."""
    models_dir = Path(models_dir)
    past = history(models_dir)
    cur = current_checkpoint(models_dir)
    if cur is not None and past and past[-1] == cur.name:
        past = past[:-1]
    kept = [n for n in past if (models_dir / n).is_file()]
    if not kept:
        return None
    atomic_write_text(models_dir / HISTORY, "\n".join(kept) + "\n")
    atomic_write_text(models_dir / CURRENT, kept[-1] + "\n")
    return kept[-1]


def clear_current(models_dir: str | os.PathLike) -> None:
    """Serve the bundled default: no `current` pointer, an empty history."""
    models_dir = Path(models_dir)
    for name in (CURRENT, HISTORY):
        (models_dir / name).unlink(missing_ok=True)


def published(models_dir: str | os.PathLike) -> list[tuple[Path, CheckpointInfo]]:
    """Readable published checkpoints, oldest first (unreadable files are skipped)."""
    out = []
    for p in Path(models_dir).glob(f"*{SUFFIX}"):
        if p.name.startswith("."):
            continue
        try:
            out.append((p, read_info(p)))
        except Exception:  # a damaged file in the folder must not hide the others
            continue
    return sorted(out, key=lambda pi: (pi[1].created, pi[0].name))


def prune(models_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently published versions; the current one is always kept.
    Imported models are never deleted: each was an operator's explicit choice (delete the file)."""
    cur = current_checkpoint(models_dir)
    rank = {name: i for i, name in enumerate(history(models_dir))}
    versions = sorted([pi for pi in published(models_dir) if not pi[1].imported], key=lambda pi: rank.get(pi[0].name, -1))  # stable: by creation otherwise
    doomed = [p for p, _ in versions[: max(0, len(versions) - keep)] if cur is None or p.name != cur.name]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def publish(models_dir: str | os.PathLike, checkpoint: str | os.PathLike, keep: int = 5) -> Path:
    """Verify `checkpoint`, copy it into the models folder as an immutable version, make it current.

    Raises CheckpointError (nothing changes) if the file is not a valid checkpoint.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    _, info = load_checkpoint(checkpoint)
    target = models_dir / f"{info.version}{SUFFIX}"
    if not target.exists():
        with open(checkpoint, "rb") as src, atomic_open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    set_current(models_dir, target.name)
    prune(models_dir, keep)
    return target
