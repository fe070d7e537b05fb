"""Claims: which daemon owns which inbox file.

A daemon claims `inbox/<rel>` by renaming it to `work/<owner>/files/<rel>`. A rename is atomic
on one file system, so of several daemons (on one machine, or several sharing the folder) exactly
one wins; the others get ENOENT and move on.

`work/<owner>/lease.json` names the owner (host, pid, process start time) and its mtime is
touched every `lease_interval` seconds. An owner folder is dead when its process is gone (same
host: no such pid, or the pid now belongs to another process) or when its lease is older than
`STALE_LEASES` intervals (any host; the age is measured against our own freshly touched lease,
so the file server's clock is the only clock involved). A dead owner folder is recovered by
renaming it *into* our own folder (`work/<ours>/adopted/<dead>`; again only one daemon wins),
then renaming each file back into the inbox, where the normal scan finds it.

Nothing under the inbox is trusted to stay what it was: whoever may write there can swap a
folder for a symbolic link at any moment. Every rename into or out of the inbox opens the
folders on the way one at a time with O_NOFOLLOW and renames relative to the last one
(model.atomic.folder_of), so a link anywhere under the inbox is never passed through, however
the swap is timed.

An input being decoded, upscaled or encoded has a marker in `work/<owner>/running/`. When a
dead owner is recovered, each of its markers adds one to that input's count in `work/deaths/`
(keyed by path, size and mtime); an input whose count reaches POISON (it was running when the
daemon died twice in a row: killed for memory, a crash in a decoder) goes to failed/ as poison
at its next claim instead of killing the daemon again. A finished input's count is removed.

With `daemon.originals: keep`, processed originals are renamed back into the inbox and recorded
in `work/kept.jsonl` (relative path, size, mtime): a file matching an entry is not processed
again; a changed file (new size or mtime) is.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import stat
import time
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from core.atomic import NAME_MAX, atomic_write_text, clip_name, folder_of, fsync_dir, numbered, rename_noreplace, sidecar
from core.names import fits, shown

LEASE = "lease.json"
FILES = "files"
ADOPTED = "adopted"
KEPT_LEDGER = "kept.jsonl"
WRITTEN = "written"  # work/written/: outputs already durable for inputs not yet moved to done/
RUNNING = "running"  # work/<owner>/running/: inputs being decoded, upscaled or encoded right now
DEATHS = "deaths"  # work/deaths/: inputs that were running when their daemon died, and how often
POISON = 2  # an input running when its daemon died this many times in a row goes to failed/
STALE_LEASES = 6  # a lease this many intervals old belongs to a dead (or hopelessly stuck) owner

# ---------------------------------------------------------------------------------------------
# Moves that never overwrite


def _copy_noreplace(src: Path, dst: Path) -> None:
    """Cross-file-system move: copy to a temp name beside `dst`, fsync, rename without replacing."""
    tmp = dst.with_name(f".{clip_name(dst.name, NAME_MAX - 14)}.{secrets.token_hex(4)}.tmp")
    try:
        with open(src, "rb") as fi, open(tmp, "xb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())
        shutil.copystat(src, tmp)
        rename_noreplace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    os.unlink(src)


def place(src: Path, dst: Path) -> Path:
    """Move `src` to `dst`, or to `name-1.ext`, `name-2.ext`... if taken; returns where it went."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for n in range(100000):
        cand = numbered(dst, n)
        try:
            try:
                rename_noreplace(src, cand)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                _copy_noreplace(src, cand)
        except FileExistsError:
            continue
        fsync_dir(cand.parent)
        return cand
    raise FileExistsError(errno.EEXIST, "no free name", str(dst))


class NameTooLong(OSError):
    """An inbox path that is too long to be claimed (its path in the work folder would not fit)."""


# ---------------------------------------------------------------------------------------------
# Processes


def proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie has exited; only its exit status is left
        return "zombie"
    return fields[19]


