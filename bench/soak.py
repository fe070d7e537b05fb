"""Soak test of `upscaled serve`: push many files through the real daemon, watch for leaks.

    .venv/bin/python bench/soak.py                          # 2,000 files, bundled fidelity model
    .venv/bin/python bench/soak.py --files 300 --model tiny # quick: a tiny random generator

Not a unit test: a script that starts `python -m upscaled serve --config CONFIG` as a subprocess
(cwd = repo root) on a fresh temp data folder and drops tiny images into its inbox in waves of
`--batch`, like several kinds of clients:

  - written to a temp name outside the inbox (a staging folder on the same file system), then
    renamed in (mv, rsync);
  - written to a hidden temp name inside the inbox (`.NAME.part`), then renamed (browsers, sftp);
  - written straight in place (open, write, close) — the daemon sees CLOSE_WRITE;

as PNG (RGB, grayscale, RGBA, gray+alpha), JPEG (RGB, grayscale) and WebP (RGB, RGBA), 32x24,
48x32 or 24x32 pixels, a third of them in subfolders up to two levels deep. A few inputs are
meant to fail (a truncated PNG, a `.txt` file: they must land in failed/ with NAME.error.json)
and a few are meant to be ignored (`.hidden.png`, `NAME.png.part`, `Thumbs.db`: they must stay in
the inbox untouched). The next wave is dropped while the previous one is still being processed
(when half of it is done), except at the sample points, where the script waits for the daemon
to be idle (every dropped file finished, status.json: nothing queued or in flight) so that
every sample is taken in the same state.

Samples of the daemon process (/proc/PID/status VmRSS and VmHWM, len(/proc/PID/fd),
/proc/PID/status Threads, inotify watches from /proc/PID/fdinfo, beside the number of folders
under the inbox) are taken after the first 100 files, every 500 files, and at the end,
and printed as a table with the CPU model and its ISA flags (amx_bf16, avx512_bf16, avx2).

Pass/fail (exit code 1 on any failure, 0 when all hold):

  - growth from the 100-file sample to the end within the margins:
      RSS      +max(10 %, 30 MB)   (about +55 MB on the ~550 MB the daemon holds with torch
                                    loaded: any leak of 30 kB or more per file over the 1,900
                                    files shows; below that, allocator fragmentation and
                                    caches that fill slowly cannot be told from a leak)
      open fds +5                  (a leaked fd per file, or per wave, shows as hundreds)
      threads  +2                  (a leaked thread per wave shows as dozens)
      inotify watches beyond one per folder under the inbox: +5 (the daemon's claim subfolders
                                   in the work folder are created and removed all the time,
                                   and each is watched while it exists)
    (--rss-margin-pct, --rss-margin-mb, --fd-margin, --thread-margin, --watch-margin);
  - every file finished: no file made no progress for --stall-timeout seconds;
  - inputs == outputs + failed + ignored, outputs == originals in done/, the expected files
    failed and the expected ones were ignored; every output decodes at 4x the input's size;
  - nothing left in the inbox but the ignored files and the work folder; no claimed file left in
    the work folder; no temp file left in the outbox;
  - SIGTERM stops the daemon with exit code 0, and the work folder then holds no owner folder;
  - the daemon logged no warning or error but one "failed" line per undecodable input.
    (Python warnings on its stderr, e.g. from watchdog, are printed but do not fail the run.)

The config is the tests' (tests/daemon_helpers.py): fast watch timings, inference.device cpu,
inference.threads --threads; plus watch.incomplete_wait 2 s (a truncated PNG is otherwise
waited for 30 s in case it is still being written) and, as root, daemon.allow_root, where this
version of the config has those keys.

On a failure the script prints what it found (the files still pending and where they are, the
fds or threads that appeared, the daemon's error lines); --keep keeps the data folder and the
daemon's log for a closer look.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALE = 4
SAMPLE_EVERY = 500
FIRST_SAMPLE = 100
IGNORED_EVERY = 150  # one ignored file per this many inputs
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}
# (extension, PIL mode): the mix, in turn.
KINDS = [(".png", "RGB"), (".jpg", "RGB"), (".webp", "RGB"), (".png", "L"), (".jpg", "L"),
         (".png", "RGBA"), (".webp", "RGBA"), (".png", "LA"), (".jpg", "RGB"), (".png", "RGB")]
SIZES = [(32, 24), (48, 32), (24, 32)]
DROP_WAYS = ("staged-rename", "inbox-tmp-rename", "in-place")


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Item:
    rel: str  # inbox-relative path
    kind: str  # "image" | "bad" | "ignored"
    size: tuple[int, int] = (0, 0)
    way: str = ""


def image_bytes(ext: str, mode: str, size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    bands = len(mode)
    # A gradient plus noise: something a model and an encoder actually work on.
    base = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] + np.linspace(0, 55, h, dtype=np.float32)[:, None, None]
    arr = np.clip(base + rng.normal(0, 25, (h, w, bands)), 0, 255).astype(np.uint8)
    if "A" in mode:
        arr[..., -1] = rng.integers(0, 256, (h, w), dtype=np.uint8)
    im = Image.fromarray(arr[..., 0] if bands == 1 else arr, mode)
    buf = BytesIO()
    im.save(buf, format=FORMATS[ext], **({"quality": 90} if ext != ".png" else {}))
    return buf.getvalue()


def plan(n: int, bad_every: int) -> list[Item]:
    """The `n` inputs, in drop order."""
    items = []
    for i in range(1, n + 1):
        k = (i // 6) % 4
        folder = {0: f"sub{k}/", 3: f"sub{k}/deep{(i // 24) % 3}/"}.get(i % 6, "")  # a third in subfolders
        if i % IGNORED_EVERY == 0:
            name = (f".hidden-{i:05d}.png", f"draft-{i:05d}.png.part", "Thumbs.db")[(i // IGNORED_EVERY) % 3]
            if name == "Thumbs.db":
                folder = f"thumbs{i:05d}/"
            items.append(Item(folder + name, "ignored"))
        elif bad_every and i % bad_every == 0:
            name = (f"broken-{i:05d}.png", f"notes-{i:05d}.txt")[(i // bad_every) % 2]
            items.append(Item(folder + name, "bad", way=DROP_WAYS[i % 3]))
        else:
            ext, _ = KINDS[i % len(KINDS)]
            items.append(Item(f"{folder}img-{i:05d}{ext}", "image", SIZES[(i // 7) % len(SIZES)], DROP_WAYS[i % 3]))
    return items


def payload(item: Item, index: int, seed: int = 0) -> bytes:
    """The bytes of input number `index` (1-based); `seed` varies the pixels."""
    pixels = seed * 1_000_003 + index
    if item.kind == "ignored":
        return image_bytes(".png", "RGB", (32, 24), pixels)
    if item.kind == "bad":
        if item.rel.endswith(".txt"):
            return b"not an image\n"
        return image_bytes(".png", "RGB", (32, 24), pixels)[:60]  # truncated: header, no pixels
    ext = Path(item.rel).suffix
    mode = KINDS[index % len(KINDS)][1]
    return image_bytes(ext, mode, item.size, pixels)


def drop(item: Item, data: bytes, inbox: Path, staging: Path) -> None:
    dst = inbox / item.rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if item.kind == "ignored" or item.way == "in-place":
        with open(dst, "wb") as f:
            f.write(data)
        return
    if item.way == "staged-rename":
        tmp = staging / f"{os.getpid()}-{dst.name}"
    else:  # inbox-tmp-rename
        tmp = dst.with_name(f".{dst.name}.part")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, dst)


def check_outputs(outbox: Path, items) -> tuple[int, list[str]]:
    """(outputs that decode at SCALE x their input's size, problems) for inputs with .rel and
    .size; inputs without an output are not counted either way."""
    good, wrong = 0, []
    for it in items:
        p = outbox / it.rel
        if not p.exists():
            continue
        try:
            with Image.open(p) as im:
                im.load()
                got = im.size
        except Exception as e:  # noqa: BLE001 - any decoder error is a bad output
            wrong.append(f"{it.rel}: {type(e).__name__}: {e}")
            continue
        if got == (it.size[0] * SCALE, it.size[1] * SCALE):
            good += 1
        else:
            wrong.append(f"{it.rel}: {got[0]}x{got[1]}, expected {it.size[0] * SCALE}x{it.size[1] * SCALE}")
    return good, wrong


# ---------------------------------------------------------------------------------------------
# The daemon


def write_config(root: Path, model: str, threads: int) -> Path:
    data = {
        "model": {"path": model},
        "inference": {"device": "cpu", "threads": threads},
        "paths": {
            "inbox": str(root / "inbox"), "outbox": str(root / "outbox"), "done": str(root / "done"),
            "failed": str(root / "failed"), "work": str(root / "inbox" / ".upscaled-work"),
            "models": str(root / "models"), "status": str(root / "status.json"),
        },
        "watch": {"settle_seconds": 0.5, "rescan_interval": 2.0, "poll_interval": 0.3},
        "daemon": {"retry_initial": 0.2, "retry_max": 1.0, "shutdown_timeout": 30.0, "status_interval": 0.2,
                   "lease_interval": 1.0},
    }
    if os.geteuid() == 0:
        data["daemon"]["allow_root"] = True  # serve refuses root otherwise (a container, a CI box)
    # The truncated PNGs among the inputs are waited for this long (default 30 s) in case they
    # are still being written, then fail as truncated.
    data["watch"]["incomplete_wait"] = 2.0
    for k in ("inbox", "outbox", "done", "failed"):
        Path(data["paths"][k]).mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def resolve_model(name: str, root: Path) -> str:
    if name != "tiny":
        return name  # a bundled model's name, or a checkpoint path
    from model.checkpoint import save_checkpoint
    from model.generator import Generator, GeneratorConfig

    path = root / "tiny.safetensors"
    save_checkpoint(path, Generator(GeneratorConfig(scale=SCALE, channels=8, blocks=1)).eval())
    return str(path)


def status_of(root: Path) -> dict:
    try:
        return json.loads((root / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


@dataclass
class Sample:
    files: int
    elapsed: float
    rss_mb: float
    hwm_mb: float
    fds: int
    threads: int
    watches: int  # inotify watches held (lines "inotify wd:" in /proc/PID/fdinfo of its inotify fds)
    folders: int  # folders under the inbox (the work folder's included): each is watched once
    fd_targets: list[str] = field(default_factory=list)
    thread_names: collections.Counter = field(default_factory=collections.Counter)


def folder_count(top: Path) -> int:
    return 1 + sum(len(dirs) for _, dirs, _ in os.walk(top))


def sample(pid: int, files: int, elapsed: float, inbox: Path) -> Sample:
    st = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        st[k] = v.strip()
    fd_dir = Path(f"/proc/{pid}/fd")
    targets = []
    watches = 0
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:
            targets.append("?")
            continue
        if targets[-1] == "anon_inode:inotify":
            try:
                info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            watches += sum(1 for line in info.splitlines() if line.startswith("inotify wd:"))
    names = collections.Counter()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            names[Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()] += 1
        except OSError:
            pass
    kb = lambda key: int(st.get(key, "0 kB").split()[0])  # noqa: E731
    return Sample(files, elapsed, kb("VmRSS") / 1024, kb("VmHWM") / 1024, len(targets), int(st["Threads"]),
                  watches, folder_count(inbox), sorted(targets), names)


def cpu_line() -> str:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k == "model name" and model == "unknown":
                model = v.strip()
            elif k == "flags" and not flags:
                flags = set(v.split())
    except OSError:
        pass
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx2") if f in flags]
    return f"CPU: {model} ({os.cpu_count()} cores visible); ISA: {', '.join(isa) or 'none of amx_bf16/avx512_bf16/avx2'}"


# ---------------------------------------------------------------------------------------------
# The run


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path):
        self.args = args
        self.root = root
        self.inbox, self.outbox = root / "inbox", root / "outbox"
        self.done_dir, self.failed_dir = root / "done", root / "failed"
        self.work = self.inbox / ".upscaled-work"
        self.staging = root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.log = root / "daemon.log"
        self.items = plan(args.files, args.bad_every)
        self.problems: list[str] = []
        self.samples: list[Sample] = []
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0

    # -- helpers --------------------------------------------------------------------------

    def finished(self, item: Item) -> bool:
        if item.kind == "ignored":
            return True
        if item.kind == "bad":
            return (self.failed_dir / (item.rel + ".error.json")).exists() and (self.failed_dir / item.rel).exists()
        return (self.outbox / item.rel).exists() and (self.done_dir / item.rel).exists()

    def where(self, item: Item) -> str:
        rel = item.rel
        places = [("inbox", self.inbox / rel), ("outbox", self.outbox / rel), ("done", self.done_dir / rel),
                  ("failed", self.failed_dir / rel)]
        found = [name for name, p in places if p.exists()]
        if self.work.is_dir():
            found += [f"work:{p.relative_to(self.work)}" for p in self.work.glob(f"*/files/{rel}")]
        return ", ".join(found) or "nowhere"

    def daemon_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {self.proc.returncode}:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def wait_idle(self, expected_done: int, expected_failed: int, timeout: float = 30.0) -> None:
        """Until status.json shows every file accounted for and nothing queued or in flight."""
        deadline = time.monotonic() + timeout
        while True:
            st = status_of(self.root)
            if (st.get("processed") == expected_done and st.get("failed") == expected_failed
                    and st.get("queued") == 0 and st.get("in_flight") == 0):
                return
            if time.monotonic() > deadline:
                self.problems.append(
                    f"status not idle {timeout:.0f} s after the last file finished: processed {st.get('processed')} "
                    f"(expected {expected_done}), failed {st.get('failed')} (expected {expected_failed}), "
                    f"queued {st.get('queued')}, in flight {st.get('in_flight')}")
                return
            self.daemon_alive()
            time.sleep(0.1)

    # -- phases ---------------------------------------------------------------------------

    def start(self) -> None:
        model = resolve_model(self.args.model, self.root)
        config = write_config(self.root, model, self.args.threads)
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "upscaled", "serve", "--config", str(config)],
                                     cwd=ROOT, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.args.start_timeout
        while status_of(self.root).get("state") != "running":
            self.daemon_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon was not running after {self.args.start_timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        st = status_of(self.root)
        print(f"daemon pid {self.proc.pid}: model {st.get('model_version')} on {st.get('device')}, "
              f"inference.threads {self.args.threads}", flush=True)

    def run(self) -> None:
        items, args = self.items, self.args
        n = len(items)
        points = sorted({p for p in [FIRST_SAMPLE, *range(SAMPLE_EVERY, n, SAMPLE_EVERY), n] if p <= n})
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=n, unit="file", desc="soak", file=sys.stderr)
        pending: dict[int, Item] = {}
        dropped = completed = 0
        last_progress = time.monotonic()
        self.t0 = time.monotonic()
        for point in points:
            while completed < point:
                # Drop the next wave when the previous one is half done (never past the sample point).
                if dropped < point and len(pending) <= args.batch // 2:
                    wave = min(args.batch, point - dropped)
                    for i in range(dropped, dropped + wave):
                        drop(items[i], payload(items[i], i + 1, args.seed), self.inbox, self.staging)
                        pending[i] = items[i]
                    dropped += wave
                for i in [i for i, it in pending.items() if self.finished(it)]:
                    del pending[i]
                    completed += 1
                    last_progress = time.monotonic()
                    if bar:
                        bar.update(1)
                if completed >= point:
                    break
                if time.monotonic() - last_progress > args.stall_timeout:
                    stuck = list(pending.values())
                    self.problems.append(f"STUCK: {len(stuck)} file(s) made no progress for {args.stall_timeout:.0f} s")
                    for it in stuck[:20]:
                        self.problems.append(f"  {it.rel} ({it.kind}, {it.way}): {self.where(it)}")
                    if bar:
                        bar.close()
                    return
                self.daemon_alive()
                time.sleep(0.05)
            done_so_far = sum(1 for it in items[:point] if it.kind == "image")
            failed_so_far = sum(1 for it in items[:point] if it.kind == "bad")
            self.wait_idle(done_so_far, failed_so_far)
            s = sample(self.proc.pid, point, time.monotonic() - self.t0, self.inbox)
            self.samples.append(s)
            if bar:
                bar.write(f"{s.files} files: RSS {s.rss_mb:.1f} MB, {s.fds} fds, {s.threads} threads")
        if bar:
            bar.close()

    def check_folders(self) -> None:
        images = [it for it in self.items if it.kind == "image"]
        bad = [it for it in self.items if it.kind == "bad"]
        ignored = [it for it in self.items if it.kind == "ignored"]

        def files(folder: Path, hidden: bool = False) -> list[str]:
            out = []
            for p in folder.rglob("*"):
                rel = p.relative_to(folder)
                if p.is_file() and (hidden or not any(part.startswith(".") for part in rel.parts)):
                    out.append(rel.as_posix())
            return sorted(out)

        outputs = set(files(self.outbox, hidden=True))
        temp_outputs = sorted(o for o in outputs if Path(o).name.startswith("."))
        outputs -= set(temp_outputs)
        done = set(files(self.done_dir, hidden=True))
        failed_all = set(files(self.failed_dir, hidden=True))
        failed = {f for f in failed_all if not f.endswith(".error.json")}
        inbox_left = {f for f in files(self.inbox, hidden=True) if not f.startswith(".upscaled-work/")}
        ignored_left = inbox_left & {it.rel for it in ignored}
        n_in = len(self.items)
        print(f"\ninputs {n_in} = outputs {len(outputs)} + failed {len(failed)} + ignored {len(ignored_left)}"
              f" ({'ok' if n_in == len(outputs) + len(failed) + len(ignored_left) else 'MISMATCH'});"
              f" originals in done/ {len(done)}")
        if n_in != len(outputs) + len(failed) + len(ignored_left):
            self.problems.append(f"inputs {n_in} != outputs {len(outputs)} + failed {len(failed)} + ignored {len(ignored_left)}")
        want_out = {it.rel for it in images}
        if outputs != want_out:
            self.problems.append(f"outputs differ from the images dropped: missing {sorted(want_out - outputs)[:10]}, "
                                 f"unexpected {sorted(outputs - want_out)[:10]}")
        if done != want_out:
            self.problems.append(f"done/ differs from the images dropped: missing {sorted(want_out - done)[:10]}, "
                                 f"unexpected {sorted(done - want_out)[:10]}")
        want_failed = {it.rel for it in bad}
        if failed != want_failed:
            self.problems.append(f"failed/ differs from the bad inputs: missing {sorted(want_failed - failed)[:10]}, "
                                 f"unexpected {sorted(failed - want_failed)[:10]}")
        missing_json = [f for f in failed if f + ".error.json" not in failed_all]
        if missing_json:
            self.problems.append(f"failed file(s) without NAME.error.json: {missing_json[:10]}")
        if ignored_left != {it.rel for it in ignored}:
            self.problems.append(f"ignored files not left alone: {sorted({it.rel for it in ignored} - ignored_left)[:10]}")
        others = sorted(inbox_left - ignored_left)
        if others:
            self.problems.append(f"{len(others)} file(s) left in the inbox: {others[:10]}")
        if temp_outputs:
            self.problems.append(f"{len(temp_outputs)} temp file(s) left in the outbox: {temp_outputs[:10]}")
        claims = [p.relative_to(self.work).as_posix() for p in self.work.glob("*/files/**/*") if p.is_file()] \
            if self.work.is_dir() else []
        if claims:
            self.problems.append(f"{len(claims)} claimed file(s) left in the work folder: {claims[:10]}")
        # Every output decodes, at 4x its input's size.
        _, wrong = check_outputs(self.outbox, images)
        if wrong:
            self.problems.append(f"{len(wrong)} bad output(s): {wrong[:10]}")
        else:
            print(f"all {len(outputs)} outputs decode at {SCALE}x their input's size")

    def stop(self) -> None:
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.problems.append("the daemon did not exit within 60 s of SIGTERM; killed")
            self.proc.kill()
            rc = self.proc.wait()
        owners = [p.name for p in self.work.iterdir() if p.is_dir() and p.name != "written"] if self.work.is_dir() else []  # written/: shared markers
        state = status_of(self.root).get("state")
        print(f"SIGTERM: exit code {rc} after {time.monotonic() - t:.1f} s; status {state}; "
              f"owner folders left in the work folder: {len(owners)}")
        if rc != 0:
            self.problems.append(f"the daemon exited with {rc} on SIGTERM")
        if owners:
            self.problems.append(f"owner folder(s) left in the work folder after the stop: {owners}")
        if state != "stopped":
            self.problems.append(f"status.json says {state!r} after the stop, not 'stopped'")

    def report(self) -> None:
        a = self.args
        print()
        print(cpu_line())
        print(f"{'files done':>10} {'elapsed s':>10} {'RSS MB':>8} {'peak MB':>8} {'fds':>5} {'threads':>8}"
              f" {'watches':>8} {'folders':>8}")
        for s in self.samples:
            print(f"{s.files:>10} {s.elapsed:>10.1f} {s.rss_mb:>8.1f} {s.hwm_mb:>8.1f} {s.fds:>5} {s.threads:>8}"
                  f" {s.watches:>8} {s.folders:>8}")
        if len(self.samples) < 2:
            self.problems.append("fewer than two samples: no growth to measure")
            return
        first, last = self.samples[0], self.samples[-1]
        rss_margin = max(first.rss_mb * a.rss_margin_pct / 100, a.rss_margin_mb)
        d_rss, d_fds, d_thr = last.rss_mb - first.rss_mb, last.fds - first.fds, last.threads - first.threads
        n = last.files - first.files
        rate = n / (last.elapsed - first.elapsed) if last.elapsed > first.elapsed else 0.0
        print(f"\ngrowth from {first.files} to {last.files} files ({rate:.1f} files/s over that span):")
        rows = [("RSS", f"{d_rss:+.1f} MB ({100 * d_rss / first.rss_mb:+.1f} %, {1024 * d_rss / max(n, 1):+.1f} kB/file)",
                 f"+{rss_margin:.1f} MB", d_rss <= rss_margin),
                ("open fds", f"{d_fds:+d}", f"+{a.fd_margin}", d_fds <= a.fd_margin),
                ("threads", f"{d_thr:+d}", f"+{a.thread_margin}", d_thr <= a.thread_margin)]
        if first.watches or last.watches:
            # Watches beyond one per inbox folder: the inbox gains folders during the run (the
            # inputs' subfolders), so it is the excess that must not grow.
            d_w = (last.watches - last.folders) - (first.watches - first.folders)
            rows.append(("watches", f"{d_w:+d} beyond one per inbox folder", f"+{a.watch_margin}", d_w <= a.watch_margin))
        for name, got, margin, ok in rows:
            print(f"  {name:<9} {got:<40} margin {margin:<10} {'ok' if ok else 'EXCEEDED'}")
            if not ok:
                self.problems.append(f"{name} grew {got}, over the margin {margin}")
        if d_fds > a.fd_margin:
            new = collections.Counter(last.fd_targets) - collections.Counter(first.fd_targets)
            if new:
                self.problems.append(f"new fds: {dict(new.most_common(10))}")
        if d_thr > a.thread_margin and last.thread_names - first.thread_names:
            self.problems.append(f"new threads: {dict(last.thread_names - first.thread_names)}")

    def log_summary(self) -> None:
        if not self.log.exists():
            return
        lines = self.log.read_text(errors="replace").splitlines()
        levels = collections.Counter()
        notable = []
        py_warnings = [ln for ln in lines if "Warning: " in ln or ln.startswith("Traceback")]
        for line in lines:
            for level in ("ERROR", "WARNING", "CRITICAL"):
                if f"| {level}" in line or f" {level} " in line:
                    levels[level] += 1
                    bad_name = any(tag in line for tag in ("broken-", "notes-"))
                    if not (level == "ERROR" and bad_name and "failed " in line):
                        notable.append(line)
                    break
        print(f"daemon log: {len(lines)} lines, " + (", ".join(f"{v} {k}" for k, v in sorted(levels.items())) or "no warnings or errors")
              + f" ({sum(1 for it in self.items if it.kind == 'bad')} errors expected, one per bad input)")
        for line in notable[:15]:
            print(f"  {line[:300]}")
        if py_warnings:
            # Printed by Python's warnings module or an uncaught exception, not by the daemon's logger.
            print(f"  {len(py_warnings)} Python warning/traceback line(s) on stderr, e.g.:")
            for line in sorted(set(py_warnings), key=py_warnings.index)[:3]:
                print(f"    {line[:300]}")
        if notable:
            self.problems.append(f"{len(notable)} unexpected warning/error line(s) in the daemon log")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000, help="inputs to drop (default 2000)")
    p.add_argument("--batch", type=int, default=50, help="files dropped per wave (default 50)")
    p.add_argument("--model", default="fidelity",
                   help="fidelity | gan (bundled), tiny (a random 8-channel, 1-block generator), or a checkpoint path")
    p.add_argument("--threads", type=int, default=1, help="inference.threads (default 1; 0 = all cores)")
    p.add_argument("--bad-every", type=int, default=125, help="one input in this many is undecodable (0 = none)")
    p.add_argument("--seed", type=int, default=0, help="varies the inputs' pixels")
    p.add_argument("--stall-timeout", type=float, default=120.0, help="seconds without a finished file = stuck")
    p.add_argument("--start-timeout", type=float, default=180.0)
    p.add_argument("--rss-margin-pct", type=float, default=10.0)
    p.add_argument("--rss-margin-mb", type=float, default=30.0)
    p.add_argument("--fd-margin", type=int, default=5)
    p.add_argument("--thread-margin", type=int, default=2)
    p.add_argument("--watch-margin", type=int, default=5)
    p.add_argument("--keep", action="store_true", help="keep the data folder and the daemon's log")
    args = p.parse_args()
    if args.files < FIRST_SAMPLE + 1:
        p.error(f"--files must be above {FIRST_SAMPLE}")

    root = Path(tempfile.mkdtemp(prefix="upscaled-soak-"))
    soak = Soak(args, root)
    n_img = sum(1 for it in soak.items if it.kind == "image")
    n_bad = sum(1 for it in soak.items if it.kind == "bad")
    print(f"soak: {args.files} inputs ({n_img} images, {n_bad} undecodable, {args.files - n_img - n_bad} ignored), "
          f"waves of {args.batch}, model {args.model}; data folder {root}", flush=True)
    t_start = time.monotonic()
    try:
        soak.start()
        soak.run()
        if not any(pr.startswith("STUCK") for pr in soak.problems):
            soak.check_folders()
        soak.report()
    except Exception as e:  # noqa: BLE001 - still stop the daemon and report
        soak.problems.append(f"{type(e).__name__}: {e}")
    finally:
        if soak.proc is not None and soak.proc.poll() is None:
            soak.stop()
        soak.log_summary()
    print(f"\ntotal {time.monotonic() - t_start:.0f} s")
    if soak.problems:
        print(f"\nFAILED ({len(soak.problems)}):")
        for pr in soak.problems:
            print(f"  - {pr}")
    else:
        print("\nPASSED")
    if args.keep or soak.problems:
        print(f"data folder and daemon log kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if soak.problems else 0


if __name__ == "__main__":
    sys.exit(main())
