"""Checks a candidate model passes before anything serves it.

The daemon runs these on every newly published model and `upscaled models promote` runs the same
ones before publishing, so a file that would be refused by the service is refused up front.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from imaging.quality import downscale, psnr_ssim_y, resize_up
from model.checkpoint import CheckpointError, CheckpointInfo, load_model
from model.generator import Generator
from PIL import Image

PROBE_SIZE = 96  # HR side; divisible by 2, 4 and 8


def probe_image(size: int = PROBE_SIZE) -> np.ndarray:
    """A deterministic, photo-like HR image: smooth shading, hard edges, fine stripes, a disc."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.25 + 0.5 * x, 0.3 + 0.4 * y, 0.6 - 0.3 * x * y], axis=2)
    img[(x - 0.65) ** 2 + (y - 0.35) ** 2 < 0.04] = (0.9, 0.75, 0.2)
    img[int(size * 0.6) : int(size * 0.85), int(size * 0.1) : int(size * 0.45)] = (0.1, 0.15, 0.35)
    stripes = (np.sin(x * size * 0.9) > 0) & (y > 0.6) & (x > 0.55)
    img[stripes] = 0.95
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class ProbeResult:
    psnr_y: float
    bicubic_psnr_y: float

    @property
    def gain_db(self) -> float:
        return self.psnr_y - self.bicubic_psnr_y


def run_probe(generator: Generator) -> ProbeResult:
    """Upscale the probe's bicubic LR; raise CheckpointError on a non-finite or wrongly sized result.
    `generator`: ours or an imported network (model.checkpoint.load_model)."""
    s = generator.descriptor.scale
    hr = probe_image()
    lr = downscale(hr, s)
    x = torch.from_numpy(lr.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        y = generator.eval()(x.to(next(generator.parameters()).device)).float().cpu()
    if tuple(y.shape) != (1, 3, hr.shape[0], hr.shape[1]):
        raise CheckpointError(f"probe output has shape {tuple(y.shape)}, expected {(1, 3, *hr.shape[:2])}")
    if not torch.isfinite(y).all():
        raise CheckpointError("probe output contains NaN or infinite values")
    out = (y[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    model_psnr, _ = psnr_ssim_y(out, hr, s)
    bicubic_psnr, _ = psnr_ssim_y(resize_up(lr, s, Image.Resampling.BICUBIC), hr, s)
    return ProbeResult(model_psnr, bicubic_psnr)


def verify_checkpoint(
    path: str | os.PathLike, scale: int, *, probe: bool = True, tolerance_db: float = 3.0, sha256: str | None = None
) -> tuple[Generator, CheckpointInfo, ProbeResult | None]:
    """Load `path` and check it can serve a x`scale` service; raises CheckpointError saying why not.

    Checks: safetensors with complete metadata, a known architecture, shapes matching it and
    finite weights (all by load_model; for an imported model, spandrel recognising the
    architecture its metadata names); the configured scale; a probe inference that is finite
    and of the right size; and, when the metadata claims the model beats bicubic on its
    validation set, a probe result not more than `tolerance_db` below bicubic (a model with
    scrambled but finite weights fails this by tens of dB). `sha256`: the digest the bytes loaded
    must have (a published model: what promote recorded).
    """
    g, info = load_model(path, sha256=sha256)
    if info.scale != scale:
        raise CheckpointError(f"{path}: a x{info.scale} model, but the service is configured for x{scale} (model.scale)")
    result = run_probe(g) if probe else None
    m = info.metrics
    claimed = m.get("psnr_y", math.nan) - m.get("bicubic_psnr_y", math.nan)
    if result is not None and claimed > 0 and result.gain_db < -tolerance_db:
        raise CheckpointError(
            f"{path}: probe image scores {result.psnr_y:.2f} dB, {-result.gain_db:.2f} dB below bicubic, "
            f"although its metadata claims +{claimed:.2f} dB over bicubic on {info.validation.get('data', 'its validation set')}"
        )
    return g, info, result
