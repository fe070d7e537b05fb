"""The daemon's parts driven one step at a time: handler dispatch, settling, scans, claims and
their recovery, worker transitions (success, corrupt input, transient error), status, notify."""

from __future__ import annotations

import json
import os
import queue
import threading
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
)

from daemon import status as status_mod
from daemon.claims import Claims, place
from daemon.job import Job, JobState, TERMINAL
from daemon.notify import Notifier
from daemon.status import ServiceState, StatusBoard
from daemon.watcher import Hint, InboxFilter, InboxHandler, Settler, make_observer, scan
from daemon.worker import Worker
from model.generator import GeneratorConfig
from tests.daemon_helpers import decoded_size, files_under, make_config, tiny_checkpoint, wait_for, write_image
from model.runtime import build_upscaler

IGNORED = [".hidden.png", "a.png.part", "b.tmp", "c.crdownload", "d.png~", ".DS_Store", "Thumbs.db", ".dir/e.png"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory, ckpt):
    cfg, _ = make_config(tmp_path_factory.mktemp("u"), ckpt)
    return build_upscaler(cfg)


def make_worker(root: Path, ckpt: Path, upscaler, **sections) -> tuple[Worker, Claims]:
    cfg, _ = make_config(root, ckpt, **sections)
    claims = Claims(cfg.path("inbox"), cfg.path("work"), cfg.daemon.lease_interval)
    claims.open()
    return Worker(cfg, upscaler, claims), claims


def run_job(worker: Worker, job: Job) -> Job:
    seen = [job.state]
    while job.state not in TERMINAL:
        worker.advance(job)
        seen.append(job.state)
    job.history = seen
    return job


# -- watcher ---------------------------------------------------------------------------------


def test_handler_only_enqueues_hints_for_our_files(tmp_path):
    import queue
    import threading

    inbox = tmp_path / "inbox"
    work = inbox / ".upscaled-work"
    hints: queue.SimpleQueue = queue.SimpleQueue()
    h = InboxHandler(InboxFilter(inbox, [work]), hints, threading.Event(), polling=False)
    h.dispatch(FileCreatedEvent(str(inbox / "a.png")))
    h.dispatch(FileModifiedEvent(str(inbox / "a.png")))
    h.dispatch(FileOpenedEvent(str(inbox / "a.png")))
    h.dispatch(FileClosedEvent(str(inbox / "a.png")))
    h.dispatch(FileMovedEvent(str(tmp_path / "x.png"), str(inbox / "sub" / "b.png")))
    h.dispatch(FileMovedEvent(str(inbox / "c.png"), str(work / "o" / "files" / "c.png")))  # our claim
    for name in IGNORED:
        h.dispatch(FileClosedEvent(str(inbox / name)))
    h.dispatch(FileClosedEvent(str(work / "o" / "files" / "d.png")))
    got = []
    while not hints.empty():
        got.append(hints.get())
    assert got == [
        (Hint.CHANGED, "a.png"), (Hint.CHANGED, "a.png"), (Hint.OPENED, "a.png"), (Hint.CLOSED, "a.png"),
        (Hint.MOVED_IN, "sub/b.png"), (Hint.GONE, "c.png"),
    ]


def test_real_observer_sees_a_rename_from_outside_as_moved_in(tmp_path):
    # mv/rsync's final rename from outside the inbox is complete at once: it must not be
    # mistaken for a fresh creation that waits settle_seconds.
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    hints: queue.SimpleQueue = queue.SimpleQueue()
    observer = make_observer("native", 1.0, inbox, InboxHandler(InboxFilter(inbox, []), hints, threading.Event(), polling=False))
    observer.start()
    try:
        (outside / "a.png").write_bytes(b"x")
        os.replace(outside / "a.png", inbox / "a.png")
        deadline = time.time() + 5
        seen = []
        while time.time() < deadline and (Hint.MOVED_IN, "a.png") not in seen:
            try:
                seen.append(hints.get(timeout=0.1))
            except queue.Empty:
                pass
        assert (Hint.MOVED_IN, "a.png") in seen, seen
    finally:
        observer.stop()
        observer.join()


