"""Colour handling end to end: decode -> upscale (tiny real model) -> encode -> decode again."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image, ImageCms

from imaging.images import Encoded, ImageError, decode, encode, encode_to, rgbx_buffer
from model.engine import EngineOptions, Upscaler
from tests.conftest import natural_image, tiny_generator

S = 4


@pytest.fixture(scope="module")
def up() -> Upscaler:
    return Upscaler(tiny_generator(), opts=EngineOptions(device="cpu", precision="fp32"))


def roundtrip(up: Upscaler, path: Path, fmt: str | None = None):
    dec = decode(path)
    enc = up.upscale_decoded(dec)
    data = encode(enc, fmt or dec.format)
    return dec, Image.open(io.BytesIO(data)), data


def test_rgb_png(tmp_path: Path, up: Upscaler) -> None:
    p = tmp_path / "a.png"
    Image.fromarray(natural_image(20, 30)).save(p)
    _, out, _ = roundtrip(up, p)
    assert out.mode == "RGB" and out.size == (30 * S, 20 * S)


def test_alpha_is_upscaled_and_reattached(tmp_path: Path, up: Upscaler) -> None:
    rgba = np.dstack([natural_image(16, 24), np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))])
    p = tmp_path / "a.png"
    Image.fromarray(rgba).save(p)
    _, out, _ = roundtrip(up, p)
    assert out.mode == "RGBA" and out.size == (24 * S, 16 * S)
    a = np.asarray(out)[..., 3].astype(int)
    expected = np.asarray(Image.fromarray(rgba[..., 3]).resize(out.size, Image.Resampling.BICUBIC)).astype(int)
    assert np.abs(a - expected).max() <= 1


def test_grayscale_in_grayscale_out(tmp_path: Path, up: Upscaler) -> None:
    p = tmp_path / "g.png"
    Image.fromarray(natural_image(16, 16)[..., 0]).save(p)
    dec, out, _ = roundtrip(up, p)
    assert dec.gray and out.mode == "L" and out.size == (64, 64)


def test_16bit_rgb_png_stays_16bit(tmp_path: Path, up: Upscaler) -> None:
    h, w = 12, 20
    arr = (np.random.default_rng(0).random((h, w, 3)) * 65535).astype(np.uint16)
    p = tmp_path / "deep.png"
    with open(p, "wb") as f:
        png.Writer(w, h, bitdepth=16, greyscale=False).write(f, arr.reshape(h, w * 3))
    dec = decode(p)
    assert dec.bits == 16 and np.allclose(dec.rgb, arr / 65535.0, atol=1e-6)  # nothing lost on input
    data = encode(up.upscale_decoded(dec), "PNG")
    ow, oh, rows, info = png.Reader(bytes=data).asDirect()
    assert info["bitdepth"] == 16 and (ow, oh) == (w * S, h * S)
    out = np.vstack([np.asarray(r, np.uint16) for r in rows])
    assert (out % 257 != 0).mean() > 0.5  # real 16-bit values, not 8-bit ones scaled up


def test_16bit_gray_png_stays_16bit(tmp_path: Path, up: Upscaler) -> None:
    arr = (np.random.default_rng(1).random((10, 14)) * 65535).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(arr).save(p)
    dec = decode(p)
    assert dec.gray and dec.bits == 16
    data = encode(up.upscale_decoded(dec), "PNG")
    _, _, _, info = png.Reader(bytes=data).asDirect()
    assert info["bitdepth"] == 16 and info["greyscale"]


def test_exif_orientation_applied(tmp_path: Path, up: Upscaler) -> None:
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(natural_image(10, 20)).save(p, exif=exif.tobytes(), quality=95)
    dec, out, _ = roundtrip(up, p)
    assert dec.size == (10, 20) and out.size == (40, 80)  # width/height swapped as displayed
    assert out.getexif().get(0x0112, 1) == 1  # and not rotated a second time by viewers


def test_icc_profile_carried(tmp_path: Path, up: Upscaler) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    for name, kw in (("c.jpg", {"quality": 90}), ("c.png", {}), ("c.webp", {"quality": 90})):
        p = tmp_path / name
        Image.fromarray(natural_image(12, 12)).save(p, icc_profile=icc, **kw)
        _, out, _ = roundtrip(up, p)
        assert out.info.get("icc_profile") == icc, name


def test_icc_profile_carried_in_16bit_png(tmp_path: Path, up: Upscaler) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    arr = (np.random.default_rng(0).random((8, 8, 3)) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    png.Writer(8, 8, bitdepth=16, greyscale=False).write(buf, arr.reshape(8, 24))
    dec = decode(buf.getvalue())
    dec.icc = icc
    out = Image.open(io.BytesIO(encode(up.upscale_decoded(dec), "PNG")))
    assert out.info.get("icc_profile") == icc


def test_palette_with_transparency_becomes_rgba(tmp_path: Path, up: Upscaler) -> None:
    im = Image.fromarray(natural_image(16, 16)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    im.info["transparency"] = 0
    p = tmp_path / "pal.png"
    im.save(p, transparency=0)
    _, out, _ = roundtrip(up, p)
    assert out.mode == "RGBA" and out.size == (64, 64)


def test_gif_is_written_as_png(tmp_path: Path, up: Upscaler) -> None:
    from imaging.images import output_format

    p = tmp_path / "a.gif"
    Image.fromarray(natural_image(8, 8)).convert("P").save(p)
    dec = decode(p)
    assert output_format(dec.format, None) == "PNG"


def test_cmyk_jpeg(tmp_path: Path, up: Upscaler) -> None:
    p = tmp_path / "cmyk.jpg"
    Image.fromarray(natural_image(8, 8)).convert("CMYK").save(p)
    _, out, _ = roundtrip(up, p)
    assert out.mode == "RGB" and out.size == (32, 32)


def test_rgba_to_jpeg_composites_on_white(up: Upscaler) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    dec = decode(_png_bytes(rgba))
    out = Image.open(io.BytesIO(encode(up.upscale_decoded(dec), "JPEG")))
    assert out.mode == "RGB" and np.asarray(out).mean() > 250


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("content,reason", [(b"", "empty"), (b"hello, not an image", "not an image"),
                                            (None, "not a readable image")])
def test_bad_inputs_have_readable_reasons(tmp_path: Path, content: bytes | None, reason: str) -> None:
    if content is None:  # a truncated PNG
        content = _png_bytes(natural_image(32, 32))[:200]
    with pytest.raises(ImageError, match=reason):
        decode(content)


def test_animated_gif_refused(tmp_path: Path) -> None:
    frames = [Image.fromarray(natural_image(8, 8, seed=i)).convert("P") for i in range(3)]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageError, match="frames"):
        decode(p)


@pytest.mark.parametrize("bits", [8, 16])
def test_png_compress_level_trades_size_not_pixels(bits):
    px = natural_image(96, 96, seed=4)
    if bits == 16:
        px = px.astype(np.uint16) * 257 + np.uint16(100)
    enc = Encoded(px, bits)
    fast, small = (encode(enc, "PNG", png_compress_level=n, png_strategy="default") for n in (0, 9))
    assert len(fast) > 1.1 * len(small)
    for data in (fast, small):
        dec = decode(data)
        assert dec.bits == bits
        assert np.array_equal(np.round(dec.unit_rgb() * (2**bits - 1)).astype(px.dtype), px)


def test_png_rle_strategy_same_pixels_and_flat_areas_still_compress():
    px = natural_image(96, 96, seed=5)
    rle, plain = (encode(Encoded(px, 8), "PNG", png_compress_level=9, png_strategy=s) for s in ("rle", "default"))
    assert rle != plain  # the strategy reached zlib
    for data in (rle, plain):
        assert np.array_equal(np.round(decode(data).unit_rgb() * 255).astype(np.uint8), px)
    flat = np.zeros((256, 256, 3), np.uint8)
    flat[:, 128:] = (200, 30, 90)
    assert len(encode(Encoded(flat, 8), "PNG", png_strategy="rle")) < flat.nbytes / 100


def test_consume_drops_the_pixels_and_encodes_the_same():
    px = natural_image(40, 56, seed=11)
    for fmt in ("JPEG", "PNG"):
        kept, given = Encoded(px.copy(), 8), Encoded(px.copy(), 8)
        a, b = io.BytesIO(), io.BytesIO()
        encode_to(a, kept, fmt, png_strategy="rle")
        encode_to(b, given, fmt, png_strategy="rle", consume=True)
        assert a.getvalue() == b.getvalue()
        assert kept.pixels is not None and given.pixels is None


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG", "TIFF", "BMP"])
def test_rgbx_layout_encodes_the_same_bytes(tmp_path: Path, up: Upscaler, fmt: str) -> None:
    """for_pillow gives the RGB view of an RGBX buffer (Pillow maps it instead of copying it);
    every format writes exactly what it writes from an ordinary array."""
    p = tmp_path / "a.png"
    Image.fromarray(natural_image(20, 30, seed=4)).save(p)
    dec = decode(p)
    plain, mapped = up.upscale_decoded(dec), up.upscale_decoded(dec, for_pillow=True)
    assert rgbx_buffer(plain.pixels) is None and rgbx_buffer(mapped.pixels) is not None
    assert np.array_equal(plain.pixels, mapped.pixels)
    # X is left unset by the engine: whatever it holds must not reach the file (as alpha, say).
    rgbx_buffer(mapped.pixels)[..., 3] = np.random.default_rng(0).integers(0, 256, mapped.pixels.shape[:2])
    assert encode(plain, fmt) == encode(mapped, fmt)


def test_rgbx_layout_only_where_it_applies(tmp_path: Path, up: Upscaler) -> None:
    rgba = np.dstack([natural_image(16, 24), np.full((16, 24), 128, np.uint8)])
    gray, deep = natural_image(16, 24)[..., 0], (np.random.default_rng(2).random((8, 8)) * 65535).astype(np.uint16)
    for name, arr in (("rgba.png", rgba), ("gray.png", gray), ("deep.png", deep)):
        Image.fromarray(arr).save(tmp_path / name)
        enc = up.upscale_decoded(decode(tmp_path / name), for_pillow=True)
        assert rgbx_buffer(enc.pixels) is None and enc.pixels.flags.c_contiguous
    buf = np.zeros((4, 5, 4), np.uint8)
    assert rgbx_buffer(buf[..., :3]) is buf
    assert rgbx_buffer(buf[1:, :, :3]) is None and rgbx_buffer(buf[..., 1:]) is None  # not where it starts


def test_noise_like_jpeg_at_high_quality_is_written(tmp_path: Path) -> None:
    """Pillow's optimised-JPEG buffer (2 bytes per pixel) overflows on noise at quality >= 90 with
    4:4:4; the file is written again without optimising, into the same open file."""
    noise = np.random.default_rng(3).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    with open(tmp_path / "n.jpg", "wb") as f:
        f.write(b"prefix")
        encode_to(f, Encoded(noise, 8), "JPEG", jpeg_quality=100)
    data = (tmp_path / "n.jpg").read_bytes()
    assert data.startswith(b"prefix\xff\xd8") and data.count(b"\xff\xd8\xff") == 1
    out = np.asarray(Image.open(io.BytesIO(data[6:])))
    assert out.shape == noise.shape and np.abs(out.astype(int) - noise).mean() < 8


def test_8bit_input_stays_uint8_and_upscales_as_its_floats(tmp_path: Path, up: Upscaler) -> None:
    """8-bit inputs are held as uint8 (a quarter of float32's memory) and converted tile by tile;
    the result is exactly that of the float input, for colour, gray and alpha images."""
    rgba = np.dstack([natural_image(21, 17, seed=8), np.full((21, 17), 200, np.uint8)])
    for name, arr in (("c.png", rgba[..., :3]), ("g.png", rgba[..., 0]), ("a.png", rgba)):
        Image.fromarray(arr).save(tmp_path / name)
        dec = decode(tmp_path / name)
        assert dec.rgb.dtype == np.uint8 and dec.rgb.flags.writeable
        assert dec.unit_rgb().dtype == np.float32 and dec.unit_rgb().max() <= 1.0
        assert np.array_equal(up.upscale_rgb(dec.rgb), up.upscale_rgb(dec.unit_rgb()))
    assert decode(tmp_path / "a.png").alpha.dtype == np.uint8  # upscaled as 8 bits, never as floats


def test_jpeg_quality_is_estimated_from_the_quantization_table() -> None:
    import io

    from imaging.images import decode

    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for q in (30, 60, 75, 90, 98):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        assert abs(decode(buf.getvalue()).jpeg_quality - q) <= 1
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert decode(buf.getvalue()).jpeg_quality is None
