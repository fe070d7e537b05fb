"""How good an upscaler is: the standard super-resolution protocol, in one place.

Used by the trainer (validation, the publishing gate), by `upscaled eval` and by the models
folder's promotion gate, so all of them measure the same thing:

- HR is cropped to a multiple of `scale`, then downscaled with Pillow's antialiased BICUBIC on
  8-bit samples (exactly how the product's inputs are simulated);
- outputs are rounded to 8 bits;
- PSNR and SSIM are computed on the BT.601 luma (Y of YCbCr, 16..235) with a border of `scale`
  pixels shaved; SSIM with an 11x11 Gaussian window (sigma 1.5) and population covariances, as
  scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.

No dependency beyond numpy and Pillow: the daemon imports this module.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

PROTOCOL = "y-bt601/shave=scale/8bit/pil-bicubic-aa/ssim-gauss1.5"

Upscale = Callable[[np.ndarray], np.ndarray]  # LR float32 HxWx3 in [0, 1] -> uint8 (sH)x(sW)x3


def to_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 stays; floats in [0, 1] are rounded; uint16 is rescaled with rounding."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return ((img.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(np.asarray(img, np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def rgb_to_y(rgb: np.ndarray) -> np.ndarray:
    """uint8-range RGB (H x W x 3) -> BT.601 luma Y in [16, 235], float64 (MATLAB rgb2ycbcr)."""
    x = np.asarray(rgb, dtype=np.float64)
    return 16.0 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255.0


def shave(img: np.ndarray, border: int) -> np.ndarray:
    return img[border:-border, border:-border] if border > 0 else img


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    if mse == 0:
        return float("inf")
    return 10.0 * np.log10(data_range**2 / mse)


def _gaussian_taps(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)  # scipy.ndimage's rule: 5 for sigma 1.5 -> 11 taps
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(img: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """Separable correlation keeping only pixels whose whole window lies inside the image."""
    k = len(taps)
    h, w = img.shape
    rows = sum(t * img[i : h - k + 1 + i] for i, t in enumerate(taps))
    return sum(t * rows[:, i : w - k + 1 + i] for i, t in enumerate(taps))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of two single-channel images (Gaussian window, sigma 1.5).

    scikit-image filters the whole image and then averages only over pixels at least the
    window radius from the border; filtering with a 'valid' window is the same number.
    """
    x = np.asarray(a, np.float64)
    y = np.asarray(b, np.float64)
    taps = _gaussian_taps()
    if min(x.shape) < len(taps):
        raise ValueError(f"SSIM needs images of at least {len(taps)}x{len(taps)} pixels, got {x.shape}")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    ux, uy = _filter_valid(x, taps), _filter_valid(y, taps)
    vx = _filter_valid(x * x, taps) - ux * ux
    vy = _filter_valid(y * y, taps) - uy * uy
    vxy = _filter_valid(x * y, taps) - ux * uy
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr_ssim_y(out: np.ndarray, ref: np.ndarray, scale: int) -> tuple[float, float]:
    """PSNR and SSIM on Y with `scale` pixels shaved; both images are 8-bit RGB of one size."""
    if out.shape != ref.shape:
        raise ValueError(f"output {out.shape} and reference {ref.shape} differ in size")
    yo = shave(rgb_to_y(to_uint8(out)), scale)
    yr = shave(rgb_to_y(to_uint8(ref)), scale)
    return psnr(yo, yr), ssim(yo, yr)