def test_settler_waits_for_stable_size_and_mtime(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    s = Settler(tmp_path, settle_seconds=2.0)
    s.note(Hint.CHANGED, "a.png", now=100.0)
    assert s.ready(now=101.0) == []
    with open(f, "ab") as fh:  # still growing: the clock starts again
        fh.write(b"y")
    assert s.ready(now=101.5) == []
    assert s.ready(now=103.0) == []
    assert s.ready(now=103.6) == ["a.png"]


def test_settler_close_means_ready_unless_still_open(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    s = Settler(tmp_path, settle_seconds=100.0, closed_grace=0.1)
    s.note(Hint.CLOSED, "a.png", now=1.0)
    assert s.ready(now=1.05) == []  # the writer may reopen it for its next chunk
    s.note(Hint.OPENED, "b.png", now=1.0)  # opened by two writers, closed by one
    s.note(Hint.OPENED, "b.png", now=1.0)
    s.note(Hint.CLOSED, "b.png", now=1.1)
    assert s.ready(now=1.2) == ["a.png"]
    s.note(Hint.CHANGED, "a.png", now=1.3)  # written again after the close
    assert s.ready(now=1.4) == []
    s.note(Hint.CLOSED, "b.png", now=1.5)
    assert s.ready(now=1.55) == []
    assert s.ready(now=1.65) == ["b.png"]
    s.note(Hint.GONE, "b.png")
    (tmp_path / "c.png").write_bytes(b"x")
    s.note(Hint.MOVED_IN, "c.png", now=2.0)  # a rename is complete at once
    assert s.ready(now=2.0) == ["c.png"]
    # ... at any clock value: 3145.91 - (3145.91 - 0.2) < 0.2 in floating point
    s = Settler(tmp_path, settle_seconds=0.2, closed_grace=0.5)
    s.note(Hint.MOVED_IN, "c.png", now=3145.91)
    assert s.ready(now=3145.91) == ["c.png"]


def test_scan_ignores_hidden_partial_symlinks_and_own_folders(tmp_path):
    inbox = tmp_path / "inbox"
    work = inbox / ".upscaled-work"
    for name in IGNORED:
        (inbox / name).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name).write_bytes(b"x")
    write_image(inbox / "ok.png")
    write_image(inbox / "sub" / "ok2.jpg")
    (work / "o" / "files").mkdir(parents=True)
    (work / "o" / "files" / "claimed.png").write_bytes(b"x")
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"x")
    (inbox / "link.png").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "z.png").write_bytes(b"x")
    (inbox / "linkdir").symlink_to(tmp_path / "elsewhere")
    found = sorted(rel for rel, _ in scan(inbox, InboxFilter(inbox, [work])))
    assert found == ["ok.png", "sub/ok2.jpg"]


# -- claims ----------------------------------------------------------------------------------


def test_two_claimants_one_winner_and_place_never_overwrites(tmp_path):
    inbox, work = tmp_path / "inbox", tmp_path / "inbox" / ".w"
    a, b = Claims(inbox, work), Claims(inbox, work)
    a.open(), b.open()
    write_image(inbox / "x" / "p.png")
    got = [a.claim("x/p.png"), b.claim("x/p.png")]
    assert got[0] is not None and got[1] is None and got[0].is_file()
    done = tmp_path / "done" / "x" / "p.png"
    done.parent.mkdir(parents=True)
    done.write_bytes(b"earlier")
    dest = place(got[0], done)
    assert dest.name == "p-1.png" and done.read_bytes() == b"earlier"


