"""Fast inference paths keep the quality of fp32: the shipped model on real photo crops (the
originals of docs/comparison.png, cut from the val photos) and on a flat one, where rounding the
image to bf16 shows most (PSNR is highest there)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imaging.quality import downscale, psnr_ssim_y
from model.checkpoint import BUNDLED_DEFAULT, load_generator
from model.engine import EngineOptions, Upscaler
from tests.conftest import ROOT

FAST = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])  # fp16: on the GPU (bench/gpu_check.sh)


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
    # fp32 on the CPU: on a GPU PyTorch runs fp32 convolutions as TF32 by default
    ref = Upscaler(g, info, EngineOptions(device="cpu", precision="fp32"))
    fast = Upscaler(g, info, EngineOptions(device=device, precision=precision))
    deltas = []
    for hr in crops:
        lr = downscale(hr, info.scale).astype(np.float32) / 255.0
        deltas.append(psnr_ssim_y(fast.upscale_rgb(lr), hr, info.scale)[0] - psnr_ssim_y(ref.upscale_rgb(lr), hr, info.scale)[0])
    assert min(deltas) > -0.05, deltas


def test_self_ensemble_views_are_distinct_and_turn_back() -> None:
    from model.engine import _view

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    views = [_view(x, k) for k in range(8)]
    assert len({str(v.tolist()) for v in views}) == 8
    for k, v in enumerate(views):
        assert torch.equal(_view(v, k, undo=True), x)


def test_self_ensemble_is_the_mean_of_the_views_turned_back_and_tiles_alike() -> None:
    from tests.conftest import natural_image, tiny_generator

    def view(a: np.ndarray, k: int, undo: bool = False) -> np.ndarray:  # H x W x C, as a user would flip it
        steps = [lambda t: t[:, ::-1] if k & 1 else t, lambda t: t[::-1] if k & 2 else t,
                 lambda t: t.transpose(1, 0, 2) if k & 4 else t]
        for step in reversed(steps) if undo else steps:
            a = step(a)
        return np.ascontiguousarray(a)

    g = tiny_generator()
    img = natural_image(40, 56, seed=2)
    one = Upscaler(g, None, EngineOptions(device="cpu", precision="fp32"))
    outs = [view(one.upscale_rgb(view(img, k)), k, undo=True).astype(np.float64) for k in range(8)]
    for n in (4, 8):
        mean = np.mean(outs[:n], axis=0)
        for tile in (0, 16):  # whole, and in tiles (border tiles are shifted, so each view tiles differently)
            got = Upscaler(g, None, EngineOptions(device="cpu", precision="fp32", self_ensemble=n, tile=tile)).upscale_rgb(img)
            assert got.shape == (160, 224, 3)
            # the engine averages before rounding, the reference after rounding each view: within a level
            assert np.abs(got.astype(np.float64) - mean).max() <= 1.0, (n, tile)
    assert np.abs(np.mean(outs[:8], axis=0) - np.mean(outs[:4], axis=0)).max() > 1.0  # the transposes count
    with pytest.raises(ValueError, match="self_ensemble"):
        Upscaler(g, None, EngineOptions(self_ensemble=3))


def test_self_ensemble_is_closer_to_the_photos(crops: list[np.ndarray]) -> None:
    g, info = load_generator(BUNDLED_DEFAULT)
    single = Upscaler(g, info, EngineOptions(device="cpu", precision="fp32"))
    four = Upscaler(g, info, EngineOptions(device="cpu", precision="fp32", self_ensemble=4))
    gains = []
    for hr in crops[:-1]:  # the photo crops
        lr = downscale(hr, info.scale)
        gains.append(psnr_ssim_y(four.upscale_rgb(lr), hr, info.scale)[0] - psnr_ssim_y(single.upscale_rgb(lr), hr, info.scale)[0])
    assert np.mean(gains) > 0.03 and min(gains) > -0.02, gains