def crop_to_multiple(img: np.ndarray, scale: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[: h - h % scale, : w - w % scale]


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """HR (uint8, uint16 or float in [0, 1]) -> uint8 LR by Pillow's antialiased BICUBIC.

    HR is first cropped to a multiple of `scale` so the two sizes are exactly `scale` apart.
    """
    hr8 = crop_to_multiple(to_uint8(hr), scale)
    h, w = hr8.shape[:2]
    return np.asarray(Image.fromarray(hr8).resize((w // scale, h // scale), Image.Resampling.BICUBIC))


def resize_up(lr: np.ndarray, scale: int, method: Image.Resampling) -> np.ndarray:
    lr8 = to_uint8(lr)
    h, w = lr8.shape[:2]
    return np.asarray(Image.fromarray(lr8).resize((w * scale, h * scale), method))


def colour_shift(out: np.ndarray, lr: np.ndarray) -> float:
    """Largest change of a channel's mean colour, output against input, as a fraction of full
    scale (0.01 = 1% = 2.55 levels in 8 bits). A model that tints or brightens an image shows
    here even when its PSNR looks fine. Full scale rather than the channel's own mean: a 0.4-level
    change of a nearly black channel is invisible, yet several percent of its mean."""
    a = to_uint8(out).reshape(-1, 3).astype(np.float64).mean(0)
    b = to_uint8(lr).reshape(-1, 3).astype(np.float64).mean(0)
    return float(np.max(np.abs(a - b)) / 255.0)


def laplacian_y(img: np.ndarray) -> np.ndarray:
    """|4-neighbour Laplacian| of Y (BT.601), (H-2) x (W-2): where the fine texture is."""
    y = rgb_to_y(to_uint8(img).astype(np.float64))
    return np.abs(4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:])


def detail(img: np.ndarray) -> float:
    """Fine-texture energy: the mean of laplacian_y. Comparing it with the original's says how
    much of the original's texture an upscaler restores (bicubic ~ 0.2 on the val photos)."""
    return float(laplacian_y(img).mean())


@dataclass
class ImageScores:
    name: str
    size: tuple[int, int]  # HR width, height after cropping to a multiple of scale
    psnr_y: dict[str, float] = field(default_factory=dict)  # method -> dB
    ssim_y: dict[str, float] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)  # method -> detail(out) / detail(original)
    colour_shift: float = 0.0  # the model's, see colour_shift()
    seconds: float = 0.0  # time the model took on this image
    peer_seconds: dict[str, float] = field(default_factory=dict)  # time each peer took


@dataclass
class Report:
    """Per-image and mean scores for `model`, `bicubic` and `lanczos`."""

    scale: int
    images: list[ImageScores]
    mean_psnr_y: dict[str, float]
    mean_ssim_y: dict[str, float]
    model_seconds_per_mp: float  # model seconds per output megapixel
    mean_detail: dict[str, float] = field(default_factory=dict)
    max_colour_shift: float = 0.0  # the model's worst image
    peer_seconds_per_mp: dict[str, float] = field(default_factory=dict)  # peers measured in the same run
    lr_jpeg: int = 0  # > 0: the LR images were saved as JPEG at this quality before upscaling
    protocol: str = PROTOCOL

    def to_dict(self) -> dict:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat metrics for checkpoint metadata and the publishing gate."""
        return {
            "psnr_y": self.mean_psnr_y["model"],
            "ssim_y": self.mean_ssim_y["model"],
            "bicubic_psnr_y": self.mean_psnr_y["bicubic"],
            "bicubic_ssim_y": self.mean_ssim_y["bicubic"],
            "detail": self.mean_detail["model"],
            "max_colour_shift": self.max_colour_shift,
            "count": len(self.images),
        }


METHODS = ("model", "bicubic", "lanczos")


def jpeg(lr8: np.ndarray, quality: int) -> np.ndarray:
    """`lr8` saved as a JPEG of `quality` and decoded again (4:2:0, as phones and the web do)."""
    import io

    buf = io.BytesIO()
    Image.fromarray(lr8).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def evaluate_images(
    upscale_fn: Upscale | None,
    hr_images: Iterable[tuple[str, np.ndarray]] | Sequence[np.ndarray],
    scale: int,
    baselines: bool = True,
    peers: dict[str, Upscale] | None = None,
    lr_jpeg: int = 0,
) -> Report:
    """Score `upscale_fn` (and bicubic/Lanczos when `baselines`, and each of `peers`, other
    upscalers measured in the same run) on HR images.

    `hr_images` yields arrays or (name, array) pairs; arrays are uint8/uint16 or float in
    [0, 1], H x W x 3. `upscale_fn` may be None to score only the baselines. `lr_jpeg` > 0
    compresses each LR image as a JPEG of that quality first (compressed inputs), for every method.
    """
    peers = peers or {}
    scores: list[ImageScores] = []
    model_seconds = 0.0
    out_pixels = 0
    for i, item in enumerate(hr_images):
        name, hr = item if isinstance(item, tuple) else (f"#{i}", item)
        hr8 = crop_to_multiple(to_uint8(hr), scale)
        lr8 = downscale(hr8, scale)
        if lr_jpeg:
            lr8 = jpeg(lr8, lr_jpeg)
        s = ImageScores(name=name, size=(hr8.shape[1], hr8.shape[0]))
        outputs: dict[str, np.ndarray] = {}
        if upscale_fn is not None:
            t0 = time.perf_counter()
            outputs["model"] = upscale_fn(lr8.astype(np.float32) / 255.0)
            s.seconds = time.perf_counter() - t0
            model_seconds += s.seconds
            out_pixels += hr8.shape[0] * hr8.shape[1]
        for peer, fn in peers.items():
            t0 = time.perf_counter()
            outputs[peer] = fn(lr8.astype(np.float32) / 255.0)
            s.peer_seconds[peer] = time.perf_counter() - t0
        if baselines:
            outputs["bicubic"] = resize_up(lr8, scale, Image.Resampling.BICUBIC)
            outputs["lanczos"] = resize_up(lr8, scale, Image.Resampling.LANCZOS)
        ref_detail = max(detail(hr8), 1e-9)
        for method, out in outputs.items():
            s.psnr_y[method], s.ssim_y[method] = psnr_ssim_y(out, hr8, scale)
            s.detail[method] = detail(out) / ref_detail
        if "model" in outputs:
            s.colour_shift = colour_shift(outputs["model"], lr8)
        scores.append(s)
    if not scores:
        raise ValueError("no images to evaluate")
    methods = [m for m in (METHODS[0], *peers, *METHODS[1:]) if m in scores[0].psnr_y]
    mp = sum(s.size[0] * s.size[1] for s in scores) / 1e6
    return Report(
        scale=scale,
        images=scores,
        mean_psnr_y={m: float(np.mean([s.psnr_y[m] for s in scores])) for m in methods},
        mean_ssim_y={m: float(np.mean([s.ssim_y[m] for s in scores])) for m in methods},
        model_seconds_per_mp=model_seconds / (out_pixels / 1e6) if out_pixels else 0.0,
        mean_detail={m: float(np.mean([s.detail[m] for s in scores])) for m in methods},
        max_colour_shift=max(s.colour_shift for s in scores),
        peer_seconds_per_mp={p: sum(s.peer_seconds[p] for s in scores) / mp for p in peers},
        lr_jpeg=lr_jpeg,
    )


def fingerprint(files: Iterable[str | os.PathLike], root: str | os.PathLike | None = None, scale: int = 4) -> str:
    """A short digest naming a validation set: file names (relative to `root`), contents, scale
    and protocol. Two evaluations are comparable only when their fingerprints are equal."""
    h = hashlib.sha256()
    h.update(f"{PROTOCOL}|x{scale}".encode())
    for f in sorted(Path(p) for p in files):
        name = f.relative_to(root).as_posix() if root is not None else f.name
        h.update(b"\0" + name.encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return "sha256:" + h.hexdigest()[:16]
