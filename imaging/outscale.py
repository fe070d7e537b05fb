"""output.scale and output.long_side, and what each output records about how it was made.

The model runs at its native scale (x1, x2, x3, x4, x8); its output is then resized
(imaging/resize.py) to `output.scale` times the input, or to a long side of `output.long_side`
pixels; neither set, it stays at the native size, untouched. Both `upscaled upscale` and the
daemon finish every image with `finish`.
"""

from __future__ import annotations

from core import __version__
from core.config import MAX_OUTPUT_SCALE, OutputConfig
from imaging.images import Encoded, ImageError
from imaging.resize import resize

SOFTWARE = f"upscaled {__version__}"


def label(scale: float) -> str:
    """The scale as names and metadata write it: 2.0 -> "2", 2.5 -> "2.5", 1.30208 -> "1.3021"."""
    return f"{round(scale, 4):g}"


def factor(out: OutputConfig, size: tuple[int, int], native: int) -> float:
    """The output's scale relative to the input of `size` = (W, H): output.scale, or what makes
    the long side output.long_side, or else the model's native scale. (The long side does not
    change when EXIF orientation turns an image, so a size read from the file header will do.)"""
    if out.scale is not None:
        return out.scale
    if out.long_side is not None and max(size) > 0:
        return out.long_side / max(size)
    return float(native)


def target_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    w, h = size
    return max(1, round(w * scale)), max(1, round(h * scale))


def provenance(model_version: str, native: int, scale: float, size: tuple[int, int]) -> dict[str, str]:
    """What the output file records (PNG text, JPEG comment, WebP XMP; imaging/images.py)."""
    return {"Software": SOFTWARE, "upscaled:model": model_version, "upscaled:model_scale": str(native),
            "upscaled:scale": label(scale), "upscaled:size": f"{size[0]}x{size[1]}"}


def finish(enc: Encoded, size: tuple[int, int], native: int, model_version: str,
           out: OutputConfig) -> tuple[Encoded, float]:
    """The model's output `enc` for an input of `size` = (W, H), resized to what `out` asks for
    (consumed when it is resized; returned as it is when the size is the native one) and
    labelled with its provenance; and the output's scale."""
    scale = factor(out, size, native)
    if scale > MAX_OUTPUT_SCALE:
        raise ImageError(f"output.long_side {out.long_side} would enlarge this {size[0]}x{size[1]} image "
                         f"{scale:.1f} times, more than {MAX_OUTPUT_SCALE:g} (output.scale's limit too)")
    enc = resize(enc, target_size(size, scale))
    h, w = enc.pixels.shape[:2]
    enc.text = provenance(model_version, native, scale, (w, h))
    return enc, scale
