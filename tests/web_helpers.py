"""Helpers for the web tests: a real `upscaled web` subprocess, a real headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from daemon_helpers import ROOT, wait_for

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium and chromium-driver (.ci/run installs them)
CHROMEDRIVER = Path("/usr/bin/chromedriver")
BROWSER_MISSING = None if CHROMIUM.exists() and CHROMEDRIVER.exists() else (
    "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; .ci/run does)")
PAGE = {"X-Upscaled-Request": "1"}  # what the page's fetch() sends with every write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web(config: Path, listen: str, *extra: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start `upscaled web` as a real subprocess."""
    e = {k: v for k, v in os.environ.items() if k != "UPSCALED_CONFIG"}
    e.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(log.parent / "cache")})
    e.update(env or {})
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "upscaled", "web", "--config", str(config), "--listen", listen, *extra],
                                cwd=ROOT, env=e, stdout=out, stderr=subprocess.STDOUT)


def wait_up(base: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"upscaled web exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout, 0.2, "upscaled web to answer /healthz")


def browser():
    """Headless Chromium through Selenium, the system's browser and driver, a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
              "--window-size=1280,900"):
        opts.add_argument(a)
    profile = tempfile.mkdtemp(prefix="upscaled-chromium-")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.profile_dir = profile
    return driver


def close_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def until(driver, fn, timeout: float = 30, what: str = "the page"):
    """Poll `fn(driver)` until it returns something true (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn(driver)
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - the element is not there yet, or being redrawn
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last})" if last else ""))


def click(driver, css: str, timeout: float = 30, what: str | None = None) -> None:
    """Find and click in one retried step: the page redraws its tables as it polls, so an element
    found a moment earlier can be gone (stale) by the time it is clicked."""
    def attempt(d):
        d.find_element("css selector", css).click()
        return True
    until(driver, attempt, timeout, what or f"a click on {css}")


def image_loaded(driver, css: str) -> tuple[int, int] | None:
    """The natural size of a loaded <img>, or None while it is still loading."""
    size = driver.execute_script(
        "const i = document.querySelector(arguments[0]);"
        "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null;", css)
    return tuple(size) if size else None


def screenshot(driver, folder: Path, name: str) -> Path:
    """A PNG of the view in the test's output folder (the README's come from bench/web_screenshots.py,
    on real images)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"web-{name}.png"
    driver.execute_script("document.getElementById('msg').hidden = true;")  # a passing notice, not the view
    driver.save_screenshot(str(path))
    return path