def test_recover_claims_of_dead_and_stale_owners_only(tmp_path):
    inbox, work = tmp_path / "inbox", tmp_path / "inbox" / ".w"
    live = Claims(inbox, work, lease_interval=0.5)
    live.open()
    for name in ("dead.png", "stale.png", "alive.png", "sub/deep.png"):
        write_image(inbox / name)
    # A dead process on this host: a pid that has exited.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = Claims(inbox, work, lease_interval=0.5)
    dead.pid = gone.pid
    dead.open()
    assert dead.claim("dead.png") and dead.claim("sub/deep.png")
    lease = json.loads(dead.lease.read_text())
    lease["pid"] = gone.pid
    dead.lease.write_text(json.dumps(lease))
    # Another host whose lease stopped being renewed long ago.
    stale = Claims(inbox, work, lease_interval=0.5)
    stale.open()
    assert stale.claim("stale.png")
    stale.lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "lease_interval": 0.5}))
    old = time.time() - 60
    os.utime(stale.lease, (old, old))
    # Another host, alive.
    other = Claims(inbox, work, lease_interval=0.5)
    other.open()
    assert other.claim("alive.png")
    other.lease.write_text(json.dumps({"host": "elsewhere", "pid": 1, "lease_interval": 0.5}))

    back = sorted(live.recover())
    assert back == ["dead.png", "stale.png", "sub/deep.png"]
    assert (inbox / "dead.png").is_file() and (inbox / "sub/deep.png").is_file() and (inbox / "stale.png").is_file()
    assert not (inbox / "alive.png").exists() and other.claimed_path("alive.png").is_file()
    assert not dead.folder.exists() and not stale.folder.exists()
    assert list((live.folder / "adopted").iterdir()) == []


# -- worker ----------------------------------------------------------------------------------


def test_worker_moves_a_job_through_every_state(tmp_path, ckpt, upscaler):
    worker, claims = make_worker(tmp_path, ckpt, upscaler, output={"format": "keep"})
    write_image(tmp_path / "inbox" / "a" / "pic.png", 32, 24)
    write_image(tmp_path / "inbox" / "anim.gif", 20, 12)
    job = run_job(worker, Job("a/pic.png", claims.claim("a/pic.png")))
    assert job.history == [JobState.CLAIMED, JobState.DECODED, JobState.UPSCALED, JobState.WRITTEN, JobState.DONE]
    assert decoded_size(tmp_path / "outbox" / "a" / "pic.png") == (128, 96)
    assert (tmp_path / "done" / "a" / "pic.png").is_file()
    gif = run_job(worker, Job("anim.gif", claims.claim("anim.gif")))
    assert gif.state is JobState.DONE and decoded_size(tmp_path / "outbox" / "anim.png") == (80, 48)
    assert not any(claims.files.rglob("*.*"))


def test_pipeline_batches_equal_size_images(tmp_path, ckpt):
    # On a GPU several small images share one forward pass; here the batch is forced to 3 on
    # the CPU. Outputs must equal one-by-one results; a different size waits for its own pass.
    from daemon.worker import Pipeline
    from imaging.images import decode

    forced = {"batch": 3, "device": "cpu", "precision": "fp32"}
    cfg, _ = make_config(tmp_path, ckpt, inference=forced)
    up = build_upscaler(cfg)
    worker, claims = make_worker(tmp_path, ckpt, up, inference=forced)
    names = [f"same{i}.png" for i in range(6)] + ["other.png"]
    for i, n in enumerate(names):
        write_image(tmp_path / "inbox" / n, 40 if n == "other.png" else 32, 24, seed=i)
    reference = {n: up.upscale_decoded(decode(tmp_path / "inbox" / n)).pixels for n in names}
    up.forward_passes = 0
    finished: list[Job] = []
    pipeline = Pipeline(worker, 2, finished.append)
    # Decode everything first, then release the inference thread on a full queue.
    jobs = [run_job_until(worker, Job(n, claims.claim(n)), JobState.DECODED) for n in names]
    for j in jobs:
        pipeline._infer.put(j)
        with pipeline._lock:
            pipeline.jobs.add(j)
    pipeline.start()
    wait_for(lambda: len(finished) == len(names), what="all jobs finished")
    pipeline._stop.set()
    assert all(j.state is JobState.DONE for j in finished)
    assert up.forward_passes < len(names)  # equal sizes went through together
    for n in names:
        # A batched convolution may round differently from a single one in float32's last bit:
        # then a pixel lands one level away, and only a few of them.
        diff = np.abs(np.asarray(Image.open(tmp_path / "outbox" / n)).astype(int) - reference[n])
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (n, diff.max(), (diff > 0).mean())


def run_job_until(worker: Worker, job: Job, state: JobState) -> Job:
    while job.state is not state:
        worker.advance(job)
    return job


