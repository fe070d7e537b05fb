"""Compare previews, made with Pillow on demand and cached: never the full output.

Two views of an output, each as a pair of images of the same size:
- fit: the whole output shrunk to at most `web.preview_max_side` on its long side ("after"),
  and the original resized with bicubic to that same size ("before");
- crop: a region of the output at 1:1 pixels, at most CROP_MAX on a side ("after"), and the same
  region of the original upscaled with bicubic to exactly that region ("before": Pillow's
  resize with a fractional source box, so the two line up pixel for pixel).

Previews are cached by file, size, mtime and request, under the user's cache folder
($XDG_CACHE_HOME/upscaled-web; the systemd unit gives it CacheDirectory=). Not under paths.work:
every folder there is a daemon's claims folder, and one without a live lease is recovered.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from loguru import logger
from PIL import Image, ImageOps

from core.atomic import atomic_write_bytes
from imaging.images import READ_FORMATS

CROP_MAX = 512  # side of a 1:1 region, in output pixels
CACHE_FILES = 2000  # the oldest half goes when the cache holds more
# A 24000-px output decoded for a crop takes gigabytes: one decode at a time.
_decoding = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "upscaled-web" / "previews"


def fit_size(w: int, h: int, max_side: int) -> tuple[int, int]:
    f = min(1.0, max_side / max(w, h))
    return max(1, round(w * f)), max(1, round(h * f))


def _open(path: Path) -> Image.Image:
    # The formats the daemon reads, nothing else (the same decoders; ICO, EPS... never run).
    try:
        return Image.open(path, formats=READ_FORMATS)
    except Image.DecompressionBombError as e:
        raise ValueError(f"too large to preview ({e})") from None


def _upright(im: Image.Image) -> Image.Image:
    """EXIF orientation applied, as the daemon does (outputs carry none: no copy for them)."""
    return ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im


def _rgb(im: Image.Image) -> Image.Image:
    """RGB for a browser: 16-bit gray scaled to 8 bits, transparency shown over mid grey."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = im.point(lambda v: v / 257).convert("L")
    if im.mode == "F":
        im = im.convert("L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (128, 128, 128, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """Width and height as the daemon sees them (EXIF orientation applied)."""
    with _open(path) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1)
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class Previews:
    def __init__(self, max_side: int, folder: Path | None = None):
        self.max_side = max_side
        self.folder = folder or cache_dir()
        self._writes = 0

    def _key(self, *parts: object) -> Path:
        h = hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:40]
        return self.folder / h[:2] / f"{h}.bin"

    def _cached(self, key: Path, make) -> bytes:
        try:
            return key.read_bytes()
        except FileNotFoundError:
            pass
        data = make()
        try:
            key.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(key, data)
            self._writes += 1
            if self._writes % 100 == 0:
                self._prune()
        except OSError as e:  # a full or read-only cache still serves the preview
            logger.warning("cannot cache a preview in {}: {}", self.folder, e.strerror or e)
        return data

    def _prune(self) -> None:
        files = sorted(self.folder.glob("*/*.bin"), key=lambda p: p.stat().st_mtime)
        for p in files[: max(0, len(files) - CACHE_FILES // 2)] if len(files) > CACHE_FILES else []:
            p.unlink(missing_ok=True)

    @staticmethod
    def _stamp(path: Path) -> str:
        st = path.stat()
        return f"{path}:{st.st_size}:{st.st_mtime_ns}"

    def geometry(self, output: Path) -> dict:
        w, h = image_size(output)
        pw, ph = fit_size(w, h, self.max_side)
        return {"width": w, "height": h, "fit_width": pw, "fit_height": ph, "crop_max": CROP_MAX}

    def fit(self, output: Path, original: Path | None, side: str) -> bytes:
        """The whole image at preview size: the output ("after") or the original by bicubic ("before")."""
        w, h = image_size(output)
        size = fit_size(w, h, self.max_side)
        src = output if side == "after" else original
        key = self._key("fit", side, self._stamp(output), self._stamp(src), size)

        def make() -> bytes:
            with _decoding, _open(src) as im:
                if side == "after":
                    im.draft("RGB", size)  # JPEG: decode at a fraction of the size
                    im = _upright(im)
                    factor = min(im.width // size[0], im.height // size[1])
                    if factor > 1:  # a cheap box reduction first: a 24000-px output is not resampled whole
                        try:
                            im = im.reduce(factor)
                        except ValueError:  # a mode reduce() does not take
                            pass
                    return _jpeg(_rgb(im).resize(size, Image.Resampling.LANCZOS))
                return _jpeg(_rgb(_upright(im)).resize(size, Image.Resampling.BICUBIC))

        return self._cached(key, make)

    def crop(self, output: Path, original: Path | None, side: str, x: int, y: int, cw: int, ch: int) -> bytes:
        """A region of the output at 1:1 ("after"), or the original's same region upscaled by
        bicubic to the same pixels ("before"). The region is clamped to the image."""
        w, h = image_size(output)
        cw, ch = max(1, min(cw, CROP_MAX, w)), max(1, min(ch, CROP_MAX, h))
        x, y = max(0, min(x, w - cw)), max(0, min(y, h - ch))
        src = output if side == "after" else original
        key = self._key("crop", side, self._stamp(output), self._stamp(src), x, y, cw, ch)

        def make() -> bytes:
            with _decoding, _open(src) as im:
                im = _upright(im)
                if side == "after":  # cropped before any conversion: no copy of the whole output
                    return _png(_rgb(im.crop((x, y, x + cw, y + ch))))
                im = _rgb(im)  # the original: 1/16 of the output's pixels
                fx, fy = im.width / w, im.height / h  # 1 / scale
                box = (x * fx, y * fy, (x + cw) * fx, (y + ch) * fy)
                return _png(im.resize((cw, ch), Image.Resampling.BICUBIC, box=box))

        return self._cached(key, make)

    def sheet(self, path: Path) -> bytes:
        """A training run's sample sheet, shrunk to the preview size if larger."""
        key = self._key("sheet", self._stamp(path), self.max_side)

        def make() -> bytes:
            with _open(path) as im:
                im = _rgb(_upright(im))
                im.thumbnail((self.max_side, self.max_side), Image.Resampling.LANCZOS)
                return _png(im)

        return self._cached(key, make)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", compress_level=3)
    return buf.getvalue()
