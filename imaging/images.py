"""Decoding and encoding images without losing what the user cares about.

EXIF orientation is applied, the ICC profile and EXIF travel to the output, alpha is upscaled
separately, grayscale stays grayscale and 16-bit PNGs stay 16-bit (Pillow only reads 16-bit
grayscale, so 16-bit colour PNGs go through pypng). What made the output (`Encoded.text`) is
written into PNG (text chunks), JPEG (a comment) and WebP (XMP) files.
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO
from xml.sax.saxutils import quoteattr

import numpy as np
import png  # pypng
from PIL import Image, ImageOps

from imaging.png import metadata_chunks, write_png

Image.MAX_IMAGE_PIXELS = 400_000_000  # large scans are welcome; decompression bombs are not

# Format name (Pillow's) -> file extension used when the format changes.
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "TIFF": ".tif", "BMP": ".bmp"}
EXTENSIONS = {
    ".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".webp": "WEBP",
    ".tif": "TIFF", ".tiff": "TIFF", ".bmp": "BMP", ".gif": "GIF",
}
# The only decoders an input file is ever shown (Pillow's `formats=`): whatever its name, ICO,
# TGA, EPS (which runs Ghostscript), PSD and the rest never see untrusted inbox files.
READ_FORMATS = tuple(sorted(set(EXTENSIONS.values())))
# Formats we read but would damage on write (GIF: 256 colours): their output is PNG.
WRITE_AS = {"GIF": "PNG"}
PILLOW_READS_RGBX = ("JPEG", "WEBP")  # formats whose Pillow encoders take an RGBX image as it is


class ImageError(ValueError):
    """An input that cannot be decoded or an output that cannot be encoded; message is for people."""


@dataclass
class Decoded:
    # H x W x 3: uint8 for 8-bit images, colour or gray (a quarter of float32's memory: 72 MB for
    # a 24-MP photo; the engine converts it tile by tile), float32 in [0, 1] for deeper ones.
    # unit_rgb() gives floats either way.
    rgb: np.ndarray
    alpha: np.ndarray | None  # H x W: uint8 for 8-bit images, float32 in [0, 1] for deeper ones
    bits: int  # 8 or 16
    gray: bool
    format: str  # Pillow format name of the input
    icc: bytes | None = None
    exif: bytes | None = None
    jpeg_quality: int | None = None  # a JPEG's quality, estimated from its quantization table

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    def unit_rgb(self) -> np.ndarray:
        """The colour as float32 in [0, 1], whatever it is stored as."""
        return unit_float(self.rgb)


def unit_float(a: np.ndarray) -> np.ndarray:
    """uint8 samples as float32 in [0, 1] (exactly as the engine converts them: x * (1 / 255) in
    float32); float arrays as they are."""
    if a.dtype != np.uint8:
        return a
    f = a.astype(np.float32)
    f *= 1 / 255.0
    return f


@dataclass
class Encoded:
    """An upscaled image ready to write: 8- or 16-bit samples plus what travels with them."""

    pixels: np.ndarray  # uint8/uint16, H x W x C with C in (1, 2, 3, 4)
    bits: int
    icc: bytes | None = None
    exif: bytes | None = None
    # What made the image (software, model, scale), key -> value; keys are PNG keywords, and
    # "prefix:name" keys are XMP names too (imaging/outscale.py provenance).
    text: dict[str, str] = field(default_factory=dict)


def is_supported(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in EXTENSIONS


def _png_ihdr(head: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG, from its first bytes; None if not a PNG."""
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or len(head) < 26:
        return None
    return head[24], head[25]


def _decode_png16(data: bytes) -> tuple[np.ndarray, int]:
    """16-bit PNG -> (uint16 H x W x C array, planes), via pypng."""
    w, h, rows, info = png.Reader(bytes=data).asDirect()
    planes = info["planes"]
    arr = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(h, w, planes)
    return arr, planes