def test_crash_after_the_output_is_written_replaces_it_on_recovery_instead_of_adding_name_1(tmp_path, ckpt, upscaler):
    # A daemon dies between publishing an output and moving the original (WRITTEN): whoever
    # recovers the original processes it again, and must replace that output, not add pic-1.png.
    cfg, _ = make_config(tmp_path, ckpt)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead_claims = Claims(cfg.path("inbox"), cfg.path("work"), 0.5)
    dead_claims.pid = gone.pid
    dead_claims.open()
    lease = json.loads(dead_claims.lease.read_text())
    dead_claims.lease.write_text(json.dumps({**lease, "pid": gone.pid}))
    dead = Worker(cfg, upscaler, dead_claims)
    write_image(tmp_path / "inbox" / "pic.png", 32, 24)
    job = run_job_until(dead, Job("pic.png", dead_claims.claim("pic.png")), JobState.WRITTEN)  # ... and it dies
    worker, claims = make_worker(tmp_path, ckpt, upscaler)
    assert claims.recover() == ["pic.png"]
    # The shared marker folder outlives every owner: even long untouched, no daemon takes it for
    # a dead owner's folder (and so the marker survives further crashes before reprocessing).
    old = time.time() - 3600
    os.utime(cfg.path("work") / "written", (old, old))
    assert claims.recover() == [] and len(list((cfg.path("work") / "written").iterdir())) == 1
    again = run_job(worker, Job("pic.png", claims.claim("pic.png")))
    assert again.state is JobState.DONE and again.output == job.output
    assert files_under(tmp_path / "outbox") == ["pic.png"]
    assert list((cfg.path("work") / "written").iterdir()) == []  # the marker goes with DONE
    # Any other input that maps to pic.png still gets a name of its own.
    write_image(tmp_path / "inbox" / "pic.png", 32, 24, seed=5)
    other = run_job(worker, Job("pic.png", claims.claim("pic.png")))
    assert other.output.name == "pic-1.png"


def test_a_marker_half_written_when_the_daemon_died_is_removed_on_recovery(tmp_path, ckpt, upscaler):
    # kill -9 while the WRITTEN marker is being written leaves its temp file behind (CI caught
    # one in work/written/). Markers are staged in the owner's folder, which recovery removes;
    # a temp file an older daemon left in written/ itself is removed too.
    cfg, _ = make_config(tmp_path, ckpt)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = Claims(cfg.path("inbox"), cfg.path("work"), 0.5)
    dead.open()
    dead.lease.write_text(json.dumps({**json.loads(dead.lease.read_text()), "pid": gone.pid}))
    write_image(tmp_path / "inbox" / "pic.png", 32, 24)
    dead.claim("pic.png")
    (dead.folder / ".written-0123456789ab.tmp").write_text('{"file": "pic.pn')
    (cfg.path("work") / "written").mkdir()
    legacy = cfg.path("work") / "written" / ".0a1b.json.0123456789ab.tmp"
    legacy.write_text('{"fi')
    _, claims = make_worker(tmp_path, ckpt, upscaler)
    assert claims.recover() == ["pic.png"]
    left = [p.relative_to(cfg.path("work")).as_posix() for p in cfg.path("work").rglob("*")
            if p.is_file() and not p.is_relative_to(claims.folder)]
    assert left == [] and not dead.folder.exists()


def test_a_marker_left_after_the_original_reached_done_is_removed_on_recovery(tmp_path, ckpt, upscaler):
    # kill -9 between moving the original to done/ and removing its marker (CI caught one): the
    # input is nowhere, so the marker is stale; markers of inputs still claimed or queued stay.
    cfg, _ = make_config(tmp_path, ckpt)
    worker, claims = make_worker(tmp_path, ckpt, upscaler)
    write_image(tmp_path / "inbox" / "gone.png", 32, 24)
    write_image(tmp_path / "inbox" / "queued.png", 32, 24, seed=1)
    write_image(tmp_path / "inbox" / "mine.png", 32, 24, seed=2)
    claims.claim("mine.png")
    for rel in ("gone.png", "queued.png", "mine.png"):
        st = os.stat(tmp_path / "inbox" / rel) if rel != "mine.png" else os.stat(claims.claimed_path(rel))
        claims.mark_written(rel, tmp_path / "outbox" / rel, st, st)
    os.rename(tmp_path / "inbox" / "gone.png", tmp_path / "done" / "gone.png")
    claims.recover()
    left = sorted(json.loads(p.read_text())["file"] for p in (cfg.path("work") / "written").glob("*.json"))
    assert left == ["mine.png", "queued.png"]


