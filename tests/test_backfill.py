"""`upscaled backfill` on a real Ray cluster: a head node and a second node started with
`ray start` on this machine, the command run as a real subprocess that joins them, on real image
files among which are a corrupt one and a name clash. Plus the plan and pool rules on their own.

The cluster is kept small (2 logical CPUs a node, the smallest object store Ray allows, no
dashboard) and is always torn down: each `ray start --block` runs in its own session, whose whole
process group is ended, and any process still naming the cluster's temp folder after it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.daemon_helpers import ROOT, files_under, image_bytes, tiny_checkpoint, wait_for, write_image
from model.checkpoint import read_info
from upscaled.backfill import IO_CPUS, STATE_DIR, make_plan, pool_shape, read_plan, settings_of, write_plan
from core.config import from_dict
from upscaled.upscale import collect

RAY = str(Path(sys.executable).with_name("ray"))  # the `ray` command of this environment


# -- the plan and the pool, without Ray ------------------------------------------------------------


def test_plan_keeps_earlier_names_and_never_takes_a_name_in_use(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    write_image(src / "photo.png", seed=1)
    (src / "photo.gif").write_bytes(image_bytes(Path("x.gif"), seed=2))  # also makes photo.png
    write_image(src / "a.png", seed=3)
    write_image(dst / "a.png", seed=4)  # someone else's file: never planned over
    cfg = from_dict({})
    jobs, _ = collect([str(src)], dst)
    first = make_plan(cfg, jobs, dst, 4, "v1", {})
    names = {str(rel): out.relative_to(dst).as_posix() for _, rel, out, _ in first.todo}
    assert names == {"a.png": "a-1.png", "photo.gif": "photo.png", "photo.png": "photo-1.png"}
    write_plan(dst / "plan.jsonl", settings_of(cfg), first.entries)
    settings, earlier = read_plan(dst / "plan.jsonl")
    assert settings == settings_of(cfg) and earlier == first.entries
    # photo.gif finished; photo.GIF, new and sorting first, would have taken photo.png in a fresh plan
    write_image(dst / "photo.png", seed=5)
    (src / "photo.GIF").write_bytes(image_bytes(Path("x.gif"), seed=6))
    jobs, _ = collect([str(src)], dst)
    again = make_plan(cfg, jobs, dst, 4, "v1", earlier)
    names = {str(rel): out.relative_to(dst).as_posix() for _, rel, out, _ in again.todo}
    assert again.finished == 1
    assert names == {"a.png": "a-1.png", "photo.png": "photo-1.png", "photo.GIF": "photo-2.png"}


def test_pool_is_one_actor_per_gpu_else_cpu_actors_that_leave_room_for_io():
    assert pool_shape(4, [32, 32], None) == pool_shape(4, [32, 32], 4)
    assert pool_shape(4, [32, 32], None).actors == 4 and pool_shape(4, [32, 32], None).gpus == 1
    assert pool_shape(4, [32], None, device="cpu").gpus == 0  # inference.device: cpu
    for node_cpus, workers in [([2], None), ([2], 1), ([2], 2), ([2, 2], 2), ([64], None), ([16, 16, 16], None), ([1], 3)]:
        pool = pool_shape(0, node_cpus, workers)
        assert pool.gpus == 0 and pool.threads >= 1
        per_node = -(-pool.actors // len(node_cpus))
        # each node keeps at least one decode/publish task's worth of CPU beside its actors
        assert min(node_cpus) - per_node * pool.cpus >= IO_CPUS or min(node_cpus) < 2, (node_cpus, workers, pool)
    assert pool_shape(0, [2], None) == pool_shape(0, [2], 1)  # 2 cores: one actor with both threads
    assert pool_shape(0, [2], None).threads == 2
    # CPU actors decode and publish their own files (no tasks beside them to stall their threads),
    # and actors sharing a node split its memory; a GPU actor is fed by CPU tasks
    assert pool_shape(0, [2], None).whole and not pool_shape(4, [32], None).whole
    assert pool_shape(0, [2], 2).per_node == 2 and pool_shape(0, [2, 2], 2).per_node == 1
    assert pool_shape(0, [64], None).actors == 4 and pool_shape(0, [64], None).threads == 16


# -- a real cluster --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env(temp: Path) -> dict:
    """Token authentication with a token of the cluster's own, so that neither ~/.ray nor a
    token already there is touched (every node and the driver need the same one)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(temp / "auth_token"),
            # The pool starts work once all its actors are up, so a handful of files cannot all go
            # to the first actor ready and the placement (one actor per node) shows in the log.
            "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "120"}


