"""Several `upscaled serve` on one inbox (docs/scaling.md): three real daemons, each with its own
status file, share the inbox, outbox, done/ and work folder. Each file is done by exactly one of
them, and when one is killed -9 holding claims, the others take its files over: none is lost,
none is done twice (no `name-1` outputs), and the dead daemon's claims folder is gone."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.daemon_helpers import files_under, serve, settings, stop, tiny_checkpoint, wait_for, write_image

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="inotify, flock and the claim scheme are tested on Linux")

DAEMONS = 3
FILES = 24
DONE = re.compile(r" done (\S+): ")


def running(status: Path, pid: int) -> bool:
    try:
        st = json.loads(status.read_text())
    except (FileNotFoundError, ValueError):
        return False
    return st.get("state") == "running" and st.get("pid") == pid


def claims_of(work: Path, pid: int) -> list[Path]:
    """Files a daemon holds: work/<host>-<pid>-<token>/files/..."""
    return [p for d in work.glob(f"*-{pid}-*") for p in (d / "files").rglob("*") if p.is_file()]


def done_lines(log: Path) -> list[str]:
    return DONE.findall(log.read_text(errors="replace")) if log.exists() else []


def test_three_daemons_on_one_inbox_share_the_files_and_survive_a_kill_9(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="upscaled-shared-", dir="/tmp"))
    try:
        ckpt = tiny_checkpoint(root / "tiny.safetensors")
        configs = []
        for k in range(DAEMONS):
            # The same folders for all; its own status file each (one daemon per status file).
            data = settings(root, ckpt, paths={"status": str(root / f"status-{k}.json")})
            (root / f"config-{k}.yaml").write_text(yaml.safe_dump(data))
            configs.append(root / f"config-{k}.yaml")
        for k in ("inbox", "outbox", "done", "failed", "staging"):
            (root / k).mkdir()
        procs = [serve(c, log=root / f"daemon-{k}.log") for k, c in enumerate(configs)]
        try:
            for k, p in enumerate(procs):
                wait_for(lambda: p.poll() is not None or running(root / f"status-{k}.json", p.pid), 120,
                         what=f"daemon {k} to be running")
                assert p.poll() is None, (root / f"daemon-{k}.log").read_text(errors="replace")[-3000:]
            names = [f"s{i:02d}.png" for i in range(FILES)]
            for i, name in enumerate(names):  # written beside the inbox, renamed in: complete at once
                write_image(root / "staging" / name, 160, 120, seed=i)
            for name in names:
                (root / "staging" / name).rename(root / "inbox" / name)
            # kill -9 the first daemon while it holds claims (files it took from the inbox, unfinished)
            work = root / "inbox" / ".upscaled-work"
            victim = procs[0]
            held = wait_for(lambda: claims_of(work, victim.pid), 60, 0.02, what="daemon 0 to hold claims")
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            held_names = sorted(p.name for p in held)
            wait_for(lambda: len(files_under(root / "done")) == FILES, 120, what="every file done by the others")
        finally:
            for p in procs[1:]:
                assert stop(p) == 0, (root / "daemon-1.log").read_text(errors="replace")[-3000:]
            if procs[0].poll() is None:
                procs[0].kill()
        assert files_under(root / "outbox") == names  # each once: no s03-1.png
        assert files_under(root / "done") == names and files_under(root / "failed") == []
        by_daemon = [done_lines(root / f"daemon-{k}.log") for k in range(DAEMONS)]
        every = [name for lines in by_daemon for name in lines]
        assert sorted(every) == names, by_daemon  # each file done by exactly one daemon, none twice
        assert all(by_daemon[1:]), by_daemon  # the survivors both worked
        assert held_names and not set(held_names) & set(by_daemon[0])  # what the dead one held, others did
        assert not list(work.glob(f"*-{victim.pid}-*"))  # its claims folder recovered and removed
        # Every daemon kept its own status file; the survivors' counts add up to what they did.
        for k in (1, 2):
            st = json.loads((root / f"status-{k}.json").read_text())
            assert st["processed"] == len(by_daemon[k]), st
    finally:
        shutil.rmtree(root, ignore_errors=True)