def pid_alive(pid: int, start: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = proc_start(pid)
    if now == "zombie":
        return False
    return start is None or now is None or now == start


# ---------------------------------------------------------------------------------------------
# Claims


class Claims:
    """This daemon's owner folder: claiming, releasing, heartbeats, and recovering dead owners."""

    def __init__(self, inbox: Path, work: Path, lease_interval: float = 10.0):
        self.inbox = inbox
        self.work = work
        self.lease_interval = lease_interval
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = f"{self.host}-{self.pid}-{secrets.token_hex(3)}"
        self.folder = work / self.name
        self.files = self.folder / FILES
        self.lease = self.folder / LEASE
        self._last_beat = 0.0
        self._kept: set[tuple[str, int, int]] = set()
        self._kept_size = -1

    # -- life cycle ----------------------------------------------------------------------------

    def open(self, again: bool = False) -> None:
        """Create the owner folder and its lease. Raises OSError when the folders are unusable.
        `again`: after the inbox was recreated (a remounted share), make what is missing."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        if os.stat(self.inbox).st_dev != os.stat(self.work).st_dev:
            raise OSError(errno.EXDEV, "paths.work must be on the inbox's file system (claims are renames)", str(self.work))
        self.files.mkdir(parents=True, exist_ok=again)
        lease = {
            "host": self.host, "pid": self.pid, "proc_start": proc_start(self.pid),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "lease_interval": self.lease_interval,
        }
        atomic_write_text(self.lease, json.dumps(lease))
        self._last_beat = time.monotonic()

    def close(self) -> None:
        """Remove the owner folder if nothing is left in it (claims left behind are recovered later)."""
        leftovers = [p for p in self.folder.rglob("*") if not p.is_dir() and p.parent != self.folder]
        if leftovers:
            logger.warning("{} claimed file(s) left in {}; they will be recovered on the next start", len(leftovers), self.folder)
            return
        shutil.rmtree(self.folder, ignore_errors=True)

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_beat >= self.lease_interval:
            try:
                os.utime(self.lease)
            except FileNotFoundError:  # someone removed our folder: take it back
                if not self.inbox.is_dir():
                    return  # the inbox itself is gone (an unmounted share): never create it under the mount point
                logger.error("lease {} vanished; recreating it", self.lease)
                self.files.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.lease, json.dumps({"host": self.host, "pid": self.pid,
                                                          "proc_start": proc_start(self.pid),
                                                          "lease_interval": self.lease_interval}))
            self._last_beat = now

    # -- claiming ------------------------------------------------------------------------------

    # -- outputs written before a crash -----------------------------------------------------------
    # A daemon that dies after publishing an output but before moving the original leaves the
    # original to be processed again (by whoever recovers it, after any number of further
    # crashes). A marker in work/written/, shared by all daemons and keyed by the input's path,
    # is written before the output's temp file is renamed into place and names that file's inode:
    # an output with that inode is this very input's own (same size and mtime), so it is
    # replaced rather than joined by name-1.ext. Removed once the original is moved (DONE).

    def _marker(self, rel: str) -> Path:
        return self.work / WRITTEN / (hashlib.sha1(os.fsencode(rel)).hexdigest() + ".json")

    def mark_written(self, rel: str, wanted: Path, output: os.stat_result, source: os.stat_result) -> None:
        m = self._marker(rel)
        m.parent.mkdir(exist_ok=True)
        # The temp file lives in our own owner folder, not in the shared written/: a daemon killed
        # while writing it leaves it where recovery removes it along with the rest of the folder.
        tmp = self.folder / f".written-{secrets.token_hex(6)}.tmp"
        data = json.dumps({"file": rel, "wanted": str(wanted), "ino": output.st_ino, "dev": output.st_dev,
                           "size": source.st_size, "mtime_ns": source.st_mtime_ns}).encode()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, m)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(m.parent)

    def written_output(self, rel: str, source: os.stat_result) -> Path | None:
        """The output this very input (same size and mtime) had already published, if any."""
        try:
            e = json.loads(self._marker(rel).read_text())
        except (OSError, ValueError):
            return None
        if (e.get("file"), e.get("size"), e.get("mtime_ns")) != (rel, source.st_size, source.st_mtime_ns):
            return None
        for n in range(1000):  # wanted, wanted-1, ...: suffix may have given it any free name
            cand = numbered(Path(e["wanted"]), n)
            try:
                st = os.lstat(cand)
            except FileNotFoundError:
                return None
            if (st.st_ino, st.st_dev) == (e.get("ino"), e.get("dev")):
                return cand
        return None

    # -- inputs running when their daemon died ------------------------------------------------------

    @staticmethod
    def _key(rel: str) -> str:
        return hashlib.sha1(os.fsencode(rel)).hexdigest() + ".json"

    def running(self, rel: str, source: os.stat_result) -> None:
        """`rel` is about to be decoded: a marker its death would leave behind. Not fsynced: a
        process that dies leaves the page cache behind, and that is the death that counts."""
        d = self.folder / RUNNING
        d.mkdir(exist_ok=True)
        (d / self._key(rel)).write_text(json.dumps({"file": rel, "size": source.st_size, "mtime_ns": source.st_mtime_ns}))

    def not_running(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / RUNNING / self._key(rel)).unlink()

    def deaths(self, rel: str, source: os.stat_result) -> int:
        """How many times in a row a daemon died while this very input (same size and mtime) ran."""
        try:
            e = json.loads((self.work / DEATHS / self._key(rel)).read_text())
        except (OSError, ValueError):
            return 0
        same = (e.get("file"), e.get("size"), e.get("mtime_ns")) == (rel, source.st_size, source.st_mtime_ns)
        return int(e.get("deaths", 0)) if same else 0

    def clear_deaths(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.work / DEATHS / self._key(rel)).unlink()
            with contextlib.suppress(OSError):
                (self.work / DEATHS).rmdir()  # only when empty

    def _count_deaths(self, owner: Path) -> None:
        """The inputs a dead owner was running: one more death each."""
        folder = owner / RUNNING
        if not folder.is_dir():
            return
        (self.work / DEATHS).mkdir(exist_ok=True)
        for m in folder.iterdir():
            try:
                e = json.loads(m.read_text())
                rel, size, mtime_ns = e["file"], e["size"], e["mtime_ns"]
            except (OSError, ValueError, KeyError, TypeError):
                rel = None
            if isinstance(rel, str):
                n = 0
                record = self.work / DEATHS / m.name
                try:
                    old = json.loads(record.read_text())
                    if (old.get("file"), old.get("size"), old.get("mtime_ns")) == (rel, size, mtime_ns):
                        n = int(old.get("deaths", 0))
                except (OSError, ValueError, TypeError):
                    pass
                atomic_write_text(record, json.dumps({"file": rel, "size": size, "mtime_ns": mtime_ns, "deaths": n + 1}))
                logger.warning("{} was being processed when daemon {} died ({} time(s) in a row{})", shown(rel), owner.name,
                               n + 1, "; it goes to failed/ as poison" if n + 1 >= POISON else "")
            with contextlib.suppress(OSError):
                m.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()

    def clear_written(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._marker(rel).unlink()

    def claimed_path(self, rel: str) -> Path:
        return self.files / rel

    def claim(self, rel: str) -> Path | None:
        """Take `inbox/<rel>`; None when it is gone (another daemon won), not a regular file, under
        a folder that is a symbolic link now, or a file of the same name is still ours. Raises
        NameTooLong when its path in the work folder would be too long for system calls."""
        dst = self.files / rel
        if not fits(dst):
            raise NameTooLong(errno.ENAMETOOLONG, "too long for the work folder", rel)
        try:
            return self._out_of_inbox(rel, dst)
        except FileExistsError:
            return None

    def _out_of_inbox(self, rel: str, dst: Path) -> Path | None:
        """Rename `inbox/<rel>` to `dst` (never replacing it) without passing through a link;
        None when it is gone, not a regular file, or under a link."""
        try:
            with folder_of(self.inbox, rel) as (fd, name):
                st = os.lstat(name, dir_fd=fd)
                if not stat.S_ISREG(st.st_mode):
                    return None
                dst.parent.mkdir(parents=True, exist_ok=True)
                rename_noreplace(name, dst, src_dir_fd=fd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                logger.warning("not taking {}: a folder on its way is a symbolic link now (never followed)", shown(rel))
                return None
            raise
        if not stat.S_ISREG(os.lstat(dst).st_mode):  # swapped for something else in between
            self.release(rel)
            return None
        return dst

    def take_failed(self, rel: str, failed: Path) -> Path | None:
        """Move `inbox/<rel>` straight to `failed` (a path for it there) without claiming it: for
        an input whose path the work folder cannot hold. The path in failed/ is shortened to the
        file's own name when the full one would not fit either. None when it is gone."""
        dst = failed / rel if fits(sidecar(failed / rel, ".error.json")) else failed / rel.rsplit("/", 1)[-1]
        for n in range(1000):
            try:
                return self._out_of_inbox(rel, numbered(dst, n))
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free name", str(dst))

    def release(self, rel: str) -> bool:
        """Give a claimed file back to the inbox; False if a new file of that name is there now,
        or a folder on its way is a symbolic link (then it stays claimed, and is recovered on the
        next start)."""
        src = self.files / rel
        self.not_running(rel)
        try:
            self._into_inbox(src, rel)
        except FileExistsError:
            logger.warning("cannot give {} back: a new {} is in the inbox; left in {}", shown(rel), shown(rel), self.folder)
            return False
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            logger.warning("cannot give {} back: a folder on its way is a symbolic link (never followed); left in {}",
                           shown(rel), self.folder)
            return False
        self._prune(src.parent, self.files)
        return True

    def _into_inbox(self, src: Path, rel: str) -> None:
        """Rename `src` to `inbox/<rel>` (never replacing), making the folders on the way without
        passing through a link (OSError ELOOP/ENOTDIR if one is)."""
        with folder_of(self.inbox, rel, create=True) as (fd, name):
            rename_noreplace(src, name, dst_dir_fd=fd)

    def forget(self, claimed: Path) -> None:
        """The claimed file has gone (done/, failed/ or deleted): tidy empty folders."""
        self._prune(claimed.parent, self.files)

    @staticmethod
    def _prune(folder: Path, stop: Path) -> None:
        while folder != stop and folder.is_relative_to(stop):
            try:
                folder.rmdir()
            except OSError:
                return
            folder = folder.parent

    # -- originals: keep ----------------------------------------------------------------------

    def _load_kept(self) -> None:
        ledger = self.work / KEPT_LEDGER
        try:
            size = ledger.stat().st_size
        except FileNotFoundError:
            return
        if size == self._kept_size:
            return
        kept = set()
        for line in ledger.read_text(errors="replace").splitlines():
            try:
                e = json.loads(line)
                kept.add((e["file"], int(e["size"]), int(e["mtime_ns"])))
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash
        self._kept, self._kept_size = kept, size

    def is_kept(self, rel: str, st: os.stat_result) -> bool:
        self._load_kept()
        return (rel, st.st_size, st.st_mtime_ns) in self._kept

    def keep(self, rel: str) -> bool:
        """Record the claimed original in the ledger, then put it back in the inbox."""
        st = os.stat(self.files / rel)
        line = json.dumps({"file": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}) + "\n"
        fd = os.open(self.work / KEPT_LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._kept.add((rel, st.st_size, st.st_mtime_ns))
        return self.release(rel)

    # -- recovery ------------------------------------------------------------------------------

    def _fs_now(self) -> float:
        """"Now" on the clock of the file server that holds the work folder."""
        self.heartbeat(force=True)
        return os.stat(self.lease).st_mtime

    def is_dead(self, folder: Path, fs_now: float) -> bool:
        try:
            info = json.loads((folder / LEASE).read_text())
            mtime = (folder / LEASE).stat().st_mtime
        except FileNotFoundError:
            info = {}
            try:
                mtime = folder.stat().st_mtime
            except FileNotFoundError:
                return False  # gone already
        except (ValueError, OSError):
            info, mtime = {}, folder.stat().st_mtime
        if info.get("host") == self.host and isinstance(info.get("pid"), int):
            if not pid_alive(info["pid"], info.get("proc_start")):
                return True
        interval = float(info.get("lease_interval") or self.lease_interval)
        return fs_now - mtime > STALE_LEASES * max(interval, self.lease_interval)

    def recover(self) -> list[str]:
        """Give back the claims of dead owners; returns the relative paths put back in the inbox."""
        try:
            owners = [p for p in self.work.iterdir()
                      if p.is_dir() and p.name not in (self.name, WRITTEN, DEATHS) and not p.is_symlink()]
        except FileNotFoundError:
            return []
        back: list[str] = []
        # Markers are staged in owner folders since 0.3; a temp file in written/ itself is a
        # leftover of an older daemon killed mid-write, never one being written now.
        for tmp in (self.work / WRITTEN).glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        fs_now = self._fs_now() if owners else 0.0
        for owner in owners:
            if not self.is_dead(owner, fs_now):
                continue
            target = self.folder / ADOPTED / owner.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(owner, target)
            except (FileNotFoundError, OSError) as e:
                if isinstance(e, FileNotFoundError) or e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another daemon is recovering it
                raise
            logger.warning("recovering claims of dead daemon {}", owner.name)
        adopted = self.folder / ADOPTED
        if adopted.is_dir():
            for dead in list(adopted.iterdir()):
                back += self._give_back(dead)
        if back:
            logger.warning("gave {} file(s) claimed by dead daemons back to the inbox", len(back))
        self._sweep_written()
        with contextlib.suppress(OSError):
            (self.work / DEATHS).rmdir()  # only when empty: no input has a death on record
        return back

    def _sweep_written(self) -> None:
        """Remove markers whose input is nowhere any more: a daemon killed after moving the original
        to done/ but before removing the marker leaves one behind, which must not outlive it (a
        later file of that name, size and mtime would otherwise replace this output)."""
        for m in [*(self.work / WRITTEN).glob("*.json"), *(self.work / DEATHS).glob("*.json")]:
            try:
                rel = json.loads(m.read_text())["file"]
            except (OSError, ValueError, KeyError, TypeError):
                rel = None
            if isinstance(rel, str) and self._pending(rel):
                continue
            with contextlib.suppress(OSError):
                m.unlink()
                logger.debug("removed the marker of {}, which is done", rel)

    def _pending(self, rel: str) -> bool:
        """`rel` is still in the inbox, or claimed by some daemon (alive, or dead and adopted)."""
        if os.path.lexists(self.inbox / rel):
            return True
        pattern = glob.escape(rel)
        return any(True for _ in self.work.glob(f"*/{FILES}/{pattern}")) or \
            any(True for _ in self.work.glob(f"*/{ADOPTED}/**/{FILES}/{pattern}"))

    def _give_back(self, owner: Path) -> list[str]:
        back: list[str] = []
        self._count_deaths(owner)
        files = owner / FILES
        left = False

        if files.is_dir():
            for p in sorted(files.rglob("*")):
                if p.is_dir() or p.is_symlink():
                    continue
                rel = p.relative_to(files).as_posix()
                try:
                    self._into_inbox(p, rel)
                    back.append(rel)
                except FileExistsError:
                    left = True
                    logger.warning("cannot give {} back: a new file of that name is in the inbox; trying later", shown(rel))
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    left = True
                    logger.warning("cannot give {} back: a folder on its way is a symbolic link (never followed); "
                                   "trying later", shown(rel))
        sub = owner / ADOPTED
        if sub.is_dir():
            for dead in list(sub.iterdir()):
                back += self._give_back(dead)
        if not left and not any(p.is_file() and p.parent != owner for p in owner.rglob("*")):
            shutil.rmtree(owner, ignore_errors=True)
        return back