def ray_start(log: Path, temp: Path, *args: str) -> subprocess.Popen:
    env = ray_env(temp)
    return subprocess.Popen(
        [RAY, "start", "--block", "--num-cpus=2", "--object-store-memory=78643200", "--node-ip-address=127.0.0.1",
         f"--temp-dir={temp}", "--disable-usage-stats", *args],
        cwd=ROOT, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def end(procs: list[subprocess.Popen], marker: str) -> None:
    """Stop what the `ray start`s started: their process groups, then anything still naming our temp folder."""
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):  # a test cluster keeps nothing worth a longer wait
        for p in procs:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.1)
    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmd and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def cluster():
    """A head node and a worker node on this machine; yields the head's address and the environment to join it."""
    pytest.importorskip("ray", reason="Ray Data is not installed (pip install -e '.[ray]')")
    temp = Path(tempfile.mkdtemp(prefix="upray-", dir="/tmp"))  # Ray's socket paths must stay short
    port = free_port()
    (temp / "auth_token").write_text(secrets.token_hex(32))
    procs: list[subprocess.Popen] = []
    try:
        procs.append(ray_start(temp / "head.log", temp, "--head", f"--port={port}", "--include-dashboard=false",
                               f"--dashboard-port={free_port()}"))
        wait_for(lambda: "Ray runtime started" in (temp / "head.log").read_text(errors="replace")
                 or procs[0].poll() is not None, 120, 0.2, "the head node")
        assert procs[0].poll() is None, (temp / "head.log").read_text(errors="replace")
        procs.append(ray_start(temp / "worker.log", temp, f"--address=127.0.0.1:{port}"))
        wait_for(lambda: "Ray runtime started" in (temp / "worker.log").read_text(errors="replace")
                 or procs[1].poll() is not None, 120, 0.2, "the second node")
        assert procs[1].poll() is None, (temp / "worker.log").read_text(errors="replace")
        yield f"127.0.0.1:{port}", ray_env(temp)
    finally:
        end(procs, str(temp))
        shutil.rmtree(temp, ignore_errors=True)


def backfill(src: Path, dst: Path, ckpt: Path, cluster: tuple[str, dict], *extra: str) -> subprocess.CompletedProcess:
    address, env = cluster
    return subprocess.run([sys.executable, "-m", "upscaled", "backfill", str(src), str(dst), "--ray", address,
                           "--model", str(ckpt), *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {rel: ((folder / rel).stat().st_ino, (folder / rel).stat().st_mtime_ns) for rel in files_under(folder)}


def test_backfill_on_a_two_node_cluster_lists_failures_and_resumes_without_redoing_work(tmp_path, cluster):
    src, dst = tmp_path / "src", tmp_path / "dst"
    ckpt = tiny_checkpoint(tmp_path / "tiny.safetensors")
    for i in range(3):
        write_image(src / f"a{i}.png", 40, 28, seed=i)
    write_image(src / "sub" / "b.jpg", 36, 24, seed=7)
    write_image(src / "photo.png", 32, 24, seed=8)
    (src / "photo.gif").write_bytes(image_bytes(Path("x.gif"), seed=9))  # a name clash: both make photo.png
    (src / "broken.png").write_bytes(image_bytes(Path("x.png"), seed=10)[:60])  # cut short
    (src / "notes.txt").write_text("not an image: never listed")
    write_image(dst / "a0.png", 8, 8, seed=11)  # already in DST, not ours: never overwritten
    theirs = (dst / "a0.png").read_bytes()

    r = backfill(src, dst, ckpt, cluster, "--workers", "2")
    assert r.returncode == 1, r.stderr  # one input failed
    nodes = {line.split(" on node ")[1].split(":")[0] for line in r.stderr.splitlines() if "backfill worker pid" in line}
    assert len(nodes) == 2, r.stderr  # the two model actors need more CPU than one node has: one on each
    outputs = ["a0-1.png", "a0.png", "a1.png", "a2.png", "photo-1.png", "photo.png", "sub/b.jpg"]
    assert files_under(dst) == outputs  # and no temp files
    assert (dst / "a0.png").read_bytes() == theirs
    with Image.open(dst / "a0-1.png") as im:
        assert im.size == (160, 112) and im.text["upscaled:scale"] == "4" and im.text["upscaled:size"] == "160x112"
        assert im.text["upscaled:model"] == read_info(ckpt).version
    with Image.open(dst / "photo.png") as gif_out, Image.open(dst / "photo-1.png") as png_out:
        assert gif_out.size == (128, 96) and png_out.size == (128, 96)  # photo.gif sorts first
    failures = [json.loads(line) for line in (dst / STATE_DIR / "failures.jsonl").read_text().splitlines()]
    assert [(f["file"], f["stage"]) for f in failures] == [("broken.png", "decode")]
    assert "not a readable image" in failures[0]["reason"]
    assert "6 file(s) upscaled" in r.stderr and "1 failed" in r.stderr, r.stderr

    # Resumed: nothing finished is done again; an output lost since is redone under its own name.
    before = snapshot(dst)
    (dst / "a2.png").unlink()
    r = backfill(src, dst, ckpt, cluster)
    assert r.returncode == 1, r.stderr
    assert "2 image(s) to upscale" in r.stderr and "5 already done" in r.stderr, r.stderr  # a2 and broken.png
    assert "1 file(s) upscaled" in r.stderr, r.stderr
    after = snapshot(dst)
    assert sorted(after) == outputs  # a2.png again, not a2-1.png
    assert {k: v for k, v in after.items() if k != "a2.png"} == {k: v for k, v in before.items() if k != "a2.png"}
    assert [json.loads(line)["file"] for line in (dst / STATE_DIR / "failures.jsonl").read_text().splitlines()] == \
        ["broken.png"]

    # Other output settings into the same DST would mix two plans: refused, nothing written.
    r = backfill(src, dst, ckpt, cluster, "--outscale", "2")
    assert r.returncode == 2 and "other output settings" in r.stderr, r.stderr
    assert snapshot(dst) == after
