"""model/png.py, the fast PNG writer: exact pixels for every layout it writes, read back by two
independent decoders; metadata kept; streamed in blocks."""

from __future__ import annotations

import io

import numpy as np
import png as pypng
import pytest
from PIL import Image, ImageCms

import model.png as fastpng
from model.images import Encoded, decode, encode
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
        assert np.array_equal(np.round(decode(data).rgb * 255).astype(np.uint8), px)
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