# The IJG (libjpeg) luminance table at quality 50; encoders scale it for other qualities.
_IJG_LUMA_SUM = sum([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                     14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def jpeg_quality(im: Image.Image) -> int | None:
    """The IJG quality (1-100) whose luminance table is closest to this JPEG's; None if unknown."""
    tables = getattr(im, "quantization", None)
    if not tables or 0 not in tables:
        return None
    scale = 100.0 * sum(tables[0]) / _IJG_LUMA_SUM  # percent of the quality-50 table
    q = (200 - scale) / 2 if scale <= 100 else 5000 / scale
    return int(min(100, max(1, round(q))))


@dataclass(frozen=True)
class Header:
    """What an image file's header says, read without decoding its pixels."""

    width: int
    height: int
    bits: int  # 8 or 16
    alpha: bool
    gray: bool


def read_header(path: str | os.PathLike) -> Header | None:
    """The size and sample layout an image file declares, from its header alone (no pixel is
    decoded); None when it is not an image we read (decode then says why)."""
    try:
        with Image.open(path, formats=READ_FORMATS) as im:
            w, h = im.size
            mode = im.mode
            ihdr = _png_ihdr(_head(path)) if im.format == "PNG" else None
            deep = mode.startswith("I") or mode == "F" or (ihdr is not None and ihdr[0] == 16)
            alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in im.info)
            return Header(w, h, 16 if deep else 8, alpha, mode in ("1", "L", "LA", "La") or mode.startswith("I") or mode == "F")
    except Exception:  # noqa: BLE001 - not an image, a bomb, a damaged header: decode reports it
        return None


def _head(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read(32)


def decode(source: str | os.PathLike | bytes) -> Decoded:
    """Read an image file into float RGB (+ alpha) plus its colour metadata; the colour under
    fully transparent pixels is filled from their visible neighbours (bleed_transparent)."""
    dec = _decode(source)
    if dec.alpha is not None:
        bleed_transparent(dec.rgb, dec.alpha)
    return dec


def _decode(source: str | os.PathLike | bytes) -> Decoded:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise ImageError("the file is empty")
    try:
        im = Image.open(io.BytesIO(data), formats=READ_FORMATS)
        im.load()
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is too large to process safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not an image, or not one of the formats upscaled reads ({', '.join(READ_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image ({e})") from None
    fmt = im.format or "PNG"
    if getattr(im, "n_frames", 1) > 1 and fmt in ("GIF", "WEBP", "PNG", "TIFF"):
        raise ImageError(f"{fmt} with {im.n_frames} frames: animated/multi-page images are not supported")
    icc = im.info.get("icc_profile") or None
    quality = jpeg_quality(im) if fmt == "JPEG" else None

    ihdr = _png_ihdr(data[:32]) if fmt == "PNG" else None
    if ihdr and ihdr[0] == 16:
        arr, planes = _decode_png16(data)
        gray = planes in (1, 2)
        has_alpha = planes in (2, 4)
        f = arr.astype(np.float32) / 65535.0
        rgb = np.repeat(f[..., :1], 3, axis=2) if gray else f[..., :3]
        alpha = f[..., -1] if has_alpha else None
        # PNG has no orientation tag Pillow honours beyond eXIf; apply it the same way.
        dec = Decoded(np.ascontiguousarray(rgb), alpha, 16, gray, fmt, icc, im.info.get("exif"))
        return _apply_orientation(dec, im)

    im = ImageOps.exif_transpose(im)  # also drops the Orientation tag from im.info["exif"]
    exif = im.info.get("exif") or None
    mode = im.mode
    if mode == "P":
        # Palette images become RGB(A): upscaled pixels would not fit back into 256 colours.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode == "PA":
        im, mode = im.convert("RGBA"), "RGBA"
    if mode == "1":
        im, mode = im.convert("L"), "L"
    if mode == "CMYK":
        im, mode, icc = im.convert("RGB"), "RGB", None  # a CMYK profile no longer describes RGB pixels
    if mode in ("La", "RGBa"):
        im = im.convert("LA" if mode == "La" else "RGBA")
        mode = im.mode

    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        f = (np.clip(a, 0, 65535) / 65535.0).astype(np.float32)
        return Decoded(np.ascontiguousarray(np.repeat(f[..., None], 3, axis=2)), None, 16, True, fmt, icc, exif)
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) if a.size else 1.0
        f = np.clip(a / (hi if hi > 1.0 else 1.0), 0, 1)
        return Decoded(np.ascontiguousarray(np.repeat(f[..., None], 3, axis=2)), None, 16, True, fmt, icc, exif)
    if mode in ("L", "LA"):
        a = np.array(im)  # uint8, like 8-bit colour
        lum = a if mode == "L" else a[..., 0]
        alpha = np.ascontiguousarray(a[..., 1]) if mode == "LA" else None
        return Decoded(np.ascontiguousarray(np.repeat(lum[..., None], 3, axis=2)), alpha, 8, True, fmt, icc, exif, quality)
    if mode not in ("RGB", "RGBA", "RGBX"):
        im = im.convert("RGBA" if "A" in mode else "RGB")
        mode = im.mode
    a = np.array(im)  # uint8, writable (asarray shares Pillow's read-only bytes); tiles become float in the engine
    alpha = np.ascontiguousarray(a[..., 3]) if mode == "RGBA" else None  # a copy: `a` can go
    return Decoded(np.ascontiguousarray(a[..., :3]), alpha, 8, False, fmt, icc, exif, quality)


def _apply_orientation(dec: Decoded, im: Image.Image) -> Decoded:
    orientation = im.getexif().get(0x0112, 1)
    ops = {
        2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1],
    }
    op = ops.get(orientation)
    if op is None:
        return dec
    exif = im.getexif()
    del exif[0x0112]
    return replace(
        dec,
        rgb=np.ascontiguousarray(op(dec.rgb)),
        alpha=None if dec.alpha is None else np.ascontiguousarray(op(dec.alpha)),
        exif=exif.tobytes(),
    )


_BAND = 512  # rows per band at full size (even): no full-size float copy of a large image


def bleed_transparent(rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Fill, in place, the colour under fully transparent pixels from the nearest visible ones.

    Icons and sprites often hold black (or anything) under alpha 0. Nobody sees it in the input,
    but the network looks at a neighbourhood, so that colour bleeds into the upscaled edge pixels
    that bicubic alpha makes partly visible: a dark fringe along every transparent edge. A
    push-pull pyramid (average the visible pixels 2x2 down to a level with no holes, then
    interpolate back up into the holes only) gives each hole a smooth blend of the visible
    colours nearest to it, in O(pixels). Visible pixels are untouched.
    """
    hole = alpha == 0
    if not hole.any() or hole.all():
        return
    h, w = alpha.shape
    # Level 1 (half size) from the full-size image, a band of rows at a time.
    hh, hw = (h + 1) // 2, (w + 1) // 2
    csum = np.zeros((hh, hw, 3), np.float32)
    wsum = np.zeros((hh, hw), np.float32)
    for y in range(0, h, _BAND):
        c = unit_float(rgb[y : y + _BAND]).astype(np.float32, copy=True)
        wt = (~hole[y : y + _BAND]).astype(np.float32)
        c *= wt[..., None]
        _pool_add(csum, wsum, c, wt, y // 2)
    levels = [(csum, wsum)]
    while levels[-1][1].min() == 0 and max(levels[-1][1].shape) > 1:
        c, wt = levels[-1]
        ch, cw = wt.shape
        nc = np.zeros(((ch + 1) // 2, (cw + 1) // 2, 3), np.float32)
        nw = np.zeros(nc.shape[:2], np.float32)
        _pool_add(nc, nw, c, wt, 0)
        levels.append((nc, nw))
    # Pull: each level's holes from the (filled) level below, interpolated bilinearly.
    filled = None
    for c, wt in reversed(levels):
        mean = c / np.maximum(wt, 1e-12)[..., None]
        if filled is not None:
            up = _resize_planes(filled, wt.shape, (0, wt.shape[0] / 2))
            empty = wt == 0
            mean[empty] = up[empty]
        filled = mean
    # Full size: only hole pixels change, band by band.
    hi = 255.0 if rgb.dtype == np.uint8 else 1.0
    for y in range(0, h, _BAND):
        band_hole = hole[y : y + _BAND]
        if not band_hole.any():
            continue
        rows = band_hole.shape[0]
        up = _resize_planes(filled, (rows, w), (y / 2, (y + rows) / 2))
        vals = up[band_hole] * hi
        if rgb.dtype == np.uint8:
            vals = np.clip(vals + 0.5, 0, 255).astype(np.uint8)
        rgb[y : y + _BAND][band_hole] = vals


def _pool_add(csum: np.ndarray, wsum: np.ndarray, c: np.ndarray, wt: np.ndarray, y0: int) -> None:
    """Add 2x2 block sums of the weighted colour `c` and weights `wt` into rows y0.. of the half-size sums."""
    h, w = wt.shape
    if h % 2 or w % 2:  # an odd edge: its blocks have one row/column
        c = np.pad(c, ((0, h % 2), (0, w % 2), (0, 0)))
        wt = np.pad(wt, ((0, h % 2), (0, w % 2)))
        h, w = wt.shape
    rows = h // 2
    csum[y0 : y0 + rows] += c.reshape(rows, 2, w // 2, 2, 3).sum(axis=(1, 3))
    wsum[y0 : y0 + rows] += wt.reshape(rows, 2, w // 2, 2).sum(axis=(1, 3))


def _resize_planes(src: np.ndarray, size: tuple[int, int], rows: tuple[float, float]) -> np.ndarray:
    """Bilinear 2x upscale of `src` (a pyramid level) rows rows[0]..rows[1] (source coordinates)
    to `size` = (H, W), per channel. Pillow takes its filter support from outside the box, so
    bands of a large image join seamlessly."""
    h, w = size
    box = (0.0, float(rows[0]), w / 2, float(rows[1]))
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(src[..., k])).resize((w, h), Image.Resampling.BILINEAR, box=box))
              for k in range(3)]
    return np.stack(planes, axis=2)


def upscale_alpha(alpha: np.ndarray, size: tuple[int, int], bits: int) -> np.ndarray:
    """Bicubic upscale of an alpha plane to `size` = (W, H), quantized to `bits`.

    8-bit alpha is resized as an 8-bit plane (a quarter of the memory of a float one, which
    matters for a 400-megapixel output); 16-bit alpha goes through float to keep its precision.
    """
    if bits == 8:
        a8 = alpha if alpha.dtype == np.uint8 else quantize(alpha, 8)
        return np.asarray(Image.fromarray(a8).resize(size, Image.Resampling.BICUBIC))
    up = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32)).resize(size, Image.Resampling.BICUBIC)
    return quantize(np.asarray(up, dtype=np.float32), 16)


def quantize(x: np.ndarray, bits: int) -> np.ndarray:
    """Float [0, 1] -> uint8/uint16 with rounding (values outside are clipped)."""
    hi = 255.0 if bits == 8 else 65535.0
    out = np.empty(x.shape, dtype=np.uint8 if bits == 8 else np.uint16)
    np.clip(x * hi + 0.5, 0, hi, out=out, casting="unsafe")
    return out


def to_gray(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of a quantized RGB array, same dtype (grayscale in -> grayscale out).

    Computed in bands of rows so a huge output never gets a full-size float copy.
    """
    out = np.empty(rgb.shape[:2], dtype=rgb.dtype)
    for y in range(0, rgb.shape[0], 256):
        band = rgb[y : y + 256].astype(np.float32)
        out[y : y + 256] = np.rint(band @ np.array([0.299, 0.587, 0.114], np.float32))
    return out


def assemble(dec: Decoded, rgb_q: np.ndarray) -> Encoded:
    """Combine the quantized upscaled colour with the source's alpha/gray/metadata."""
    planes = to_gray(rgb_q)[..., None] if dec.gray else rgb_q
    if dec.alpha is not None:
        a = upscale_alpha(dec.alpha, (rgb_q.shape[1], rgb_q.shape[0]), dec.bits)
        planes = np.concatenate([planes, a[..., None]], axis=2)
    # The engine's RGB view of an RGBX buffer stays a view (see rgbx_buffer).
    return Encoded(planes if planes is rgb_q else np.ascontiguousarray(planes), dec.bits, dec.icc, dec.exif)


def rgbx_buffer(px: np.ndarray) -> np.ndarray | None:
    """The H x W x 4 uint8 buffer whose first three channels `px` is (what Upscaler.upscale_rgb
    returns with rgbx=True), or None when `px` is not such a view."""
    base = px.base
    if (px.ndim == 3 and px.shape[2] == 3 and px.dtype == np.uint8 and isinstance(base, np.ndarray)
            and base.dtype == np.uint8 and base.shape == px.shape[:2] + (4,) and base.flags.c_contiguous
            and base.ctypes.data == px.ctypes.data):
        return base
    return None


def output_format(src_format: str, requested: str | None) -> str:
    if requested:
        return {"JPG": "JPEG"}.get(requested.upper(), requested.upper())
    return WRITE_AS.get(src_format, src_format if src_format in FORMATS else "PNG")


NAME_FIELDS = ("stem", "scale", "model")


def output_name(rel: Path, requested: str | None, template: str = "{stem}", scale: int | str = 4,
                model: str = "") -> tuple[Path, str]:
    """Output path (relative, like `rel`) and format. The name is `template` filled in ({stem},
    {scale}: the output's scale as written, "2" or "2.5"; {model}: the model version's digest)
    plus the extension: the input's own while the format is kept, else the new format's. Raises
    ImageError for an unsupported input type."""
    src_format = EXTENSIONS.get(rel.suffix.lower())
    if src_format is None:
        raise ImageError(f"not a supported image type ({rel.suffix or 'no extension'})")
    fmt = output_format(src_format, requested)
    ext = rel.suffix if fmt == src_format else FORMATS[fmt]
    if template == "{stem}":
        return rel.with_suffix(ext), fmt
    name = template.format(stem=rel.stem, scale=scale, model=model.rsplit("-", 1)[-1])
    return rel.with_name(name + ext), fmt


def _encode_png16(enc: Encoded, level: int) -> bytes:
    h, w, c = enc.pixels.shape
    writer = png.Writer(w, h, bitdepth=16, greyscale=c in (1, 2), alpha=c in (2, 4), compression=level)
    buf = io.BytesIO()
    writer.write(buf, enc.pixels.reshape(h, w * c))
    data = buf.getvalue()
    extra = metadata_chunks(enc.icc, enc.exif, enc.text)
    # IHDR is always the first chunk: 8-byte signature + 25-byte IHDR chunk.
    return data[:33] + extra + data[33:]


XMP_NS = {"xmp": "http://ns.adobe.com/xap/1.0/", "upscaled": "urn:upscaled:ns:1.0/"}


def xmp_packet(text: dict[str, str]) -> bytes:
    """An XMP packet with `text` as properties of one rdf:Description: "Software" becomes
    xmp:CreatorTool, "upscaled:..." keys stay as they are (the upscaled namespace)."""
    props = "".join(f"\n   {'xmp:CreatorTool' if k == 'Software' else k}={quoteattr(v)}" for k, v in text.items()
                    if k == "Software" or k.startswith("upscaled:"))
    ns = "".join(f' xmlns:{p}="{uri}"' for p, uri in XMP_NS.items())
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
            f'  <rdf:Description rdf:about=""{ns}{props}/>\n </rdf:RDF>\n</x:xmpmeta>\n'
            '<?xpacket end="w"?>').encode()


def _text_options(fmt: str, text: dict[str, str]) -> dict:
    """Pillow save options that write `text` into a `fmt` file: PNG, JPEG and WebP."""
    lines = "\n".join(f"{k}: {v}" for k, v in text.items())
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for k, v in text.items():
            info.add_text(k, v)  # iTXt where the value is not Latin-1
        return {"pnginfo": info}
    if fmt == "JPEG":
        return {"comment": lines.encode()}  # a COM segment, one "key: value" per line
    if fmt == "WEBP":
        return {"xmp": xmp_packet(text)}
    # TIFF: Pillow's tiffinfo would replace the EXIF that travels from the input; BMP has no room.
    return {}


def encode(enc: Encoded, fmt: str, **options) -> bytes:
    """Encode to bytes in `fmt` (see encode_to for the options)."""
    buf = io.BytesIO()
    encode_to(buf, enc, fmt, **options)
    return buf.getvalue()


def encode_to(f: IO[bytes], enc: Encoded, fmt: str, *, jpeg_quality: int = 95, webp_quality: int = 95,
              webp_lossless: bool = False, png_compress_level: int = 4, png_strategy: str = "fast",
              consume: bool = False, png_threads: int = 1,
              jpeg_background: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Encode into an open binary file, without holding the encoded bytes in memory.

    png_threads: threads for the fast PNG writer (the same file with any number).
    consume: the caller gives up `enc.pixels`. Where Pillow encodes (JPEG, WebP, TIFF, BMP, and
    PNG but for "fast") it makes its own copy of the image first, so the array is dropped before
    the encode itself. An RGBX buffer from the engine (rgbx_buffer) is not copied for JPEG and
    WebP but mapped, so there is no moment when both exist: for a 24000x16000 JPEG, peak RSS
    3.22 -> 2.89 GB.

    16-bit data is kept where the format can hold it (PNG, TIFF gray). PNGs are written by
    imaging/png.py (png_strategy "fast": one filter and ISA-L, 5-7x faster than Pillow for files
    16-22% larger on photos and smaller on graphics), or by Pillow (8-bit) and pypng (16-bit) with
    zlib at png_compress_level ("rle" and "default"). For those: PNG level 4 rather than
    zlib's 6: measured on model outputs, 2.5-3x faster for files 2-3% larger, and on a busy CPU
    compression time is taken from inference. png_strategy "rle" (8-bit only; pypng, which writes
    16-bit, has no strategy) halves that again, with smaller files on photos: after PNG's
    filters an upscaled photo has few long repeats for LZ77 to find, while runs of one colour
    in flat graphics still compress.
    """
    px, c = enc.pixels, enc.pixels.shape[2]
    if fmt == "PNG" and png_strategy == "fast":
        write_png(f, px, icc=enc.icc, exif=enc.exif, text=enc.text, threads=png_threads)
        return
    if enc.bits == 16 and fmt == "PNG":
        f.write(_encode_png16(enc, png_compress_level))
        return
    if enc.bits == 16:
        if fmt == "TIFF" and c == 1:
            im = Image.fromarray(np.ascontiguousarray(px[..., 0]))  # I;16
        else:
            # JPEG/WEBP/BMP hold 8 bits per sample; round rather than truncate.
            px = ((px.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            im = None
    else:
        im = None
    if im is None and fmt in PILLOW_READS_RGBX and (buf := rgbx_buffer(px)) is not None:
        # Pillow's RGB pixels are 4 bytes: map the engine's RGBX buffer instead of copying into them.
        im = Image.frombuffer("RGBX", (buf.shape[1], buf.shape[0]), buf, "raw", "RGBX", 0, 1)
    if im is None:
        im = Image.fromarray(np.ascontiguousarray(px[..., 0] if c == 1 else px))  # L, LA, RGB or RGBA
    if consume:
        enc.pixels = px = None  # Pillow has its copy (or shares the buffer, which keeps it alive)
    if fmt == "JPEG" and im.mode in ("LA", "RGBA"):
        # JPEG has no alpha: composite onto the background (output.jpeg_background; white by default).
        r, g, b = jpeg_background
        bg = Image.new("RGB" if im.mode == "RGBA" else "L", im.size,
                       round(0.299 * r + 0.587 * g + 0.114 * b) if im.mode == "LA" else (r, g, b))
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    if fmt == "BMP" and im.mode == "LA":
        im = im.convert("RGBA")
    kw: dict = {}
    if enc.icc:
        kw["icc_profile"] = enc.icc
    if enc.exif and fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        kw["exif"] = enc.exif
    if enc.text:
        kw.update(_text_options(fmt, enc.text))
    if fmt == "JPEG":
        # Huffman optimisation makes libjpeg hold every coefficient of the image (~6 bytes per
        # pixel): worth a few percent of file size on normal images, gigabytes on huge ones.
        small = im.width * im.height <= 16_000_000
        kw.update(quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2, optimize=small)
    elif fmt == "WEBP":
        kw.update(quality=webp_quality, lossless=webp_lossless, method=4)
    elif fmt == "PNG":
        kw.update(compress_level=png_compress_level)
        if png_strategy == "rle" and png_compress_level:
            kw.update(compress_type=zlib.Z_RLE)
    elif fmt == "TIFF":
        kw.update(compression="tiff_lzw")
    start = f.tell() if f.seekable() else None
    try:
        try:
            im.save(f, format=fmt, **kw)
        except OSError as e:
            if e.errno is not None or not kw.get("optimize") or start is None:
                raise
            # Pillow sizes the buffer of an optimised JPEG at 2 bytes per pixel (quality >= 95),
            # and noise-like images at high quality need more: written again without optimising.
            f.seek(start)
            f.truncate()
            im.save(f, format=fmt, **(kw | {"optimize": False}))
    except OSError as e:
        if e.errno is not None:
            raise  # a real I/O error (disk full, ...): the caller decides whether to retry
        raise ImageError(f"cannot encode as {fmt}: {e}") from None
    except (ValueError, KeyError) as e:
        raise ImageError(f"cannot encode as {fmt}: {e}") from None
