"""`upscaled web` end to end: a real `upscaled serve` and a real `upscaled web` on real folders,
driven by a real headless Chromium (Selenium, Debian's chromium and chromedriver).

One daemon, one web process and one browser for the module, in the order a person would go:
the page loads; promote and rollback change what the daemon serves; a file dropped on the
page is upscaled and compared; a failed file shows its reason and Retry puts it back; a short
training run shows its curve and stops with its state saved; then /metrics is parsed with
prometheus-client's parser and checked against the status file. Security checks (traversal,
token, cross-site requests, upload limits) use httpx against the same and further web
processes. Screenshots of each view land in the test's output folder (the README's are made
on real images by bench/web_screenshots.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from conftest import natural_image
from daemon_helpers import ROOT, TINY, make_config, serve, stop, tiny_checkpoint, wait_for
from model.checkpoint import read_info, save_checkpoint
from model.generator import Generator
from model.store import publish
from web_helpers import (
    BROWSER_MISSING,
    PAGE,
    browser,
    click,
    close_browser,
    free_port,
    image_loaded,
    screenshot,
    until,
    wait_up,
    web,
)

needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(natural_image(h, w, seed)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    served = tiny_checkpoint(root / "a.safetensors")
    night = root / "runs" / "night" / "best.safetensors"  # a finished run's checkpoint, to promote from the page
    night.parent.mkdir(parents=True)
    save_checkpoint(night, Generator(TINY).eval(), step=42)
    publish(root / "models", served)
    for i in range(3):
        (root / "train" / "photos").mkdir(parents=True, exist_ok=True)
        (root / "train" / "photos" / f"p{i}.png").write_bytes(png_bytes(96, 128, i))
    for i in range(2):
        (root / "train" / "val").mkdir(parents=True, exist_ok=True)
        (root / "train" / "val" / f"v{i}.png").write_bytes(png_bytes(64, 64, 10 + i))
    tiny_trainer = {"generator_channels": 8, "generator_blocks": 1, "discriminator_width": 8, "pretrain_steps": 100000,
                    "workers": 0, "cache_mb": 64, "downscale_min": 1.0, "downscale_max": 1.0, "save_every": 100000,
                    "seed": 1, "lr_schedule": "constant"}
    cfg, config = make_config(root, served, model={"path": None}, paths={"runs": str(root / "runs")},
                              trainer=tiny_trainer, web={"data_root": str(root / "train"), "upload_max_mb": 1})
    daemon = serve(config, log=root / "serve.log", env={"OMP_NUM_THREADS": "1"})
    port = free_port()
    page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
    status_path = cfg.path("status")

    def status() -> dict:
        try:
            return json.loads(status_path.read_text())
        except (OSError, ValueError):
            return {}

    try:
        wait_for(lambda: status().get("state") == "running", 60, 0.2, "the daemon to run")
        wait_up(f"http://127.0.0.1:{port}", page, root / "web.log")
        yield {"root": root, "cfg": cfg, "config": config, "base": f"http://127.0.0.1:{port}", "status": status,
               "served": read_info(served).version, "night": read_info(night).version, "shots": root / "screenshots"}
    finally:
        stop(page)
        stop(daemon)


@pytest.fixture(scope="module")
def chrome(site):
    if BROWSER_MISSING:
        pytest.skip(BROWSER_MISSING)
    driver = browser()
    try:
        yield driver
    finally:
        close_browser(driver)


def view(driver, site, name: str) -> None:
    driver.get(f"{site['base']}/#{name}")


def text(driver, css: str) -> str:
    return driver.find_element("css selector", css).text


def idle(site) -> dict:
    """The status once the daemon has nothing queued or in flight."""
    return wait_for(lambda: (s := site["status"]()) and s.get("queued") == 0 and s.get("in_flight") == 0 and s, 30, 0.2,
                    "the daemon to be idle")


# -- through the browser -------------------------------------------------------------------------


@needs_browser
def test_the_page_loads_and_shows_the_served_model(site, chrome):
    view(chrome, site, "overview")
    until(chrome, lambda d: text(d, "#ov-model-version") == site["served"], what="the served model's version")
    until(chrome, lambda d: text(d, "#daemon-pill") == "daemon ready", what="the daemon to show as ready")
    assert "probe PSNR-Y" in text(chrome, "#ov-figures")  # a tiny checkpoint without validation figures
    assert not chrome.find_element("css selector", "#token-box").is_displayed()  # loopback, no token configured


@needs_browser
def test_promote_and_rollback_from_the_page_change_what_the_daemon_serves(site, chrome):
    view(chrome, site, "models")
    row = 'tr[data-name="night/best.safetensors"] .promote-btn'
    until(chrome, lambda d: d.find_element("css selector", row), what="the run's checkpoint in the models list")
    click(chrome, row)
    # An untrained network scores below bicubic on the probe: refused, with the numbers, as the CLI does.
    log = until(chrome, lambda d: (t := text(d, "#models-log")) and "refused" in t and t, 60, what="the refusal")
    assert "below bicubic" in log and "--force" in log, log
    assert site["status"]()["model_version"] == site["served"]
    click(chrome, "#models-force")
    click(chrome, row)
    until(chrome, lambda d: "promote night/best.safetensors: done" in text(d, "#models-log"), 60, what="the promotion")
    wait_for(lambda: site["status"]()["model_version"] == site["night"], 60, 0.2, "the daemon to serve the promoted model")
    screenshot(chrome, site["shots"], "models")
    click(chrome, "#models-rollback")
    until(chrome, lambda d: "roll back: done" in text(d, "#models-log"), 30, what="the rollback")
    wait_for(lambda: site["status"]()["model_version"] == site["served"], 60, 0.2, "the daemon to serve the previous model")
    # A bundled model from its row: the compare view below then shows a real model's output.
    serve_fidelity = 'tr[data-name="fidelity"] .serve-btn'
    click(chrome, serve_fidelity, what="the bundled fidelity row")
    fidelity = until(chrome, lambda d: d.find_element("css selector", 'tr[data-name="fidelity"]').get_attribute("data-version"))
    wait_for(lambda: site["status"]()["model_version"] == fidelity, 90, 0.2, "the daemon to serve the bundled model")
    site["swaps"] = 3  # promoted, rolled back, the bundled model served: /metrics must count each once
    view(chrome, site, "overview")
    until(chrome, lambda d: text(d, "#ov-model-version") == fidelity, what="the overview to show the new model")
    until(chrome, lambda d: "validation PSNR-Y" in text(d, "#ov-figures"), what="its validation figures beside bicubic")


@needs_browser
def test_a_file_uploaded_through_the_page_is_processed_and_compared(site, chrome, tmp_path):
    root = site["root"]
    photo = tmp_path / "beach.png"
    photo.write_bytes(png_bytes(60, 80, 3))
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"these are notes, not an image")
    view(chrome, site, "make")
    chrome.find_element("css selector", "#make-input").send_keys(f"{photo}\n{notes}")
    until(chrome, lambda d: d.find_element("css selector", 'li.upload-ok[data-name="beach.png"]'), what="the upload")
    refused = until(chrome, lambda d: d.find_element("css selector", 'li.upload-refused[data-name="notes.png"]'))
    assert "not an image" in refused.text  # checked like the daemon checks, never dropped into the inbox
    screenshot(chrome, site["shots"], "make")
    wait_for(lambda: (root / "outbox" / "beach.png").exists() and (root / "done" / "beach.png").exists(), 60, 0.2,
             "the daemon to upscale the upload")
    assert not (root / "inbox" / "notes.png").exists() and not list((root / "inbox").glob(".*.tmp"))
    view(chrome, site, "files")
    row = 'table#files-done tr[data-output="beach.png"]'
    until(chrome, lambda d: "80×60" in text(d, row) and "320×240" in text(d, row), what="the file with its sizes in and out")
    click(chrome, row + " .compare-btn")
    until(chrome, lambda d: image_loaded(d, "#cmp-before") and image_loaded(d, "#cmp-after"), what="both previews")
    assert image_loaded(chrome, "#cmp-before") == image_loaded(chrome, "#cmp-after") == (320, 240)
    assert "320×240 output" in text(chrome, "#cmp-info")
    screenshot(chrome, site["shots"], "compare")
    click(chrome, "#cmp-stage")  # 1:1 pixels where clicked
    until(chrome, lambda d: text(d, "#cmp-mode").startswith("1:1"), what="the zoomed view")
    until(chrome, lambda d: image_loaded(d, "#cmp-after") == (320, 240) and "x=" in d.find_element(
        "css selector", "#cmp-after").get_attribute("src"), what="the 1:1 crop")
    assert image_loaded(chrome, "#cmp-before") == (320, 240)
    screenshot(chrome, site["shots"], "compare-1to1")
    # The Make form's Size and Format apply to that upload only (tests/test_web_upload_request.py
    # checks the daemon's side): x2 WebP here, and the batch says what it asked for.
    from selenium.webdriver.support.ui import Select

    view(chrome, site, "make")
    Select(chrome.find_element("css selector", "#make-size")).select_by_value("scale:2")
    Select(chrome.find_element("css selector", "#make-format")).select_by_value("webp")
    shore = tmp_path / "shore.png"
    shore.write_bytes(png_bytes(24, 32, 4))
    chrome.find_element("css selector", "#make-input").send_keys(str(shore))
    until(chrome, lambda d: "scale 2, format webp" in text(d, ".batch-head"), what="the batch with its request")
    wait_for(lambda: (root / "outbox" / "shore.webp").exists(), 60, 0.2, "the x2 WebP output")
    with Image.open(root / "outbox" / "shore.webp") as im:
        assert im.format == "WEBP" and im.size == (64, 48)
    for css in ("#make-size", "#make-format"):
        Select(chrome.find_element("css selector", css)).select_by_value("")


@needs_browser
def test_a_failed_file_shows_its_reason_and_retry_puts_it_back(site, chrome):
    root = site["root"]
    (root / "inbox" / "scan.png").write_bytes(b"\x00 not an image at all")
    wait_for(lambda: (root / "failed" / "scan.png.error.json").exists(), 30, 0.2, "the daemon to fail the file")
    view(chrome, site, "files")
    row = 'table#files-failed tr[data-file="scan.png"]'
    until(chrome, lambda d: "not an image" in text(d, row), what="the failure and its reason")
    screenshot(chrome, site["shots"], "files")
    (root / "failed" / "scan.png").write_bytes(png_bytes(24, 32, 7))  # fixed by its owner
    click(chrome, row + " .retry-btn")
    wait_for(lambda: (root / "outbox" / "scan.png").exists(), 60, 0.2, "the retried file to be upscaled")
    assert not (root / "failed" / "scan.png").exists() and not (root / "failed" / "scan.png.error.json").exists()
    until(chrome, lambda d: not d.find_elements("css selector", row), what="the failed row to go")
    until(chrome, lambda d: d.find_element("css selector", 'table#files-done tr[data-output="scan.png"]'))


@needs_browser
def test_a_training_run_started_from_the_page_shows_its_curve_and_stops(site, chrome):
    root = site["root"]
    view(chrome, site, "train")
    form = {"#train-data": root / "train" / "photos", "#train-val": root / "train" / "val", "#train-crop": 32,
            "#train-batch": 2, "#train-steps": 100000, "#train-lr": 0.001, "#train-val-every": 2}
    for css, value in form.items():
        box = until(chrome, lambda d: d.find_element("css selector", css))
        box.clear()
        box.send_keys(str(value))
    assert "crop in (LR): 8 px" in until(chrome, lambda d: text(d, "#train-crop-in"))
    click(chrome, "#train-start")
    until(chrome, lambda d: d.find_element("css selector", "#train-state").get_attribute("data-running") == "true",
          what="the run to start")
    # Loss and validation records, and a sample sheet, drawn as they come in.
    until(chrome, lambda d: int(d.find_element("css selector", "#train-val-curve").get_attribute("data-points") or 0) >= 4,
          90, what="two validations on the curve")
    until(chrome, lambda d: int(d.find_element("css selector", "#train-loss").get_attribute("data-points") or 0) >= 2)
    until(chrome, lambda d: image_loaded(d, "#train-sample"), what="a sample sheet")
    screenshot(chrome, site["shots"], "train")
    run = root / "runs" / text(chrome, "#train-state").split(": ", 1)[1].split(" ")[0]
    assert (run / "metrics.jsonl").exists() and json.loads((run / "web-params.json").read_text())["crop_in"] == 8
    click(chrome, "#train-stop")
    until(chrome, lambda d: "stopped (state saved; resumable)" in text(d, "#train-state"), 60, what="the run to stop")
    assert (run / "state.pt").is_file() and not (run / "last.safetensors").exists()
    assert "stopped by SIGINT" in (run / "train.log").read_text()
    until(chrome, lambda d: d.find_element("css selector", f'#train-runs [data-run="{run.name}"] .resume-btn'),
          what="a Resume button for the stopped run")


@needs_browser
def test_the_overview_after_the_work(site, chrome):
    # Its own work, so it holds alone or after the other tests: counts only grow.
    root = site["root"]
    before = idle(site)
    (root / "inbox" / "ov-good.png").write_bytes(png_bytes(20, 24, 11))
    (root / "inbox" / "ov-torn.png").write_bytes(b"\x00 torn, not an image")
    wait_for(lambda: (root / "outbox" / "ov-good.png").exists() and (root / "failed" / "ov-torn.png.error.json").exists(),
             60, 0.2, "the daemon to take both files")
    after = idle(site)
    assert after["processed"] == before["processed"] + 1 and after["failed"] == before["failed"] + 1
    view(chrome, site, "overview")
    until(chrome, lambda d: int(text(d, "#ov-processed")) == after["processed"]
          and int(text(d, "#ov-failed")) == after["failed"], what="the counts")
    until(chrome, lambda d: "last failed: ov-torn.png" in text(d, "#ov-last-failed"), what="the last failure named")
    screenshot(chrome, site["shots"], "overview")


# -- metrics and health --------------------------------------------------------------------------


def test_metrics_agree_with_the_status_after_known_work(site):
    from prometheus_client.parser import text_string_to_metric_families

    root = site["root"]
    (root / "inbox" / "m1.png").write_bytes(png_bytes(16, 16, 21))
    (root / "inbox" / "m2.txt").write_bytes(b"not an image")
    wait_for(lambda: (root / "outbox" / "m1.png").exists() and (root / "failed" / "m2.txt.error.json").exists(), 60, 0.2,
             "the daemon to take both files")
    st = idle(site)
    r = httpx.get(site["base"] + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = [s for f in fams.values() for s in f.samples]
    value = lambda name, **labels: next(s.value for s in samples  # noqa: E731
                                        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    assert fams["upscaled_files_processed"].type == "counter"
    assert value("upscaled_files_processed_total") == st["processed"] >= 1
    by_class = st["counters"]["failed_by_class"]
    assert by_class.get("unsupported_type", 0) >= 1
    assert sum(s.value for s in fams["upscaled_files_failed"].samples if s.name.endswith("_total")) == st["failed"]
    assert value("upscaled_files_failed_total", reason="unsupported_type") == by_class["unsupported_type"]
    assert value("upscaled_queue_depth") == 0 and value("upscaled_in_flight") == 0 and value("upscaled_retrying") == 0
    assert fams["upscaled_stage_duration_seconds"].type == "histogram"
    for stage in ("decode", "upscale", "encode"):
        assert value("upscaled_stage_duration_seconds_count", stage=stage) == st["processed"]
        assert value("upscaled_stage_duration_seconds_bucket", stage=stage, le="+Inf") == st["processed"]
        assert value("upscaled_stage_duration_seconds_sum", stage=stage) > 0
    assert value("upscaled_output_megapixels_total") == pytest.approx(st["counters"]["output_megapixels"])
    assert value("upscaled_model_info", version=st["model_version"]) == 1
    swaps = st["counters"]["model_swaps"]
    assert value("upscaled_model_swaps_total") == swaps
    if "swaps" in site:
        assert swaps == site["swaps"]
    assert value("upscaled_model_refused_total") == st["counters"]["model_refusals"] == 0
    assert value("upscaled_daemon_up") == 1 and 0 <= value("upscaled_heartbeat_age_seconds") < 60
    assert httpx.get(site["base"] + "/healthz").json()["status"] == "ok"
    ready = httpx.get(site["base"] + "/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "problems": []}


# -- security ------------------------------------------------------------------------------------


def test_no_path_outside_the_configured_folders_is_served(site):
    root, base = site["root"], site["base"]
    (root / "outbox" / "leak.png").symlink_to(root / "config.yaml")
    (root / "outbox" / "sub").mkdir(exist_ok=True)
    (root / "outbox" / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "failed" / "away.png").symlink_to(root / "config.yaml")
    attempts = [
        "/api/preview?out=../config.yaml&side=after", "/api/preview?out=..%2Fconfig.yaml&side=after",
        "/api/preview?out=%2e%2e%2fconfig.yaml&side=after", "/api/preview?out=%2Fetc%2Fpasswd&side=after",
        "/api/preview?out=sub%2F..%2F..%2Fconfig.yaml", "/api/preview?out=sub/up/config.yaml",
        "/api/preview?out=leak.png&side=after", "/api/compare?out=leak.png",
        "/api/preview?out=.upscaled-work%2Fx.png", "/api/compare?out=sub%5C..%5C..%5Cconfig.yaml",
        "/api/sample?run=..&file=config.yaml", "/api/sample?run=night&file=..%2F..%2F..%2Fconfig.yaml",
        "/api/runs/..%2F..", "/static/..%2F..%2Fconfig.yaml", "/static/%2e%2e/app.py",
    ]
    for url in attempts:
        r = httpx.get(base + url)
        assert r.status_code in (404, 400), (url, r.status_code, r.text[:200])
        assert "web:" not in r.text and "root:" not in r.text, url  # neither config.yaml nor /etc/passwd
    for name in ("../config.yaml", "..%2Fconfig.yaml", "away.png", "/etc/passwd", "sub/../../config.yaml"):
        r = httpx.post(base + "/api/retry", json={"file": name}, headers=PAGE)
        assert r.status_code == 404, (name, r.text)
    assert (root / "config.yaml").is_file() and not (root / "inbox" / "away.png").exists()
    # A Host name that is not loopback (DNS rebinding) gets nothing from a loopback-bound page.
    assert httpx.get(base + "/api/overview", headers={"Host": "evil.example:80"}).status_code == 421


def test_writes_need_the_page_the_same_origin_and_the_token(site, tmp_path):
    config = site["config"]
    port = free_port()
    # Bound to every address without a token: refused at start.
    r = subprocess.run([sys.executable, "-m", "upscaled", "web", "--config", str(config), "--listen", f"0.0.0.0:{port}"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0" in r.stderr, r.stderr
    token = "s3cret-token-of-the-test-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    proc = web(config, f"0.0.0.0:{port}", "--set", f"web.token_file={tmp_path / 'token'}", log=tmp_path / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base, proc, tmp_path / "web.log")
        assert httpx.get(base + "/api/overview").json()["access"] == {"read_only": False, "token_required": True,
                                                                      "details": False}  # no token sent
        retry = base + "/api/retry"
        body = {"file": "nothing.png"}
        assert httpx.post(retry, json=body).status_code == 403  # not from the page
        assert httpx.post(retry, json=body, headers=PAGE).status_code == 401  # no token
        assert httpx.post(retry, json=body, headers={**PAGE, "X-Upscaled-Token": token + "x"}).status_code == 401
        good = {**PAGE, "X-Upscaled-Token": token}
        assert httpx.post(retry, json=body, headers={**good, "Origin": "https://evil.example"}).status_code == 403
        assert httpx.post(retry, json=body, headers={**good, "Sec-Fetch-Site": "cross-site"}).status_code == 403
        r = httpx.post(retry, json=body, headers={**good, "Origin": base, "Sec-Fetch-Site": "same-origin"})
        assert r.status_code == 404 and "no such file" in r.text  # past the guard
        r = httpx.post(base + "/api/upload", files={"f": ("a.png", png_bytes(8, 8))}, headers=PAGE)
        assert r.status_code == 401
        assert not (site["root"] / "inbox" / "a.png").exists()
    finally:
        stop(proc)
    # Read-only: may listen anywhere without a token, and refuses every write.
    port = free_port()
    proc = web(config, f"0.0.0.0:{port}", "--set", "web.read_only=true", log=tmp_path / "ro.log")
    try:
        wait_up(f"http://127.0.0.1:{port}", proc, tmp_path / "ro.log")
        for path in ("/api/retry", "/api/promote", "/api/rollback", "/api/train/start", "/api/train/stop", "/api/upload"):
            r = httpx.post(f"http://127.0.0.1:{port}{path}", json={}, headers=PAGE)
            assert r.status_code == 403 and "read-only" in r.text, (path, r.text)
    finally:
        stop(proc)


def test_uploads_are_limited_checked_and_leave_nothing_behind(site):
    root, base = site["root"], site["base"]
    upload = base + "/api/upload"
    before = sorted(p.name for p in (root / "inbox").iterdir())
    big = b"\x89PNG\r\n\x1a\n" + os.urandom((1 << 20) + 4096)  # over web.upload_max_mb (1 MB)
    r = httpx.post(upload, files={"f": ("big.png", big)}, headers=PAGE, timeout=60)
    assert r.status_code == 413 and "upload limit" in r.text
    r = httpx.post(upload, files={"f": ("fake.png", b"GIF89a but not really")}, headers=PAGE)
    assert r.status_code == 415 and "not an image" in r.json()["files"][0]["reason"]
    whole = png_bytes(64, 64)
    r = httpx.post(upload, files={"f": ("cut.png", whole[: len(whole) // 2])}, headers=PAGE)
    assert r.status_code == 415 and "not a readable image" in r.json()["files"][0]["reason"]
    r = httpx.post(upload, files={"f": ("notes.txt", b"hello")}, headers=PAGE)
    assert r.status_code == 415 and "not a supported image type" in r.json()["files"][0]["reason"]
    r = httpx.post(upload, files={"f": (".hidden.png", png_bytes(8, 8))}, headers=PAGE)
    assert r.status_code == 415 and "not a usable file name" in r.json()["files"][0]["reason"]
    r = httpx.post(upload, content=b"x" * 10, headers={**PAGE, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    assert sorted(p.name for p in (root / "inbox").iterdir()) == before  # no file, no temp file left
    # Two files of one name: neither replaces the other (the second is twin-1.png, unless the
    # daemon took the first out of the inbox before the second was renamed in); both are upscaled.
    r = httpx.post(upload, files=[("f", ("twin.png", png_bytes(16, 16, 1))), ("f", ("twin.png", png_bytes(16, 16, 2)))],
                   headers=PAGE)
    assert r.status_code == 200 and {f["saved_as"] for f in r.json()["files"]} <= {"twin.png", "twin-1.png"}
    wait_for(lambda: len([p for p in (root / "outbox").iterdir() if p.name.startswith("twin")]) == 2, 60, 0.2,
             "both uploads to be upscaled")


# -- the command -----------------------------------------------------------------------------


def test_a_bad_web_setting_names_its_key(site):
    r = subprocess.run([sys.executable, "-m", "upscaled", "web", "--config", str(site["config"]), "--set", "web.listen=nowhere"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "web.listen: expected HOST:PORT" in r.stderr, r.stderr


def test_without_its_dependencies_web_says_what_to_install(tmp_path):
    fake = tmp_path / "starlette"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named starlette (test)')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("UPSCALED_CONFIG", None)
    r = subprocess.run([sys.executable, "-m", "upscaled", "web"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=env)
    assert r.returncode == 2 and "pip install 'upscaled[web]'" in r.stderr and "starlette" in r.stderr, r.stderr


def test_the_status_board_counts_what_metrics_expose(tmp_path):
    """The daemon's side: swaps and refusals counted once each from what the model slot shows,
    failures by reason class, per-stage histograms, and what the Files view lists."""
    from daemon.status import StatusBoard

    board = StatusBoard(tmp_path / "status.json", 0.1)
    v1 = {"version": "v1", "file": "v1.safetensors", "loaded_at": "t1", "refused": None}
    board.set(model=v1)
    board.set(model=dict(v1))  # the same model shown again: no swap
    bad = {"file": "bad.safetensors", "reason": "NaN weights", "time": "t2"}
    board.set(model={**v1, "refused": bad})
    board.set(model={**v1, "refused": dict(bad)})  # one refusal, seen at every pass
    board.set(model={"version": "v2", "file": "v2.safetensors", "loaded_at": "t3", "refused": bad})
    board.record_done(0.75, file="a.png", model_version="v2", timings={"decode": 0.003, "upscale": 0.2, "write": 0.04},
                      input_bytes=10, output=tmp_path / "out" / "a.png", size=(4, 3))
    board.record_failed("x.txt", "not a supported image type (.txt)")
    board.record_failed("y.png", "not an image, or not one of the formats upscaled reads (PNG)")
    board.record_failed("z.png", "something new")
    st = board.snapshot()
    c = st["counters"]
    assert c["model_swaps"] == 1 and c["model_refusals"] == 1
    assert c["failed_by_class"] == {"unsupported_type": 1, "not_an_image": 1, "other": 1}
    assert c["output_megapixels"] == 0.75
    up = c["stage_seconds"]["upscale"]
    assert up["count"] == 1 and up["cumulative"][up["le"].index(0.25)] == 1 and up["cumulative"][up["le"].index(0.1)] == 0
    assert c["stage_seconds"]["encode"]["sum"] == pytest.approx(0.04)  # Job.timings' "write" is encode+write
    assert st["recent"][-1] == {"file": "a.png", "model_version": "v2", "time": st["recent"][-1]["time"],
                                "output": str(tmp_path / "out" / "a.png"), "input_bytes": 10, "size": [4, 3],
                                "seconds": {"decode": 0.003, "upscale": 0.2, "encode": 0.04}}
    assert isinstance(st["heartbeat"], float)


def test_previews_line_up_and_never_send_the_whole_output(tmp_path):
    """Fit previews of before and after have one size, at most web.preview_max_side; a 1:1 crop
    of the output and of the original (bicubic) cover the same pixels; EXIF orientation is
    applied to the original as the daemon applies it."""
    from web.previews import Previews

    small = Image.fromarray(natural_image(30, 40, 5))  # 40 wide, 30 high as stored ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... shown rotated: 30 wide, 40 high
    small.save(tmp_path / "in.jpg", quality=95, exif=exif.tobytes())
    upright = Image.open(tmp_path / "in.jpg").transpose(Image.Transpose.ROTATE_270)
    big = upright.resize((1200, 1600), Image.Resampling.BICUBIC)  # the "output": upright, 40x
    big.save(tmp_path / "out.png")
    p = Previews(max_side=400, folder=tmp_path / "cache")
    g = p.geometry(tmp_path / "out.png")
    assert (g["width"], g["height"], g["fit_width"], g["fit_height"]) == (1200, 1600, 300, 400)
    after = Image.open(io.BytesIO(p.fit(tmp_path / "out.png", tmp_path / "in.jpg", "after")))
    before = Image.open(io.BytesIO(p.fit(tmp_path / "out.png", tmp_path / "in.jpg", "before")))
    assert after.size == before.size == (300, 400) and after.format == "JPEG"
    import numpy as np

    diff = np.abs(np.asarray(after, np.float32) - np.asarray(before, np.float32)).mean()
    assert diff < 8, diff  # the same picture, the same way up (unrotated it would differ wildly)
    crop_a = Image.open(io.BytesIO(p.crop(tmp_path / "out.png", tmp_path / "in.jpg", "after", 1000, 100, 512, 512)))
    crop_b = Image.open(io.BytesIO(p.crop(tmp_path / "out.png", tmp_path / "in.jpg", "before", 1000, 100, 512, 512)))
    assert crop_a.size == crop_b.size == (512, 512)  # clamped to the image: x 688..1200
    assert (crop_a.convert("RGB").getpixel((0, 0)), crop_a.size) == (big.crop((688, 100, 689, 101)).getpixel((0, 0)), (512, 512))
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 4  # cached: made once


# -- issue 23: hostile names, Retry through links, details, models nobody promoted --------------


def _files(site) -> dict:
    r = httpx.get(site["base"] + "/api/files")
    assert r.status_code == 200, r.text[:500]
    return r.json()


def test_retry_and_the_list_agree_on_a_255_byte_name(site):
    """Issue 23 (9): the daemon clips a record's name to fit (244 bytes + .error.json); the list
    paired record and file by cutting the suffix off, and Retry looked for NAME.error.json
    (266 bytes: ENAMETOOLONG, a 500)."""
    root = site["root"]
    name = "long-" + "n" * 246 + ".png"
    assert len(name.encode()) == 255
    (root / "inbox" / name).write_bytes(b"\x00 not an image, and a name as long as Linux allows")
    record = root / "failed" / (name[:244] + ".error.json")
    wait_for(lambda: record.exists() and (root / "failed" / name).exists(), 30, 0.2, "the daemon to fail it")
    rows = [r for r in _files(site)["failed"] if r["file"].startswith("long-")]
    assert [(r["file"], r["exists"]) for r in rows] == [(name, True)], rows
    assert "not an image" in rows[0]["reason"]
    r = httpx.post(site["base"] + "/api/retry", json={"file": name}, headers=PAGE)
    assert r.status_code == 200 and r.json()["inbox"] == name, r.text
    assert not (root / "failed" / name).exists() and not record.exists()
    wait_for(lambda: (root / "failed" / name).exists() and record.exists(), 30, 0.2, "the daemon to fail it again")


HOSTILE_NAME = "ctl\n\x1b]0;pwned\x07<b>bold<img src=x>\u202egnp.png"  # a forged line, an OSC title, HTML, a bidi override


def test_hostile_names_are_listed_escaped_on_the_page_and_retried_as_they_are(site, chrome):
    """Issue 23 (3, 6 on the page): a name that is not UTF-8 made /api/files answer 500 (UTF-8
    cannot encode it); names with control characters were shown raw."""
    root = site["root"]
    undecodable = os.fsencode(root / "inbox") + b"/bad\xff.png"
    with open(undecodable, "wb") as f:
        f.write(b"\x00 not an image")
    (root / "inbox" / HOSTILE_NAME).write_bytes(b"\x00 not an image either")
    wait_for(lambda: {"bad\udcff.png", HOSTILE_NAME} <= {r["file"] for r in _files(site)["failed"]}, 30, 0.2,
             "the daemon to fail both")
    # As the page's JSON.stringify sends it: the lone surrogate as a \udcff escape.
    r = httpx.post(site["base"] + "/api/retry", content=json.dumps({"file": "bad\udcff.png"}),
                   headers={**PAGE, "Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["inbox"] == "bad\udcff.png", r.text  # the very file, its bytes kept
    wait_for(lambda: "bad\udcff.png" in {r["file"] for r in _files(site)["failed"]}, 30, 0.2, "it to fail again")
    view(chrome, site, "files")
    cells = until(chrome, lambda d: [c for c in d.execute_script(
        "return [...document.querySelectorAll('#files-failed td')].map(td => td.textContent);")
        if c.startswith(("ctl", "bad"))], what="both rows")
    assert "ctl\\n\\x1b]0;pwned\\x07<b>bold<img src=x>\\u202egnp.png" in cells, cells  # escaped, text, not HTML
    assert "bad\\xff.png" in cells, cells
    assert not chrome.find_elements("css selector", "#files-failed b, #files-failed img")


def test_retry_never_writes_through_a_link_and_the_daemon_serves_only_what_promote_signed(tmp_path):
    """Issue 23 (2), the chain as it was reproduced: a checkpoint and a `current` dropped into the
    inbox fail; their folder is swapped for a link to the models folder; two Retries moved them
    there and the daemon served the dropped model, past promote's gates. Now Retry refuses the
    link, and a `current` or checkpoint put in the models folder any other way is refused by the
    daemon, while the trainer's gate (trainer/publish.py) still publishes what the daemon serves."""
    from model import store
    from trainer.publish import publish_if_better
    from trainer.validation import ValidationSet

    root = tmp_path
    served = tiny_checkpoint(root / "a.safetensors")
    evil = root / "evil-src.safetensors"
    save_checkpoint(evil, Generator(TINY).eval(), step=666)
    models = root / "models"
    store.publish(models, served)
    cfg, config = make_config(root, served, model={"path": None})
    daemon = serve(config, log=root / "serve.log", env={"OMP_NUM_THREADS": "1"})
    port = free_port()
    page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
    base = f"http://127.0.0.1:{port}"

    def status() -> dict:
        try:
            return json.loads(cfg.path("status").read_text())
        except (OSError, ValueError):
            return {}

    def refused(name: str, words: str) -> dict:
        st = wait_for(lambda: (s := status()).get("model", {}).get("refused") and words in s["model"]["refused"]["reason"]
                      and s, 30, 0.2, f"{name} refused ({words})")
        assert st["model"]["refused"]["file"] == name and st["model_version"] == v1, st["model"]
        return st

    v1 = read_info(served).version
    try:
        wait_for(lambda: status().get("model_version") == v1, 60, 0.2, "the daemon to serve the published model")
        wait_up(base, page, root / "web.log")
        drop = root / "inbox" / "evil"
        drop.mkdir()
        (drop / "evil.safetensors").write_bytes(evil.read_bytes())
        (drop / "current").write_text("evil.safetensors\n")
        failed = root / "failed" / "evil"
        wait_for(lambda: (failed / "current.error.json").exists() and (failed / "evil.safetensors.error.json").exists(),
                 30, 0.2, "the daemon to fail both drops")
        pointer = (models / "current").read_bytes()
        import shutil

        shutil.rmtree(drop, ignore_errors=True)
        drop.symlink_to(models, target_is_directory=True)
        for name in ("evil/evil.safetensors", "evil/current"):
            r = httpx.post(base + "/api/retry", json={"file": name}, headers=PAGE)
            assert r.status_code == 409 and "symbolic link" in r.json()["error"], (name, r.status_code, r.text)
        assert (models / "current").read_bytes() == pointer and not (models / "evil.safetensors").exists()
        assert (failed / "current").is_file() and (failed / "current.error.json").is_file()  # left as they were
        # A link to a folder outside every configured one: refused the same way, nothing written there.
        outside = root / "elsewhere"
        outside.mkdir()
        drop.unlink()
        drop.symlink_to(outside, target_is_directory=True)
        assert httpx.post(base + "/api/retry", json={"file": "evil/current"}, headers=PAGE).status_code == 409
        assert list(outside.iterdir()) == []

        # Put there some other way: a pointer without promote's record is refused, the old model serves.
        shutil.copyfile(evil, models / "evil.safetensors")
        (models / "current").write_text("evil.safetensors\n")
        refused("evil.safetensors", "without a publishing record")
        # A record with a digest but an HMAC made without the key.
        digest = store.sha256_of(models / "evil.safetensors")
        (models / "current").write_text(f"evil.safetensors sha256:{digest} hmac-sha256:{'0' * 64}\n")
        refused("evil.safetensors", "did not sign")
        # The published file's bytes swapped under a valid record.
        (models / "current").write_bytes(pointer)
        time.sleep(0.5)
        shutil.copyfile(evil, models / f"{v1}.safetensors.swap")
        os.replace(models / f"{v1}.safetensors.swap", models / f"{v1}.safetensors")
        refused(f"{v1}.safetensors", "not the checkpoint that was published")
        assert httpx.post(base + "/api/rollback", json={"version": "evil.safetensors"},
                          headers=PAGE).json()["ok"] is False  # the page's Serve cannot sign it either

        # The trainer's gate publishes a candidate (the tampered current is no bar), and it is served.
        val = root / "val"
        for i in range(2):
            (val / f"v{i}.png").parent.mkdir(exist_ok=True)
            (val / f"v{i}.png").write_bytes(png_bytes(32, 32, 40 + i))
        cand = root / "cand.safetensors"
        save_checkpoint(cand, Generator(TINY).eval(), step=7)
        result = publish_if_better(cand, ValidationSet.load(val, 4), models)
        assert result.published and result.current_origin == "untrusted", result
        assert store.verified_current(models)[0].name == Path(result.target).name
        wait_for(lambda: status().get("model_version") == read_info(cand).version, 60, 0.2, "the daemon to serve it")
    finally:
        stop(page)
        assert stop(daemon) == 0, (root / "serve.log").read_text()[-3000:]


