"""Fast inference paths keep the quality of fp32: the shipped model on real photo crops (the
originals of docs/comparison.png, cut from the val photos) and on a flat one, where rounding the
image to bf16 shows most (PSNR is highest there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import BUNDLED_DEFAULT, load_generator
from model.engine import EngineOptions, Upscaler
from model.quality import downscale, psnr_ssim_y
from tests.conftest import ROOT

FAST = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])


def flat_photo(side: int = 96, seed: int = 0) -> np.ndarray:
    """A sky-like crop: a gentle gradient with sensor noise, bright enough that bf16's step is 1/512."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = np.stack([0.55 + 0.1 * y, 0.7 + 0.08 * y - 0.03 * x, 0.9 + 0.05 * x], axis=2)
    return (np.clip(img + rng.normal(0, 0.004, img.shape), 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def crops() -> list[np.ndarray]:
    with Image.open(ROOT / "docs" / "comparison.png") as im:
        boxes = json.loads(im.text["upscaled:originals"])
        sheet = np.asarray(im.convert("RGB"))
    return [sheet[y : y + 96, x : x + 96] for x, y, _, _ in boxes] + [flat_photo()]


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
