"""One image's way from its file to its published output, the one path both front ends take:
decode → (pick the model) → upscale → output scale → encode → atomic publish.

The daemon runs these steps as a job's states, each on its own thread (daemon/worker.py:
CLAIMED → DECODED → UPSCALED → WRITTEN); `upscaled upscale` runs them one after the other
(upscaled/upscale.py). Neither reaches into the other: what they share is here, and below
(imaging/ for the pixels and files, core/ for the atomic rename).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Callable

from core.atomic import Conflict, atomic_open
from core.config import Config, OutputConfig
from imaging import outscale
from imaging.images import PILLOW_READS_RGBX, Decoded, Encoded, decode, encode_to

__all__ = ["compressed", "decode", "model_for", "output_scale", "publish", "upscale", "upscale_many"]


def compressed(dec, cfg: Config) -> bool:
    """A JPEG below model.for_jpeg_below (estimated quality; unknown counts as compressed)."""
    if dec is None or dec.format != "JPEG":
        return False
    return dec.jpeg_quality is None or dec.jpeg_quality < cfg.model.for_jpeg_below


def model_for(dec: Decoded | None, cfg: Config, up, up_jpeg=None):
    """The served model `up`, or model.for_jpeg's `up_jpeg` for a JPEG compressed harder than
    model.for_jpeg_below (blocking and ringing the served model would sharpen)."""
    return up_jpeg if compressed(dec, cfg) and up_jpeg is not None else up


def upscale(up, dec: Decoded, fmt: str, progress: Callable[[int, int], None] | None = None) -> Encoded:
    """The model's output for `dec`, laid out for the encoder of `fmt` (Pillow's reads the
    engine's buffer in place where it can)."""
    return up.upscale_decoded(dec, progress, for_pillow=fmt in PILLOW_READS_RGBX)


def upscale_many(up, decs: list[Decoded]) -> list[Encoded]:
    """Equal-size images in one forward pass (the daemon's batches on a GPU; see
    Upscaler.upscale_decoded_many)."""
    return up.upscale_decoded_many(decs)


def output_scale(enc: Encoded, size: tuple[int, int], native: int, model_version: str,
                 out: OutputConfig) -> tuple[Encoded, float]:
    """output.scale / output.long_side: resized unless that is the model's own size, and labelled
    with the model and scale (PNG text, JPEG comment, WebP XMP); and the output's scale."""
    return outscale.finish(enc, size, native, model_version, out)


def publish(enc: Encoded, dst: Path, fmt: str, out: OutputConfig, *, conflict: Conflict = "replace",
            png_threads: int = 1, sealed: Callable[[IO[bytes]], None] | None = None) -> Path:
    """Encode `enc` (consumed) straight into a temp file beside `dst` and rename it into place
    (output.on_conflict's `conflict`, see core.atomic.publish_as) in its folder, which the
    caller has made; returns the name it got.

    A huge PNG never sits in memory as bytes. `sealed(f)` runs once the image is encoded into
    the temp file, before it is synced and renamed: a caller records or locks there, and an
    exception it raises removes the temp file and publishes nothing.
    """
    with atomic_open(dst, "wb", conflict=conflict) as f:
        encode_to(f, enc, fmt, consume=True, png_threads=png_threads, **out.encode_options())
        del enc
        if sealed is not None:
            sealed(f)
    return f.published
