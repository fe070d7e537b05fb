"""Every hostile or unusual input through a real daemon ends in exactly one place (see
tests/hostile_cases.py, which also prints the README's table)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.daemon_helpers import ROOT, files_under, image_bytes, make_config, serve, stop, tiny_checkpoint, wait_for
from tests.hostile_cases import CASES, FAILED, IGNORED, MARKER, OUTBOX, run

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify and the claim scheme are tested on Linux")


def test_every_hostile_input_ends_in_exactly_one_place(tmp_path: Path) -> None:
    ended, log = run(tmp_path, tiny_checkpoint(tmp_path / "tiny.safetensors"))
    assert len(CASES) >= 35
    wrong = [(e.case.path[:40], e.case.expect, e.where, e.detail) for e in ended if e.where != e.case.expect]
    assert not wrong, wrong
    # inputs = outputs + failed + ignored, and nothing else anywhere
    outputs = {o for e in ended if e.where == OUTBOX for o in (e.case.outputs or (e.case.path,))}
    assert set(files_under(tmp_path / "outbox")) == outputs
    failed = [f for f in files_under(tmp_path / "failed") if not f.endswith(".error.json")]
    assert sorted(failed) == sorted(e.case.path for e in ended if e.where == FAILED)
    assert len(files_under(tmp_path / "failed")) == 2 * len(failed)  # each with its reason
    done = files_under(tmp_path / "done")
    assert len(done) + len(failed) + sum(e.where == IGNORED for e in ended) == len(CASES)
    left = sorted(p.relative_to(tmp_path / "inbox").as_posix() for p in (tmp_path / "inbox").rglob("*")
                  if not p.is_dir() or p.is_symlink())
    assert left == sorted(e.case.path for e in ended if e.where == IGNORED)  # and no claim left in the work folder
    # both inputs that map to photo.png got an output, and the log says which took the suffix
    assert {"photo.png", "photo-1.png"} <= set(files_under(tmp_path / "outbox"))
    assert "was taken (output.on_conflict: suffix)" in log
    # no other decoder saw the disguised files, and nothing ran
    reasons = {e.case.path: e.detail for e in ended}
    for name in ("icon.png", "targa.png", "netpbm.jpg", "post.png", "doc.jpg"):
        assert "not one of the formats upscaled reads" in reasons[name], (name, reasons[name])
    assert not Path(MARKER).exists()
    assert "truncated" in reasons["cut.png"] and "empty" in reasons["empty.png"]


# -- issue 23: folders swapped for links, names that are not text, sizes that cannot fit ---------
# Each through its own real daemon (tests/daemon_helpers.serve).


@pytest.fixture
def root():
    d = Path(tempfile.mkdtemp(prefix="upscaled-hostile-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _running(root: Path, proc: subprocess.Popen) -> None:
    def up():
        assert proc.poll() is None, f"daemon exited early with {proc.returncode}: {_log(root)}"
        try:
            st = json.loads((root / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return False
        return st.get("state") == "running" and st.get("pid") == proc.pid

    wait_for(up, 90, what="the daemon to be running")


def _log(root: Path) -> str:
    p = root / "daemon.log"
    return p.read_text(errors="backslashreplace") if p.exists() else ""


def _wait(root: Path, cond, timeout: float, what: str):
    try:
        return wait_for(cond, timeout, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}; the log:\n{_log(root)[-3000:]}") from None


def _drop(root: Path, rel: str | bytes, data: bytes) -> None:
    """Write beside the inbox, then rename in (names as bytes: any name Linux allows)."""
    rel = os.fsencode(rel)
    staged = os.path.join(os.fsencode(root), b"staging", os.path.basename(rel))
    os.makedirs(os.path.dirname(staged), exist_ok=True)
    with open(staged, "wb") as f:
        f.write(data)
    dst = os.path.join(os.fsencode(root), b"inbox", rel)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(staged, dst)


def _listing(folder: Path) -> list[bytes]:
    """Every file under `folder`, as raw relative bytes."""
    base = os.fsencode(folder)
    out = []
    for d, _, files in os.walk(base):
        out += [os.path.relpath(os.path.join(d, f), base) for f in files]
    return sorted(out)


def test_a_noted_inbox_folder_swapped_for_a_symlink_is_never_followed(root):
    """Issue 23.1: a folder the daemon is waiting in, replaced by a link to another folder."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt, watch={"rescan_interval": 1.0, "incomplete_wait": 30.0})
    outside = root / "outside"
    outside.mkdir()
    victim = image_bytes(Path("victim.png"), seed=7)
    (outside / "victim.png").write_bytes(victim)
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        (root / "inbox" / "sw").mkdir()
        (root / "inbox" / "sw" / "victim.png").write_bytes(victim[: len(victim) // 2])  # truncated: noted, waited for
        time.sleep(1.0)
        os.rename(root / "inbox" / "sw", root / "moved")
        os.symlink(outside, root / "inbox" / "sw")
        _wait(root, lambda: "ignored sw: a symbolic link" in _log(root), 10, what="the link to be noticed")
        time.sleep(3.0)  # the settle period and more than two rescans
        drop_ok = image_bytes(Path("ok.png"), seed=8)
        _drop(root, "ok.png", drop_ok)
        _wait(root, lambda: (root / "done" / "ok.png").exists(), 30, what="a file after it")
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    assert (outside / "victim.png").read_bytes() == victim  # never moved out of the folder the link points to
    assert files_under(root / "outbox") == ["ok.png"] and files_under(root / "done") == ["ok.png"]
    assert files_under(root / "failed") == []
    assert "done sw/victim.png" not in _log(root)


def test_a_claim_never_passes_through_a_symlinked_folder_even_when_swapped_mid_claim(tmp_path):
    """The claim itself, raced: every component is opened without following links."""
    from daemon.claims import Claims

    inbox, work, outside = tmp_path / "inbox", tmp_path / "inbox" / ".work", tmp_path / "outside"
    (inbox / "sw").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.png").write_bytes(b"outside")
    claims = Claims(inbox, work)
    claims.open()
    os.rename(inbox / "sw", tmp_path / "moved")
    os.symlink(outside, inbox / "sw")
    assert claims.claim("sw/x.png") is None
    assert (outside / "x.png").read_bytes() == b"outside" and not list((claims.files).rglob("x.png"))
    # and giving a claim back never writes through a link either
    (inbox / "real").mkdir()
    (inbox / "real" / "y.png").write_bytes(b"ours")
    assert claims.claim("real/y.png") is not None
    os.rename(inbox / "real", tmp_path / "real-moved")
    os.symlink(outside, inbox / "real")
    assert claims.release("real/y.png") is False
    assert not (outside / "y.png").exists() and (claims.files / "real" / "y.png").exists()


UNDECODABLE = b"bad\xff.png"


def test_undecodable_names_are_processed_or_failed_once_and_shown_escaped(root):
    """Issue 23.6: names are bytes; one that is not UTF-8 is processed (and a corrupt one fails
    once, with its record), never retried forever."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt)
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        _drop(root, UNDECODABLE, image_bytes(Path("x.png"), seed=1))
        _drop(root, b"sub\xfe/worse\xfe.png", b"not an image at all")
        _wait(root, lambda: os.path.exists(os.path.join(os.fsencode(root / "done"), UNDECODABLE)), 30, what="the output")
        _wait(root, lambda: len(_listing(root / "failed")) == 2, 30, what="the corrupt one in failed/")
        time.sleep(1.0)
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    assert _listing(root / "outbox") == [UNDECODABLE]
    assert _listing(root / "failed") == [b"sub\xfe/worse\xfe.png", b"sub\xfe/worse\xfe.png.error.json"]
    record = json.loads((root / "failed" / os.fsdecode(b"sub\xfe/worse\xfe.png.error.json")).read_text())
    assert os.fsencode(record["file"]) == b"sub\xfe/worse\xfe.png" and "not" in record["reason"]
    text = _log(root)
    assert "Traceback" not in text and "retrying" not in text, text[-3000:]
    assert "done bad\\xff.png" in text and "failed sub\\xfe/worse\\xfe.png" in text


def test_names_with_newlines_and_escape_sequences_are_shown_escaped_in_the_log_and_status(root):
    """Issue 23.3: a newline in a name must not forge a log line, nor ESC/OSC reach a terminal."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt)
    forged = "a.png\n12:00:00 ERROR   forged line.png"
    osc = "b\x1b]0;owned\x07\x1b[31mred\u202e.png"
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        _drop(root, forged, image_bytes(Path("x.png"), seed=1))
        _drop(root, osc, b"not an image")
        _wait(root, lambda: (root / "done" / forged).exists() and (root / "failed" / (osc + ".error.json")).exists(), 30,
                 what="both files")
        r = subprocess.run([sys.executable, "-m", "upscaled", "status", "--config", str(config)], cwd=ROOT,
                           capture_output=True, timeout=60)
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    raw = (root / "daemon.log").read_bytes()
    assert b"\x1b" not in raw and b"\x07" not in raw and "\u202e".encode() not in raw
    assert not any(line.startswith(b"12:00:00 ERROR   forged") for line in raw.splitlines())
    assert b"done a.png\\n12:00:00 ERROR   forged line.png" in raw
    assert b"b\\x1b]0;owned\\x07\\x1b[31mred\\u202e.png" in raw
    assert r.returncode == 0 and b"\x1b" not in r.stdout and b"\x07" not in r.stdout, r.stdout
    assert b"last failed: b\\x1b]0;owned\\x07" in r.stdout, r.stdout


def test_a_path_too_long_for_the_work_folder_goes_to_failed_as_name_too_long(root):
    """Issue 23.8: fits the inbox, not the work folder (PATH_MAX 4096 bytes)."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt, watch={"rescan_interval": 1.0})
    inbox = os.fsencode(root / "inbox")
    room = 4095 - len(inbox) - 1 - len(b"/x.png") - 8  # a path the inbox still holds, with a little to spare
    parts = [b"d" * 200] * (room // 201)
    rel = b"/".join(parts + [b"x.png"])
    fd = os.open(inbox, os.O_DIRECTORY)
    for p in parts:  # made one level at a time: the whole path is near PATH_MAX
        os.mkdir(p, dir_fd=fd)
        nfd = os.open(p, os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    with open(os.open("x.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as f:
        f.write(image_bytes(Path("x.png"), seed=2))
    os.close(fd)
    assert len(os.path.join(inbox, rel)) < 4096 < len(os.path.join(inbox, b".upscaled-work/owner-1234-abcdef/files", rel))
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        _wait(root, lambda: any(f.endswith(b".error.json") for f in _listing(root / "failed")), 30, what="failed/")
        st = json.loads((root / "status.json").read_text())
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    (err,) = [f for f in _listing(root / "failed") if f.endswith(b".error.json")]
    record = json.loads((root / "failed" / os.fsdecode(err)).read_text())
    assert os.fsencode(record["file"]) == rel and "too long" in record["reason"], record
    from daemon.status import reason_class

    assert reason_class(record["reason"]) == "name_too_long"
    assert "permission" not in _log(root) and not st.get("blocked"), st
    assert not os.path.exists(os.path.join(inbox, rel))


def _tiff(compression: str | None, w: int = 96, h: int = 64) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "TIFF", compression=compression)
    return buf.getvalue()


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])  # strips before the IFD, and after
def test_a_tiff_written_by_reopening_per_chunk_is_one_file_and_one_output(root, compression):
    """Issue 23.7: TIFF has no end marker; the strips its IFD names must all be in the file."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt, watch={"closed_grace": 0.3, "settle_seconds": 0.3})
    data = _tiff(compression)
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        step = len(data) // 5 + 1
        for i in range(0, len(data), step):
            with open(root / "inbox" / "x.tif", "ab") as f:  # a fresh open and close for each chunk
                f.write(data[i : i + step])
            time.sleep(0.8)
        _wait(root, lambda: (root / "done" / "x.tif").exists(), 30, what="the file")
        time.sleep(0.5)
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    assert files_under(root / "failed") == [] and files_under(root / "outbox") == ["x.tif"]
    assert (root / "done" / "x.tif").read_bytes() == data


def _huge_png(w: int, h: int) -> bytes:
    """A real w x h 8-bit gray PNG, all black: a few hundred kB for 144 megapixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = b"\0" * (w + 1)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def test_an_output_too_large_for_the_memory_budget_goes_to_failed_before_decoding(root):
    """Issue 23.5: 12000 x 12000 in, 4x out: 6.4 GiB of output pixels alone."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt, daemon={"memory_budget_mb": 2048})
    proc = serve(config, log=root / "daemon.log")
    try:
        _running(root, proc)
        _drop(root, "huge.png", _huge_png(12000, 12000))
        _drop(root, "small.png", image_bytes(Path("x.png"), seed=3))
        _wait(root, lambda: (root / "failed" / "huge.png.error.json").exists() and (root / "done" / "small.png").exists(),
                 60, what="both")
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    reason = json.loads((root / "failed" / "huge.png.error.json").read_text())["reason"]
    assert "12000x12000" in reason and "48000x48000" in reason and "2.0 GiB" in reason, reason
    assert "daemon.memory_budget_mb" in reason
    from daemon.status import reason_class

    assert reason_class(reason) == "too_large"


def test_an_image_in_flight_when_the_daemon_died_twice_goes_to_failed_as_poison(root):
    """Issue 23.5: a crash loop must end. Killed twice while the same image was in flight, the
    next start sends it to failed/."""
    ckpt = tiny_checkpoint(root / "tiny.safetensors")
    _, config = make_config(root, ckpt)
    _drop(root, "heavy.png", image_bytes(Path("x.png"), w=800, h=600, seed=4))
    work = root / "inbox" / ".upscaled-work"
    for death in range(2):
        proc = serve(config, log=root / "daemon.log")
        _wait(root, lambda: list(work.glob(f"*-{proc.pid}-*/running/*")), 60, what="the image to be in flight")
        proc.kill()
        proc.wait(10)
    _drop(root, "light.png", image_bytes(Path("x.png"), seed=5))
    proc = serve(config, log=root / "daemon.log")
    try:
        _wait(root, lambda: (root / "failed" / "heavy.png.error.json").exists() and (root / "done" / "light.png").exists(),
                 60, what="the poison to be failed and the other file done")
    finally:
        assert stop(proc) == 0, _log(root)[-3000:]
    reason = json.loads((root / "failed" / "heavy.png.error.json").read_text())["reason"]
    assert "poison" in reason and "2 times" in reason, reason
    assert files_under(root / "outbox") == ["light.png"]
