"""The web page's answers come from the daemon's own records, across restarts.

A real `upscaled serve --once` per batch (each run is a daemon restart: the status file's
`recent` list starts empty) and a real `upscaled web`, checked with httpx: which original an
output is compared with after a name clash, and what an output made before a restart shows.
"""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from daemon_helpers import make_config, serve, tiny_checkpoint
from web_helpers import free_port, wait_up, web


def flat(colour: tuple[int, int, int], fmt: str, w: int = 24, h: int = 16) -> bytes:
    rng = np.random.default_rng(sum(colour))
    a = np.clip(np.array(colour, float) + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return buf.getvalue()


RED, GREEN, BLUE = (200, 40, 40), (40, 200, 40), (40, 40, 200)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("records")
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)

    def batch(name: str, data: bytes) -> None:
        (root / "inbox" / name).write_bytes(data)
        assert serve(config, "--once", log=root / "serve.log").wait(120) == 0, (root / "serve.log").read_text()

    # p.png, then p.gif (its output takes p-1.png), then another p.png (its original takes
    # done/p-1.png, its output p-2.png): three daemon runs.
    batch("p.png", flat(RED, "PNG"))
    batch("p.gif", flat(GREEN, "GIF"))
    batch("p.png", flat(BLUE, "PNG"))
    assert sorted(p.name for p in (root / "done").iterdir()) == ["p-1.png", "p.gif", "p.png"]
    assert sorted(p.name for p in (root / "outbox").iterdir()) == ["p-1.png", "p-2.png", "p.png"]
    port = free_port()
    page = web(config, f"127.0.0.1:{port}", log=root / "web.log")
    try:
        wait_up(f"http://127.0.0.1:{port}", page, root / "web.log")
        yield {"root": root, "cfg": cfg, "base": f"http://127.0.0.1:{port}"}
    finally:
        page.terminate()
        page.wait(20)


def before_colour(site, out: str) -> np.ndarray:
    r = httpx.get(f"{site['base']}/api/preview", params={"out": out, "side": "before"}, timeout=30)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).reshape(-1, 3).mean(axis=0)


def test_compare_pairs_each_output_with_the_input_that_made_it_after_a_name_clash(site):
    for out, original, colour in (("p.png", "p.png", RED), ("p-1.png", "p.gif", GREEN), ("p-2.png", "p-1.png", BLUE)):
        info = httpx.get(f"{site['base']}/api/compare", params={"out": out}, timeout=30).json()
        assert info["original"] == original, (out, info)
        assert info["before_available"]
        seen = before_colour(site, out)
        assert np.abs(seen - colour).max() < 30, (out, seen, colour)  # the right picture, not only the right name


def test_outputs_from_before_a_restart_keep_their_size_times_and_model(site):
    status = json.loads((site["root"] / "status.json").read_text())
    assert [e["output"].rsplit("/", 1)[-1] for e in status["recent"]] == ["p-2.png"]  # the last run's only
    rows = {r["output"]: r for r in httpx.get(f"{site['base']}/api/files", timeout=30).json()["done"]}
    for out, original in (("p.png", "p.png"), ("p-1.png", "p.gif"), ("p-2.png", "p-1.png")):
        row = rows[out]
        assert row["size_in"] == [24, 16] and row["size_out"] == [96, 64], row
        assert row["model_version"] and row["seconds"].get("upscale") is not None, row
        assert row["original"] == original, row


def test_history_keeps_the_newest_half_past_its_limit_and_skips_a_torn_line(tmp_path, monkeypatch):
    from daemon import history

    path = history.path_for(tmp_path / "status.json")
    monkeypatch.setattr(history, "MAX_BYTES", 2000)
    for i in range(100):
        history.append(path, {"file": f"a{i}.png", "output": f"/o/a{i}.png"})
    kept = history.read(path)
    assert path.stat().st_size <= 2000 + 100 and kept[-1]["file"] == "a99.png"
    assert [e["file"] for e in kept] == [f"a{i}.png" for i in range(100 - len(kept), 100)]  # newest, in order
    with open(path, "ab") as f:
        f.write(b'{"file": "torn')  # a crash in the middle of an append
    history.append(path, {"file": "b.png"})
    assert history.read(path)[-1] == {"file": "b.png"} and len(history.read(path)) == len(kept) + 1
