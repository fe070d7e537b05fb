"""config.yaml parsing and the `upscaled` command line, through real subprocesses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import config as config_mod
from core.config import ConfigError
from model.checkpoint import save_checkpoint
from model.generator import GeneratorConfig
from tests.conftest import ROOT, natural_image, run_cli, save_image, tiny_generator, write_config


def test_documented_config_equals_builtin_defaults() -> None:
    documented = config_mod.load(ROOT / "config.yaml")
    builtin = config_mod.from_dict({}, base_dir=ROOT)
    assert dataclasses.replace(documented, base_dir="") == dataclasses.replace(builtin, base_dir="")


@pytest.mark.parametrize(
    "data,key,expected",
    [
        ({"inference": {"tiel": 64}}, "inference.tiel", "known key"),
        ({"inference": {"tile": "big"}}, "inference.tile", "an integer"),
        ({"inference": {"tile": 32, "overlap": 40}}, "inference.overlap", "less than inference.tile"),
        ({"inference": {"device": "tpu"}}, "inference.device", "auto, cpu, cuda"),
        ({"model": {"scale": 5}}, "model.scale", "one of 1, 2, 3, 4, 8"),
        ({"watch": {"mode": "magic"}}, "watch.mode", "native, polling"),
        ({"daemon": {"originals": "shred"}}, "daemon.originals", "move, delete, keep"),
        ({"output": {"jpeg_quality": 101}}, "output.jpeg_quality", "1..100"),
        ({"output": {"png_strategy": "lz4"}}, "output.png_strategy", "fast, rle, default"),
        ({"daemon": {"io_nice": 20}}, "daemon.io_nice", "0..19"),
        ({"daemon": {"io_workers": 0}}, "daemon.io_workers", "auto or an integer >= 1"),
        ({"inference": {"self_ensemble": 3}}, "inference.self_ensemble", "1, 2, 4 or 8"),
        ({"inference": {"runtime": "tensorrt"}}, "inference.runtime", "onnxruntime, ncnn"),
        ({"daemon": {"io_workers": "many"}}, "daemon.io_workers", "an integer or one of auto"),
        ({"daemon": {"io_nice": "low"}}, "daemon.io_nice", "an integer or one of auto, idle"),
        ({"trainer": {"lr_g": "fast"}}, "trainer.lr_g", "a number"),
        ({"paths": {"outbox": "data/inbox/out"}}, "paths.outbox", "outside paths.inbox"),
        ({"bogus": 1}, "bogus", "known key"),
    ],
)
def test_bad_config_names_key_and_expectation(data: dict, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_mod.from_dict(data)
    assert e.value.key == key and expected in str(e.value)


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    cfg = config_mod.load(write_config(tmp_path, {"paths": {"inbox": "in", "models": "/abs/models"}}))
    assert cfg.path("inbox") == tmp_path / "in" and cfg.path("models") == Path("/abs/models")


def test_env_var_selects_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, {"inference": {"tile": 128}})
    monkeypatch.setenv(config_mod.ENV_VAR, str(path))
    assert config_mod.load().inference.tile == 128


def test_cli_help_for_every_command() -> None:
    top = run_cli("--help")
    assert top.returncode == 0
    for cmd in ("upscale", "serve", "status", "train", "eval"):
        assert cmd in top.stdout
        r = run_cli(cmd, "--help")
        assert r.returncode == 0 and "--config" in r.stdout, cmd


def test_cli_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"inference": {"tile": 8}})
    r = run_cli("upscale", str(tmp_path), "-o", str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 2 and "inference.tile" in r.stderr and ">= 16" in r.stderr


def test_cli_scale_mismatch_exits_2(tmp_path: Path, tiny_ckpt: Path) -> None:
    cfg = write_config(tmp_path, {"model": {"path": str(tiny_ckpt), "scale": 2}})
    save_image(tmp_path / "in" / "a.png", natural_image(8, 8))
    r = run_cli("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 2 and "model.scale" in r.stderr and "x4" in r.stderr


def test_cli_refuses_pickle_model(tmp_path: Path) -> None:
    evil = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, evil)
    save_image(tmp_path / "in" / "a.png", natural_image(8, 8))
    r = run_cli("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", str(evil))
    assert r.returncode == 2 and "pickle" in r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_upscale_folder(tmp_path: Path, tiny_config: Path) -> None:
    src = tmp_path / "in"
    save_image(src / "a.png", natural_image(10, 12))
    save_image(src / "sub" / "deeper" / "b.jpg", natural_image(9, 7), quality=90)
    save_image(src / "c.gif", natural_image(6, 6))
    (src / "broken.png").write_bytes(b"not really a png")
    (src / "notes.txt").write_text("ignored: not an image")
    (src / ".hidden.png").write_bytes(b"ignored: hidden")
    out = tmp_path / "out"

    r = run_cli("upscale", str(src), "-o", str(out), "--config", str(tiny_config))
    assert r.returncode == 1  # one file failed
    failures = [line for line in r.stderr.splitlines() if "failed:" in line]
    assert len(failures) == 1 and "broken.png" in failures[0] and "not an image" in failures[0]
    assert "3 image(s)" in r.stderr and "1 failed" in r.stderr
    assert Image.open(out / "a.png").size == (48, 40)
    assert Image.open(out / "sub" / "deeper" / "b.jpg").format == "JPEG"
    assert Image.open(out / "c.png").size == (24, 24)  # GIF -> PNG
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["a.png", "b.jpg", "c.png"]

    # Existing outputs are kept unless --overwrite.
    before = (out / "a.png").stat().st_mtime_ns
    r = run_cli("upscale", str(src / "a.png"), "-o", str(out), "--config", str(tiny_config))
    assert r.returncode == 0 and "skipped" in r.stderr and (out / "a.png").stat().st_mtime_ns == before
    r = run_cli("upscale", str(src / "a.png"), "-o", str(out), "--config", str(tiny_config),
                "--overwrite", "--format", "webp")
    assert r.returncode == 0 and Image.open(out / "a.webp").format == "WEBP"


def test_cli_uses_bundled_default_when_nothing_configured(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", natural_image(8, 8))
    r = run_cli("upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "bundled" in r.stderr and Image.open(tmp_path / "out" / "a.png").size == (32, 32)


def test_cli_prefers_published_model(tmp_path: Path) -> None:
    from model.store import publish

    ck = tmp_path / "x.safetensors"
    info = save_checkpoint(ck, tiny_generator(GeneratorConfig(channels=8, blocks=1), seed=9))
    publish(tmp_path / "models", ck)
    cfg = write_config(tmp_path, {"paths": {"models": "models"}})
    save_image(tmp_path / "a.png", natural_image(8, 8))
    r = run_cli("upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 0 and "published" in r.stderr and info.version in r.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "docs" / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_training_recipes_in_docs_are_valid_configs(recipe: Path) -> None:
    from core.config import load

    tc = load(recipe).trainer
    assert tc.data and tc.val and tc.pretrain_steps >= 0
    # every run starts from an earlier one, but the first of each architecture (run 6: lowres tail)
    assert (tc.init is None) == (recipe.stem in ("fidelity-1", "fidelity-6"))


def test_set_overrides_any_key_validated_like_the_file(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"paths": {"status": "a/status.json"}})
    r = run_cli("status", "--config", str(cfg), "--set", "paths.status=b/status.json")
    assert r.returncode == 3 and str(tmp_path / "b" / "status.json") in r.stdout, r.stdout
    for bad, named in [("trainer.batch=0", "trainer.batch"), ("trainer.bach=8", "trainer.bach"),
                       ("inference.tile=banana", "inference.tile"), ("batch=8", "SECTION.KEY=VALUE"),
                       ("output.name={name}", "output.name"), ("output.name=x", "output.name"),
                       ("output.jpeg_background=white", "output.jpeg_background")]:
        r = run_cli("upscale", str(tmp_path / "x.png"), "-o", str(tmp_path / "out"), "--config", str(cfg), "--set", bad)
        assert r.returncode == 2 and named in r.stderr, (bad, r.stderr)


def test_a_missing_input_is_a_usage_error(tmp_path: Path) -> None:
    r = run_cli("upscale", str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "no such file or folder" in r.stderr and not (tmp_path / "out").exists()


def test_progress_bar_on_a_terminal_unless_quiet(tmp_path: Path) -> None:
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    save_image(tmp_path / "a.png", natural_image(8, 8))

    def stderr_of(*extra: str) -> str:
        leader, follower = pty.openpty()  # stderr is a terminal, as for a person at a shell
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # of 100 columns
        p = subprocess.Popen([sys.executable, "-m", "upscaled", "upscale", str(tmp_path / "a.png"), "-o",
                              str(tmp_path / f"out{len(extra)}"), *extra], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=follower)
        os.close(follower)
        out = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(120) == 0
        os.close(leader)
        return out.decode(errors="replace")

    assert "upscaling: 100%" in stderr_of()
    assert "upscaling" not in stderr_of("-q")


def test_train_without_validation_says_so_at_the_start(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    for i in range(2):
        save_image(photos / f"p{i}.png", natural_image(64, 64, seed=i))
    r = run_cli("train", "--data", str(photos), "--out", str(tmp_path / "run"), "--steps", "1",
                "--set", "trainer.batch=1", "--set", "trainer.crop=32", "--set", "trainer.generator_blocks=1",
                "--set", "trainer.generator_channels=8", "--set", "trainer.pretrain_steps=1", "--set", "trainer.workers=0",
                "--set", f"paths.runs={tmp_path / 'runs'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    first = next(line for line in r.stderr.splitlines() if "WARNING" in line or "INFO" in line)
    assert "no validation folder" in first and "no best.safetensors" in first


def test_upscale_sends_compressed_jpegs_to_the_real_model_by_default(tmp_path: Path) -> None:
    from PIL import Image

    from model.checkpoint import BUNDLED, read_info

    Image.fromarray(natural_image(24, 32)).save(tmp_path / "a.jpg", quality=70)
    save_image(tmp_path / "b.png", natural_image(24, 32))
    r = run_cli("upscale", str(tmp_path / "a.jpg"), str(tmp_path / "b.png"), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"(JPEGs: {read_info(BUNDLED['real']).version})" in r.stderr
    r = run_cli("upscale", str(tmp_path / "b.png"), "-o", str(tmp_path / "out2"), cwd=tmp_path)
    assert r.returncode == 0 and "JPEGs:" not in r.stderr  # no JPEG: the second model is not even loaded
