"""Training data: synthetic-but-natural test photos, HR-only sampling, paired-folder checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from trainer.data import (
    DataError,
    Degradations,
    HRData,
    PairedData,
    check_hr_folder,
    check_pairs,
)
from upscaled.cli import main as cli_main


def photo(seed: int, h: int = 96, w: int = 128) -> Image.Image:
    """Smooth colour gradients, flat shapes with sharp edges, lines, text-like strokes, a slight
    lens blur and sensor noise: small, but with the statistics SR learns from."""
    r = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([0.5 + 0.25 * np.sin(2 * np.pi * (x * r.uniform(0.3, 1) + y * r.uniform(0.3, 1)) + c) for c in range(3)], -1)
    im = Image.fromarray((base * 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    colour = lambda: tuple(int(v) for v in r.integers(0, 256, 3))
    for i in range(8):
        x0, y0, sz = int(r.integers(0, max(1, w - 20))), int(r.integers(0, max(1, h - 20))), int(r.integers(10, 40))
        (d.ellipse if i % 2 else d.rectangle)((x0, y0, x0 + sz, y0 + int(sz * r.uniform(0.5, 1.5))), fill=colour())
    for _ in range(6):
        d.text((int(r.integers(0, max(1, w - 50))), int(r.integers(0, max(1, h - 10)))), "Abc 12", fill=colour())
    for _ in range(4):
        d.line([tuple(int(v) for v in r.integers(0, w, 2)) for _ in range(2)], fill=colour(), width=int(r.integers(1, 4)))
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(0.6))).astype(np.float32) + r.normal(0, 2, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def photo_folder(folder: Path, count: int, seed: int = 0, h: int = 96, w: int = 128) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(seed + i, h, w).save(folder / f"photo{i}.png")
    return folder


def test_hr_batches_depend_only_on_seed_and_step(tmp_path):
    files = check_hr_folder(photo_folder(tmp_path / "hr", 2, h=200, w=240), 32)
    kw = {"scale": 4, "crop": 32, "batch": 3, "seed": 7, "rank": 0, "cache_mb": 64, "max_side": 0}
    a = HRData(files, shrink=(0.25, 0.5), degradations=Degradations(0.5, 0.5, 0.5), **kw)
    b = HRData(files, shrink=(0.25, 0.5), degradations=Degradations(0.5, 0.5, 0.5), **kw)
    lr5, hr5 = a[5]
    a[3]  # consuming other steps first changes nothing
    lr5b, hr5b = b[5]
    assert lr5.shape == (3, 3, 8, 8) and hr5.shape == (3, 3, 32, 32)
    assert 0 <= float(lr5.min()) and float(hr5.max()) <= 1
    assert torch_equal(lr5, lr5b) and torch_equal(hr5, hr5b)
    assert not torch_equal(a[6][1], hr5)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_small_photos_are_not_shrunk_below_the_crop(tmp_path):
    files = check_hr_folder(photo_folder(tmp_path / "hr", 1, h=40, w=48), 32)
    data = HRData(files, shrink=(0.25, 0.25), degradations=Degradations(), scale=4, crop=32, batch=2, seed=0, rank=0, cache_mb=8, max_side=0)
    _lr, hr = data[0]
    assert hr.shape == (2, 3, 32, 32)


def test_too_small_and_unreadable_hr_files_are_all_reported(tmp_path):
    folder = photo_folder(tmp_path / "hr", 1)
    photo(5, 20, 20).save(folder / "tiny.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as e:
        check_hr_folder(folder, 32)
    text = str(e.value)
    assert "tiny.png" in text and "smaller than the 32-pixel" in text
    assert "broken.jpg" in text and "unreadable" in text


def _paired(tmp_path: Path) -> tuple[Path, Path]:
    lr, hr = tmp_path / "lr", tmp_path / "hr"
    lr.mkdir()
    hr.mkdir()
    for i in range(2):  # good pairs
        big = photo(i, 64, 96)
        big.save(hr / f"pair{i}.png")
        big.resize((24, 16), Image.Resampling.BICUBIC).save(lr / f"pair{i}.jpg")  # names match by stem
    return lr, hr


def test_paired_folders_give_aligned_crops(tmp_path):
    lr_dir, hr_dir = _paired(tmp_path)
    pairs = check_pairs(lr_dir, hr_dir, 4, 32)
    assert [p[0].stem for p in pairs] == ["pair0", "pair1"]
    data = PairedData(pairs, scale=4, crop=32, batch=2, seed=1, rank=0, cache_mb=8, max_side=0)
    lr, hr = data[0]
    assert lr.shape == (2, 3, 8, 8) and hr.shape == (2, 3, 32, 32)


def test_paired_folder_problems_are_reported_together_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # built-in defaults, not the repository's config.yaml
    monkeypatch.delenv("UPSCALED_CONFIG", raising=False)
    lr_dir, hr_dir = _paired(tmp_path)
    photo(9, 16, 24).save(lr_dir / "only_lr.png")
    photo(9, 64, 96).save(hr_dir / "only_hr.png")
    photo(9, 16, 24).save(lr_dir / "wrong_size.png")
    photo(9, 60, 96).save(hr_dir / "wrong_size.png")
    photo(9, 16, 24).save(lr_dir / "broken.png")
    (hr_dir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "run"
    rc = cli_main(["train", "--paired-lr", str(lr_dir), "--paired-hr", str(hr_dir), "--out", str(out), "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "only_lr.png: low-resolution image without a high-resolution image" in err
    assert "only_hr.png: high-resolution image without a low-resolution image" in err
    assert "wrong_size: high-resolution 96x60 is not 4x the low-resolution 24x16 (expected 96x64)" in err
    assert "broken.png: unreadable" in err
    assert not (out / "state.pt").exists()


def test_command_line_mistakes_stop_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # built-in defaults, not the repository's config.yaml
    monkeypatch.delenv("UPSCALED_CONFIG", raising=False)
    photos = photo_folder(tmp_path / "photos", 1)
    assert cli_main(["train", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no state.pt" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(photos), "--out", str(tmp_path / "r"), "--publish"]) == 2
    assert "--publish needs a validation folder" in capsys.readouterr().err
    assert cli_main(["train", "--out", str(tmp_path / "r")]) == 2
    assert "no training data" in capsys.readouterr().err