def test_corrupt_input_goes_to_failed_with_a_reason(tmp_path, ckpt, upscaler):
    worker, claims = make_worker(tmp_path, ckpt, upscaler)
    (tmp_path / "inbox" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "inbox" / "notes.txt").write_text("hello")
    job = run_job(worker, Job("bad.jpg", claims.claim("bad.jpg")))
    assert job.history == [JobState.CLAIMED, JobState.REJECTED, JobState.FAILED]
    rec = json.loads((tmp_path / "failed" / "bad.jpg.error.json").read_text())
    assert set(rec) == {"file", "stage", "reason", "exception", "time", "model_version"}
    assert rec["stage"] == "decode" and "image" in rec["reason"] and rec["model_version"] == upscaler.version
    assert (tmp_path / "failed" / "bad.jpg").read_bytes() == b"\xff\xd8\xff garbage"
    txt = run_job(worker, Job("notes.txt", claims.claim("notes.txt")))
    assert txt.state is JobState.FAILED
    assert "not a supported image type" in json.loads((tmp_path / "failed" / "notes.txt.error.json").read_text())["reason"]
    assert not (tmp_path / "outbox" / "bad.jpg").exists()


def test_transient_write_error_keeps_the_claim_and_retries(tmp_path, ckpt, upscaler):
    worker, claims = make_worker(tmp_path, ckpt, upscaler)
    write_image(tmp_path / "inbox" / "sub" / "x.png")
    outbox = tmp_path / "outbox"
    (outbox / "sub").write_bytes(b"")  # a file where the output folder should be: the write fails
    job = run_job(worker, Job("sub/x.png", claims.claim("sub/x.png")))
    assert job.state is JobState.RETRY and job.resume is JobState.CLAIMED and job.attempts == 1
    assert job.problem.startswith("write:") and job.claimed.is_file()
    assert not (tmp_path / "failed").exists() or not any((tmp_path / "failed").iterdir())
    (outbox / "sub").unlink()  # fixed
    worker.advance(job)  # RETRY -> CLAIMED
    assert job.state is JobState.CLAIMED
    run_job(worker, job)
    assert job.state is JobState.DONE and decoded_size(outbox / "sub" / "x.png") == (128, 96)


def test_originals_keep_leaves_the_file_and_does_not_process_it_again(tmp_path, ckpt, upscaler):
    worker, claims = make_worker(tmp_path, ckpt, upscaler, daemon={"originals": "keep"})
    src = write_image(tmp_path / "inbox" / "k.png")
    before = src.read_bytes()
    assert run_job(worker, Job("k.png", claims.claim("k.png"))).state is JobState.DONE
    assert src.read_bytes() == before and (tmp_path / "outbox" / "k.png").is_file()
    assert claims.is_kept("k.png", os.stat(src))
    write_image(src, seed=5)  # replaced by a new picture of the same name: processed again
    assert not claims.is_kept("k.png", os.stat(src))


def test_release_gives_unfinished_work_back(tmp_path, ckpt, upscaler):
    worker, claims = make_worker(tmp_path, ckpt, upscaler)
    write_image(tmp_path / "inbox" / "r.png")
    job = Job("r.png", claims.claim("r.png"))
    worker.advance(job)
    assert job.state is JobState.DECODED
    assert claims.release("r.png") and (tmp_path / "inbox" / "r.png").is_file()
    job.released = True
    worker.advance(job)
    assert job.state is JobState.RELEASED and not (tmp_path / "outbox" / "r.png").exists()


# -- status and notify ------------------------------------------------------------------------


