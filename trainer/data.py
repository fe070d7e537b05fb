"""Training data: HR-only folders (LR made on the fly) and paired LR/HR folders.

A batch is a pure function of (seed, rank, step): every sample draws from a numpy generator
seeded with those three numbers. Resuming at step k therefore reproduces exactly the batches an
uninterrupted run would have seen, whatever the number of loader processes, and the data
"sampler state" is just the step.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from imaging.images import EXTENSIONS, READ_FORMATS, ImageError, decode
from imaging.quality import to_uint8

BICUBIC = Image.Resampling.BICUBIC


class DataError(ValueError):
    """Training data that cannot be used; `problems` lists every reason, one per line."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"{what}:\n" + "\n".join(f"  - {p}" for p in problems))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted; hidden files and folders are skipped."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}", [f"{root} is not a folder"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in EXTENSIONS]
    return sorted(out)


def load_rgb8(path: Path, max_side: int = 0, shrink: float = 1.0) -> Image.Image:
    """Decode (EXIF orientation applied, 16-bit rounded to 8) to an 8-bit RGB Pillow image, capped
    at `max_side` on the long side, then shrunk by `shrink` (antialiased bicubic)."""
    with Image.open(path, formats=READ_FORMATS) as im:
        if im.mode in ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1"):
            img = ImageOps.exif_transpose(im).convert("RGB")  # 8-bit: Pillow directly, no float copy
        else:
            img = Image.fromarray(to_uint8(decode(path).rgb))  # 16-bit and other deep modes
    f = min(shrink, max_side / max(img.size) if max_side else 1.0)
    if f < 1:
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), BICUBIC)
    return img


def header_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed, from the header only."""
    with Image.open(path, formats=READ_FORMATS) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class ImageCache:
    """Decoded images by path, least recently used dropped beyond `budget_mb`."""

    def __init__(self, budget_mb: int, max_side: int = 0):
        self.budget = budget_mb << 20
        self.max_side = max_side
        self.used = 0
        self.items: OrderedDict[Path, Image.Image] = OrderedDict()

    def get(self, path: Path, shrink: float = 1.0) -> Image.Image:
        img = self.items.get(path)
        if img is not None:
            self.items.move_to_end(path)
            return img
        img = load_rgb8(path, self.max_side, shrink)
        size = img.width * img.height * 4  # Pillow keeps RGB as 4 bytes per pixel
        if size <= self.budget:
            while self.used + size > self.budget and self.items:
                _, old = self.items.popitem(last=False)
                self.used -= old.width * old.height * 4
            self.items[path] = img
            self.used += size
        return img


def augment(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """The same random flip and 90-degree rotation applied to every array (H x W x C)."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = []
    for a in arrays:
        a = np.rot90(a, k)
        if flip:
            a = a[:, ::-1]
        out.append(np.ascontiguousarray(a))
    return out


