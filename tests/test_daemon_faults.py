"""Issue 16's defects, each through a real `upscaled serve` on real folders: name clashes,
permissions, fatal errors, slow writers, a second daemon, `upscaled status`, a recreated inbox,
leftovers in the work folder, and running as root.

Permission cases run the daemon so that file modes apply to it: under root (as in CI), as root
without its capabilities (tests/daemon_helpers.as_daemon_user).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.daemon_helpers import (
    ROOT,
    as_daemon_user,
    files_under,
    image_bytes,
    make_config,
    not_ours,
    serve,
    stop,
    tiny_checkpoint,
    wait_for,
    write_image,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify, flock and the claim scheme are tested on Linux")


@pytest.fixture
def root():
    """A data folder every user can reach (pytest's own tmp folders are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="upscaled-faults-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    for p in [d, *d.rglob("*")]:  # undo not_ours() so that everything can go
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    shutil.rmtree(d, ignore_errors=True)


def status_of(root: Path, name: str = "status.json") -> dict:
    try:
        return json.loads((root / name).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def running(root: Path, proc: subprocess.Popen) -> None:
    def up():
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}: {log(root)}"
        st = status_of(root)
        return st.get("state") == "running" and st.get("pid") == proc.pid  # not a killed predecessor's file

    wait_for(up, 90, what="the daemon to be running")


def log(root: Path) -> str:
    p = root / "daemon.log"
    return p.read_text(errors="replace")[-4000:] if p.exists() else ""


def status_cmd(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "upscaled", "status", *args], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=60)


def drop(root: Path, rel: str, seed: int = 0, w: int = 32, h: int = 24) -> None:
    """Like a well-behaved client: write beside the inbox, then rename in."""
    staged = write_image(root / "staging" / rel, w=w, h=h, seed=seed)
    dst = root / "inbox" / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, dst)


def work_leftovers(root: Path) -> list[str]:
    work = root / "inbox" / ".upscaled-work"
    # Owner folders and any file (claims, leases, markers); the shared, empty written/ may stay.
    return sorted(p.relative_to(work).as_posix() for p in work.rglob("*")
                  if p.is_file() or (p.parent == work and p.name != "written")) if work.exists() else []


# -- 1. name clashes ---------------------------------------------------------------------------


