"""The README's screenshots of the web page, on real images and the bundled model.

A real `upscaled serve` (bundled fidelity model) and `upscaled web` on a temporary data folder,
a crop of a validation photo and of a text page dropped into the inbox, one unreadable file for
the failed list; then headless Chromium (as in tests/test_web.py) photographs the overview and
the compare view into docs/web-overview.png and docs/web-compare.png.

    .venv/bin/python bench/web_screenshots.py [--photos ../shared/data/photos/val]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from PIL import Image  # noqa: E402

from tests.daemon_helpers import make_config, serve, stop, wait_for  # noqa: E402
from tests.web_helpers import browser, click, close_browser, free_port, image_loaded, until, wait_up, web  # noqa: E402


def crop(src: Path, dst: Path, box_w: int, box_h: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        x, y = (im.width - box_w) // 2, (im.height - box_h) // 2
        im.crop((x, y, x + box_w, y + box_h)).save(dst)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, default=ROOT.parent / "shared" / "data" / "photos" / "val")
    ap.add_argument("--mixed", type=Path, default=ROOT.parent / "shared" / "data" / "mixed" / "val")
    a = ap.parse_args()
    images = lambda d: sorted(p for p in d.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))  # noqa: E731
    root = Path(tempfile.mkdtemp(prefix="upscaled-shots-"))
    _, config = make_config(root, Path("fidelity"), model={"path": "fidelity"}, inference={"threads": 2})
    daemon = serve(config, log=root / "serve.log")
    page = None
    driver = None
    try:
        inbox = root / "inbox"
        text_pages = [p for p in images(a.mixed) if "gnuplot" in p.name]
        crop(text_pages[0] if text_pages else images(a.mixed)[0], inbox / "manual-page.png", 240, 180)
        (inbox / "notes.png").write_bytes(b"a text file with the wrong name")
        crop(images(a.photos)[3], inbox / "holiday.png", 176, 100)
        wait_for(lambda: (root / "outbox" / "holiday.png").exists() and (root / "failed" / "notes.png").exists(),
                 180, 0.5, "the daemon's work")
        port = free_port()
        page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
        base = f"http://127.0.0.1:{port}"
        wait_up(base, page, root / "web.log")
        driver = browser()
        driver.set_window_size(1280, 880)
        driver.get(f"{base}/#overview")
        until(driver, lambda d: d.find_element("css selector", "#ov-processed").text == "2", what="the counts")
        time.sleep(1)
        driver.save_screenshot(str(ROOT / "docs" / "web-overview.png"))
        driver.get(f"{base}/#files")
        row = 'table#files-done tr[data-output="holiday.png"]'
        click(driver, row + " .compare-btn")
        until(driver, lambda d: image_loaded(d, "#cmp-before") and image_loaded(d, "#cmp-after"), what="both previews")
        time.sleep(1)
        driver.save_screenshot(str(ROOT / "docs" / "web-compare.png"))
        print("wrote docs/web-overview.png and docs/web-compare.png")
    finally:
        if driver is not None:
            close_browser(driver)
        if page is not None:
            stop(page)
        stop(daemon)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