@dataclass(frozen=True)
class Degradations:
    blur: float = 0.0  # probability of each
    noise: float = 0.0
    jpeg: float = 0.0
    jpeg_quality: tuple[int, int] = (40, 95)  # inclusive range

    def apply(self, lr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blur, then Gaussian noise, then JPEG, each with its probability (uint8 in and out)."""
        # Draw every random number whether or not the degradation applies, so that enabling one
        # does not shift the random stream of the others.
        u = rng.random(3)
        lo, hi = self.jpeg_quality
        radius, sigma, quality = rng.uniform(0.3, 1.5), rng.uniform(1.0, 8.0), int(rng.integers(lo, hi + 1))
        if u[0] < self.blur:
            lr = np.asarray(Image.fromarray(lr).filter(ImageFilter.GaussianBlur(radius)))
        if u[1] < self.noise:
            noise = rng.normal(0.0, sigma, lr.shape)
            lr = np.clip(lr + noise + 0.5, 0, 255).astype(np.uint8)
        if u[2] < self.jpeg:
            buf = io.BytesIO()
            Image.fromarray(lr).save(buf, "JPEG", quality=quality)
            lr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return lr


def to_tensor(batch: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float().div_(255.0)


class TrainingData(torch.utils.data.Dataset):
    """Indexed by step: item `step` is the whole batch (lr, hr) for that step."""

    def __init__(self, scale: int, crop: int, batch: int, seed: int, rank: int, cache_mb: int, max_side: int):
        self.scale, self.crop, self.batch, self.seed, self.rank = scale, crop, batch, seed, rank
        self.cache = ImageCache(cache_mb, max_side)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        pairs = [self.sample(rng) for _ in range(self.batch)]
        return to_tensor([p[0] for p in pairs]), to_tensor([p[1] for p in pairs])

    def __len__(self) -> int:
        return 2**62


class HRData(TrainingData):
    """Random HR crops of photos, each photo first shrunk by a random factor in
    [shrink_min, shrink_max] when it is large enough; LR = antialiased bicubic of the crop."""

    def __init__(self, files: list[Path], *, shrink: tuple[float, float], degradations: Degradations, **kw):
        super().__init__(**kw)
        self.files, self.shrink, self.degradations = files, shrink, degradations
        self.sizes = {}
        for f in files:  # after max_side; headers only
            w, h = header_size(f)
            cap = min(1.0, self.cache.max_side / max(w, h)) if self.cache.max_side else 1.0
            self.sizes[f] = (w * cap, h * cap)

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        path = self.files[int(rng.integers(len(self.files)))]
        # Photos are cached already shrunk by the largest factor (less memory, less to read);
        # the rest of the drawn factor happens here. A photo too small for that pre-shrink is
        # kept at full size.
        lo, hi = self.shrink
        pre = hi if min(self.sizes[path]) * hi >= self.crop else 1.0
        img = self.cache.get(path, pre)
        w, h = img.size
        # Shrinking the whole photo by f and cropping `crop` pixels is the same as resampling a
        # crop/f region to `crop` (Pillow's filter reads the pixels around the box too), and
        # far cheaper. A photo too small for the drawn factor is shrunk only as far as it can be.
        region = min(self.crop * pre / rng.uniform(lo, hi), w, h)
        x, y = rng.uniform(0, w - region), rng.uniform(0, h - region)
        if region <= self.crop:  # too small to shrink at all: a plain pixel-aligned crop
            x, y = int(x), int(y)
            hr = np.asarray(img.crop((x, y, x + self.crop, y + self.crop)))
        else:
            hr = np.asarray(img.resize((self.crop, self.crop), BICUBIC, box=(x, y, x + region, y + region)))
        (hr,) = augment([hr], rng)
        lr_side = self.crop // self.scale
        lr = np.asarray(Image.fromarray(hr).resize((lr_side, lr_side), BICUBIC))
        return self.degradations.apply(lr, rng), hr


class MixedData(TrainingData):
    """Crops drawn from `first` or, with probability `share`, from `second` (each keeps its cache)."""

    def __init__(self, first: TrainingData, second: TrainingData, share: float, **kw):
        super().__init__(**{**kw, "cache_mb": 0})
        self.first, self.second, self.share = first, second, share

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return (self.second if rng.random() < self.share else self.first).sample(rng)


class PairedData(TrainingData):
    """Aligned random crops of LR/HR pairs (HR exactly `scale` times the LR size)."""

    def __init__(self, pairs: list[tuple[Path, Path]], **kw):
        super().__init__(**kw)
        self.pairs = pairs

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        lr_path, hr_path = self.pairs[int(rng.integers(len(self.pairs)))]
        lr_img, hr_img = self.cache.get(lr_path), self.cache.get(hr_path)
        side = self.crop // self.scale
        x, y = int(rng.integers(lr_img.width - side + 1)), int(rng.integers(lr_img.height - side + 1))
        s = self.scale
        lr = np.asarray(lr_img.crop((x, y, x + side, y + side)))
        hr = np.asarray(hr_img.crop((x * s, y * s, (x + side) * s, (y + side) * s)))
        lr, hr = augment([lr, hr], rng)
        return lr, hr


def check_hr_folder(folder: Path, crop: int) -> list[Path]:
    """Usable HR photos of `folder`; raises DataError listing every unreadable or too-small file."""
    files = list_images(folder)
    if not files:
        raise DataError(f"no training images in {folder}", [f"{folder} holds no image files ({', '.join(sorted(EXTENSIONS))})"])
    problems, usable = [], []
    for f in files:
        try:
            w, h = header_size(f)
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            problems.append(f"{f}: unreadable ({e})")
            continue
        if min(w, h) < crop:
            problems.append(f"{f}: {w}x{h} is smaller than the {crop}-pixel training crop")
        else:
            usable.append(f)
    if problems:
        raise DataError(f"problems in the training folder {folder}", problems)
    return usable


def check_pairs(lr_dir: Path, hr_dir: Path, scale: int, crop: int) -> list[tuple[Path, Path]]:
    """Match LR and HR files by stem; raises DataError naming every problem at once."""
    problems: list[str] = []
    lr_files = {f.relative_to(lr_dir).with_suffix("").as_posix(): f for f in list_images(lr_dir)}
    hr_files = {f.relative_to(hr_dir).with_suffix("").as_posix(): f for f in list_images(hr_dir)}
    for name, lists in (("low-resolution", lr_files), ("high-resolution", hr_files)):
        if not lists:
            problems.append(f"the {name} folder {lr_dir if lists is lr_files else hr_dir} holds no images")
    for stem in sorted(set(lr_files) - set(hr_files)):
        problems.append(f"{lr_files[stem]}: low-resolution image without a high-resolution image named {stem}.* in {hr_dir}")
    for stem in sorted(set(hr_files) - set(lr_files)):
        problems.append(f"{hr_files[stem]}: high-resolution image without a low-resolution image named {stem}.* in {lr_dir}")
    pairs = []
    for stem in sorted(set(lr_files) & set(hr_files)):
        lr, hr = lr_files[stem], hr_files[stem]
        sizes = []
        for f in (lr, hr):
            try:
                sizes.append(header_size(f))
                with Image.open(f, formats=READ_FORMATS) as im:
                    im.load()  # decode the pixels: catches truncated files, not just bad headers
            except (OSError, ValueError, SyntaxError) as e:
                problems.append(f"{f}: unreadable ({e})")
        if len(sizes) < 2:
            continue
        (lw, lh), (hw, hh) = sizes
        if (hw, hh) != (lw * scale, lh * scale):
            problems.append(
                f"{stem}: high-resolution {hw}x{hh} is not {scale}x the low-resolution {lw}x{lh} "
                f"(expected {lw * scale}x{lh * scale})"
            )
        elif min(lw, lh) * scale < crop:
            problems.append(f"{stem}: {hw}x{hh} is smaller than the {crop}-pixel training crop")
        else:
            pairs.append((lr, hr))
    if problems:
        raise DataError(f"problems in the paired folders {lr_dir} and {hr_dir}", problems)
    return pairs


def load_validation(folder: Path, scale: int, max_images: int = 0,
                    skipped: list[str] | None = None) -> tuple[list[tuple[str, np.ndarray]], list[Path]]:
    """(name, uint8 HR array cropped to a multiple of scale) for the first `max_images` images.

    An unreadable image raises DataError naming every one, unless `skipped` is given: then each
    is left out and described there ("name: reason"), and only the readable ones are returned.
    """
    files = list_images(folder)
    if max_images:
        files = files[:max_images]
    if not files:
        raise DataError(f"no validation images in {folder}", [f"{folder} holds no image files"])
    images, good, problems = [], [], []
    for f in files:
        try:
            rgb = to_uint8(decode(f).rgb)
        except (ImageError, OSError) as e:
            problems.append(f"{f}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")
            continue
        h, w = rgb.shape[:2]
        images.append((f.relative_to(folder).as_posix(), rgb[: h - h % scale, : w - w % scale]))
        good.append(f)
    if problems and skipped is None:
        raise DataError(f"unreadable validation images in {folder}", problems)
    if skipped is not None:
        skipped += problems
    if not images:
        raise DataError(f"no readable validation images in {folder}", problems)
    return images, good
