"""Resizing an upscaled image to the size asked for (output.scale, output.long_side).

The model always runs at its native scale; its output is then resized with Lanczos, and only
when the size asked for differs (otherwise the image is returned untouched, bit for bit).

- 8-bit: Pillow's LANCZOS on the whole image (L, LA, RGB, RGBA; an RGBX buffer from the engine
  is mapped, not copied). Pillow filters LA and RGBA premultiplied by alpha, so the colour of
  transparent pixels does not bleed into visible ones. Reductions of 6x or more first shrink by
  an integer factor (reducing_gap 3: by Pillow's measure indistinguishable from a full Lanczos).
- 16-bit: each plane as Pillow's "I;16", which Lanczos-filters 16-bit samples directly (within
  about one 16-bit level of a float filter on smooth images), so there is no full-size float copy:
  the extra memory is one input plane and one output plane at a time. With alpha, the colour is
  premultiplied into a 16-bit plane, in bands of rows, as Pillow does for 8 bits.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imaging.images import Encoded, rgbx_buffer

FILTER = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0
BAND = 256  # rows per step of the 16-bit alpha arithmetic (float32 only for a band)


def resize(enc: Encoded, size: tuple[int, int]) -> Encoded:
    """`enc` resized to `size` = (W, H); `enc` itself when it already has that size. Otherwise
    `enc` is consumed (its pixels dropped as soon as Pillow holds them) and a new Encoded, with
    the same bits, channels and metadata, is returned."""
    h, w, c = enc.pixels.shape
    if (w, h) == tuple(size):
        return enc
    out = _resize8(enc, size) if enc.pixels.dtype == np.uint8 else _resize16(enc, size)
    return Encoded(out, enc.bits, enc.icc, enc.exif, dict(enc.text))


def _resize8(enc: Encoded, size: tuple[int, int]) -> np.ndarray:
    px, enc.pixels = enc.pixels, None
    c = px.shape[2]
    buf = rgbx_buffer(px)
    if buf is not None:  # the engine's layout for Pillow encoders: kept, so encode_to maps it too
        im = Image.frombuffer("RGBX", (buf.shape[1], buf.shape[0]), buf, "raw", "RGBX", 0, 1)
    else:
        im = Image.fromarray(np.ascontiguousarray(px[..., 0] if c == 1 else px))  # L, LA, RGB, RGBA
    del px, buf  # Pillow has its copy (or the buffer)
    im = im.resize(size, FILTER, reducing_gap=REDUCING_GAP)
    out = np.array(im)  # owns its memory: an RGBX result's [..., :3] is again an rgbx_buffer view
    del im
    if out.ndim == 2:
        return out[..., None]
    return out[..., :3] if out.shape[2] == 4 and c == 3 else out


def _plane16(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One H x W uint16 plane, Lanczos-resized to `size` as a 16-bit image."""
    im = Image.fromarray(np.ascontiguousarray(plane))  # mode I;16, sharing the array's memory
    return np.asarray(im.resize(size, FILTER, reducing_gap=REDUCING_GAP))


def _resize16(enc: Encoded, size: tuple[int, int]) -> np.ndarray:
    px, enc.pixels = enc.pixels, None
    h, w, c = px.shape
    out = np.empty((size[1], size[0], c), np.uint16)
    if c in (1, 3):
        for k in range(c):
            out[..., k] = _plane16(px[..., k], size)
        return out
    alpha = out[..., -1]
    alpha[...] = _plane16(px[..., -1], size)
    tmp = np.empty((h, w), np.uint16)  # one premultiplied colour plane at a time
    for k in range(c - 1):
        for y in range(0, h, BAND):
            band = px[y : y + BAND, :, k].astype(np.float32)
            band *= px[y : y + BAND, :, -1]
            band *= 1 / 65535
            np.rint(band, out=band)
            tmp[y : y + BAND] = band
        colour = _plane16(tmp, size)
        for y in range(0, size[1], BAND):
            a = alpha[y : y + BAND].astype(np.float32)
            band = colour[y : y + BAND].astype(np.float32)
            band *= 65535
            np.divide(band, a, out=band, where=a > 0)
            band[a == 0] = 0
            band += 0.5
            np.clip(band, 0, 65535, out=band)
            out[y : y + BAND, :, k] = band
    return out
