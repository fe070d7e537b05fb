"""Transparent edges: the colour under alpha 0 must not bleed into the upscaled edge.

Icons, sprites and cut-out portraits often hold black under their fully transparent pixels.
Through the real `upscaled upscale` with the bundled model, the band of partly visible edge
pixels must come out no darker than bicubic's (before the fix it was ~95 levels darker on an
icon: a dark dotted outline)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import imaging.images as images
from imaging.images import bleed_transparent, decode
from tests.conftest import natural_image, run_cli

BT601 = np.array([0.299, 0.587, 0.114])


def icon() -> Image.Image:
    """An anti-aliased round badge with a white glyph, on transparent black."""
    im = Image.new("RGBA", (48, 48), (0, 0, 0, 0))
    draw = ImageDraw.Draw(im)
    draw.ellipse((6, 6, 41, 41), fill=(240, 200, 60, 255))
    draw.rectangle((18, 14, 29, 33), fill=(250, 250, 250, 255))
    return im


def sprite() -> Image.Image:
    """Pixel art: hard 0/255 alpha, a few palette colours."""
    a = np.zeros((32, 32, 4), np.uint8)
    rng = np.random.default_rng(1)
    palette = np.array([[230, 80, 60], [250, 220, 120], [90, 160, 240], [255, 255, 255]], np.uint8)
    y, x = np.mgrid[0:32, 0:32]
    inside = (x - 16) ** 2 / 64 + (y - 16) ** 2 / 144 <= 1
    a[inside, :3] = palette[rng.integers(4, size=int(inside.sum()))]
    a[inside, 3] = 255
    return Image.fromarray(a, "RGBA")


def portrait() -> Image.Image:
    """A photo cut out with a feathered oval mask, black where the mask is 0."""
    h, w = 56, 40
    rgb = natural_image(h, w, seed=4)
    y, x = np.mgrid[0:h, 0:w]
    r = np.sqrt(((x - w / 2) / (w * 0.4)) ** 2 + ((y - h / 2) / (h * 0.42)) ** 2)
    alpha = (np.clip((1 - r) * 25, 0, 1) * 255).round().astype(np.uint8)
    out = np.dstack([rgb, alpha])
    out[alpha == 0, :3] = 0
    return Image.fromarray(out, "RGBA")


def test_transparent_edges_are_no_darker_than_bicubic(tmp_path: Path) -> None:
    art = {"icon": icon(), "sprite": sprite(), "portrait": portrait()}
    for name, im in art.items():
        im.save(tmp_path / f"{name}.png")
    r = run_cli("upscale", *(str(tmp_path / f"{n}.png") for n in art), "-o", str(tmp_path / "out"),
                "--set", "inference.device=cpu")
    assert r.returncode == 0, r.stderr
    for name, im in art.items():
        out = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
        assert out.shape[2] == 4
        # Pillow resizes RGBA premultiplied: the hidden colour cannot reach bicubic's edge.
        bic = np.asarray(im.resize((out.shape[1], out.shape[0]), Image.Resampling.BICUBIC)).astype(float)
        band = (bic[..., 3] >= 16) & (bic[..., 3] <= 240)  # partly visible: the edge
        assert band.sum() > 200, name
        ours, theirs = (out[..., :3].astype(float) @ BT601)[band].mean(), (bic[..., :3] @ BT601)[band].mean()
        assert ours >= theirs - 6, f"{name}: edge band luma {ours:.1f} against bicubic's {theirs:.1f}"
        # and the alpha itself is bicubic's (clean, no halo of its own)
        assert np.abs(out[..., 3].astype(int) - bic[..., 3]).max() <= 1, name


def test_bleed_fills_only_holes_from_the_nearest_visible_colour() -> None:
    rgb = np.zeros((37, 53, 3), np.uint8)
    alpha = np.zeros((37, 53), np.uint8)
    rgb[5:15, 5:20], alpha[5:15, 5:20] = (200, 50, 50), 255
    rgb[25:35, 35:50], alpha[25:35, 35:50] = (20, 200, 20), 90  # partly visible: its colour counts too
    before = rgb.copy()
    bleed_transparent(rgb, alpha)
    seen = alpha > 0
    assert (rgb[seen] == before[seen]).all()
    red, green = np.array([200, 50, 50]), np.array([20, 200, 20])
    for (y, x), near, far in (((0, 0), red, green), ((10, 21), red, green), ((36, 52), green, red), ((30, 34), green, red)):
        px = rgb[y, x].astype(int)
        assert np.abs(px - near).sum() < np.abs(px - far).sum() / 3, (y, x, px)
    assert (rgb[~seen].astype(int).sum(axis=1) > 150).all()  # no hole keeps its black


def test_bleed_is_seamless_across_bands_and_handles_float_and_edge_cases(monkeypatch) -> None:
    """A tall image goes through in bands of rows; the bands must join exactly as one pass."""
    h, w = 203, 31  # odd sizes on purpose
    rgb = natural_image(h, w, seed=2)
    y, x = np.mgrid[0:h, 0:w]
    alpha = (((x - 15) ** 2 + (y - 100) ** 2) < 14**2).astype(np.uint8) * 255
    one = rgb.copy()
    bleed_transparent(one, alpha)
    monkeypatch.setattr(images, "_BAND", 16)
    banded = rgb.copy()
    bleed_transparent(banded, alpha)
    assert np.abs(one.astype(int) - banded).max() <= 1
    deep = rgb.astype(np.float32) / 255
    bleed_transparent(deep, alpha)
    assert np.abs(deep * 255 - one).max() <= 1
    for a in (np.zeros((h, w), np.uint8), np.full((h, w), 255, np.uint8)):  # nothing to bleed from / into
        same = rgb.copy()
        bleed_transparent(same, a)
        assert (same == rgb).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_decode_bleeds_under_alpha(tmp_path: Path, mode: str) -> None:
    im = icon().convert(mode)
    im.save(tmp_path / "i.png")
    dec = decode(tmp_path / "i.png")
    assert dec.rgb[0, 0].astype(int).sum() > 300  # the badge's colour, not the file's black
