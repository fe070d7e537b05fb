"""Helpers for the daemon tests: a tiny real checkpoint, a config file, images, polling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import yaml
from PIL import Image

from core.config import Config, from_dict
from model.checkpoint import save_checkpoint
from model.generator import Generator, GeneratorConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = GeneratorConfig(scale=4, channels=8, blocks=1)


def tiny_checkpoint(path: Path, cfg: GeneratorConfig = TINY) -> Path:
    if not path.exists():
        save_checkpoint(path, Generator(cfg).eval())
    return path


def settings(root: Path, checkpoint: Path, **sections: dict) -> dict:
    """Config dict for a data folder at `root` (fast timings; override per section)."""
    data = {
        "model": {"path": str(checkpoint), "for_jpeg": None},  # one model for every file (test_daemon_e2e tests the rule)
        # runtime torch: a fresh tiny model would be probed at every start (tests/test_runtimes.py covers auto)
        "inference": {"device": "cpu", "threads": 1, "runtime": "torch"},
        "paths": {
            "inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "done": str(root / "done"),
            "failed": str(root / "failed"), "work": str(root / "inbox" / ".upscaled-work"),
            "models": str(root / "models"), "status": str(root / "status.json"),
        },
        # incomplete_wait: a file whose end is missing (a truncated or corrupt image) waits 30 s by
        # default for its writer; here 3 s (tests/test_hostile.py sets it where the wait is the point)
        "watch": {"settle_seconds": 0.5, "rescan_interval": 2.0, "poll_interval": 0.3, "incomplete_wait": 3.0},
        "daemon": {"retry_initial": 0.2, "retry_max": 1.0, "shutdown_timeout": 10.0, "status_interval": 0.2,
                   "lease_interval": 0.5, "io_workers": 2, "allow_root": True},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def make_config(root: Path, checkpoint: Path, **sections: dict) -> tuple[Config, Path]:
    """Write config.yaml under `root`; returns (Config, path of the file)."""
    data = settings(root, checkpoint, **sections)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    for k in ("inbox", "outbox", "done", "failed"):
        Path(data["paths"][k]).mkdir(parents=True, exist_ok=True)
    return from_dict(data, base_dir=root), path


def image_bytes(path: Path, w: int = 32, h: int = 24, seed: int = 0, fmt: str | None = None) -> bytes:
    """Encoded bytes of a small random RGB image, in the format `path`'s extension names."""
    import io

    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    im.save(buf, format=fmt or {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".gif": "GIF"}[path.suffix.lower()])
    return buf.getvalue()


def write_image(path: Path, w: int = 32, h: int = 24, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(path, w, h, seed))
    return path


def wait_for(cond: Callable[[], object], timeout: float = 30.0, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def files_under(folder: Path, include_hidden: bool = False) -> list[str]:
    """Regular files under `folder`, relative, sorted (hidden ones and hidden folders skipped)."""
    if not folder.exists():
        return []
    out = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if not include_hidden and any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():
            out.append(rel.as_posix())
    return sorted(out)


def serve(config: Path | None, *extra: str, env: dict | None = None, log: Path | None = None,
          cwd: Path = ROOT, prefix: list[str] | tuple = ()) -> subprocess.Popen:
    """Start `upscaled serve` as a real subprocess (`config` None: no --config; `prefix`: a
    command to run it under, such as as_daemon_user())."""
    e = dict(os.environ)
    e.pop("NOTIFY_SOCKET", None)
    e.update(env or {})
    out = open(log, "ab") if log else subprocess.DEVNULL
    args = ["--config", str(config)] if config is not None else []
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "upscaled", "serve", *args, *extra],
        cwd=cwd, env=e, stdout=out, stderr=subprocess.STDOUT,
    )


NOBODY = 65534


def as_daemon_user() -> list[str]:
    """A command prefix under which file permissions apply to the daemon. Under root (CI):
    root without its capabilities (setpriv empties the bounding set, so an exec'd process keeps
    none), for which the modes of files it does not own apply; otherwise nothing."""
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"] if os.geteuid() == 0 else []


def not_ours(path: Path, mode: int) -> None:
    """Give `path` `mode` for a daemon that does not own it: under root, owned by nobody."""
    if os.geteuid() == 0:
        os.lchown(path, NOBODY, NOBODY)
    os.chmod(path, mode)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def decoded_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        return im.size
