"""Fault injection against `upscaled serve`: kill -9, a full disk, a read-only outbox.

    .venv/bin/python bench/faults.py                    # tiny random model (fast)
    .venv/bin/python bench/faults.py --model fidelity   # the bundled model
    .venv/bin/python bench/faults.py --only kill        # one scenario (kill, disk, ro)

Not a unit test: like bench/soak.py (whose config writer and helpers it reuses), it starts the
real daemon, `python -m upscaled serve --config CONFIG` (cwd = repo root), on fresh temp data
folders, and prints a table for the README's reliability section, with the CPU model and its ISA
flags (amx_bf16, avx512_bf16, avx2).

1. kill -9: --files (120) small images (PNG RGB/L/RGBA and JPEG RGB/L, a third in subfolders up
   to two levels deep) are put in the inbox; the daemon is started, and --kills (20) times it is
   SIGKILLed 0.2-1.5 s (random, --seed) after its status file says "running" (the status file of
   *this* process: its pid, since the killed one's file still says running) and started again.
   After the last restart it is left to finish, then stopped with SIGTERM. Reported: outputs
   complete in the outbox (each decodes at 4x its input's size), originals in done/, duplicates
   (NAME-1.ext beside NAME.ext in the outbox or done/), files lost (inputs != outputs + failed),
   temp files (.NAME.*.tmp) left in the outbox, owner folders left in the work folder
   (inbox/.upscaled-work) after the clean stop.
2. disk full: the outbox is a 2 MB tmpfs (`mount -t tmpfs -o size=2m`); --disk-files (30) noise
   PNGs of 160x120 (640x480 outputs, ~900 KB each) are dropped; the script waits until the daemon
   has been retrying ("No space left on device" in its log, entries in the status file's
   "retrying" list) for --fault-seconds, then grows the tmpfs to 64 MB (`mount -o remount`) and
   times the drain. Every file must complete, no partial output may be left.
3. read-only outbox: the outbox is bind-mounted on itself and remounted read-only while the
   daemon runs; --ro-files (10) files are dropped, retried ("Read-only file system"), then the
   bind mount is removed and all must complete. Where mounts are not allowed, the outbox is
   chowned to nobody and chmod 0555 instead, and the daemon runs as root without capabilities
   (setpriv, see tests/daemon_helpers.as_daemon_user) so that the mode applies to it.

Mounts need root (CAP_SYS_ADMIN); a scenario that cannot set up its fault says why and is
skipped. Mounts are always undone (try/finally, umount; umount -l as a last resort).

Exit code 1 when any file is lost or duplicated, or any other check fails (a bad output, a temp
file or owner folder left, a stuck file, the daemon exiting non-zero on SIGTERM); 0 otherwise.
--keep keeps the data folders and the daemons' logs.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import soak  # noqa: E402  (bench/soak.py: config writer, model, status file, CPU line)

ROOT = soak.ROOT
SCALE = soak.SCALE
KINDS = [(".png", "RGB"), (".jpg", "RGB"), (".png", "L"), (".jpg", "L"), (".png", "RGBA")]
SIZES = [(64, 48), (48, 64), (96, 72)]  # times --kill-scale
WORK = ".upscaled-work"


# ---------------------------------------------------------------------------------------------
# Helpers


def sh(*cmd: str) -> tuple[bool, str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


def mounted(path: Path) -> bool:
    """True when something is mounted on `path` (a bind mount within one file system included,
    which os.path.ismount does not see)."""
    want = os.path.realpath(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return os.path.ismount(path)
    for line in lines:
        point = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if point == want:
            return True
    return False


def umount(path: Path) -> None:
    """Undo every mount stacked on `path`."""
    for _ in range(5):
        if not mounted(path):
            return
        ok, _ = sh("umount", str(path))
        if not ok:
            time.sleep(0.5)
            sh("umount", "-l", str(path))


def noise_png(size: tuple[int, int], seed: int) -> bytes:
    import io

    w, h = size
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def files_under(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def is_temp(rel: str) -> bool:
    return Path(rel).name.startswith(".") and rel.endswith(".tmp")


@dataclass
class Input:
    rel: str
    size: tuple[int, int]
    data: bytes


@dataclass
class Outcome:
    name: str
    files: int = 0
    complete: int = 0  # output in the outbox that decodes at 4x
    done: int = 0  # originals in done/
    failed: int = 0
    duplicates: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # no output, not in failed/, and nowhere else either
    unfinished: list[str] = field(default_factory=list)  # no output, not in failed/, still in the inbox or work folder
    temps: list[str] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)
    retries: int | None = None  # retry warnings in the log caused by the fault
    drain_s: float | None = None
    stop_rc: int | None = None
    skipped: str = ""
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# One data folder with a daemon


class Rig:
    def __init__(self, base: Path, name: str, model: str, args: argparse.Namespace):
        self.root = base / name
        self.root.mkdir(parents=True)
        os.chmod(self.root, 0o755)  # reachable for a daemon without root's capabilities
        self.args = args
        self.config = soak.write_config(self.root, model, args.threads)
        self.inbox, self.outbox = self.root / "inbox", self.root / "outbox"
        self.done_dir, self.failed_dir = self.root / "done", self.root / "failed"
        self.work = self.inbox / WORK
        self.staging = self.root / "staging"
        self.staging.mkdir()
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self.prefix: list[str] = []
        self.inputs: list[Input] = []

    def start(self) -> float:
        """Start the daemon; return once its status file (its own pid) says running; seconds taken."""
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        t = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "upscaled", "serve", "--config", str(self.config)],
                                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = t + self.args.start_timeout
        while True:
            st = soak.status_of(self.root)
            if st.get("pid") == self.proc.pid and st.get("state") == "running":
                return time.monotonic() - t
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon was not running after {self.args.start_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, out: Outcome) -> None:
        """SIGTERM; record the exit code and the owner folders left in the work folder."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            out.stop_rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            out.problems.append("the daemon did not exit within 60 s of SIGTERM; killed")
            self.proc.kill()
            out.stop_rc = self.proc.wait()
        if out.stop_rc != 0:
            out.problems.append(f"the daemon exited with {out.stop_rc} on SIGTERM")
        out.owners = [p.name for p in self.work.iterdir() if p.is_dir() and p.name != "written"] if self.work.is_dir() else []  # written/: shared markers, not an owner
        if out.owners:
            out.problems.append(f"owner folder(s) left in the work folder after the stop: {out.owners}")

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines() if self.log.exists() else []

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")

    # -- inputs -----------------------------------------------------------------------------

    def drop(self, item: Input, staged: bool = True) -> None:
        dst = self.inbox / item.rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not staged:
            dst.write_bytes(item.data)
            return
        tmp = self.staging / dst.name
        tmp.write_bytes(item.data)
        os.rename(tmp, dst)

    def finished(self, item: Input) -> bool:
        return ((self.outbox / item.rel).exists() and (self.done_dir / item.rel).exists()) or \
            (self.failed_dir / (item.rel + ".error.json")).exists()

    def pending(self) -> list[Input]:
        return [it for it in self.inputs if not self.finished(it)]

    def where(self, item: Input) -> str:
        places = [("inbox", self.inbox / item.rel), ("outbox", self.outbox / item.rel),
                  ("done", self.done_dir / item.rel), ("failed", self.failed_dir / item.rel)]
        found = [n for n, p in places if p.exists()]
        if self.work.is_dir():
            found += [f"work:{p.relative_to(self.work)}" for p in self.work.glob(f"**/files/{item.rel}")]
        return ", ".join(found) or "nowhere"

    def wait_all(self, out: Outcome, on_tick=None) -> bool:
        """Until every input is finished and the daemon is idle; False when stuck."""
        last, n_left = time.monotonic(), len(self.pending())
        while True:
            left = self.pending()
            if on_tick:
                on_tick()
            if len(left) < n_left:
                last, n_left = time.monotonic(), len(left)
            if not left:
                st = soak.status_of(self.root)
                if st.get("queued") == 0 and st.get("in_flight") == 0 and not st.get("retrying"):
                    return True
            if time.monotonic() - last > self.args.stall_timeout:
                out.problems.append(f"STUCK: {len(left)} file(s) made no progress for {self.args.stall_timeout:.0f} s")
                for it in left[:10]:
                    out.problems.append(f"  {it.rel}: {self.where(it)}")
                st = soak.status_of(self.root)
                if not left:
                    out.problems.append(f"  status not idle: queued {st.get('queued')}, in flight {st.get('in_flight')}, "
                                        f"retrying {st.get('retrying')}")
                return False
            self.alive()
            time.sleep(0.1)

    # -- the tally -------------------------------------------------------------------------

    def tally(self, out: Outcome) -> None:
        out.files = len(self.inputs)
        want = {it.rel: it for it in self.inputs}
        outputs = files_under(self.outbox)
        out.temps = [o for o in outputs if is_temp(o)]
        outputs = [o for o in outputs if not is_temp(o)]
        done = files_under(self.done_dir)
        failed_all = files_under(self.failed_dir)
        failed = {f for f in failed_all if not f.endswith(".error.json")}
        out.failed = len(failed)
        out.done = len([d for d in done if d in want])
        dup_re = {rel: re.compile(re.escape(str(Path(rel).with_suffix(""))) + r"-\d+" + re.escape(Path(rel).suffix) + "$")
                  for rel in want}
        for folder, names in (("outbox", outputs), ("done", done)):
            for name in names:
                if name in want:
                    continue
                if any(rx.match(name) for rx in dup_re.values()):
                    out.duplicates.append(f"{folder}/{name}")
                else:
                    out.problems.append(f"unexpected file {folder}/{name}")
        out.complete, wrong = soak.check_outputs(self.outbox, want.values())
        if wrong:
            out.problems.append(f"{len(wrong)} bad output(s): {wrong[:5]}")
        missing = [rel for rel in want if not (self.outbox / rel).exists() and rel not in failed]
        out.unfinished = [rel for rel in missing if self.where(want[rel]) != "nowhere"]
        out.lost = [rel for rel in missing if rel not in out.unfinished]
        if out.unfinished:
            out.problems.append(f"UNFINISHED {len(out.unfinished)} (no output; the input is still there): "
                                + "; ".join(f"{r} ({self.where(want[r])})" for r in out.unfinished[:10]))
        if out.lost:
            out.problems.append(f"LOST {len(out.lost)} (no output, not in failed/, the input gone): {out.lost[:10]}")
        if out.duplicates:
            same = []
            for d in out.duplicates:
                folder, name = d.split("/", 1)
                orig = next((rel for rel, rx in dup_re.items() if rx.match(name)), None)
                top = self.outbox if folder == "outbox" else self.done_dir
                if (top / orig).exists() and (top / orig).read_bytes() == (top / name).read_bytes():
                    same.append(d)
            out.problems.append(f"DUPLICATED {len(out.duplicates)}: {out.duplicates[:10]}"
                                f" ({len(same)} byte-identical to the file without the -N)")
        if out.temps:
            out.problems.append(f"{len(out.temps)} temp file(s) left in the outbox: {out.temps[:5]}")
        missing_done = [rel for rel in want if (self.outbox / rel).exists() and not (self.done_dir / rel).exists()]
        if missing_done:
            out.problems.append(f"{len(missing_done)} output(s) without their original in done/: {missing_done[:5]}")
        if failed:
            out.problems.append(f"{len(failed)} file(s) in failed/: {sorted(failed)[:5]}")
        inbox_left = [f for f in files_under(self.inbox) if not f.startswith(WORK + "/")]
        if inbox_left:
            out.problems.append(f"{len(inbox_left)} file(s) left in the inbox: {inbox_left[:5]}")
        claims = [p.relative_to(self.work).as_posix() for p in self.work.glob("**/files/**/*") if p.is_file()] \
            if self.work.is_dir() else []
        if claims:
            out.problems.append(f"{len(claims)} claimed file(s) left in the work folder: {claims[:5]}")
        crashes = [ln for ln in self.log_lines() if ln.startswith("Traceback") or "| CRITICAL" in ln]
        if crashes:
            out.problems.append(f"{len(crashes)} traceback/critical line(s) in the daemon log: {crashes[:3]}")