def test_same_output_name_never_overwritten_by_another_input(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        drop(root, "photo.png", seed=1)
        wait_for(lambda: not (root / "inbox" / "photo.png").exists(), 30, what="the first to be claimed")
        drop(root, "photo.png", seed=2)  # the same name again, while or after the first is processed
        (root / "staging" / "photo.gif").write_bytes(image_bytes(Path("photo.gif"), seed=3))
        os.rename(root / "staging" / "photo.gif", root / "inbox" / "photo.gif")  # also becomes photo.png
        wait_for(lambda: len(files_under(root / "done")) == 3, 30, what="all three done")
    finally:
        assert stop(proc) == 0, log(root)
    assert files_under(root / "outbox") == ["photo-1.png", "photo-2.png", "photo.png"]
    assert files_under(root / "done") == ["photo-1.png", "photo.gif", "photo.png"]
    assert log(root).count("was taken (output.on_conflict: suffix)") == 2


def test_on_conflict_skip_sends_the_input_to_failed_with_a_reason(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, output={"on_conflict": "skip"})
    (root / "outbox" / "photo.png").write_bytes(b"an earlier output")
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        drop(root, "photo.png")
        wait_for(lambda: (root / "failed" / "photo.png.error.json").exists(), 30, what="the skip")
    finally:
        assert stop(proc) == 0, log(root)
    assert (root / "outbox" / "photo.png").read_bytes() == b"an earlier output"
    assert "already exists" in json.loads((root / "failed" / "photo.png.error.json").read_text())["reason"]


def test_cli_gives_inputs_that_differ_only_by_extension_each_an_output(tmp_path):
    src = tmp_path / "in"
    for name in ("photo.gif", "photo.jpg", "photo.png"):
        write_image(src / name, seed=len(name))
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")

    def upscale(*extra):
        return subprocess.run([sys.executable, "-m", "upscaled", "upscale", str(src), "-o", str(tmp_path / "out"),
                               "--model", str(ckpt), "--format", "png", *extra], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)

    r = upscale("--overwrite")
    assert r.returncode == 0, r.stderr
    assert files_under(tmp_path / "out") == ["photo-1.png", "photo-2.png", "photo.png"]
    assert "upscaled 3 image(s)" in r.stderr and "0 skipped" in r.stderr
    r = upscale()  # again: the three outputs exist now, and are left alone
    assert r.returncode == 0 and "upscaled 0 image(s)" in r.stderr and "3 skipped" in r.stderr, r.stderr
    assert files_under(tmp_path / "out") == ["photo-1.png", "photo-2.png", "photo.png"]


# -- 2, 4, 8: permissions, an input's fault, status ------------------------------------------


def test_unclaimable_and_unreadable_inputs_never_stop_the_service(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, watch={"rescan_interval": 1.0})
    inbox = root / "inbox"
    write_image(inbox / "stuck" / "a.png", seed=1)  # in a folder the daemon may not write
    write_image(inbox / "secret" / "b.png", seed=2)  # in a folder the daemon may not even list
    write_image(inbox / "unreadable.png", seed=3)  # a file the daemon may not read
    not_ours(inbox / "stuck", 0o555)
    not_ours(inbox / "secret", 0o000)
    not_ours(inbox / "unreadable.png", 0o000)
    proc = serve(config, log=root / "daemon.log", prefix=as_daemon_user())
    try:
        running(root, proc)
        drop(root, "fine.png", seed=4)
        wait_for(lambda: (root / "outbox" / "fine.png").exists(), 30, what="the good file, past the bad ones")
        wait_for(lambda: (root / "failed" / "unreadable.png.error.json").exists(), 30, what="the unreadable file")
        reason = json.loads((root / "failed" / "unreadable.png.error.json").read_text())["reason"]
        assert "may not read this file" in reason and "tried 3 times" in reason
        blocked = wait_for(lambda: {b["file"]: b["reason"] for b in status_of(root).get("blocked", [])}
                           if len(status_of(root).get("blocked", [])) == 2 else None, 20, what="both problems in the status")
        assert "cannot move it" in blocked["stuck/a.png"] and "cannot list this folder" in blocked["secret"]
        r = status_cmd("--config", str(config))
        assert r.returncode == 0 and "skipped:     stuck/a.png" in r.stdout and "skipped:     secret" in r.stdout, r.stdout
        assert proc.poll() is None  # still serving
        # Access granted: both are taken at the next rescan, and the problems leave the status.
        for p in (inbox / "stuck", inbox / "secret"):
            os.chmod(p, 0o777)
        wait_for(lambda: (root / "outbox" / "stuck" / "a.png").exists() and (root / "outbox" / "secret" / "b.png").exists(),
                 30, what="the freed files")
        wait_for(lambda: status_of(root).get("blocked") == [] and status_of(root).get("last_error") is None, 10,
                 what="the status to clear")
    finally:
        assert stop(proc) == 0, log(root)
    assert log(root).count("cannot take stuck/a.png") == 1  # logged once, not at every rescan


def test_last_error_clears_once_the_outbox_is_writable_again(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    not_ours(root / "outbox", 0o555)
    proc = serve(config, log=root / "daemon.log", prefix=as_daemon_user())
    try:
        running(root, proc)
        drop(root, "a.png")
        wait_for(lambda: (status_of(root).get("last_error") or {}).get("file") == "a.png", 30, what="the retry")
        os.chmod(root / "outbox", 0o777)
        wait_for(lambda: (root / "outbox" / "a.png").exists(), 30, what="the output")
        wait_for(lambda: status_of(root).get("last_error") is None and status_of(root).get("retrying") == [], 10,
                 what="last_error to clear")
    finally:
        assert stop(proc) == 0, log(root)


def test_fatal_error_is_logged_with_traceback_and_shown_by_status(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    proc = serve(config, log=root / "daemon.log", prefix=as_daemon_user())
    running(root, proc)
    # The daemon's own claims folder taken away from it: its next heartbeat fails.
    (owner,) = [p for p in (root / "inbox" / ".upscaled-work").iterdir() if p.is_dir()]
    not_ours(owner, 0o000)
    assert proc.wait(30) == 1
    text = log(root)
    assert "fatal error, exiting: PermissionError" in text and "Traceback" in text
    r = status_cmd("--config", str(config))
    assert r.returncode == 3 and "it ended with a fatal error: PermissionError" in r.stdout, r.stdout


def test_input_name_too_long_for_its_temp_name_is_still_processed(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, output={"format": "webp"})
    name = "n" * 250 + ".png"  # 254 bytes; as .webp it would be 255, and its temp name far longer
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        drop(root, name)
        wait_for(lambda: (root / "outbox" / ("n" * 250 + ".webp")).exists(), 30, what="the output")
    finally:
        assert stop(proc) == 0, log(root)
    assert files_under(root / "failed") == [] and "retrying" not in log(root)


# -- 5. a writer that reopens the file for every chunk ------------------------------------------


def test_writer_reopening_per_chunk_slower_than_closed_grace_gives_one_output(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, watch={"closed_grace": 0.5, "settle_seconds": 0.5})
    data = image_bytes(Path("slow.png"), 64, 48, seed=5)
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        step = len(data) // 5 + 1
        for i in range(0, len(data), step):
            with open(root / "inbox" / "slow.png", "ab") as f:  # open, append, close: a new close each chunk
                f.write(data[i : i + step])
            time.sleep(0.7)
        wait_for(lambda: (root / "done" / "slow.png").exists(), 30, what="the file")
        time.sleep(1.0)
    finally:
        assert stop(proc) == 0, log(root)
    assert files_under(root / "failed") == [] and files_under(root / "outbox") == ["slow.png"]
    assert (root / "done" / "slow.png").read_bytes() == data


# -- 7. a second daemon on one config ------------------------------------------------------------


def test_second_daemon_on_the_same_status_file_is_refused(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    first = serve(config, log=root / "daemon.log")
    try:
        running(root, first)
        second = subprocess.run([sys.executable, "-m", "upscaled", "serve", "--config", str(config)], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 75, second.stderr
        assert "another upscaled serve" in second.stderr and str(cfg.path("status")) in second.stderr
        assert first.poll() is None and status_of(root)["pid"] == first.pid
        drop(root, "a.png")
        wait_for(lambda: (root / "outbox" / "a.png").exists(), 30, what="the first daemon to go on")
    finally:
        assert stop(first) == 0, log(root)


# -- 8. upscaled status --------------------------------------------------------------------------


def test_status_from_elsewhere_through_an_invalid_config_and_a_closed_pipe(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        r = status_cmd("--config", str(config), cwd=elsewhere)
        assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr
        r = status_cmd(cwd=elsewhere, env={"UPSCALED_CONFIG": str(config)})
        assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr
        good = config.read_text()
        config.write_text(good.replace("inference:", "inference:\n  tile: banana"))  # mid-edit
        r = status_cmd("--config", str(config))
        assert r.returncode == 0 and "running" in r.stdout and "inference.tile" in r.stderr, r.stdout + r.stderr
        config.write_text("paths: [unclosed\n")  # not even YAML; paths.status was absolute, default now
        r = status_cmd("--config", str(config))
        assert r.returncode == 3 and "invalid" in r.stderr and "Traceback" not in r.stderr
        config.write_text(good)
        # A reader that has gone away (`| head` closing early): no BrokenPipeError traceback.
        p = subprocess.Popen([sys.executable, "-m", "upscaled", "status", "--config", str(config)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    finally:
        assert stop(proc) == 0, log(root)


def test_serve_without_a_config_says_which_defaults_and_folders_it_uses(root):
    env = {k: v for k, v in os.environ.items() if k != "UPSCALED_CONFIG"}
    env["PYTHONPATH"] = str(ROOT)
    r = subprocess.run([sys.executable, "-m", "upscaled", "serve", "--once"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    first = r.stderr.splitlines()[0]
    assert "no config file" in first and "built-in defaults" in first and str(root / "data" / "inbox") in first, r.stderr
    if os.geteuid() == 0:  # and the defaults do not allow root
        assert r.returncode == 2 and "refusing to run as root" in r.stderr, r.stderr
    else:
        assert r.returncode == 0, r.stderr


# -- 9, 10: a recreated inbox, leftovers -------------------------------------------------------


def test_recreated_inbox_is_watched_again_within_seconds(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, watch={"rescan_interval": 120.0})
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        shutil.rmtree(root / "inbox")  # the share goes away ...
        time.sleep(1.5)
        (root / "inbox").mkdir()  # ... and comes back
        time.sleep(1.5)
        t0 = time.monotonic()
        drop(root, "after.png")
        wait_for(lambda: (root / "outbox" / "after.png").exists(), 10, what="the file in the new inbox")
        assert time.monotonic() - t0 < 10  # not the 120-second rescan
    finally:
        assert stop(proc) == 0, log(root)
    assert "is a new folder (recreated or remounted)" in log(root)
    assert work_leftovers(root) == []


def test_work_folder_is_clean_after_kill_9_restart_and_stop_and_after_a_failed_start(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt)
    proc = serve(config, log=root / "daemon.log")
    running(root, proc)
    n = 16
    for i in range(n):
        drop(root, f"k{i:02d}.png", seed=i, w=240, h=180)
    wait_for(lambda: files_under(root / "done"), 30, what="the first file done")
    proc.send_signal(signal.SIGKILL)  # mid-queue
    proc.wait(10)
    assert work_leftovers(root)  # the dead daemon's claims folder
    proc = serve(config, log=root / "daemon.log")
    try:
        running(root, proc)
        wait_for(lambda: len(files_under(root / "done")) == n, 90, what="every file done after the restart")
    finally:
        assert stop(proc) == 0, log(root)
    assert work_leftovers(root) == []
    assert files_under(root / "outbox") == [f"k{i:02d}.png" for i in range(n)]  # each once: no -1 duplicates
    # A start-up that fails (a model file that does not exist) leaves nothing behind either.
    bad = config.read_text().replace(str(ckpt), str(root / "missing.safetensors"))
    config.write_text(bad)
    r = subprocess.run([sys.executable, "-m", "upscaled", "serve", "--config", str(config)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr, r.stderr
    assert work_leftovers(root) == []


# -- running as root ------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can test the refusal to run as root")
def test_serve_refuses_root_unless_allowed(root):
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    cfg, config = make_config(root, ckpt, daemon={"allow_root": False})
    r = subprocess.run([sys.executable, "-m", "upscaled", "serve", "--config", str(config)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "refusing to run as root" in r.stderr and "daemon.allow_root" in r.stderr
    assert not (root / "status.json").exists() and work_leftovers(root) == []


def test_cli_run_twice_into_a_folder_inside_its_input_does_not_upscale_its_outputs(tmp_path):
    write_image(tmp_path / "pics" / "a.png", seed=1)
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-m", "upscaled", "upscale", str(tmp_path / "pics"), "-o",
                            str(tmp_path / "pics" / "up"), "--model", str(ckpt)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert files_under(tmp_path / "pics") == ["a.png", "up/a.png"]  # no up/up/a.png (16x)
    assert "1 skipped" in r.stderr  # the second run: a.png's output exists
