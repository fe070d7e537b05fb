"""imaging/png.py, the fast PNG writer: exact pixels for every layout it writes, read back by two
independent decoders; metadata kept; streamed in blocks."""

from __future__ import annotations

import io

import numpy as np
import png as pypng
import pytest
from PIL import Image, ImageCms

from imaging.images import Encoded, decode, encode
import imaging.png as fastpng
from tests.conftest import natural_image


def read_pypng(data: bytes) -> np.ndarray:
    w, h, rows, info = pypng.Reader(bytes=data).read()
    return np.array([np.asarray(r) for r in rows]).reshape(h, w, info["planes"])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 9), (40, 1)])
def test_pixels_round_trip_exactly(channels: int, dtype, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(channels)
    px = rng.integers(0, np.iinfo(dtype).max + 1, (*shape, channels)).astype(dtype)
    buf = io.BytesIO()
    fastpng.write_png(buf, px)
    data = buf.getvalue()
    assert np.array_equal(read_pypng(data), px)
    if dtype == np.uint8:  # Pillow reads 8-bit of every colour type
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))).reshape(px.shape), px)


def test_streams_in_blocks_with_the_right_prior_row(monkeypatch: pytest.MonkeyPatch) -> None:
    px = natural_image(64, 48, seed=3)
    monkeypatch.setattr(fastpng, "BLOCK_BYTES", 48 * 3 * 5)  # 5 rows a block: 13 blocks, the last short
    buf = io.BytesIO()
    fastpng.write_png(buf, px)
    assert np.array_equal(read_pypng(buf.getvalue()), px)


def test_metadata_kept_and_bad_layouts_refused() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "upscaled test camera"
    data = encode(Encoded(natural_image(8, 8), 8, icc=icc, exif=exif.tobytes()), "PNG", png_strategy="fast")
    im = Image.open(io.BytesIO(data))
    assert im.info["icc_profile"] == icc and im.getexif()[0x010F] == "upscaled test camera"
    for bad in (np.zeros((4, 4, 5), np.uint8), np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)):
        with pytest.raises(ValueError):
            fastpng.write_png(io.BytesIO(), bad)


def test_fast_is_the_default_with_the_same_pixels() -> None:
    px = natural_image(96, 128, seed=9)
    fast, rle = encode(Encoded(px, 8), "PNG"), encode(Encoded(px, 8), "PNG", png_strategy="rle")
    assert fast != rle
    for data in (fast, rle):
        assert np.array_equal(np.round(decode(data).unit_rgb() * 255).astype(np.uint8), px)
    flat = np.zeros((256, 256, 3), np.uint8)
    flat[:, 128:] = (200, 30, 90)
    assert len(encode(Encoded(flat, 8), "PNG")) < flat.nbytes / 100  # flat areas still compress


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_strided_views_are_written_block_by_block(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """The engine's RGB view of an RGBX buffer (and any strided view) gives the same file as a
    contiguous copy, with blocks as the only copies."""
    rgbx = np.random.default_rng(5).integers(0, np.iinfo(dtype).max + 1, (33, 21, 4)).astype(dtype)
    monkeypatch.setattr(fastpng, "BLOCK_BYTES", 21 * 3 * dtype().itemsize * 4)
    view, copy = io.BytesIO(), io.BytesIO()
    fastpng.write_png(view, rgbx[..., :3])
    fastpng.write_png(copy, np.ascontiguousarray(rgbx[..., :3]))
    assert view.getvalue() == copy.getvalue()
    assert np.array_equal(read_pypng(view.getvalue()), rgbx[..., :3])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_threads_write_the_same_file(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """Blocks compressed on several threads are concatenated raw deflate streams under one zlib
    header and one combined adler32: the same bytes as serially, and zlib (pypng) checks the sum."""
    px = natural_image(200, 300, seed=7).astype(dtype) * (257 if dtype == np.uint16 else 1)  # >= 256 KB: split
    px[::7, ::5] ^= 1  # a little noise, so blocks do not compress to nothing
    for block in (fastpng.BLOCK_BYTES, 300 * 3 * px.itemsize * 9):  # the default; many small blocks
        monkeypatch.setattr(fastpng, "BLOCK_BYTES", block)
        files = {}
        for threads in (1, 2, 3):
            buf = io.BytesIO()
            fastpng.write_png(buf, px, threads=threads)
            files[threads] = buf.getvalue()
        assert files[1] == files[2] == files[3]
        assert np.array_equal(read_pypng(files[2]), px)


def test_adler32_combine_matches_zlib() -> None:
    import zlib

    rng = np.random.default_rng(0)
    a, b = rng.bytes(100_003), rng.bytes(65_521 * 2 + 7)
    assert fastpng.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b)) == zlib.adler32(a + b)
    assert fastpng.adler32_combine(1, zlib.adler32(b), len(b)) == zlib.adler32(b)