def test_status_file_and_status_command(tmp_path, ckpt, capsys):
    cfg, _ = make_config(tmp_path, ckpt)
    assert status_mod.main(cfg) == status_mod.EXIT_NOT_RUNNING
    assert "not running" in capsys.readouterr().out
    board = StatusBoard(cfg.path("status"), interval=0.2)
    board.set(state=ServiceState.RUNNING, model_version="v1", device="cpu", queued=3)
    board.record_done(1.5)
    board.record_failed("bad.jpg", "not a readable image")
    assert board.write(force=True)
    st = json.loads(cfg.path("status").read_text())
    assert st["state"] == "running" and st["pid"] == os.getpid() and st["processed"] == 1 and st["failed"] == 1
    assert st["last_failed"]["reason"] == "not a readable image" and st["throughput"]["images_per_min"] > 0
    assert st["last_error"] is None  # a failed file is a fact, not a standing problem
    assert status_mod.main(cfg) == status_mod.EXIT_RUNNING
    out = capsys.readouterr().out
    assert "running" in out and "v1" in out and "not a readable image" in out
    assert status_mod.main(cfg, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["running"] is True
    board.set(state=ServiceState.STOPPED)
    board.write(force=True)
    assert status_mod.main(cfg) == status_mod.EXIT_NOT_RUNNING
    assert "not running (last seen" in capsys.readouterr().out


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_datagrams(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"\0upscaled-test-{os.getpid()}" if abstract else str(tmp_path / "notify.sock")
    sock.bind(name)
    sock.settimeout(5)
    env = {"NOTIFY_SOCKET": "@" + name[1:] if abstract else name, "WATCHDOG_USEC": "2000000"}
    n = Notifier(env)
    assert n.enabled and n.watchdog_interval == 1.0
    n.ready("running: 0 done")
    n.watchdog(now=10.0)
    n.watchdog(now=10.5)  # too soon: no second ping
    n.watchdog(now=11.1)
    n.stopping()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=running: 0 done", "WATCHDOG=1", "WATCHDOG=1", "STOPPING=1"]
    sock.close()
    assert not Notifier({}).enabled and Notifier({}).send(ready=1) is False


def test_daemon_never_imports_trainer():
    import ast

    for path in (Path(__file__).resolve().parents[1] / "daemon").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "trainer" or n.startswith("trainer.") for n in names), f"{path.name} imports {names}"
    code = ("import sys, daemon.service, daemon.status, model.runtime, model.engine; "
            "sys.exit(any(m.split('.')[0] == 'trainer' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_service_retries_a_transient_error_until_fixed(tmp_path, ckpt):
    """The service loop, in-process with the real observer: an outbox that cannot be written
    (a file in its place) keeps the input claimed and retrying, shown in the status; once fixed,
    the image goes through. Nothing goes to failed/."""
    from daemon.service import Service
    from tests.daemon_helpers import wait_for

    cfg, config = make_config(tmp_path, ckpt, watch={"settle_seconds": 0.1})
    outbox = tmp_path / "outbox"
    outbox.rmdir()
    outbox.write_bytes(b"not a folder")
    svc = Service(cfg, config_path=config)
    svc.startup()
    try:
        def spin(cond):
            def step():
                svc.tick(time.monotonic())
                return cond()
            return step

        write_image(tmp_path / "inbox" / "t.png")
        def retrying_in_status():
            st = json.loads(cfg.path("status").read_text())  # written every status_interval, after the board
            return st["retrying"] and st
        st = wait_for(spin(lambda: svc.board.retrying and retrying_in_status()), 30, what="a retry in the status")
        assert st["retrying"][0]["file"] == "t.png" and "write" in st["retrying"][0]["problem"]
        assert not any((tmp_path / "failed").iterdir())
        assert svc.claims.claimed_path("t.png").is_file()  # still ours, not back in the inbox
        wait_for(spin(lambda: svc.retries and svc.retries[0][2].attempts >= 2), 30, what="a second attempt")
        outbox.unlink()
        outbox.mkdir()
        wait_for(spin(lambda: (tmp_path / "done" / "t.png").exists()), 30, what="success after the fix")
        assert decoded_size(outbox / "t.png") == (128, 96)
        assert svc.board.processed == 1 and svc.board.failed == 0 and not svc.retries
    finally:
        svc.begin_stop("test over")
        svc.run()
        assert svc.shutdown()
    assert json.loads(cfg.path("status").read_text())["state"] == "stopped"
    assert not svc.claims.folder.exists()


def test_io_threads_run_at_lower_cpu_priority_than_inference(tmp_path, ckpt, upscaler):
    import threading

    from daemon.worker import Pipeline

    worker, _ = make_worker(tmp_path, ckpt, upscaler)
    pipeline = Pipeline(worker, 2, lambda job: None, io_nice=7)
    base = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's nice (Linux schedules threads)
    daemon_nice = min(19, base + 3)

    def start_as_a_niced_daemon() -> None:
        # Threads inherit their creator's nice: started from a thread at +3, the pipeline is what a
        # daemon under `nice -n 3` or systemd's Nice=3 would run, and this test thread keeps its own.
        os.setpriority(os.PRIO_PROCESS, 0, daemon_nice)
        pipeline.start()

    starter = threading.Thread(target=start_as_a_niced_daemon)
    starter.start()
    starter.join()
    try:
        wait_for(lambda: all(t.native_id for t in pipeline._threads), what="threads started")

        def nice() -> dict:
            return {t.name: os.getpriority(os.PRIO_PROCESS, t.native_id) for t in pipeline._threads}

        # Each I/O thread sets its own priority as it starts; wait for that rather than sleep. The
        # setting is relative to the daemon's own nice, so I/O stays below inference under `nice`.
        io = min(19, daemon_nice + 7)
        wait_for(lambda: nice() == {"io-0": io, "io-1": io, "inference": daemon_nice}, what=f"priorities {nice()}")
    finally:
        pipeline._stop.set()
        pipeline._infer.put(None)
        pipeline.stop()


def test_pipeline_threads_carry_their_names_in_the_kernel(tmp_path, ckpt, upscaler):
    # What `top -H`, `ps -L` and the benchmark's CPU-by-thread line see.
    from daemon.worker import Pipeline

    worker, _ = make_worker(tmp_path, ckpt, upscaler)
    pipeline = Pipeline(worker, 2, lambda job: None)
    pipeline.start()
    try:
        wait_for(lambda: all(t.native_id for t in pipeline._threads), what="threads started")

        def comm() -> dict:
            return {t.name: Path(f"/proc/self/task/{t.native_id}/comm").read_text().strip() for t in pipeline._threads}

        wait_for(lambda: comm() == {"io-0": "io-0", "io-1": "io-1", "inference": "inference"}, what=f"names {comm()}")
    finally:
        pipeline.stop()


def test_io_threads_can_run_only_when_a_core_is_idle(tmp_path, ckpt, upscaler):
    from daemon.worker import Pipeline

    worker, _ = make_worker(tmp_path, ckpt, upscaler)
    pipeline = Pipeline(worker, 2, lambda job: None, io_nice="idle")
    pipeline.start()
    try:
        wait_for(lambda: all(t.native_id for t in pipeline._threads), what="threads started")

        def policies() -> dict:
            return {t.name: os.sched_getscheduler(t.native_id) for t in pipeline._threads}

        want = {"io-0": os.SCHED_IDLE, "io-1": os.SCHED_IDLE, "inference": os.SCHED_OTHER}
        wait_for(lambda: policies() == want, what=f"policies {policies()}")
    finally:
        pipeline.stop()


def test_auto_io_priority_is_idle_only_alone_in_a_cgroup(tmp_path):
    from daemon.worker import alone_in_cgroup, io_priority

    def tree(cgroup_lines: str, procs: dict[str, str]) -> tuple[Path, Path]:
        proc = tmp_path / "proc_cgroup"
        proc.write_text(cgroup_lines)
        root = tmp_path / "fs"
        for rel, pids in procs.items():
            (root / rel).mkdir(parents=True, exist_ok=True)
            (root / rel / "cgroup.procs").write_text(pids)
        return proc, root

    unit = "system.slice/upscaled.service"
    assert alone_in_cgroup(*tree(f"0::/{unit}\n", {unit: "42\n"}), pid=42)  # v2, its own unit
    assert not alone_in_cgroup(*tree(f"0::/{unit}\n", {unit: "42\n43\n"}), pid=42)  # shares it
    assert not alone_in_cgroup(*tree("0::/\n", {"": "42\n"}), pid=42)  # the root cgroup holds everything
    v1 = f"4:memory:/x\n2:cpu,cpuacct:/{unit}\n0::/\n"
    assert alone_in_cgroup(*tree(v1, {f"cpu,cpuacct/{unit}": "42\n"}), pid=42)  # v1 cpu controller
    assert not alone_in_cgroup(tmp_path / "missing", tmp_path / "none", pid=42)
    assert io_priority("auto", True) == "idle" and io_priority("auto", False) == 10
    assert io_priority(3, True) == 3 and io_priority("idle", False) == "idle"


def test_auto_io_threads_are_two_beside_a_cpu_model_and_the_spare_cores_beside_a_gpu():
    from daemon.worker import io_thread_count

    assert [io_thread_count("auto", "cpu", cores=n) for n in (1, 2, 16, 64)] == [2, 2, 2, 2]
    assert [io_thread_count("auto", "cuda", cores=n) for n in (1, 2, 4, 9, 16, 64)] == [2, 2, 3, 8, 8, 8]
    assert io_thread_count(5, "cuda", cores=16) == 5 and io_thread_count(1, "cpu") == 1


def test_model_loading_thread_takes_its_openmp_workers_with_it():
    # libgomp gives each thread that runs a parallel op its own worker pool for as long as that
    # thread lives; the start-up load must not leave one to the main thread (daemon/models.py).
    import torch

    from daemon.models import on_passing_thread

    def new_tasks() -> set[str]:  # by id: other tests' threads may end meanwhile
        return set(os.listdir("/proc/self/task")) - base

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    x = torch.ones(1 << 22)
    try:
        base = set(os.listdir("/proc/self/task"))
        assert on_passing_thread(lambda: float((x * 2).sum())) == 2 * (1 << 22)
        wait_for(lambda: not new_tasks(), what=f"threads left behind: {new_tasks()}")
        # The control: the same op on a thread that stays leaves it a worker besides itself.
        ran, stay = threading.Event(), threading.Event()

        def keep() -> None:
            float((x * 2).sum())
            ran.set()
            stay.wait()

        t = threading.Thread(target=keep)
        t.start()
        ran.wait()
        assert new_tasks() - {str(t.native_id)}, "the op started no OpenMP worker: the check above proves nothing"
        stay.set()
        t.join()
        with pytest.raises(ZeroDivisionError):
            on_passing_thread(lambda: 1 / 0)
    finally:
        torch.set_num_threads(threads)


def test_start_up_load_leaves_no_openmp_workers_behind(tmp_path):
    # The wiring of the fix above, in a fresh process (the first parallel op of a process is
    # what gives its thread a pool): ModelSlot.start must leave the calling thread no worker,
    # and the same load run on that thread directly, the control, must leave one.
    # An 8x32 model with full-resolution stages: its warm-up is large enough for oneDNN to go
    # parallel (the run-6 layout's all-low-resolution warm-up may stay on one thread).
    ckpt = tiny_checkpoint(tmp_path / "stages.safetensors", GeneratorConfig(channels=32, blocks=8, batchnorm=False))
    _, config = make_config(tmp_path, ckpt)
    script = (
        "import os, sys, time, torch\n"
        "torch.set_num_threads(2)\n"
        "from daemon.models import ModelSlot\n"
        "from core.config import load\n"
        "slot = ModelSlot(load(sys.argv[1]), watch=False)\n"
        "base = set(os.listdir('/proc/self/task'))\n"
        "(slot.start if sys.argv[2] == 'start' else slot._start)()\n"
        "time.sleep(0.2)\n"  # a passing thread's workers end just after it
        "print(len(set(os.listdir('/proc/self/task')) - base))\n"
    )

    def left_behind(how: str) -> int:
        r = subprocess.run([sys.executable, "-c", script, str(config), how], capture_output=True, text=True,
                           cwd=Path(__file__).parents[1], timeout=120)
        assert r.returncode == 0, r.stderr
        return int(r.stdout.split()[-1])

    assert left_behind("direct") >= 1, "the load ran no parallel op: the check below proves nothing"
    assert left_behind("start") == 0
