"""output.scale / output.long_side (--outscale, --long-side) and the provenance written into
outputs: through the real `upscaled upscale` and `upscaled serve`, with a tiny real model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import png
import pytest
import yaml
from PIL import Image

from imaging.images import Encoded, ImageError, rgbx_buffer
from imaging.resize import resize
from model.checkpoint import read_info
from tests.conftest import natural_image, run_cli, save_image, write_config
from tests.daemon_helpers import make_config, serve, settings, stop, tiny_checkpoint, wait_for, write_image
from core import config as config_mod
from core.config import ConfigError, OutputConfig
from imaging import outscale

LANCZOS = Image.Resampling.LANCZOS
# name -> (W, H) of the inputs
SIZES = {"rgb.png": (20, 12), "rgba.png": (16, 10), "deep.png": (14, 10), "photo.jpg": (18, 12), "gray.png": (10, 10)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def version(ckpt: Path) -> str:
    return read_info(ckpt).version


def smooth16(h: int, w: int, planes: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [0.5 + 0.4 * np.sin(x / 3 + k) * np.cos(y / 4 - k) for k in range(planes)]
    return np.rint(np.stack(chans, axis=2) * 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("inputs")
    save_image(src / "rgb.png", natural_image(12, 20))
    rgba = np.dstack([natural_image(10, 16, seed=1), np.tile(np.linspace(0, 255, 16).astype(np.uint8), (10, 1))])
    save_image(src / "rgba.png", rgba)
    deep = smooth16(10, 14, 3)
    with open(src / "deep.png", "wb") as f:
        png.Writer(14, 10, bitdepth=16, greyscale=False).write(f, deep.reshape(10, 14 * 3))
    save_image(src / "photo.jpg", natural_image(12, 18, seed=2), quality=95)
    save_image(src / "gray.png", natural_image(10, 10, seed=3)[..., 0])
    return src


@pytest.fixture(scope="module")
def runs(tmp_path_factory, inputs: Path, ckpt: Path):
    """`upscaled upscale INPUTS -o OUT *flags`, each set of flags run once for the module."""
    root = tmp_path_factory.mktemp("runs")
    config = write_config(root, {"model": {"path": str(ckpt), "for_jpeg": None},
                                 "inference": {"device": "cpu", "threads": 1}})
    done: dict[tuple[str, ...], tuple[Path, subprocess.CompletedProcess]] = {}

    def run(*flags: str) -> tuple[Path, subprocess.CompletedProcess]:
        if flags not in done:
            out = root / f"out{len(done)}"
            r = run_cli("upscale", str(inputs), "-o", str(out), "--config", str(config), *flags,
                        env={"OMP_NUM_THREADS": "1"})
            assert r.returncode == 0, r.stderr[-3000:]
            done[flags] = out, r
        return done[flags]

    return run


def read16(path: Path) -> tuple[np.ndarray, dict]:
    w, h, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, info["planes"]), info


def test_outscale_2_gives_twice_the_input_for_every_kind_of_image(runs, version: str) -> None:
    out, r = runs("--outscale", "2")
    for name, (w, h) in SIZES.items():
        with Image.open(out / name) as im:
            assert im.size == (2 * w, 2 * h), name
    assert Image.open(out / "rgba.png").mode == "RGBA"
    assert Image.open(out / "gray.png").mode == "L"  # grayscale stays grayscale
    assert Image.open(out / "photo.jpg").format == "JPEG"
    px, info = read16(out / "deep.png")
    assert info["bitdepth"] == 16 and px.shape == (20, 28, 3)
    assert (px % 257 != 0).mean() > 0.5  # real 16-bit values after the resize, not 8-bit ones widened
    assert "x2 (model x4)" in r.stderr and version in r.stderr


def test_outscale_resizes_the_native_output_with_lanczos_alpha_included(runs) -> None:
    native, _ = runs("--outscale", "4")
    half, _ = runs("--outscale", "2")
    a4 = np.asarray(Image.open(native / "rgba.png"))[..., 3]
    a2 = np.asarray(Image.open(half / "rgba.png"))[..., 3]
    assert np.array_equal(a2, np.asarray(Image.fromarray(a4).resize((32, 20), LANCZOS, reducing_gap=3.0)))
    # 16-bit: the native 16-bit output, resized at 16 bits (within a few 16-bit levels of a float filter)
    n16, _ = read16(native / "deep.png")
    h16, _ = read16(half / "deep.png")
    ref = np.stack([np.clip(np.asarray(Image.fromarray(n16[..., k].astype(np.float32)).resize((28, 20), LANCZOS)), 0, 65535)
                    for k in range(3)], axis=2)
    assert np.abs(h16 - ref).max() <= 8  # 257 would be one 8-bit level


def test_outscale_equal_to_the_native_scale_changes_nothing(runs) -> None:
    plain, _ = runs()
    native, _ = runs("--outscale", "4")
    for name in SIZES:
        assert (native / name).read_bytes() == (plain / name).read_bytes(), name


def test_long_side_sets_the_long_side_and_scale_in_the_name(runs) -> None:
    # png_strategy default: the Pillow (8-bit) and pypng (16-bit) writers, which carry the text too
    out, r = runs("--long-side", "50", "--set", 'output.name="{stem}_x{scale}"', "--set", "output.png_strategy=default")
    expected = {"rgb_x2.5.png": (50, 30), "rgba_x3.125.png": (50, 31), "deep_x3.5714.png": (50, 36),
                "photo_x2.7778.jpg": (50, 33), "gray_x5.png": (50, 50)}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, size in expected.items():
        with Image.open(out / name) as im:
            assert im.size == size, name
    assert read16(out / "deep_x3.5714.png")[1]["bitdepth"] == 16
    assert Image.open(out / "rgb_x2.5.png").text["upscaled:scale"] == "2.5"
    assert Image.open(out / "deep_x3.5714.png").text["upscaled:size"] == "50x36"
    assert "to a long side of 50 px (model x4)" in r.stderr


def test_png_and_jpeg_outputs_name_the_model_and_scale(runs, version: str) -> None:
    out, _ = runs("--outscale", "2")
    for name in ("rgb.png", "rgba.png", "deep.png", "gray.png"):
        text = Image.open(out / name).text
        assert text["Software"].startswith("upscaled ") and text["upscaled:model"] == version, name
        assert text["upscaled:model_scale"] == "4" and text["upscaled:scale"] == "2"
    assert Image.open(out / "rgb.png").text["upscaled:size"] == "40x24"
    comment = Image.open(out / "photo.jpg").info["comment"].decode()
    assert f"upscaled:model: {version}" in comment.splitlines() and "upscaled:scale: 2" in comment.splitlines()
    assert "upscaled:size: 36x24" in comment.splitlines()
    # the native run records its scale too
    plain, _ = runs()
    assert Image.open(plain / "rgb.png").text["upscaled:scale"] == "4"


def test_webp_output_carries_xmp_and_a_fractional_scale(tmp_path: Path, inputs: Path, ckpt: Path, version: str) -> None:
    config = write_config(tmp_path, {"model": {"path": str(ckpt), "for_jpeg": None}, "inference": {"device": "cpu"}})
    r = run_cli("upscale", str(inputs / "rgb.png"), "-o", str(tmp_path / "out"), "--config", str(config),
                "--format", "webp", "--outscale", "2.5", "--set", 'output.name="{stem}_x{scale}"',
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    with Image.open(tmp_path / "out" / "rgb_x2.5.webp") as im:
        assert im.size == (50, 30)
        xmp = im.info["xmp"]
    desc = ET.fromstring(xmp[xmp.index(b"<x:xmpmeta"): xmp.index(b"</x:xmpmeta>") + 12]).find(
        ".//{http://www.w3.org/1999/02/22-rdf-syntax-ns#}Description")
    ns = "{urn:upscaled:ns:1.0/}"
    assert desc.get(ns + "model") == version and desc.get(ns + "scale") == "2.5" and desc.get(ns + "model_scale") == "4"
    assert desc.get("{http://ns.adobe.com/xap/1.0/}CreatorTool").startswith("upscaled ")


@pytest.mark.parametrize("output,key,expected", [
    ({"scale": 0}, "output.scale", "> 0 and <= 16"),
    ({"scale": -1}, "output.scale", "> 0 and <= 16"),
    ({"scale": 17}, "output.scale", "<= 16"),
    ({"scale": "x"}, "output.scale", "a number"),
    ({"scale": True}, "output.scale", "a number"),
    ({"scale": 2, "long_side": 100}, "output.scale", "output.long_side"),
    ({"long_side": 0}, "output.long_side", ">= 1"),
    ({"long_side": 1.5}, "output.long_side", "an integer"),
])
def test_bad_output_size_settings_name_the_key(output: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.from_dict({"output": output})
    assert e.value.key == key and expected in str(e.value)


def test_output_size_settings_parse() -> None:
    assert config_mod.from_dict({"output": {"scale": 2}}).output.scale == 2.0
    assert config_mod.from_dict({"output": {"scale": 2.5, "long_side": None}}).output.scale == 2.5
    assert config_mod.from_dict({"output": {"long_side": 2048}}).output.long_side == 2048
    assert config_mod.from_dict({}).output == OutputConfig()  # both null by default


def test_bad_values_on_the_command_line_exit_2_naming_the_key(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", natural_image(8, 8))
    args = ("upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"))
    r = run_cli(*args, "--set", "output.scale=0")
    assert r.returncode == 2 and "output.scale" in r.stderr and "> 0" in r.stderr, r.stderr
    r = run_cli(*args, "--set", "output.scale=x")
    assert r.returncode == 2 and "output.scale" in r.stderr, r.stderr
    both = write_config(tmp_path, {"output": {"scale": 2, "long_side": 100}})
    r = run_cli(*args, "--config", str(both))
    assert r.returncode == 2 and "output.scale" in r.stderr and "output.long_side" in r.stderr, r.stderr
    # --outscale replaces the config's long_side (and --long-side its scale): no clash
    r = run_cli(*args, "--outscale", "-1")
    assert r.returncode == 2 and "--outscale" in r.stderr and "> 0" in r.stderr
    r = run_cli(*args, "--outscale", "2", "--long-side", "64")
    assert r.returncode == 2 and "not allowed with" in r.stderr
    assert not (tmp_path / "out").exists()


def test_serve_once_writes_resized_outputs_and_reports_the_scale(tmp_path: Path, ckpt: Path, version: str) -> None:
    _, config = make_config(tmp_path, ckpt, output={"name": "{stem}_x{scale}"})
    write_image(tmp_path / "inbox" / "a.png", 32, 24)
    write_image(tmp_path / "inbox" / "sub" / "b.jpg", 20, 16, seed=1)
    log = tmp_path / "daemon.log"
    proc = serve(config, "--once", "--set", "output.scale=2.5", log=log, env={"OMP_NUM_THREADS": "1"})
    assert proc.wait(120) == 0, log.read_text()[-3000:]
    out = tmp_path / "outbox"
    assert Image.open(out / "a_x2.5.png").size == (80, 60)
    assert Image.open(out / "sub" / "b_x2.5.jpg").size == (50, 40)
    text = Image.open(out / "a_x2.5.png").text
    assert text["upscaled:model"] == version and text["upscaled:scale"] == "2.5" and text["upscaled:model_scale"] == "4"
    assert f"upscaled:model: {version}" in Image.open(out / "sub" / "b_x2.5.jpg").info["comment"].decode()
    lines = [line for line in log.read_text().splitlines() if " done " in line]
    assert len(lines) == 2 and all("(x2.5, model x4)" in line and line.endswith(f"; model {version}") for line in lines)
    assert any("80x60" in line for line in lines)
    recent = json.loads((tmp_path / "status.json").read_text())["recent"]
    assert {(e["file"], e["scale"], e["model_scale"], e["model_version"]) for e in recent} == {
        ("a.png", 2.5, 4, version), ("sub/b.jpg", 2.5, 4, version)}


@pytest.mark.skipif(sys.platform != "linux", reason="the daemon's end-to-end tests run on Linux")
def test_sighup_applies_a_new_output_size(tmp_path: Path, ckpt: Path) -> None:
    _, config = make_config(tmp_path, ckpt)
    log = tmp_path / "daemon.log"
    proc = serve(config, log=log, env={"OMP_NUM_THREADS": "1"})
    out = tmp_path / "outbox"
    try:
        write_image(tmp_path / "inbox" / "a.png", 32, 24)
        wait_for(lambda: (tmp_path / "done" / "a.png").exists(), 60, what="the first output")
        assert Image.open(out / "a.png").size == (128, 96)
        config.write_text(yaml.safe_dump(settings(tmp_path, ckpt, output={"long_side": 40})))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: config reloaded" in log.read_text(), 20, what="the reload")
        assert "output.long_side" in log.read_text()
        write_image(tmp_path / "inbox" / "b.png", 32, 24, seed=1)
        wait_for(lambda: (tmp_path / "done" / "b.png").exists(), 60, what="the output after the reload")
        assert Image.open(out / "b.png").size == (40, 30)
        assert Image.open(out / "b.png").text["upscaled:scale"] == "1.25"
    finally:
        assert stop(proc) == 0, log.read_text()[-3000:]


# The resize itself, on arrays.

def test_the_native_size_is_returned_untouched() -> None:
    enc = Encoded(np.zeros((8, 12, 3), np.uint8), 8)
    assert resize(enc, (12, 8)) is enc and enc.pixels is not None


@pytest.mark.parametrize("bits,planes", [(8, 1), (8, 2), (8, 3), (8, 4), (16, 1), (16, 2), (16, 3), (16, 4)])
def test_resize_keeps_depth_and_channels(bits: int, planes: int) -> None:
    px = smooth16(20, 30, planes)
    px = px if bits == 16 else (px >> 8).astype(np.uint8)
    got = resize(Encoded(px, bits, b"icc", b"exif"), (45, 30))
    assert got.pixels.shape == (30, 45, planes) and got.pixels.dtype == px.dtype
    assert got.bits == bits and got.icc == b"icc" and got.exif == b"exif"


def test_16bit_resize_keeps_16bit_precision() -> None:
    px = smooth16(40, 60, 4)
    px[..., 3] = 40000  # constant alpha: the premultiplied colour must come back as it was
    for size in [(90, 60), (20, 13)]:
        got = resize(Encoded(px.copy(), 16), size).pixels
        for k in range(3):
            ref = np.asarray(Image.fromarray(px[..., k].astype(np.float32)).resize(size, LANCZOS))
            assert np.abs(got[..., k] - np.clip(ref, 0, 65535)).max() <= 6  # of 65535
        assert (got[..., 3] == 40000).all()


def test_an_rgbx_buffer_stays_one_for_pillow_encoders() -> None:
    buf = np.zeros((20, 30, 4), np.uint8)
    buf[..., :3] = natural_image(20, 30)
    got = resize(Encoded(buf[..., :3], 8), (15, 10)).pixels
    assert got.shape == (10, 15, 3) and rgbx_buffer(got) is not None
    ref = np.asarray(Image.fromarray(natural_image(20, 30)).resize((15, 10), LANCZOS, reducing_gap=3.0))
    assert np.array_equal(got, ref)


def test_scale_labels_and_the_16x_limit_of_long_side() -> None:
    assert [outscale.label(x) for x in (2.0, 2.5, 0.125, 4, 1 / 3)] == ["2", "2.5", "0.125", "4", "0.3333"]
    enc = Encoded(np.zeros((40, 40, 3), np.uint8), 8)
    with pytest.raises(ImageError, match="output.long_side"):
        outscale.finish(enc, (10, 10), 4, "v", OutputConfig(long_side=1000))
    enc, scale = outscale.finish(enc, (10, 10), 4, "v", OutputConfig(long_side=160))
    assert scale == 16 and enc.pixels.shape == (160, 160, 3) and enc.text["upscaled:size"] == "160x160"
