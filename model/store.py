"""The models folder: the only thing the trainer and the daemon share besides model/ itself.

Published checkpoints are immutable `<version>.safetensors` files; a small `current` file names
the one to serve and is replaced atomically. With nothing published, the checkpoint bundled
inside this package is served.
"""

from __future__ import annotations

import os
from pathlib import Path

from model.checkpoint import BUNDLED_DEFAULT

CURRENT = "current"


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
