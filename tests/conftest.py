"""Shared fixtures: tiny real generators, real image files, config files in temp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from model.checkpoint import save_checkpoint
from model.generator import Generator, GeneratorConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = GeneratorConfig(scale=4, channels=8, blocks=1)


def tiny_generator(cfg: GeneratorConfig = TINY, seed: int = 0) -> Generator:
    torch.manual_seed(seed)
    g = Generator(cfg)
    # Give BatchNorm non-trivial statistics so folding and loading are really exercised.
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.8, 1.2)
                m.bias.uniform_(-0.1, 0.1)
    return g.eval()


def natural_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth-plus-edges RGB image (uint8), more photo-like than white noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([
        0.5 + 0.4 * np.sin(x / (7 + seed % 5) + y / 11),
        0.5 + 0.4 * np.cos(y / (5 + seed % 3) - x / 13),
        0.5 + 0.3 * np.sin((x + y) / 9),
    ], axis=2)
    img[h // 4 : h // 2, w // 3 : 2 * w // 3] *= 0.4  # a hard-edged block
    img += rng.normal(0, 0.02, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def pytest_xdist_auto_num_workers(config) -> int:
    """Workers for `-n auto` (the default, pyproject.toml): most tests wait on real daemons and
    subprocesses, so two workers help even on one or two cores; past four the daemons' own threads
    would only compete."""
    return min(4, max(2, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def _runtime_cache(tmp_path_factory) -> None:
    """The runtime probe's cache (model/runtimes.py) of every test and its subprocesses goes to a
    temp folder of this run, never to the user's ~/.cache. Under pytest-xdist the workers share
    it (the folder above their own temp folders), so a bundled model is probed once per run, not
    once per worker (the cache file is written atomically; a lost update costs one more probe)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "xdg-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield


@pytest.fixture
def tiny_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, tiny_generator(), step=7)
    return path


def write_config(folder: Path, data: dict) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_ckpt: Path) -> Path:
    # runtime torch: a fresh tiny model would be probed in every test; tests/test_runtimes.py covers auto
    return write_config(tmp_path, {"model": {"path": str(tiny_ckpt)}, "inference": {"device": "cpu", "runtime": "torch"}})


def run_cli(*args: str, env: dict | None = None, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `upscaled` entry point in a subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k != "UPSCALED_CONFIG"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "upscaled", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


def save_image(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path
