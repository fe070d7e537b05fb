"""`upscaled learn` (issue 25): the daemon keeps finished originals, learn fine-tunes the served
model on them and publishes only through the gate, and the running daemon then serves it.

Real parts throughout: a real `upscaled serve` subprocess keeps the material, `upscaled learn`
runs as a subprocess on a tiny real generator, the teacher is a tiny real SPAN imported with
`upscaled models import`. The domain is line art made here: hatching and outlines in flat colours,
nothing like the smooth photos of the base set.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from daemon.keep import keep, kept_files, prune
from model import store
from model.checkpoint import read_info, save_checkpoint
from model.generator import Generator, GeneratorConfig
from tests.conftest import run_cli
from tests.daemon_helpers import ROOT, make_config, serve, stop, wait_for
from tests.test_train_data import photo_folder
from trainer.data import Degradations
from trainer.learn import CROP_SIDE, LAST_CROP, LearnData, decide, in_slice, load_kept, opaque_corners, survey
from core.config import LearnConfig

TINY = GeneratorConfig(scale=4, channels=16, blocks=2, batchnorm=False, upsampler="lowres", skip="bilinear")
LEARN = {"keep_mb": 50, "min_images": 6, "holdout": 0.3, "crop": 32, "batch": 8, "lr": 0.001,
         "slice_max_side": 96, "base_ratio": 0.3, "min_gain_db": 0.05, "teacher_cpu_seconds": 60}
ENV = {"OMP_NUM_THREADS": "1"}
# A run that must pass the gate is capped by steps, not by time: 300 steps (about a second of
# training on a quiet 2-core box) already gain ~3 dB on the slice (seed 3) against the 0.05 the
# gate asks, and the generous --minutes only matters on a loaded machine, where the run still
# ends at the cap rather than at the clock.
TRAINED = ("--minutes", "1", "--set", "learn.max_steps=300")


def line_art(seed: int, size: int = 112) -> Image.Image:
    """Flat colour regions crossed by thin dark hatching and outlines: a style of its own."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(180, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = rng.integers(0, size // 2, 2)
        x1, y1 = np.array([x0, y0]) + rng.integers(size // 4, size // 2, 2)
        d.rectangle((int(x0), int(y0), int(x1), int(y1)), fill=tuple(int(c) for c in rng.integers(60, 240, 3)),
                    outline=(20, 20, 20), width=3)
    step = int(rng.integers(10, 15))
    for k in range(-size, size, step):  # hatching at 45 degrees, coarse enough to survive a 4x shrink
        d.line((k, 0, k + size, size), fill=(30, 30, 40), width=2)
    return img


def served_model(path: Path) -> Path:
    """A tiny generator whose output layer is zero: it serves exactly the bilinear skip, a weak
    but honest starting point that any real learning beats."""
    torch.manual_seed(0)
    g = Generator(TINY)
    with torch.no_grad():
        g.upsample[0].weight.zero_()
        g.upsample[0].bias.zero_()
    save_checkpoint(path, g.eval())
    return path


def setup_root(root: Path, **learn) -> Path:
    """Config (daemon + trainer + learn) at root; the served model published as `current`."""
    photos = photo_folder(root / "photos", 3, h=96, w=96)
    val = photo_folder(root / "val", 2, seed=10, h=64, w=64)
    models = root / "models"
    store.publish(models, served_model(root / "served.safetensors"))
    _, path = make_config(root, root / "unused", learn={**LEARN, **learn},
                          trainer={"data": str(photos), "val": str(val), "seed": 3, "precision": "fp32"})
    data = yaml.safe_load(path.read_text())
    data["model"]["path"] = None  # serve the published `current`, so a published candidate is swapped in
    data["paths"].update(learn=str(root / "learn"), runs=str(root / "runs"))
    path.write_text(yaml.safe_dump(data))
    return path


def fill_learn_folder(folder: Path, count: int, seed: int = 0) -> list[Path]:
    src = folder.parent / "domain-src"
    src.mkdir(exist_ok=True)
    out = []
    for i in range(count):
        f = src / f"art{seed + i}.png"
        line_art(seed + i).save(f)
        out.append(keep(f, folder, 50, 30))
    return out


def learn_cli(config: Path, *args: str, timeout: float = 300):
    return run_cli("learn", "--config", str(config), *args, env=ENV, timeout=timeout)


def last_run(root: Path) -> dict:
    return json.loads((root / "runs" / "learn-last.json").read_text())


# ----------------------------------------------------------------------------- end to end


def test_the_daemon_keeps_material_learn_publishes_and_the_daemon_serves_it(tmp_path):
    config = setup_root(tmp_path)
    log = tmp_path / "serve.log"
    proc = serve(config, env=ENV, log=log)
    try:
        for i in range(12):  # through the real daemon: each finished original is kept
            tmp = tmp_path / "inbox" / f".art{i}.png"
            line_art(i).save(tmp)
            os.rename(tmp, tmp_path / "inbox" / f"art{i}.png")
        wait_for(lambda: len(list((tmp_path / "done").glob("*.png"))) == 12, 120, what="12 originals done")
        kept = kept_files(tmp_path / "learn")
        assert len(kept) == 12
        # hardlinks of the originals (same file system), and people's files are untouched in done/
        assert all(k.path.stat().st_nlink == 2 for k in kept)
        served = read_info(store.current_checkpoint(tmp_path / "models")).version

        r = learn_cli(config, *TRAINED)
        assert r.returncode == 0, r.stderr
        run = last_run(tmp_path)
        assert run["decision"] == "published", (r.stdout, r.stderr)
        assert run["slice_gain_db"] >= LEARN["min_gain_db"] and run["standard_loss_db"] <= 0.1
        assert "folder slice" in r.stdout and "val val" in r.stdout and "published" in r.stdout
        current = store.current_checkpoint(tmp_path / "models")
        info = read_info(current)
        assert info.version != served and info.extra["learn"]["slice_gain_db"] == run["slice_gain_db"]
        assert info.extra["learn"]["decision"] == "published" and info.extra["init"] == served

        # the running daemon swaps it in: the next image is upscaled by the learned model
        wait_for(lambda: json.loads((tmp_path / "status.json").read_text()).get("model", {}).get("version") == info.version,
                 60, what="the daemon serving the learned model")
        line_art(99).save(tmp_path / "inbox" / ".late.png")
        os.rename(tmp_path / "inbox" / ".late.png", tmp_path / "inbox" / "late.png")
        wait_for(lambda: [e for e in json.loads((tmp_path / "status.json").read_text()).get("recent", [])
                          if e["file"] == "late.png" and e["model_version"] == info.version],
                 60, what="late.png upscaled by the learned model")

        # a second run builds on the first: it starts from the learned model (a few steps show it;
        # the listing, which only reads the models folder, runs beside it)
        second = subprocess.Popen([sys.executable, "-m", "upscaled", "learn", "--config", str(config), "--minutes", "1",
                                   "--no-publish", "--set", "learn.max_steps=3"], cwd=ROOT, text=True,
                                  env={**{k: v for k, v in os.environ.items() if k != "UPSCALED_CONFIG"}, **ENV},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        listing = run_cli("models", "list", "--config", str(config))
        out2, err2 = second.communicate(timeout=300)
        assert f"learn: slice {run['slice_gain_db']:+.2f} dB" in listing.stdout, listing.stdout
        assert second.returncode == 0, err2
        assert last_run(tmp_path)["served"] == info.version
        assert store.current_checkpoint(tmp_path / "models") == current  # --no-publish
    finally:
        stop(proc)


def test_a_candidate_without_gain_on_the_slice_or_losing_on_the_standard_set_is_refused(tmp_path):
    config = setup_root(tmp_path)
    fill_learn_folder(tmp_path / "learn", 10)
    current = store.current_checkpoint(tmp_path / "models")
    # (each run is capped at 40 steps, with a time budget far beyond what they take even on a loaded machine)
    r = learn_cli(config, "--minutes", "1", "--set", "learn.min_gain_db=50", "--set", "learn.max_steps=40")
    assert r.returncode == 0, r.stderr
    run = last_run(tmp_path)
    assert run["decision"] == "refused" and "learn.min_gain_db" in run["reason"], run
    assert run["slice_gain_db"] > 0  # it did learn; the bar was simply not met
    assert run["steps"] == 40  # learn.max_steps stops it before the time budget
    assert store.current_checkpoint(tmp_path / "models") == current
    r = learn_cli(config, "--minutes", "1", "--set", "learn.max_regression_db=-50", "--set", "learn.max_steps=40")  # any candidate fails this bar
    run = last_run(tmp_path)
    assert r.returncode == 0 and run["decision"] == "refused" and "learn.max_regression_db" in run["reason"], run
    assert store.current_checkpoint(tmp_path / "models") == current
    assert "refused" in r.stdout


def test_too_little_material_says_so_and_trains_nothing(tmp_path):
    config = setup_root(tmp_path)
    fill_learn_folder(tmp_path / "learn", 3)
    Image.new("RGB", (20, 20)).save(tmp_path / "learn" / "20260101T000000000000Z-0123456789abcdef0123.png")
    r = learn_cli(config, "--minutes", "0.3")
    assert r.returncode == 0, r.stderr
    assert "too little material" in r.stdout and "smaller than learn.crop" in r.stdout
    assert not (tmp_path / "runs" / "learn-last.json").exists()


def with_a_tiny_teacher(root: Path) -> tuple[Path, str]:
    """setup_root with 8 kept images and a tiny SPAN x4 imported as a teacher; (config, its version)."""
    pytest.importorskip("spandrel")
    from spandrel.architectures.SPAN.__arch.span import SPAN

    from core.config import load as load_config
    from upscaled.models_cmd import cmd_import

    config = setup_root(root)
    fill_learn_folder(root / "learn", 8)
    torch.manual_seed(0)
    torch.save(SPAN(num_in_ch=3, num_out_ch=3, feature_channels=8, upscale=4).state_dict(), root / "span_x4.pth")
    # in-process: `upscaled models import` itself is tested in tests/test_foreign.py
    assert cmd_import(load_config(config), root / "span_x4.pth", "teacher", None, None) == 0
    return config, next(i.version for _, i in store.published(root / "models") if i.imported)


def test_the_teacher_path_runs_with_a_tiny_imported_model(tmp_path):
    config, version = with_a_tiny_teacher(tmp_path)
    # capped at 5 steps: the run ends once every label is made (learn.teacher_cpu_seconds bounds
    # that, and half the budget: a busy machine may starve the idle-priority labeller) and a few
    # steps are taken, not at the clock
    r = learn_cli(config, "--minutes", "2", "--set", "learn.max_steps=5", "--teacher", version, "--no-publish")
    assert r.returncode == 0, r.stderr
    run = last_run(tmp_path)
    assert run["teacher"] == version and run["teacher_pairs"] > 0, run
    cached = list((tmp_path / "learn" / ".teacher" / version).glob("*.png"))
    assert len(cached) == run["teacher_pairs"]
    slice_digests = {f.split("-")[-1].split(".")[0] for f in os.listdir(tmp_path / "learn") if in_slice(f, LEARN["holdout"])}
    assert slice_digests and not any(c.name.split("@")[0].split("-")[-1].split(".")[0] in slice_digests for c in cached)
    with Image.open(cached[0]) as im:
        assert im.size == (32, 32)  # an 8-pixel crop at its own size, times the teacher's 4


def test_the_teacher_labelling_stops_at_the_runs_time_budget(tmp_path):
    """The labeller runs at idle priority, which a busy machine may starve for good: it is
    stopped at half the run's budget and the run goes on with the labels cached so far."""
    config, version = with_a_tiny_teacher(tmp_path)
    # 3 s of budget: the labeller (a fresh process importing torch and spandrel) cannot be done in 1.5
    t0 = time.monotonic()
    r = learn_cli(config, "--minutes", "0.05", "--set", "learn.max_steps=2", "--teacher", version, "--no-publish")
    assert r.returncode == 0, r.stderr
    assert "stopped at the run's time budget" in r.stderr, r.stderr
    assert last_run(tmp_path)["teacher"] == version
    assert time.monotonic() - t0 < 60  # not held by a labeller that never finishes


# ----------------------------------------------------------------------------- the web page


def test_the_models_view_shows_the_material_the_last_learn_and_its_before_after_crop(tmp_path):
    """A real `upscaled learn`, then a real `upscaled web`: the Models view's learning block holds
    what is kept (against learn.keep_mb), the run's table and decision as learn recorded them, and
    a before/after crop of a held-out image, served only from its one fixed name."""
    import httpx
    from web_helpers import BROWSER_MISSING, browser, close_browser, free_port, image_loaded, until, wait_up, web

    config = setup_root(tmp_path)
    kept = fill_learn_folder(tmp_path / "learn", 10)
    r = learn_cli(config, *TRAINED, "--no-publish")
    assert r.returncode == 0, r.stderr
    run = last_run(tmp_path)
    assert (tmp_path / "runs" / LAST_CROP).is_file() and (Path(run["run"]) / "before-after.png").is_file()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    page = web(config, f"127.0.0.1:{port}", log=tmp_path / "web.log", env=ENV)
    try:
        wait_up(base, page, tmp_path / "web.log")
        L = httpx.get(base + "/api/models", timeout=60).json()["learning"]
        assert L["on"] and L["keep_mb"] == LEARN["keep_mb"] and L["files"] == len(kept)
        assert L["mb"] == round(sum(k.stat().st_size for k in kept) / 2**20, 2)
        last = L["last"]
        assert last["time"] == run["time"] and last["decision"] == run["decision"] == "passed, not published (--no-publish)"
        assert last["reason"] == run["reason"] and last["candidate"] == run["candidate"]
        rows = {row["set"]: row for row in last["rows"]}
        assert list(rows) == ["folder slice", "val val"]
        for name, row in rows.items():
            assert (row["images"], row["served"], row["candidate"]) == (
                run["sets"][name]["images"], run["sets"][name]["served"], run["sets"][name]["candidate"])

        # the crop: bicubic | served | candidate | original of a held-out image, the original untouched
        assert L["crop"]["panels"] == ["bicubic", "served", "candidate", "original"]
        assert in_slice(L["crop"]["image"], LEARN["holdout"])
        got = httpx.get(f"{base}/api/learn/crop?v={L['crop']['v']}", timeout=30)
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        sheet = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"))
        side = min(CROP_SIDE, LEARN["slice_max_side"], 112)
        assert sheet.shape == (side, 4 * side + 3 * 2, 3)
        x, y, w, h = run["crop"]["box"]
        original = np.asarray(Image.open(tmp_path / "learn" / L["crop"]["image"]).convert("RGB"))
        off = (112 - side) // 2  # slice_set's centre square of the kept image, then the crop's box in it
        expect = original[off + y : off + y + h, off + x : off + x + w]
        assert np.array_equal(sheet[14:, -side:], expect[14:])  # below the panel's label
        assert not np.array_equal(sheet[14:, :side], expect[14:])  # bicubic is not the original

        # only that one file, never a link
        (tmp_path / "elsewhere.png").write_bytes(got.content)
        os.replace(tmp_path / "runs" / LAST_CROP, tmp_path / "runs" / "moved.png")
        os.symlink(tmp_path / "elsewhere.png", tmp_path / "runs" / LAST_CROP)
        assert httpx.get(base + "/api/learn/crop", timeout=30).status_code == 404
        assert httpx.get(base + "/api/models", timeout=60).json()["learning"]["crop"] is None
        os.unlink(tmp_path / "runs" / LAST_CROP)
        os.replace(tmp_path / "runs" / "moved.png", tmp_path / "runs" / LAST_CROP)
        assert httpx.get(base + "/api/learn/crop?file=../config.yaml", timeout=30).content == got.content

        html = httpx.get(base + "/", timeout=30).text
        assert 'id="learning-table"' in html and 'id="learning-crop"' in html
        if BROWSER_MISSING:  # the rendering itself needs the browser; the figures above do not
            return
        driver = browser()
        try:
            driver.get(base + "/#models")
            cells = until(driver, lambda d: [c.text for c in d.find_elements("css selector", "#learning-table tbody td")]
                          or None, what="the learning table")
            assert cells[:2] == ["folder slice", str(rows["folder slice"]["images"])]
            assert f"{rows['folder slice']['candidate']:.3f} dB" in cells
            assert "passed, not published" in driver.find_element("css selector", "#learning-decision").text
            assert f"{len(kept)} files" in driver.find_element("css selector", "#learning-material").text
            assert until(driver, lambda d: image_loaded(d, "#learning-crop img"), what="the crop") == (sheet.shape[1], side)
        finally:
            close_browser(driver)
    finally:
        stop(page)


# ----------------------------------------------------------------------------- keeping


def test_keep_mb_zero_keeps_nothing(tmp_path):
    config = setup_root(tmp_path, keep_mb=0)
    line_art(1).save(tmp_path / "inbox" / "a.png")
    r = run_cli("serve", "--once", "--config", str(config), env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "done" / "a.png").exists() and not (tmp_path / "learn").exists()


def test_budget_and_age_pruning_hold(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    folder = tmp_path / "learn"
    rng = np.random.default_rng(0)
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    for i in range(5):  # ~0.4 MB each (noise does not compress), one a minute
        Image.fromarray(rng.integers(0, 256, (370, 370, 3), dtype=np.uint8)).save(src / f"n{i}.png")
        keep(src / f"n{i}.png", folder, 1, 30, now=now + timedelta(minutes=i))
    kept = kept_files(folder)
    assert sum(k.size for k in kept) <= 1 << 20 and len(kept) == 2
    assert [k.when.minute for k in kept] == [3, 4]  # the oldest went first
    assert all((src / f"n{i}.png").exists() for i in range(5))  # people's files untouched
    assert keep(src / "n4.png", folder, 1, 30, now=now + timedelta(minutes=9)) is None  # already kept
    assert prune(folder, 1, 30, now=now + timedelta(days=30, minutes=3, seconds=30)) == [kept[0].path]
    assert [k.when.minute for k in kept_files(folder)] == [4]


def test_a_copy_where_a_hardlink_cannot_be_made(tmp_path):
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs a second file system")
    folder = Path(os.environ.get("TMPDIR_SHM", "/dev/shm")) / f"upscaled-learn-{os.getpid()}-{time.time_ns()}"
    try:
        line_art(0).save(tmp_path / "a.png")
        kept = keep(tmp_path / "a.png", folder, 10, 30)
        assert kept.stat().st_nlink == 1 and kept.read_bytes() == (tmp_path / "a.png").read_bytes()
        assert [p.name for p in folder.iterdir()] == [kept.name]  # no temp file left
    finally:
        for p in folder.glob("*"):
            p.unlink()
        folder.rmdir()


# ----------------------------------------------------------------------------- the set


def test_the_slice_never_appears_in_a_training_batch_and_alpha_zero_is_never_a_target(tmp_path):
    lc = LearnConfig(crop=32, holdout=0.3, min_images=2)
    folder = tmp_path / "learn"
    src = tmp_path / "src"
    src.mkdir()
    marker, hidden = (7, 201, 99), (250, 3, 180)
    for i in range(16):
        f = src / f"img{i}.png"
        line_art(i, 80).save(f)
        k = keep(f, folder, 50, 30)
        if in_slice(k.name, lc.holdout):  # held out: painted in a colour no training image has
            Image.new("RGB", (80, 80), marker).save(k.with_suffix(".tmp.png"))
            os.replace(k.with_suffix(".tmp.png"), k)
    # a transparent image: the colour under alpha 0 must never become a target
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., :3] = hidden
    rgba[:, 40:, :3] = np.asarray(line_art(50, 80))[:, 40:]
    rgba[:, 40:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(src / "alpha.png")
    keep(src / "alpha.png", folder, 50, 30)
    m = survey(folder, lc)
    assert m.slice and m.train and not set(m.slice) & set(m.train)
    assert any(load_kept(f, 32).corners is not None for f in m.train) or any(load_kept(f, 32).corners is not None for f in m.slice)
    data = LearnData(m.train, base=None, base_ratio=0.0, degradations=Degradations(), teacher=[], teacher_share=0.0,
                     scale=4, crop=32, batch=16, seed=1, rank=0, cache_mb=64, max_side=0)
    for step in range(40):
        _, hr = data[step]
        px = (hr * 255).round().byte().permute(0, 2, 3, 1).reshape(-1, 3).numpy()
        for colour in (marker, hidden):
            assert not (px == colour).all(axis=1).any(), (step, colour)


def test_opaque_corners_and_images_too_small_are_counted(tmp_path):
    a = np.full((40, 40), 255, np.uint8)
    a[0, 0] = 0
    corners = opaque_corners(a, 32, stride=1)
    assert len(corners) and all(not (y == 0 and x == 0) for y, x in corners)
    assert opaque_corners(np.zeros((40, 40), np.uint8), 32).shape == (0, 2)
    assert opaque_corners(None, 32) is None
    folder = tmp_path / "learn"
    folder.mkdir()
    Image.new("RGB", (20, 50)).save(folder / "small.png")
    Image.new("RGBA", (60, 60)).save(folder / "clear.png")
    m = survey(folder, LearnConfig(crop=32, min_images=2))
    assert m.count_skipped() == {"smaller than learn.crop": 1, "no fully opaque crop": 1} and not m.train + m.slice


def test_the_gate():
    lc = LearnConfig(min_gain_db=0.1, max_regression_db=0.1)
    assert decide(0.3, 0.05, lc).publish
    assert not decide(0.05, -1.0, lc).publish  # no gain on the folder: refused, however the photos fare
    assert not decide(0.5, 0.2, lc).publish  # a loss on the standard set: refused
    assert not decide(0.5, None, lc).publish
    assert not decide(float("nan"), 0.0, lc).publish
