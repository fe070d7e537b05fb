"""Issue 26, Make: an upload's own output scale and format, through a real `upscaled web` and a
real `upscaled serve` on real folders (httpx: the page's fetch() sends the same form)."""

from __future__ import annotations

import io
import json
import os

import httpx
from PIL import Image

from conftest import natural_image
from daemon_helpers import make_config, serve, stop, tiny_checkpoint, wait_for
from daemon import requests
from web_helpers import PAGE, free_port, wait_up, web


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(natural_image(h, w, seed)).save(buf, "PNG")
    return buf.getvalue()


def test_an_upload_gets_its_own_scale_and_format_and_other_drops_the_defaults(tmp_path):
    root = tmp_path
    served = tiny_checkpoint(root / "a.safetensors")
    cfg, config = make_config(root, served)
    daemon = serve(config, log=root / "serve.log", env={"OMP_NUM_THREADS": "1"})
    port = free_port()
    page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
    base = f"http://127.0.0.1:{port}"
    inbox, outbox = root / "inbox", root / "outbox"
    native = cfg.model.scale
    try:
        wait_for(lambda: cfg.path("status").exists(), 60, 0.2, "the daemon to start")
        wait_up(base, page, root / "web.log")
        # A bogus request is refused, naming the field, and leaves nothing in the inbox.
        for fields, key in (({"scale": "99"}, "output.scale"), ({"scale": "two"}, "output.scale"),
                            ({"format": "gif"}, "output.format"), ({"long_side": "0"}, "output.long_side")):
            r = httpx.post(base + "/api/upload", data=fields, files={"f": ("bad.png", png_bytes(12, 16))}, headers=PAGE)
            assert r.status_code == 400 and key in r.json()["error"], (fields, r.status_code, r.text)
        assert not (inbox / "bad.png").exists()
        # The upload asks for x2 WebP; a file dropped beside it by other means keeps the defaults.
        r = httpx.post(base + "/api/upload", data={"scale": "2", "format": "webp"},
                       files={"f": ("asked.png", png_bytes(12, 16, 1))}, headers=PAGE)
        assert r.status_code == 200 and r.json()["files"][0]["saved_as"] == "asked.png", r.text
        tmp = inbox / ".plain.png.tmp"
        tmp.write_bytes(png_bytes(12, 16, 2))
        os.rename(tmp, inbox / "plain.png")
        # A request written for another file (its size differs) that happens to carry this
        # file's inode is ignored, and logged: the file gets the defaults.
        tmp = inbox / ".forged.png.tmp"
        tmp.write_bytes(png_bytes(12, 16, 3))
        forged = requests.write(requests.folder_for(cfg.path("status")), tmp, {"scale": 2.0, "format": "webp"}, "forged.png")
        record = json.loads(forged.read_text())
        forged.write_text(json.dumps({**record, "size": record["size"] + 1}))
        os.rename(tmp, inbox / "forged.png")

        wait_for(lambda: all((outbox / n).exists() for n in ("asked.webp", "plain.png", "forged.png")), 60, 0.2,
                 "the three outputs")
        with Image.open(outbox / "asked.webp") as im:
            assert im.format == "WEBP" and im.size == (32, 24)
            assert "scale 2" in (im.info.get("xmp") or b"").decode("utf-8", "replace")  # the provenance says so
        for name in ("plain.png", "forged.png"):
            with Image.open(outbox / name) as im:
                assert im.format == "PNG" and im.size == (16 * native, 12 * native), name
        history = [json.loads(line) for line in (root / "status-history.jsonl").read_text().splitlines()]
        by_file = {h["file"]: h for h in history}
        assert by_file["asked.png"]["request"] == {"scale": 2.0, "format": "webp"} and by_file["asked.png"]["scale"] == 2
        assert "request" not in by_file["plain.png"] and "request" not in by_file["forged.png"]
        assert list(requests.folder_for(cfg.path("status")).iterdir()) == []  # used or refused: none left
        assert "forged.png: upload request" in (root / "serve.log").read_text()
    finally:
        stop(page)
        stop(daemon)