def test_read_endpoints_keep_details_behind_the_token_and_hosts_are_normalised(tmp_path):
    """Issue 23 (4): /api/overview and /api/train gave anyone the pid, the host name, errors with
    absolute paths and a fatal traceback; the Host check took "evil@localhost"."""
    root = tmp_path
    cfg, config = make_config(root, tiny_checkpoint(root / "a.safetensors"))
    inbox = cfg.path("inbox")
    status = {"state": "stopped", "pid": 424242, "host": "secret-host-name", "started": "2026-12-04T10:00:00+00:00",
              "updated": "2026-12-04T10:00:00+00:00",
              "fatal": {"reason": f"PermissionError: [Errno 13] Permission denied: '{inbox}/sub/a.png'",
                        "time": "2026-12-04T10:00:00+00:00",
                        "traceback": 'File "/opt/upscaled/.venv/lib/python3.11/site-packages/x/y.py", line 3, in z'},
              "last_error": {"file": "sub/a.png", "reason": f"cannot read {inbox}/sub/a.png (see /etc/upscaled/x.yaml)",
                             "time": "2026-12-04T10:00:00+00:00"}}
    cfg.path("status").write_text(json.dumps(status))
    token = "read-token-of-the-test-0123456789"
    (root / "token").write_text(token + "\n")
    port = free_port()
    proc = web(config, f"127.0.0.1:{port}", "--set", f"web.token_file={root / 'token'}", log=root / "web.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base, proc, root / "web.log")
        for path in ("/api/overview", "/api/train"):
            r = httpx.get(base + path)
            assert r.status_code == 200
            assert "424242" not in r.text and "secret-host-name" not in r.text and "y.py" not in r.text, r.text
            assert str(root) not in r.text and "/etc/" not in r.text and "/opt/" not in r.text, r.text
        o = httpx.get(base + "/api/overview").json()
        assert o["last_error"]["reason"] == "cannot read inbox/sub/a.png (see …/x.yaml)", o["last_error"]
        assert o["daemon"]["fatal"]["reason"].endswith("Permission denied: 'inbox/sub/a.png'")
        assert "traceback" not in o["daemon"]["fatal"] and o["access"]["details"] is False
        assert "data" not in httpx.get(base + "/api/train").json()["defaults"]
        full = httpx.get(base + "/api/overview", headers={"X-Upscaled-Token": token}).json()
        assert full["daemon"]["pid"] == 424242 and full["daemon"]["host"] == "secret-host-name"
        assert "y.py" in full["daemon"]["fatal"]["traceback"] and full["access"]["details"] is True
        assert str(root) not in json.dumps(full)  # paths stay relative for token holders too
        # Host names: parsed strictly and compared normalised.
        for host in ("evil@localhost", f"evil@localhost:{port}", "localhost evil", "evil.example", ""):
            assert httpx.get(base + "/api/overview", headers={"Host": host}).status_code == 421, host
        assert httpx.get(base + "/api/overview", headers={"Host": f"LOCALHOST.:{port}"}).status_code == 200
        good = {**PAGE, "X-Upscaled-Token": token, "Sec-Fetch-Site": "same-origin"}
        r = httpx.post(base + "/api/retry", json={"file": "none.png"},
                       headers={**good, "Host": f"LOCALHOST:{port}", "Origin": f"http://localhost:{port}"})
        assert r.status_code == 404, r.text  # the same origin, past the guard
        for origin in (f"http://evil@localhost:{port}", f"http://localhost:{port}/x", f"http://localhost:{port + 1}"):
            r = httpx.post(base + "/api/retry", json={"file": "none.png"}, headers={**good, "Origin": origin})
            assert r.status_code == 403, (origin, r.text)
    finally:
        stop(proc)
