"""`upscaled serve` as a real subprocess: real observer, real folders, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.daemon_helpers import (
    ROOT,
    decoded_size,
    files_under,
    image_bytes,
    make_config,
    serve,
    settings,
    stop,
    tiny_checkpoint,
    wait_for,
    write_image,
)
from model.generator import GeneratorConfig

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify and the claim scheme are tested on Linux")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


def status_of(root: Path) -> dict:
    try:
        return json.loads((root / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_running(root: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    def up():
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}: {log_tail(root)}"
        return status_of(root).get("state") == "running"

    wait_for(up, timeout, what="the daemon to be running")


def log_tail(root: Path) -> str:
    p = root / "daemon.log"
    return p.read_text()[-3000:] if p.exists() else ""


def status_cmd(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "upscaled", "status", "--config", str(config), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_serve_drops_by_copy_rename_and_slow_writer(tmp_path, ckpt):
    cfg, config = make_config(tmp_path, ckpt)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    write_image(inbox / "before" / "early.png", seed=1)  # present before start-up
    ignored = [".hidden.png", "x.png.part", "y.tmp", "z.crdownload", "w.png~", "Thumbs.db"]
    for name in ignored:
        (inbox / name).write_bytes(image_bytes(Path("a.png")))
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_running(tmp_path, proc)
        r = status_cmd(config)
        assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr

        staging = tmp_path / "staging"
        write_image(staging / "copied.jpg", seed=2)
        write_image(staging / "moved.png", seed=3)
        shutil.copy(staging / "copied.jpg", inbox / "copied.jpg")  # by cp
        os.makedirs(inbox / "deep" / "er")
        os.rename(staging / "moved.png", inbox / "deep" / "er" / "moved.png")  # by rename (mv)
        (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        write_image(staging / "album" / "one.png", seed=7)  # a whole folder moved in
        write_image(staging / "album" / "inner" / "two.jpg", seed=8)
        os.rename(staging / "album", inbox / "album")

        # A slow writer: one open file, chunks over ~3 s, far slower than settle_seconds (0.5).
        data = image_bytes(Path("slow.png"), 48, 40, seed=4)
        chunks = [data[i : i + max(1, len(data) // 15)] for i in range(0, len(data), max(1, len(data) // 15))]
        with open(inbox / "slow.png", "wb") as f:
            for c in chunks:
                f.write(c)
                f.flush()
                time.sleep(3.0 / len(chunks))
        # A slow writer that reopens the file for every chunk (as some network copies do).
        data2 = image_bytes(Path("slow2.png"), 40, 32, seed=6)
        step = max(1, len(data2) // 8)
        for i in range(0, len(data2), step):
            with open(inbox / "slow2.png", "ab") as f:
                f.write(data2[i : i + step])
            time.sleep(0.1)

        expected = {"before/early.png": (128, 96), "copied.jpg": (128, 96), "deep/er/moved.png": (128, 96),
                    "slow.png": (192, 160), "slow2.png": (160, 128), "album/one.png": (128, 96),
                    "album/inner/two.jpg": (128, 96)}
        # The output is put in place first and the original moved to done/ after it, so wait for both.
        wait_for(lambda: all((outbox / k).exists() and (tmp_path / "done" / k).exists() for k in expected)
                 and (tmp_path / "failed" / "corrupt.png.error.json").exists(), 60, what="all outputs and done/ originals")
        for rel, size in expected.items():
            assert decoded_size(outbox / rel) == size
            assert (tmp_path / "done" / rel).read_bytes()  # original moved to done/
        assert files_under(outbox) == sorted(expected)
        assert files_under(outbox, include_hidden=True) == sorted(expected)  # no temp files left
        err = json.loads((tmp_path / "failed" / "corrupt.png.error.json").read_text())
        assert err["stage"] == "decode" and err["reason"]
        assert files_under(tmp_path / "failed") == ["corrupt.png", "corrupt.png.error.json"]

        # The daemon goes on after the corrupt file.
        write_image(staging / "after.png", seed=5)
        shutil.copy(staging / "after.png", inbox / "after.png")
        wait_for(lambda: (tmp_path / "done" / "after.png").exists(), 30, what="a file after the corrupt one")

        # SIGHUP with a broken config: logged, the old one kept, still serving.
        good = config.read_text()
        config.write_text("watch: {settle_seconds: -1}\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: config rejected" in log_tail(tmp_path), 20, what="the SIGHUP to be handled")
        config.write_text(good)
        assert proc.poll() is None
        wait_for(lambda: status_of(tmp_path).get("processed") == 8, 10, what="status counters")
        st = status_of(tmp_path)
        assert st["failed"] == 1 and st["last_failed"]["file"] == "corrupt.png" and st["model_version"]
    finally:
        t0 = time.monotonic()
        rc = stop(proc)
    assert rc == 0 and time.monotonic() - t0 < 10, log_tail(tmp_path)
    for name in ignored:  # untouched
        assert (inbox / name).read_bytes() == image_bytes(Path("a.png"))
    assert status_of(tmp_path)["state"] == "stopped"
    assert status_cmd(config).returncode == 3
    assert not any(p.is_file() for p in (inbox / ".upscaled-work").rglob("*") if p.name != "kept.jsonl")
    assert "SIGHUP: config rejected" in (tmp_path / "daemon.log").read_text()


def test_polling_mode_picks_up_a_copy(tmp_path, ckpt):
    cfg, config = make_config(tmp_path, ckpt, watch={"mode": "polling", "rescan_interval": 60.0})
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_running(tmp_path, proc)
        write_image(tmp_path / "staging" / "p.png", seed=9)
        shutil.copy(tmp_path / "staging" / "p.png", tmp_path / "inbox" / "p.png")
        wait_for(lambda: (tmp_path / "done" / "p.png").exists(), 30, what="the polled file")
        assert decoded_size(tmp_path / "outbox" / "p.png") == (128, 96)
    finally:
        assert stop(proc) == 0, log_tail(tmp_path)


def test_daemon_serves_the_configured_self_ensemble(tmp_path, ckpt):
    import numpy as np
    from PIL import Image

    from model.checkpoint import load_generator
    from model.engine import EngineOptions, Upscaler

    cfg, config = make_config(tmp_path, ckpt, inference={"device": "cpu", "precision": "fp32", "self_ensemble": 4})
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_running(tmp_path, proc)
        write_image(tmp_path / "staging" / "e.png", w=40, h=28, seed=4).rename(tmp_path / "inbox" / "e.png")
        wait_for(lambda: (tmp_path / "done" / "e.png").exists(), 30, what="the file")
    finally:
        assert stop(proc) == 0, log_tail(tmp_path)
    assert "self-ensemble of 4 views" in log_tail(tmp_path)
    rgb = np.asarray(Image.open(tmp_path / "done" / "e.png").convert("RGB"))
    out = np.asarray(Image.open(tmp_path / "outbox" / "e.png").convert("RGB")).astype(np.int16)
    g, info = load_generator(ckpt)
    diff = {n: np.abs(out - Upscaler(g, info, EngineOptions(device="cpu", precision="fp32", self_ensemble=n))
                      .upscale_rgb(rgb).astype(np.int16)).max() for n in (1, 4)}
    assert diff[4] <= 1 < diff[1], diff


def test_two_daemons_process_each_file_exactly_once(tmp_path, ckpt):
    # Two daemons on one shared inbox, each with its own status file (as documented).
    cfg, config = make_config(tmp_path, ckpt, watch={"settle_seconds": 0.2})
    data = settings(tmp_path, ckpt, watch={"settle_seconds": 0.2})
    data["paths"]["status"] = str(tmp_path / "status-2.json")
    config2 = tmp_path / "config-2.yaml"
    config2.write_text(yaml.safe_dump(data))
    inbox = tmp_path / "inbox"
    names = [f"d{i % 3}/img{i:02d}.png" for i in range(24)]
    for i, n in enumerate(names[:12]):
        write_image(inbox / n, seed=i)
    procs = [serve(c, log=tmp_path / "daemon.log") for c in (config, config2)]
    try:
        for i, n in enumerate(names[12:], 12):  # more while both run
            write_image(tmp_path / "staging" / n, seed=i)
            (inbox / n).parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp_path / "staging" / n, inbox / n)
            time.sleep(0.05)
        wait_for(lambda: len(files_under(tmp_path / "done")) >= len(names), 90, every=0.2, what="all files done")
        time.sleep(0.5)  # a duplicate, if any, would show up now
    finally:
        codes = [stop(p) for p in procs]
    assert codes == [0, 0], log_tail(tmp_path)
    assert files_under(tmp_path / "done") == sorted(names)  # no "-1" duplicates
    assert files_under(tmp_path / "outbox", include_hidden=True) == sorted(names)
    assert files_under(tmp_path / "failed") == []
    assert (tmp_path / "daemon.log").read_text().count(" done ") == len(names)


def test_kill_9_mid_batch_then_restart_loses_nothing(tmp_path, ckpt):
    slow = tiny_checkpoint(tmp_path / "slower.safetensors", GeneratorConfig(scale=4, channels=16, blocks=2))
    cfg, config = make_config(tmp_path, slow, watch={"settle_seconds": 0.0}, daemon={"io_workers": 1})
    inbox = tmp_path / "inbox"
    names = [f"k/img{i:02d}.png" for i in range(30)]
    for i, n in enumerate(names):
        write_image(inbox / n, 64, 48, seed=i)
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_for(lambda: len(files_under(tmp_path / "done")) >= 3, 60, every=0.01, what="the first outputs")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(files_under(tmp_path / "done")) < len(names), "the batch finished before the kill; make it slower"
    r = subprocess.run([sys.executable, "-m", "upscaled", "serve", "--once", "--config", str(config)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert files_under(tmp_path / "done") == sorted(names)
    assert files_under(tmp_path / "outbox", include_hidden=True) == sorted(names)  # no temp/partial files
    for n in names:
        assert decoded_size(tmp_path / "outbox" / n) == (256, 192)
    assert files_under(inbox, include_hidden=True) == []  # claims recovered, nothing left behind
    assert "recovering claims of dead daemon" in r.stderr


def test_sigterm_while_busy_exits_zero_quickly_and_gives_back_unfinished(tmp_path, ckpt):
    slow = tiny_checkpoint(tmp_path / "slower.safetensors", GeneratorConfig(scale=4, channels=16, blocks=2))
    cfg, config = make_config(tmp_path, slow, watch={"settle_seconds": 0.0}, daemon={"shutdown_timeout": 5.0})
    names = [f"t{i:02d}.png" for i in range(30)]
    for i, n in enumerate(names):
        write_image(tmp_path / "inbox" / n, 64, 48, seed=i)
    proc = serve(config, log=tmp_path / "daemon.log")
    wait_for(lambda: files_under(tmp_path / "done"), 60, every=0.01, what="the first output")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log_tail(tmp_path)
    assert time.monotonic() - t0 < 8
    done, left = files_under(tmp_path / "done"), files_under(tmp_path / "inbox")
    assert sorted(done + left) == names  # every file either finished or back in the inbox
    assert files_under(tmp_path / "outbox", include_hidden=True) == done
    assert files_under(tmp_path / "inbox", include_hidden=True) == left  # no claims left


def test_notify_protocol_under_a_fake_systemd(tmp_path, ckpt):
    cfg, config = make_config(tmp_path, ckpt)
    write_image(tmp_path / "inbox" / "n.png")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    got: list[str] = []
    proc = serve(config, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"},
                 log=tmp_path / "daemon.log")

    def pump():
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        return any(m.startswith("READY=1") for m in got) and sum(m == "WATCHDOG=1" for m in got) >= 3

    try:
        wait_for(pump, 60, every=0, what="READY=1 and watchdog pings")
        assert wait_for(lambda: (tmp_path / "done" / "n.png").exists(), 30)
    finally:
        assert stop(proc) == 0
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except (TimeoutError, OSError):
            break
    sock.close()
    ready = next(m for m in got if m.startswith("READY=1"))
    assert "STATUS=" in ready
    assert any(m.startswith("STATUS=") and "done" in m for m in got)
    assert "STOPPING=1" in got
    assert got.index(ready) < got.index("STOPPING=1")


def test_jpeg_inputs_go_to_the_model_for_jpeg(tmp_path, ckpt):
    import torch

    from model.checkpoint import read_info, save_checkpoint
    from model.generator import Generator

    torch.manual_seed(7)
    other = tmp_path / "for-jpeg.safetensors"
    save_checkpoint(other, Generator(GeneratorConfig(scale=4, channels=8, blocks=1)).eval())
    main_v, jpeg_v = read_info(ckpt).version, read_info(other).version
    assert main_v != jpeg_v
    cfg, config = make_config(tmp_path, ckpt, model={"path": str(ckpt), "for_jpeg": "for-jpeg.safetensors"})  # relative to the config
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_running(tmp_path, proc)
        for name in ("a.jpg", "b.png", "c.webp"):  # the JPEG at Pillow's default quality, 75
            write_image(tmp_path / "staging" / name, seed=1).rename(tmp_path / "inbox" / name)
        from PIL import Image

        Image.open(write_image(tmp_path / "staging" / "d.png", seed=2)).convert("RGB").save(tmp_path / "staging" / "d.jpg", quality=95)
        os.rename(tmp_path / "staging" / "d.jpg", tmp_path / "inbox" / "d.jpg")  # barely compressed
        wait_for(lambda: len(files_under(tmp_path / "done")) == 4, 30, what="four files")
    finally:
        assert stop(proc) == 0, log_tail(tmp_path)
    done = {line.split()[3].rstrip(":"): line.split()[-1] for line in log_tail(tmp_path).splitlines() if " done " in line}
    assert done == {"a.jpg": jpeg_v, "b.png": main_v, "c.webp": main_v, "d.jpg": main_v}, done
    assert f"JPEG inputs below quality 90 go to model {jpeg_v}" in log_tail(tmp_path)


def test_output_name_template_and_jpeg_flattening_onto_the_background(tmp_path, ckpt):
    import numpy as np
    from PIL import Image

    from model.checkpoint import read_info

    cfg, config = make_config(tmp_path, ckpt, output={"format": "jpg", "name": "{stem}_x{scale}_{model}",
                                                      "jpeg_background": "#ff0000"})
    rgba = np.zeros((24, 32, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[:, 16:, 3] = 255  # left half transparent, right half opaque green
    Image.fromarray(rgba, "RGBA").save(tmp_path / "staging.png")
    proc = serve(config, log=tmp_path / "daemon.log")
    try:
        wait_running(tmp_path, proc)
        os.rename(tmp_path / "staging.png", tmp_path / "inbox" / "logo.png")
        wait_for(lambda: (tmp_path / "done" / "logo.png").exists(), 30, what="the file")
    finally:
        assert stop(proc) == 0, log_tail(tmp_path)
    digest = read_info(ckpt).version.rsplit("-", 1)[-1]
    assert files_under(tmp_path / "outbox") == [f"logo_x4_{digest}.jpg"]
    out = np.asarray(Image.open(tmp_path / "outbox" / f"logo_x4_{digest}.jpg").convert("RGB")).astype(int)
    assert (np.abs(out[40:56, 8:40] - [255, 0, 0]) < 40).all()  # transparent -> the configured red
    assert "flattened onto #ff0000" in log_tail(tmp_path)
