"""Finding finished files in the inbox: watchdog events as hints, scans as the truth.

The watchdog handler runs on the observer thread and only enqueues `(Hint, path)`; the service's
loop feeds the hints to a `Settler`, which decides when a file is ready:

- MOVED_IN: ready now; CLOSED (inotify IN_CLOSE_WRITE): ready once nothing has touched it for
  `closed_grace` (a writer that reopens the file for each chunk closes it many times) — and
  never while some process still has it open (we count IN_OPEN / IN_CLOSE events per file);
- CHANGED (created, modified, any polling event) or SCANNED: ready once its size and mtime have
  not changed for `settle_seconds` and nobody has it open.

A file that changes after it was found ready goes back to waiting, and so does one whose image
data visibly ends early (`image_complete`) while its last change is recent: a writer that reopens
the file for each chunk, slower than `closed_grace`, is not finished.
"""

from __future__ import annotations

import math
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

from core.atomic import lstat_under

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", ".DS_Store"})
IGNORED_SUFFIXES = (".part", ".tmp", ".crdownload", "~", ".partial", ".swp")
OPEN_GRACE = 600.0  # seconds without any event after which an "open" count is presumed stale


class Hint(str, Enum):
    CLOSED = "closed"  # closed after writing
    MOVED_IN = "moved_in"
    CHANGED = "changed"  # created or modified: wait until it settles
    OPENED = "opened"
    CLOSED_NOWRITE = "closed_nowrite"
    GONE = "gone"  # deleted or moved away
    SCANNED = "scanned"


