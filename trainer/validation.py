"""A validation set and how a generator is scored on it: through the product's own engine
(BatchNorm folded, tiled), with imaging/quality.py's protocol."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imaging.quality import Report, downscale, evaluate_images, fingerprint, resize_up
from model.engine import EngineOptions, Upscaler
from model.generator import Generator
from trainer.data import load_validation


@dataclass
class ValidationSet:
    folder: Path
    images: list[tuple[str, np.ndarray]]  # (name, uint8 HR cropped to a multiple of scale)
    fingerprint: str
    scale: int

    @classmethod
    def load(cls, folder: Path, scale: int, max_images: int = 0) -> ValidationSet:
        images, files = load_validation(folder, scale, max_images)
        return cls(folder, images, fingerprint(files, folder, scale), scale)

    def describe(self) -> dict:
        return {"data": str(self.folder), "fingerprint": self.fingerprint}


def engine_for(generator: Generator, device: str = "cpu") -> Upscaler:
    # fp32 so that numbers do not depend on which CPU validated; the engine copies the weights.
    return Upscaler(generator, None, EngineOptions(device=device, precision="fp32", threads=0))


def score(generator: Generator, val: ValidationSet, device: str = "cpu", baselines: bool = True, lr_jpeg: int = 0) -> Report:
    """`lr_jpeg` > 0: every method sees the LR saved as a JPEG of that quality (compressed inputs)."""
    up = engine_for(generator, device)
    return evaluate_images(up.upscale_rgb, val.images, val.scale, baselines=baselines, lr_jpeg=lr_jpeg)


def label_panel(panel: np.ndarray, text: str) -> np.ndarray:
    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    w = draw.textlength(text) + 6
    draw.rectangle((0, 0, w, 13), fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
    return np.asarray(img)


def sample_sheet(generator: Generator, val: ValidationSet, device: str = "cpu", count: int = 4, side: int = 64) -> Image.Image:
    """Rows of (bicubic | generated | original) centre crops of the first `count` images;
    `side` is the LR crop side."""
    up = engine_for(generator, device)
    s = val.scale
    rows = []
    for name, hr in val.images[:count]:
        lr = downscale(hr, s)
        h, w = lr.shape[:2]
        c = min(side, h, w)
        y, x = (h - c) // 2, (w - c) // 2
        lr_c = lr[y : y + c, x : x + c]
        hr_c = hr[y * s : (y + c) * s, x * s : (x + c) * s]
        panels = [
            label_panel(resize_up(lr_c, s, Image.Resampling.BICUBIC), "bicubic"),
            label_panel(up.upscale_rgb(lr_c.astype(np.float32) / 255.0), "generated"),
            label_panel(np.ascontiguousarray(hr_c), f"original {name}"[:40]),
        ]
        rows.append(np.concatenate(panels, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return Image.fromarray(np.concatenate(rows, axis=0))