class Watcher:
    """Polls the status file while a fault lasts: the most entries seen in "retrying"."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.max_retrying = 0
        self.retried: set[str] = set()
        self.problems: set[str] = set()

    def __call__(self) -> None:
        st = soak.status_of(self.rig.root)
        r = st.get("retrying") or []
        self.max_retrying = max(self.max_retrying, len(r))
        for e in r:
            self.retried.add(e.get("file", "?"))
            self.problems.add(str(e.get("problem", ""))[:120])


def drain_and_tally(rig, out, watcher, needle: str) -> int:
    """After a fault ends: wait for every file, stop the daemon, count, and check that the fault
    was really hit (a retry naming `needle` in the log). Returns the outbox's bytes."""
    t = time.monotonic()
    drained = rig.wait_all(out, on_tick=watcher)
    out.drain_s = time.monotonic() - t if drained else None
    total = sum(p.stat().st_size for p in rig.outbox.rglob("*") if p.is_file())
    rig.stop(out)
    rig.tally(out)
    out.retries = retry_lines(rig, needle)
    if not out.retries:
        out.problems.append(f"no '{needle}' retry in the daemon log: the fault was not hit")
    return total


def retry_lines(rig: Rig, needle: str) -> int:
    return sum(1 for ln in rig.log_lines() if "retrying in" in ln and needle in ln)


