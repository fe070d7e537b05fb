"""Fast inference paths keep the quality of fp32: the shipped model, small photo-like crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import BUNDLED_DEFAULT, load_generator
from model.engine import EngineOptions, Upscaler
from model.quality import downscale, psnr_ssim_y
from tests.conftest import natural_image

FAST = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    return [natural_image(64, 64, seed=s) for s in range(3)]


@pytest.mark.parametrize("precision", FAST)
def test_fast_path_within_0_05_db_of_fp32(precision: str, crops: list[np.ndarray]) -> None:
    g, info = load_generator(BUNDLED_DEFAULT)
    device = "cuda" if precision == "fp16" else "cpu"
    ref = Upscaler(g, info, EngineOptions(device=device, precision="fp32"))
    fast = Upscaler(g, info, EngineOptions(device=device, precision=precision))
    deltas = []
    for hr in crops:
        lr = downscale(hr, info.scale).astype(np.float32) / 255.0
        deltas.append(psnr_ssim_y(fast.upscale_rgb(lr), hr, info.scale)[0] - psnr_ssim_y(ref.upscale_rgb(lr), hr, info.scale)[0])
    assert min(deltas) > -0.05, deltas