def image_complete(path: Path) -> bool:
    """False when the file visibly ends before its image does (cheap: the head and the last bytes).

    PNG ends with IEND, JPEG with EOI, GIF with its trailer; WebP and BMP state their size in the
    header. TIFF has no end marker: every strip and tile its IFDs name must lie within the file
    (`tiff_complete`). Anything else: True (nothing cheap to tell by).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - 16))
            tail = f.read()
    except OSError:
        return True  # the claim and decode report it properly
    if size == 0:
        return False  # created, not yet written
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return tail.endswith(b"IEND\xaeB`\x82")
    if head.startswith(b"\xff\xd8"):
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if head[:4] == b"GIF8":
        return tail.endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 <= size
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return tiff_complete(path, size)
    if head[:2] == b"BM" and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")  # 0 is allowed by the format
        return declared == 0 or declared <= size
    return True


# TIFF tags whose values are the offsets and byte counts of the image data.
_TIFF_DATA = {273: "offsets", 279: "counts", 324: "offsets", 325: "counts"}  # strips; tiles
_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8 (BigTIFF)


def tiff_complete(path: Path, size: int | None = None, max_ifds: int = 64) -> bool:
    """Whether every IFD of a TIFF (classic or BigTIFF) lies within the file, and every strip or
    tile it names (offset + byte count) does too. A writer that appends the data in chunks has
    not finished while any of them reaches past the end. Damaged files count as complete: the
    decoder then says what is wrong with them."""
    import struct

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size if size is None else size
            head = f.read(16)
            e = "<" if head[:2] == b"II" else ">"
            big = struct.unpack(e + "H", head[2:4])[0] == 43
            if big:
                count_fmt, entry, off_fmt, ifd = "Q", 20, "Q", struct.unpack(e + "Q", head[8:16])[0]
            else:
                count_fmt, entry, off_fmt, ifd = "H", 12, "I", struct.unpack(e + "I", head[4:8])[0]
            seen = set()
            while ifd and len(seen) < max_ifds:
                if ifd in seen:
                    return True  # a loop: damaged, not unfinished
                seen.add(ifd)
                n_size = struct.calcsize(count_fmt)
                if ifd + n_size > size:
                    return False
                f.seek(ifd)
                n = struct.unpack(e + count_fmt, f.read(n_size))[0]
                table = f.read(n * entry + struct.calcsize(off_fmt))
                if len(table) < n * entry + struct.calcsize(off_fmt):
                    return False
                data: dict[str, list[int]] = {"offsets": [], "counts": []}
                for i in range(n):
                    tag, typ = struct.unpack(e + "HH", table[i * entry : i * entry + 4])
                    if tag not in _TIFF_DATA or typ not in _TIFF_TYPES:
                        continue
                    inline = 8 if big else 4  # bytes of the count, and of the value or its offset
                    cnt = struct.unpack(e + ("Q" if big else "I"), table[i * entry + 4 : i * entry + 4 + inline])[0]
                    fmt, width = _TIFF_TYPES[typ]
                    if cnt > 1 << 24:
                        return True  # no real image has that many strips: damaged
                    if cnt * width <= inline:
                        raw = table[i * entry + entry - inline : i * entry + entry][: cnt * width]
                    else:
                        at = struct.unpack(e + off_fmt, table[i * entry + entry - inline : i * entry + entry])[0]
                        if at + cnt * width > size:
                            return False
                        here = f.tell()
                        f.seek(at)
                        raw = f.read(cnt * width)
                        f.seek(here)
                    data[_TIFF_DATA[tag]] += struct.unpack(f"{e}{cnt}{fmt}", raw)
                if any(o + c > size for o, c in zip(data["offsets"], data["counts"])):
                    return False
                ifd = struct.unpack(e + off_fmt, table[n * entry :])[0]
    except (OSError, struct.error, ValueError, MemoryError):
        return True
    return True


def ignored_name(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES or name.lower().endswith(IGNORED_SUFFIXES)


class InboxFilter:
    """Which paths under the inbox are ours to process, as inbox-relative POSIX paths."""

    def __init__(self, inbox: Path, own: list[Path]):
        self.inbox = inbox
        self.own = [p for p in own if p.is_relative_to(inbox)]  # our folders inside the inbox

    def is_own(self, path: str | os.PathLike) -> bool:
        """One of our folders inside the inbox (the work folder, ...) or something in one."""
        p = Path(os.fsdecode(path))
        return any(p.is_relative_to(o) for o in self.own)

    def rel(self, path: str | os.PathLike) -> str | None:
        """The inbox-relative path of `path`, or None when it is outside, ignored, or ours."""
        p = Path(os.fsdecode(path))
        if not p.is_relative_to(self.inbox) or p == self.inbox:
            return None
        if self.is_own(p):
            return None
        rel = p.relative_to(self.inbox)
        if any(ignored_name(part) for part in rel.parts):
            return None
        return rel.as_posix()


IGNORED_WHY = "a hidden or temporary name (dot files, .part, .tmp, .crdownload, ~, .swp, Thumbs.db)"


def scan(inbox: Path, filt: InboxFilter, unreadable: dict[str, str] | None = None,
         ignored: dict[str, str] | None = None) -> Iterator[tuple[str, os.stat_result]]:
    """Every candidate regular file under the inbox (symlinks neither followed nor returned).
    Folders that cannot be listed are put in `unreadable`, and what is deliberately passed over
    in `ignored` (inbox-relative path -> reason)."""
    stack = [inbox]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as e:
            if unreadable is not None and folder != inbox:
                unreadable[filt.rel(folder) or str(folder)] = (
                    f"cannot list this folder ({e.strerror or e}); the daemon's user (uid {os.geteuid()}) needs "
                    "read and execute access to it")
            continue
        for e in entries:
            if ignored_name(e.name):
                if ignored is not None and not filt.is_own(e.path):
                    ignored[Path(e.path).relative_to(inbox).as_posix()] = IGNORED_WHY
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if filt.rel(e.path) is not None:
                    stack.append(Path(e.path))
            elif stat.S_ISREG(st.st_mode):
                rel = filt.rel(e.path)
                if rel is not None:
                    yield rel, st
            elif ignored is not None and filt.rel(e.path) is not None:
                ignored[filt.rel(e.path)] = ("a symbolic link (never followed: it could point anywhere)"
                                            if stat.S_ISLNK(st.st_mode) else "not a regular file (a pipe, socket or device)")


class InboxHandler(FileSystemEventHandler):
    """Runs on the observer thread: translates an event into hints and enqueues them, nothing more."""

    def __init__(self, filt: InboxFilter, hints: "queue.SimpleQueue[tuple[Hint, str]]", wake: threading.Event, polling: bool):
        self.filt = filt
        self.hints = hints
        self.wake = wake
        self.polling = polling

    def _put(self, hint: Hint, path: str | bytes) -> None:
        rel = self.filt.rel(path)
        if rel is not None:
            self.hints.put((hint, rel))
            if hint in (Hint.CLOSED, Hint.MOVED_IN):
                self.wake.set()

    def dispatch(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if event.event_type == "moved":
                # A folder moved in: its files produce no events of their own; the scan finds them.
                self.hints.put((Hint.SCANNED, ""))
                self.wake.set()
            return
        if isinstance(event, FileMovedEvent):
            self._put(Hint.GONE, event.src_path)
            self._put(Hint.CHANGED if self.polling else Hint.MOVED_IN, event.dest_path)
        elif isinstance(event, FileClosedEvent):
            self._put(Hint.CLOSED, event.src_path)
        elif isinstance(event, FileClosedNoWriteEvent):
            self._put(Hint.CLOSED_NOWRITE, event.src_path)
        elif isinstance(event, FileOpenedEvent):
            self._put(Hint.OPENED, event.src_path)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            self._put(Hint.CHANGED, event.src_path)
        elif isinstance(event, FileDeletedEvent):
            self._put(Hint.GONE, event.src_path)


def make_observer(mode: str, poll_interval: float, inbox: Path, handler: InboxHandler):
    if mode == "polling":
        from watchdog.observers.polling import PollingObserver

        observer = PollingObserver(timeout=poll_interval)
    else:
        try:
            from watchdog.observers.inotify import InotifyObserver

            # Full events: a file renamed in from outside the inbox (mv, rsync's final rename)
            # arrives as a move, which is complete at once, rather than as a creation that has
            # to wait settle_seconds.
            observer = InotifyObserver(generate_full_events=True)
        except (ImportError, OSError):  # not Linux
            from watchdog.observers import Observer

            observer = Observer()
    observer.schedule(handler, str(inbox), recursive=True)
    return observer


@dataclass
class Candidate:
    size: int
    mtime_ns: int
    stable_since: float  # when size and mtime were last seen to change
    first_seen: float
    closed: bool = False  # a close-after-write or a move-in says it is complete
    opens: int = 0  # writers/readers holding it open, from inotify
    last_event: float = 0.0
    settled: bool = False  # found ready once; not stat'ed again until claimed (or a new hint)


class Settler:
    """Candidates and the rule that makes them ready; driven by the service loop only."""

    def __init__(self, inbox: Path, settle_seconds: float, trust_mtime: bool = False,
                 skip: Callable[[str, os.stat_result], bool] = lambda rel, st: False, closed_grace: float = 0.5,
                 incomplete_wait: float = 30.0):
        self.inbox = inbox
        self.incomplete_wait = incomplete_wait
        self.settle_seconds = settle_seconds
        self.closed_grace = min(closed_grace, settle_seconds)
        self.trust_mtime = trust_mtime  # --once: a file untouched for settle_seconds is ready at once
        self.skip = skip
        self.candidates: dict[str, Candidate] = {}

    def __len__(self) -> int:
        return len(self.candidates)

    def note(self, hint: Hint, rel: str, st: os.stat_result | None = None, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if hint is Hint.GONE:
            self.candidates.pop(rel, None)
            return
        c = self.candidates.get(rel)
        if hint is Hint.OPENED:
            if c is None:
                c = self._add(rel, st, now)
                if c is None:
                    return
            c.opens += 1
            c.last_event = now
            c.settled = False
            return
        if hint in (Hint.CLOSED, Hint.CLOSED_NOWRITE) and c is not None:
            c.opens = max(0, c.opens - 1)
            c.last_event = now
        if hint is Hint.CLOSED_NOWRITE:
            return
        if c is None:
            c = self._add(rel, st, now)
            if c is None:
                return
        c.last_event = now
        c.settled = False
        if hint in (Hint.CLOSED, Hint.MOVED_IN):
            c.closed = True
            self._restat(rel, c, now, keep_closed=True)
            # A rename is complete at once. (Not `now - closed_grace`: in floating point
            # now - (now - 0.2) is below 0.2 for most clock values, which cost a whole loop tick.)
            c.stable_since = -math.inf if hint is Hint.MOVED_IN else now
        elif hint is Hint.CHANGED:
            c.closed = False
            c.stable_since = now

    def _add(self, rel: str, st: os.stat_result | None, now: float) -> Candidate | None:
        if st is None:
            try:
                st = lstat_under(self.inbox, rel)  # never through a folder swapped for a link
            except OSError:
                return None
        if not stat.S_ISREG(st.st_mode):
            return None
        since = now
        if self.trust_mtime and time.time() - st.st_mtime >= self.settle_seconds:
            since = now - self.settle_seconds
        c = Candidate(st.st_size, st.st_mtime_ns, since, now)
        self.candidates[rel] = c
        return c

    def _restat(self, rel: str, c: Candidate, now: float, keep_closed: bool = False) -> os.stat_result | None:
        try:
            st = lstat_under(self.inbox, rel)  # never through a folder swapped for a link
        except OSError:
            self.candidates.pop(rel, None)
            return None
        if not stat.S_ISREG(st.st_mode):
            self.candidates.pop(rel, None)
            return None
        if (st.st_size, st.st_mtime_ns) != (c.size, c.mtime_ns):
            c.size, c.mtime_ns, c.stable_since = st.st_size, st.st_mtime_ns, now
            if not keep_closed:
                c.closed = False
        return st

    def ready(self, now: float | None = None, want: int | None = None) -> list[str]:
        """Candidates that are complete, oldest first; they stay candidates until `take`n.

        Files found ready before are not stat'ed again (the claim checks them); the others are
        only when fewer than `want` are ready, so a deep backlog costs no stat storm.
        """
        now = time.monotonic() if now is None else now
        out = [rel for rel, c in self.candidates.items() if c.settled]
        if want is not None and len(out) >= want:
            out.sort(key=lambda r: self.candidates[r].first_seen)
            return out
        for rel, c in list(self.candidates.items()):
            if c.settled:
                continue
            st = self._restat(rel, c, now)
            if st is None:
                continue
            if c.opens > 0 and now - c.last_event < OPEN_GRACE:
                continue
            if now - c.stable_since >= (self.closed_grace if c.closed else self.settle_seconds):
                if self.skip(rel, st):
                    self.candidates.pop(rel, None)
                    continue
                if time.time() - st.st_mtime < self.incomplete_wait and not image_complete(self.inbox / rel):
                    # Most likely still being written: wait for its next change (or a settle period).
                    c.closed, c.stable_since = False, now
                    continue
                c.settled = True
                out.append(rel)
        out.sort(key=lambda r: self.candidates[r].first_seen)
        return out

    def take(self, rel: str) -> Candidate | None:
        return self.candidates.pop(rel, None)