# ---------------------------------------------------------------------------------------------
# Scenarios


def kill_scenario(base: Path, model: str, args: argparse.Namespace, rng: random.Random) -> Outcome:
    out = Outcome(f"kill -9 x{args.kills}")
    rig = Rig(base, "kill", model, args)
    for i in range(1, args.files + 1):
        k = (i // 6) % 4
        folder = {0: f"sub{k}/", 3: f"sub{k}/deep{(i // 24) % 3}/"}.get(i % 6, "")
        ext, mode = KINDS[i % len(KINDS)]
        size = tuple(d * args.kill_scale for d in SIZES[(i // 7) % len(SIZES)])
        rig.inputs.append(Input(f"{folder}img-{i:04d}{ext}", size, soak.image_bytes(ext, mode, size, args.seed * 1_000_003 + i)))
    for it in rig.inputs:
        rig.drop(it, staged=False)  # the daemon is not running yet
    try:
        starts, at_kill = [], []
        for n in range(args.kills):
            starts.append(rig.start())
            time.sleep(rng.uniform(0.2, 1.5))
            rig.kill9()
            at_kill.append(len(rig.inputs) - len(rig.pending()))
            # what a kill leaves behind at that moment
        starts.append(rig.start())
        t = time.monotonic()
        ok = rig.wait_all(out)
        finish_s = time.monotonic() - t
        out.drain_s = finish_s if ok else None
        rig.stop(out)
        rig.tally(out)
        lines = rig.log_lines()
        recovered = sum(1 for ln in lines if "recovering claims of dead daemon" in ln)
        given_back = sum(int(m.group(1)) for ln in lines if (m := re.search(r"gave (\d+) file\(s\) claimed by dead", ln)))
        partial = sum(1 for ln in lines if "a partial output of a dead daemon" in ln)
        mid = sum(1 for a, b in zip([0, *at_kill], at_kill) if b < len(rig.inputs))
        out.notes.append(f"daemon start to 'running': median {sorted(starts)[len(starts) // 2]:.1f} s, "
                         f"max {max(starts):.1f} s over {len(starts)} starts")
        out.notes.append(f"files finished at each kill: {at_kill}")
        out.notes.append(f"{mid} of {args.kills} kills hit with work left; after the last restart the rest took "
                         f"{finish_s:.1f} s{'' if ok else ' (stuck)'}")
        out.notes.append(f"dead owner folders recovered: {recovered}; claimed files given back to the inbox: {given_back}; "
                         f"partial outputs removed: {partial}")
    finally:
        rig.abort()
    return out


def disk_scenario(base: Path, model: str, args: argparse.Namespace) -> Outcome:
    out = Outcome("disk full (2 MB)")
    rig = Rig(base, "disk", model, args)
    ok, why = sh("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(rig.outbox))
    if not ok:
        out.skipped = f"cannot mount a tmpfs on the outbox: {why}"
        return out
    try:
        rig.inputs = [Input(f"{'big/' if i % 3 == 0 else ''}noise-{i:03d}.png", (160, 120), noise_png((160, 120), args.seed * 1_000_003 + i))
                      for i in range(1, args.disk_files + 1)]
        rig.start()
        for it in rig.inputs:
            rig.drop(it)
        w = Watcher(rig)
        deadline = time.monotonic() + args.stall_timeout
        first = None
        while True:
            w()
            if first is None and retry_lines(rig, "No space left on device"):
                first = time.monotonic()
            if first is not None and time.monotonic() - first >= args.fault_seconds:
                break
            if not rig.pending():
                break  # the disk never filled
            if time.monotonic() > deadline:
                out.problems.append(f"no ENOSPC retry within {args.stall_timeout:.0f} s")
                break
            rig.alive()
            time.sleep(0.1)
        done_full = len(rig.inputs) - len(rig.pending())
        used = shutil.disk_usage(rig.outbox)
        ok, why = sh("mount", "-o", "remount,size=64m", str(rig.outbox))
        if not ok:
            raise RuntimeError(f"cannot grow the tmpfs: {why}")
        total = drain_and_tally(rig, out, w, "No space left on device")
        if not w.max_retrying:
            out.problems.append("the status file never listed a file under 'retrying'")
        out.notes.append(f"while full ({args.fault_seconds:.0f} s after the first ENOSPC): {done_full} of {len(rig.inputs)} done, "
                         f"tmpfs {used.used / 1e6:.2f} of {used.total / 1e6:.2f} MB used; status 'retrying' held up to "
                         f"{w.max_retrying} file(s) at once, {len(w.retried)} different")
        out.notes.append(f"retry problems seen in the status file: {sorted(w.problems)[:2]}")
        out.notes.append(f"outputs total {total / 1e6:.1f} MB on a 2 MB tmpfs, then grown to 64 MB")
    finally:
        rig.abort()
        umount(rig.outbox)
        if mounted(rig.outbox):
            out.problems.append(f"could not unmount {rig.outbox}")
    return out


def ro_scenario(base: Path, model: str, args: argparse.Namespace) -> Outcome:
    out = Outcome("read-only outbox")
    rig = Rig(base, "ro", model, args)
    rig.inputs = [Input(f"{'sub/' if i % 3 == 0 else ''}ro-{i:02d}{'.jpg' if i % 2 else '.png'}", (64, 48),
                        soak.image_bytes(".jpg" if i % 2 else ".png", "RGB", (64, 48), args.seed * 1_000_003 + 7000 + i))
                  for i in range(1, args.ro_files + 1)]
    ok, why = (False, "--ro-method chmod") if args.ro_method == "chmod" else sh("mount", "--bind", str(rig.outbox), str(rig.outbox))
    method, needle = "", ""
    if ok:
        umount(rig.outbox)  # it works: set it up again once the daemon runs
        method, needle = "bind mount remounted ro", "Read-only file system"
    elif os.geteuid() == 0 and shutil.which("setpriv"):
        method, needle = f"chmod 0555, owner nobody, daemon under setpriv without capabilities (mount: {why})", "Permission denied"
        rig.prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    elif os.geteuid() != 0:
        method, needle = "chmod 0555 (not root)", "Permission denied"
    else:
        out.skipped = f"no mount ({why}) and no setpriv"
        return out
    out.notes.append(f"fault: {method}")
    try:
        rig.start()

        def fault_on() -> None:
            if method.startswith("bind"):
                for cmd in (("mount", "--bind", str(rig.outbox), str(rig.outbox)),
                            ("mount", "-o", "remount,ro,bind", str(rig.outbox))):
                    ok, why = sh(*cmd)
                    if not ok:
                        raise RuntimeError(f"{' '.join(cmd)}: {why}")
            else:
                if os.geteuid() == 0:
                    os.chown(rig.outbox, 65534, 65534)
                os.chmod(rig.outbox, 0o555)

        def fault_off() -> None:
            if method.startswith("bind"):
                umount(rig.outbox)
            else:
                if os.geteuid() == 0:
                    os.chown(rig.outbox, 0, 0)  # the daemon's (capability-less root's) own again
                os.chmod(rig.outbox, 0o755)

        fault_on()
        for it in rig.inputs:
            rig.drop(it)
        w = Watcher(rig)
        deadline = time.monotonic() + args.stall_timeout
        first = None
        while True:  # until every file has been retried, and the fault has lasted --fault-seconds
            w()
            if first is None and w.retried:
                first = time.monotonic()
            if first is not None and len(w.retried) >= len(rig.inputs) and time.monotonic() - first >= args.fault_seconds:
                break
            if time.monotonic() > deadline:
                out.problems.append(f"only {len(w.retried)} of {len(rig.inputs)} file(s) retried within {args.stall_timeout:.0f} s")
                break
            rig.alive()
            time.sleep(0.1)
        done_ro = len(rig.inputs) - len(rig.pending())
        fault_off()
        drain_and_tally(rig, out, w, needle)
        if done_ro:
            out.problems.append(f"{done_ro} file(s) completed while the outbox was read-only")
        out.notes.append(f"status 'retrying' held up to {w.max_retrying} file(s) at once, {len(w.retried)} different; "
                         f"e.g. {sorted(w.problems)[:1]}")
    finally:
        rig.abort()
        if method.startswith("bind"):
            umount(rig.outbox)
            if mounted(rig.outbox):
                out.problems.append(f"could not unmount {rig.outbox}")
    return out


# ---------------------------------------------------------------------------------------------


def table(outcomes: list[Outcome]) -> str:
    head = (f"{'scenario':<18} {'files':>5} {'complete':>8} {'in done/':>8} {'dupes':>5} {'unfinished':>10} {'lost':>4} {'tmp left':>8}"
            f" {'owners left':>11} {'retries':>7} {'drain s':>7} {'SIGTERM rc':>10}")
    rows = [head, "-" * len(head)]
    for o in outcomes:
        if o.skipped:
            rows.append(f"{o.name:<18} skipped: {o.skipped}")
            continue
        dash = lambda v, f="{}": "-" if v is None else f.format(v)  # noqa: E731
        rows.append(f"{o.name:<18} {o.files:>5} {o.complete:>8} {o.done:>8} {len(o.duplicates):>5} {len(o.unfinished):>10} {len(o.lost):>4}"
                    f" {len(o.temps):>8} {len(o.owners):>11} {dash(o.retries):>7} {dash(o.drain_s, '{:.1f}'):>7}"
                    f" {dash(o.stop_rc):>10}")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny (a random 8-channel, 1-block generator; default), fidelity | gan (bundled), or a checkpoint path")
    p.add_argument("--threads", type=int, default=1, help="inference.threads (default 1)")
    p.add_argument("--only", default="kill,disk,ro", help="scenarios to run, comma-separated: kill, disk, ro")
    p.add_argument("--files", type=int, default=120, help="kill -9: inputs (default 120)")
    p.add_argument("--kill-scale", type=int, default=3,
                   help="kill -9: input sizes are 64x48, 48x64, 96x72 times this (default 3, so that with the tiny "
                        "model on 2 cores the work spans most of the kills)")
    p.add_argument("--kills", type=int, default=20, help="kill -9: SIGKILLs (default 20)")
    p.add_argument("--disk-files", type=int, default=30, help="disk full: inputs (default 30)")
    p.add_argument("--ro-files", type=int, default=10, help="read-only outbox: inputs (default 10)")
    p.add_argument("--ro-method", choices=("auto", "chmod"), default="auto",
                   help="read-only outbox: a read-only bind mount where allowed (auto), or chmod 0555 (+ setpriv as root)")
    p.add_argument("--fault-seconds", type=float, default=5.0, help="how long a fault is held once retries show (default 5)")
    p.add_argument("--seed", type=int, default=0, help="kill delays and pixels")
    p.add_argument("--stall-timeout", type=float, default=120.0, help="seconds without progress = stuck")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--keep", action="store_true", help="keep the data folders and the daemons' logs")
    args = p.parse_args()
    which = [s.strip() for s in args.only.split(",") if s.strip()]
    if bad := [s for s in which if s not in ("kill", "disk", "ro")]:
        p.error(f"unknown scenario(s) {bad}")

    base = Path(tempfile.mkdtemp(prefix="upscaled-faults-", dir="/tmp"))
    os.chmod(base, 0o755)
    print(f"faults: {', '.join(which)}; model {args.model}, inference.threads {args.threads}, seed {args.seed}; "
          f"data folders under {base}", flush=True)
    t0 = time.monotonic()
    rng = random.Random(args.seed)
    model = soak.resolve_model(args.model, base)
    outcomes: list[Outcome] = []
    for name, fn in (("kill", lambda: kill_scenario(base, model, args, rng)), ("disk", lambda: disk_scenario(base, model, args)),
                     ("ro", lambda: ro_scenario(base, model, args))):
        if name not in which:
            continue
        t = time.monotonic()
        print(f"\n== {name} ...", flush=True)
        try:
            o = fn()
        except Exception as e:  # noqa: BLE001 - report it, go on with the next scenario
            o = Outcome(name)
            o.skipped = f"aborted: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            o.problems.append(f"{type(e).__name__}: {e}")
        outcomes.append(o)
        print(f"   {time.monotonic() - t:.0f} s", flush=True)
        for n in o.notes:
            print(f"   {n}")
        for pr in o.problems:
            print(f"   ! {pr}")

    print()
    print(soak.cpu_line())
    print(table(outcomes))
    print("complete: outputs in the outbox that decode at 4x; dupes: NAME-N.ext in outbox or done/; unfinished: no output, "
          "input still in the inbox or work folder; lost: no output, not in failed/, input gone; tmp left: .*.tmp in the outbox; owners left: owner folders in inbox/.upscaled-work after "
          "SIGTERM; retries: the daemon's retry warnings for the fault's error; drain s: from the fault's end (kill: the last restart running) to the last file done")
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    lost = sum(len(o.lost) for o in outcomes)
    dup = sum(len(o.duplicates) for o in outcomes)
    problems = [(o.name, pr) for o in outcomes for pr in o.problems]
    if problems:
        unfinished = sum(len(o.unfinished) for o in outcomes)
        print(f"\nFAILED ({lost} lost, {dup} duplicated, {unfinished} unfinished, {len(problems)} problem(s)):")
        for name, pr in problems:
            print(f"  - {name}: {pr[:600]}")
    else:
        print("\nPASSED: nothing lost or duplicated")
    if args.keep or problems:
        print(f"data folders and daemon logs kept in {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
