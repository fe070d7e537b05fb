"""The web page as a newcomer uses it, in a real Chromium against a real `upscaled serve` and a
real `upscaled web`: upload a batch and download what it made (each file under its own name,
the batch as a zip), both failure counts, Compare fitting a portrait output with a divider on
the image, a 420-px window, the training charts with one point, one sample sheet per run, the
run-time estimate and the web.data_root notice. httpx checks the download endpoints."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import natural_image
from daemon_helpers import make_config, serve, stop, tiny_checkpoint, wait_for
from web_helpers import BROWSER_MISSING, browser, close_browser, free_port, until, wait_up, web

pytestmark = pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")


def png(path, h: int, w: int, seed: int) -> None:
    Image.fromarray(natural_image(h, w, seed)).save(path)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    runs = root / "runs"
    cfg, config = make_config(root, ckpt, paths={"runs": str(runs)},
                              trainer={"generator_channels": 8, "generator_blocks": 1, "discriminator_width": 8,
                                       "batch": 2, "crop": 64})
    # A failure from before this daemon started: failed/ holds it, the daemon's count does not.
    (root / "failed" / "old.png").write_bytes(b"junk")
    (root / "failed" / "old.png.error.json").write_text(json.dumps({"reason": "not an image", "stage": "decode"}))
    # Two runs as the trainer leaves them: an older one with one validation and a sample sheet, and
    # a newer one just started (no samples of its own yet).
    old, new = runs / "web-20261201T000000Z", runs / "web-20261202T000000Z"
    for run, lines in ((old, [{"event": "start", "step": 0, "config": {"steps": 100}},
                              {"event": "train", "step": 20, "l1": 0.05, "loss_g": 0.05, "phase": "pretrain"},
                              {"event": "val", "step": 20, "psnr_y": 27.5, "bicubic_psnr_y": 26.9, "ssim_y": 0.8}]),
                       (new, [{"event": "start", "step": 0, "config": {"steps": 100}}])):
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (old / "samples").mkdir()
    png(old / "samples" / "step_00000020.png", 40, 120, 5)
    daemon = serve(config, log=root / "serve.log")
    port = free_port()
    page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
    driver = None
    try:
        wait_for(lambda: (root / "status.json").exists(), 60, 0.2, "the daemon's status")
        wait_up(f"http://127.0.0.1:{port}", page, root / "web.log")
        driver = browser()
        yield {"root": root, "base": f"http://127.0.0.1:{port}", "driver": driver}
    finally:
        if driver is not None:
            close_browser(driver)
        stop(page)
        stop(daemon)


def go(site, view: str) -> None:
    site["driver"].get(f"{site['base']}/#{view}")


def js(site, script: str, *args):
    return site["driver"].execute_script(script, *args)


def test_an_upload_batch_shows_each_files_progress_and_downloads(site, tmp_path):
    d, root = site["driver"], site["root"]
    wide, tall, bad = tmp_path / "wide.png", tmp_path / "tall.png", tmp_path / "notes.png"
    png(wide, 24, 40, 1)
    png(tall, 48, 20, 2)  # portrait, for Compare below
    bad.write_bytes(b"not an image")
    go(site, "make")
    d.find_element("css selector", "#make-input").send_keys(f"{wide}\n{tall}\n{bad}")
    for name in ("wide.png", "tall.png"):
        li = until(d, lambda d, n=name: (e := d.find_element("css selector", f'li.upload-ok[data-name="{n}"]'))
                   and e.get_attribute("data-state") == "done" and e, 60, what=f"{name} done")
        href = li.find_element("css selector", "a.download-btn").get_attribute("href")
        r = httpx.get(href, timeout=30)
        assert r.status_code == 200 and r.content == (root / "outbox" / name).read_bytes()
        assert f'filename="{name}"' in r.headers["content-disposition"]
    assert "not an image" in d.find_element("css selector", 'li.upload-refused[data-name="notes.png"]').text
    zip_href = until(d, lambda d: d.find_element("css selector", "a.batch-zip").get_attribute("href"), what="the batch zip")
    with zipfile.ZipFile(io.BytesIO(httpx.get(zip_href, timeout=30).content)) as z:
        assert sorted(z.namelist()) == ["tall.png", "wide.png"]
        assert z.read("tall.png") == (root / "outbox" / "tall.png").read_bytes()
    # Files: each row downloads; ticked rows download together
    go(site, "files")
    for out in ("wide.png", "tall.png"):
        until(d, lambda d, o=out: d.find_element("css selector", f'tr[data-output="{o}"] input.pick'), what=out).click()
    z = until(d, lambda d: (a := d.find_element("css selector", "#files-zip")).is_displayed() and a.get_attribute("href"))
    with zipfile.ZipFile(io.BytesIO(httpx.get(z, timeout=30).content)) as zf:
        assert sorted(zf.namelist()) == ["tall.png", "wide.png"]
    for bad_out in ("../config.yaml", "/etc/passwd", "nope.png"):
        assert httpx.get(f"{site['base']}/api/download", params={"out": bad_out}).status_code == 404
        assert httpx.get(f"{site['base']}/api/download.zip", params={"out": ["wide.png", bad_out]}).status_code == 404


def test_overview_counts_failures_since_start_and_in_the_folder(site):
    root = site["root"]
    (root / "inbox" / "scan.png").write_bytes(b"\x00 not an image")
    wait_for(lambda: (root / "failed" / "scan.png.error.json").exists(), 30, 0.2, "the daemon to fail scan.png")
    go(site, "overview")
    until(site["driver"], lambda d: d.find_element("css selector", "#ov-failed").text == "1"
          and d.find_element("css selector", "#ov-failed-folder").text == "2", what="1 since start, 2 in failed/")


def test_compare_fits_a_portrait_output_in_the_window_with_a_divider_on_the_image(site):
    d = site["driver"]
    d.set_window_size(1280, 700)
    go(site, "compare?out=tall.png")
    until(d, lambda d: d.find_element("css selector", "#cmp-after").get_attribute("src"), what="the preview")
    box = js(site, "const s = document.querySelector('#cmp-stage').getBoundingClientRect(),"
                   " r = document.querySelector('#cmp-slider').getBoundingClientRect();"
                   "return [s.width, s.height, r.bottom, window.innerHeight];")
    w, h, slider_bottom, inner = box
    assert h > w and slider_bottom <= inner, box  # portrait, and the slider is not below the fold
    handle = d.find_element("css selector", "#cmp-handle")
    from selenium.webdriver import ActionChains

    ActionChains(d).click_and_hold(handle).move_by_offset(-int(w * 0.3), 0).release().perform()
    value = float(d.find_element("css selector", "#cmp-slider").get_attribute("value"))
    assert 10 < value < 30, value  # dragged from 50 % towards the left edge
    assert "1:1" not in d.find_element("css selector", "#cmp-mode").text  # a drag is not a zoom click


def test_a_420px_window_keeps_the_navigation_inside(site):
    d = site["driver"]
    try:
        d.set_window_size(420, 800)
        for view in ("overview", "files", "train"):
            go(site, view)
            until(d, lambda d: d.find_element("css selector", "#daemon-pill").text != "…", what="the page")
            widths = js(site, "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                              " Math.max(...[...document.querySelectorAll('nav a')].map(a => a.getBoundingClientRect().right))]")
            assert widths[0] <= widths[1] and widths[2] <= widths[1], (view, widths)
    finally:
        d.set_window_size(1280, 900)


def test_train_view_charts_samples_estimate_and_data_root_notice(site):
    d = site["driver"]
    go(site, "models")  # run cards with the older run's one validation point
    card = '[data-run="web-20261201T000000Z"] canvas.run-curve'
    axes = until(d, lambda d: d.find_element("css selector", card).get_attribute("data-axes"), what="the run's chart")
    x0, x1, y0, y1 = map(float, axes.split(","))
    assert x0 < 20 < x1 and y0 < 26.9 - 0.01 and y1 > 27.5 + 0.01 and y0 > 0, axes  # around the point, with room
    assert d.find_element("css selector", card).get_attribute("data-series") == "model:1,bicubic:1"
    go(site, "train")
    # The newer run has just started: no sheet of its own, and never the older run's.
    until(d, lambda d: d.find_element("css selector", "#train-sample-run").get_attribute("textContent")
          == "web-20261202T000000Z", what="the run")
    assert not d.find_element("css selector", "#train-sample").is_displayed()
    assert d.find_element("css selector", "#train-sample-none").is_displayed()
    assert not any(i.is_displayed() for i in d.find_elements("css selector", "#train-runs .run-sample"))  # once, not twice
    note = d.find_element("css selector", "#train-root-note")
    assert note.is_displayed() and "web.data_root" in note.text and "--set web.data_root=" in note.text
    est = until(d, lambda d: (t := d.find_element("css selector", "#train-estimate").text).startswith("≈") and t, 120,
                what="the run-time estimate")
    assert "on cpu" in est and "per step, measured here" in est, est
    assert d.find_element("css selector", "#train-steps").get_attribute("value") == "1000"  # not 20,000 on a CPU
