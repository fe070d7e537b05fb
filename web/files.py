"""What the daemon's folders hold, for the Files and Compare views, and Retry.

Everything here is read from what the daemon already writes: its history file and the status
file's `recent` list (each input done: where its original went, its output, sizes, stage times
and the model that made it; daemon/history.py), the outbox, done/,
failed/ with each `NAME.error.json`, and the inbox (files waiting). The only write is Retry:
a failed file renamed back into the inbox, where the daemon takes it like any new file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import history
from daemon.status import read as read_status
from daemon.status import reason_class
from core.atomic import NAME_MAX, clip_name, folder_of, numbered, rename_noreplace, sidecar
from core.names import shown
from core.config import Config
from web.security import Refused, clean_relative, resolve_under

ERROR_SUFFIX = ".error.json"
LIST_LIMIT = 200  # rows per list on the page
WALK_LIMIT = 20000  # directory entries looked at per listing, so a huge outbox cannot stall the page
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".webp", ".tif", ".tiff", ".bmp", ".gif")


@dataclass(frozen=True)
class Folders:
    inbox: Path
    outbox: Path
    done: Path
    failed: Path
    work: Path
    models: Path
    runs: Path
    status: Path
    originals: str  # daemon.originals: where a processed input's original is (done/, the inbox, nowhere)

    def labels(self) -> list[tuple[str, str]]:
        """(absolute path, the name the page shows for it), longest first (work is in the inbox)."""
        named = {"inbox": self.inbox, "outbox": self.outbox, "done": self.done, "failed": self.failed,
                 "work": self.work, "models": self.models, "runs": self.runs, "status.json": self.status}
        out = {}
        for label, p in named.items():
            for form in {str(p), os.path.realpath(p)}:
                out[form] = label
        return sorted(out.items(), key=lambda pl: len(pl[0]), reverse=True)

    @classmethod
    def of(cls, cfg: Config) -> "Folders":
        p = cfg.path
        return cls(p("inbox"), p("outbox"), p("done"), p("failed"), p("work"), p("models"), p("runs"), p("status"),
                   cfg.daemon.originals)


_ELSEWHERE = re.compile(r"(?<![\w.~:/-])/(?:[^\s/\"'():,;<>]+/)+(?=[^\s/\"'():,;<>])")


def relative_paths(value: Any, folders: Folders) -> Any:
    """`value` (strings, nested in dicts and lists) with absolute paths taken out, for the page:
    a path under a configured folder named from that folder (/srv/upscaled/inbox/a.png ->
    inbox/a.png), any other one cut to its last part (…/engine.py). Error texts, reasons and
    tracebacks name files by absolute path, which tells a visitor how the host is laid out."""
    if isinstance(value, dict):
        return {k: relative_paths(v, folders) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, folders) for v in value]
    if not isinstance(value, str) or "/" not in value:
        return value
    for prefix, label in folders.labels():
        value = value.replace(prefix + "/", label + "/")
        if value == prefix or value.endswith(prefix):
            value = value[: len(value) - len(prefix)] + label
    return _ELSEWHERE.sub("…/", value)


def status(folders: Folders) -> dict[str, Any] | None:
    return read_status(folders.status)


def _walk(root: Path, skip: Path | None = None, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES):
    """(relative path, stat) of regular files under `root`: hidden names, symlinks and `skip`
    (the work folder inside the inbox) left out, at most WALK_LIMIT entries looked at."""
    seen = 0
    stack = [root]
    while stack and seen < WALK_LIMIT:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for e in entries:
            seen += 1
            if e.name.startswith(".") or (skip is not None and Path(e.path) == skip):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            elif e.is_file(follow_symlinks=False) and (suffixes is None or e.name.lower().endswith(suffixes)):
                yield Path(e.path).relative_to(root).as_posix(), st


def rel_to(root: Path, path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


_dims_cache: dict[tuple[str, int, int], list[int] | None] = {}


def _dims(path: Path) -> list[int] | None:
    """An image's width and height from its header (output.scale may make any size), cached."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _dims_cache:
        from PIL import Image

        from imaging.images import READ_FORMATS

        try:
            with Image.open(path, formats=READ_FORMATS) as im:
                _dims_cache[key] = list(im.size)
        except Exception:  # noqa: BLE001 - not an image we can read: no size shown
            _dims_cache[key] = None
        if len(_dims_cache) > 4096:
            _dims_cache.clear()
    return _dims_cache[key]


def original_of(folders: Folders, input_rel: str | None, output_rel: str) -> str | None:
    """Where the input of an output lies now, relative to done/ (or to the inbox with
    daemon.originals: keep); None when it is not kept. A name taken in done/ made the newcomer
    name-1.ext, so the candidates are tried, newest first."""
    base = folders.inbox if folders.originals == "keep" else folders.done
    if folders.originals == "delete":
        return None
    if input_rel:
        names = [Path(input_rel)]
    else:  # an older output: the same path and stem, any image type
        stem = Path(output_rel).with_suffix("")
        names = [stem.with_suffix(s) for s in IMAGE_SUFFIXES]
    found = []
    for name in names:
        for n in range(10):
            cand = base / numbered(name, n)
            with contextlib.suppress(OSError):
                st = cand.stat()
                if cand.is_file():
                    found.append((st.st_ctime, cand))
    if not found:
        return None
    return max(found)[1].relative_to(base).as_posix()


_history: dict[str, Any] = {"key": None, "records": []}


def records(folders: Folders, st: dict[str, Any] | None) -> list[dict[str, Any]]:
    """What the daemon recorded for each input it finished, newest first: its history file in
    the status file's folder (kept across restarts, daemon/history.py) and the status's recent list."""
    path = history.path_for(folders.status)
    try:
        s = path.stat()
        key = (s.st_ino, s.st_size, s.st_mtime_ns)
    except OSError:
        key = None
    if key != _history["key"]:
        _history.update(key=key, records=history.read(path) if key else [])
    merged: dict[tuple, dict[str, Any]] = {}
    for e in [*_history["records"], *((st or {}).get("recent") or [])]:
        merged.setdefault((e.get("time"), e.get("file"), e.get("output")), e)
    return sorted(merged.values(), key=lambda e: str(e.get("time") or ""), reverse=True)


def record_of(folders: Folders, st: dict[str, Any] | None, out_rel: str) -> dict[str, Any]:
    """The newest record of the input that made outbox/out_rel ({} when none is left)."""
    return next((e for e in records(folders, st) if rel_to(folders.outbox, e.get("output")) == out_rel), {})


def paired_original(folders: Folders, entry: dict[str, Any], out_rel: str) -> tuple[str | None, Path | None]:
    """(shown name, path) of the original that made outbox/out_rel: where the daemon's record
    says it put it (so `p.png` is paired with done/p.png even when a later p.png went to
    done/p-1.png); by name only for an output with no record. (None, None) when not kept."""
    if folders.originals == "delete":
        return None, None
    recorded = entry.get("original")
    if recorded:
        for base in (folders.done, folders.inbox):  # daemon.originals: keep leaves it in the inbox
            rel = rel_to(base, recorded)
            if rel is not None:
                with contextlib.suppress(Refused):
                    return rel, resolve_under(base, rel)
        return None, None  # recorded, but moved away or deleted since: no other file stands in
    rel = original_of(folders, entry.get("file"), out_rel)
    if rel is None:
        return None, None
    with contextlib.suppress(Refused):
        return rel, resolve_under(folders.inbox if folders.originals == "keep" else folders.done, rel)
    return None, None


def done_rows(folders: Folders, st: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The files done, newest first: the status's recent list (with stage times and model), then
    other outputs in the outbox by modification time."""
    rows: list[dict[str, Any]] = []
    listed: set[str] = set()
    for e in records(folders, st):
        out = rel_to(folders.outbox, e.get("output"))
        if out in listed:
            continue  # an output replaced later (output.on_conflict: overwrite): its newest record only
        size = e.get("size") or []
        row = {
            "file": e.get("file"), "state": "done", "time": e.get("time"), "model_version": e.get("model_version"),
            "output": out, "input_bytes": e.get("input_bytes"),
            "output_bytes": _size(folders.outbox / out) if out else None,
            "size_in": size if len(size) == 2 else None,
            "size_out": _dims(folders.outbox / out) if out else None,
            "seconds": e.get("seconds") or {},
        }
        if out:
            listed.add(out)
            row["original"] = paired_original(folders, e, out)[0]
            row["in_outbox"] = row["output_bytes"] is not None
        rows.append(row)
        if len(rows) >= LIST_LIMIT:
            break
    older = sorted(((s.st_mtime, rel, s.st_size) for rel, s in _walk(folders.outbox) if rel not in listed), reverse=True)
    for mtime, rel, nbytes in older[: max(0, LIST_LIMIT - len(rows))]:
        rows.append({"file": None, "state": "done", "time": _iso(mtime), "model_version": None, "output": rel,
                     "input_bytes": None, "output_bytes": nbytes, "size_in": None, "size_out": None, "seconds": {},
                     "original": original_of(folders, None, rel), "in_outbox": True})
    return rows[:LIST_LIMIT]


def failed_rows(folders: Folders) -> list[dict[str, Any]]:
    """Files in failed/, each with what its NAME.error.json says, newest first. A file and its
    record are paired by the name the daemon gives the record (`record_name`: shortened when
    NAME + .error.json would not fit in 255 bytes), never by cutting the suffix off the record's
    name, so a 255-byte name is listed as it is and Retry finds it. A record whose file is gone
    is listed too (not retryable)."""
    found = dict(_walk(folders.failed, suffixes=None))
    pairs: dict[str, str | None] = {}  # record -> its failed file
    for rel in found:
        folder, _, name = rel.rpartition("/")
        rec = f"{folder}/{record_name(name)}" if folder else record_name(name)
        if rec != rel and rec in found:
            pairs[rec] = rel
    files = set(pairs.values())
    for rel in found:
        if rel.endswith(ERROR_SUFFIX) and rel not in pairs and rel not in files:
            pairs[rel] = None
    rows = []
    for rec_rel, file_rel in pairs.items():
        s = found[rec_rel]
        try:
            rec = json.loads((folders.failed / rec_rel).read_text(errors="replace"))
        except (OSError, ValueError):
            rec = {}
        if not isinstance(rec, dict):
            rec = {}
        reason = str(rec.get("reason") or "unknown (unreadable error record)")
        rows.append({"file": file_rel or rec_rel[: -len(ERROR_SUFFIX)], "state": "failed", "reason": reason,
                     "class": reason_class(reason), "stage": rec.get("stage"), "time": rec.get("time") or _iso(s.st_mtime),
                     "model_version": rec.get("model_version"), "exists": file_rel is not None, "_mtime": s.st_mtime})
    rows.sort(key=lambda r: r.pop("_mtime"), reverse=True)
    return rows[:LIST_LIMIT]


def queued_rows(folders: Folders, st: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Files waiting in the inbox (not yet claimed), and those the daemon is retrying."""
    rows = [{"file": r.get("file"), "state": "retrying", "reason": r.get("problem"), "attempts": r.get("attempts"),
             "next_in_s": r.get("next_in_s")} for r in (st or {}).get("retrying") or []]
    waiting = sorted(_walk(folders.inbox, skip=folders.work, suffixes=None), key=lambda rs: rs[1].st_mtime)
    for rel, s in waiting[:LIST_LIMIT]:
        rows.append({"file": rel, "state": "queued", "input_bytes": s.st_size, "time": _iso(s.st_mtime)})
    return rows


def _iso(t: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _move_at(src_fd: int, name: str, dst_fd: int, want: str) -> str:
    """Rename `name` (in the folder open as `src_fd`) to `want` or the first free `want-N.ext` in
    the folder open as `dst_fd`, never replacing anything; returns the name it got. Across file
    systems (or bind mounts under systemd): a copy under a temp name in the destination, fsynced
    and renamed the same way, then the unlink. Only *at() calls: no path is looked up again."""
    for n in range(100000):
        cand = numbered(Path(want), n).name
        try:
            rename_noreplace(name, cand, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            return _copy_at(src_fd, name, dst_fd, want)
        os.fsync(dst_fd)
        return cand
    raise FileExistsError(errno.EEXIST, "no free name", want)


def _copy_at(src_fd: int, name: str, dst_fd: int, want: str) -> str:
    tmp = f".{clip_name(want, NAME_MAX - 18)}.{secrets.token_hex(6)}.tmp"
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_fd)
    try:
        fout = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dst_fd)
        try:
            with open(fin, "rb", closefd=False) as f, open(fout, "wb", closefd=False) as out:
                shutil.copyfileobj(f, out, 1 << 20)
                out.flush()
                os.fsync(fout)
        finally:
            os.close(fout)
        for n in range(100000):
            cand = numbered(Path(want), n).name
            try:
                rename_noreplace(tmp, cand, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
            except FileExistsError:
                continue
            os.fsync(dst_fd)
            os.unlink(name, dir_fd=src_fd)
            return cand
        raise FileExistsError(errno.EEXIST, "no free name", want)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dst_fd)
        raise
    finally:
        os.close(fin)


def record_name(name: str) -> str:
    """The error record's name beside failed file `name`, shortened as the daemon shortens it
    (model.atomic.sidecar): a 255-byte name's record is its first 244 bytes + .error.json."""
    return sidecar(Path(name), ERROR_SUFFIX).name


def _link_refused(e: OSError, where: str) -> Refused:
    if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return Refused(409, f"refused: a folder on the way to {shown(where)} is a symbolic link (or not a folder); "
                            "links are never followed")
    if e.errno == errno.ENOENT:
        return Refused(404, "no such file")
    return Refused(500, f"cannot retry {shown(where)}: {e.strerror or e}")


def retry(folders: Folders, rel: str) -> str:
    """Put failed/REL back into the inbox (same relative path; name-1.ext if taken there) and
    drop its error record; returns its path relative to the inbox. The record is moved aside
    first, so that a new record the daemon writes if the file fails again is never the one removed.

    Every folder on both ways is opened one part at a time with O_NOFOLLOW, from the configured
    failed/ and inbox, and the file is renamed between the two open folders (renameat2): a part
    that is, or is swapped for, a symbolic link fails the open, and a swap after it changes
    nothing, since the descriptors name the folders that were opened. So Retry never writes
    anywhere but under the inbox, and never takes anything but a regular file of failed/."""
    rel = clean_relative(rel)
    if rel.endswith(ERROR_SUFFIX):
        raise Refused(400, "name the failed file, not its error record")
    try:
        with folder_of(folders.failed, rel) as (src_fd, name):
            got = _retry_from(folders, rel, src_fd, name)
    except OSError as e:
        raise _link_refused(e, f"failed/{rel}") from None
    dest = "/".join([*rel.split("/")[:-1], got])
    logger.info("retry: {} moved from {} back into the inbox as {}", shown(rel), folders.failed, shown(dest))
    return dest


def _retry_from(folders: Folders, rel: str, src_fd: int, name: str) -> str:
    try:
        st = os.lstat(name, dir_fd=src_fd)
    except FileNotFoundError:
        raise Refused(404, "no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(404, "no such file")  # a link or a folder: not a file of failed/
    record = record_name(name)
    aside = f".{clip_name(record, NAME_MAX - 18)}.{secrets.token_hex(4)}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.rename(record, aside, src_dir_fd=src_fd, dst_dir_fd=src_fd)
    try:
        try:
            with folder_of(folders.inbox, rel, create=True) as (dst_fd, want):
                got = _move_at(src_fd, name, dst_fd, want)
        except OSError as e:
            raise _link_refused(e, f"inbox/{rel}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.rename(aside, record, src_dir_fd=src_fd, dst_dir_fd=src_fd)
        raise
    with contextlib.suppress(FileNotFoundError):
        os.unlink(aside, dir_fd=src_fd)
    return got


def throughput_history(samples: list[tuple[float, int]], st: dict[str, Any] | None, now: float | None = None,
                       keep: float = 900.0) -> list[tuple[float, int]]:
    """Append (time, processed) from the status to `samples` (the page's throughput chart),
    dropping samples older than `keep` seconds or from before a daemon restart."""
    now = time.time() if now is None else now
    if st and isinstance(st.get("processed"), int):
        if samples and st["processed"] < samples[-1][1]:
            samples.clear()  # the daemon restarted: its counter started over
        if not samples or now - samples[-1][0] >= 5.0 or st["processed"] != samples[-1][1]:
            samples.append((now, st["processed"]))
    while samples and now - samples[0][0] > keep:
        samples.pop(0)
    return samples


# -- downloads and upload progress (the Files and Make views) -------------------------------------

ZIP_LIMIT = 1000  # outputs per zip


def output_file(folders: Folders, rel: str) -> Path:
    """An output to download: a regular file that really lies in the outbox (web.security)."""
    return resolve_under(folders.outbox, rel)


def zip_stream(folders: Folders, rels: list[str]):
    """A zip of these outputs, made as it is sent (nothing spooled): each member under its path
    in the outbox. Images are compressed already, so members are stored, not deflated."""
    import zipfile

    if not rels or len(rels) > ZIP_LIMIT:
        raise Refused(400, f"name 1 to {ZIP_LIMIT} outputs (out=…)")
    paths = [(rel, output_file(folders, rel)) for rel in dict.fromkeys(rels)]  # every name checked first

    class _Sink:  # a write-only stream: zipfile writes, the response takes what is there
        def __init__(self) -> None:
            self.chunks: list[bytes] = []
            self.pos = 0

        def write(self, b) -> int:
            self.chunks.append(bytes(b))
            self.pos += len(b)
            return len(b)

        def tell(self) -> int:
            return self.pos

        def flush(self) -> None:
            pass

        def take(self) -> bytes:
            out, self.chunks = b"".join(self.chunks), []
            return out

    def gen():
        sink = _Sink()
        with zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as zf:  # type: ignore[arg-type]
            for rel, path in paths:
                try:
                    src = open(path, "rb")
                except OSError as e:  # gone since the check: left out, said in the log
                    logger.warning("zip: {} left out ({})", rel, e.strerror or e)
                    continue
                with src, zf.open(zipfile.ZipInfo.from_file(path, rel), "w", force_zip64=True) as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        yield sink.take()
                yield sink.take()
        yield sink.take()

    return gen()


def clean_zip_name(name: str) -> str:
    """A download's file name from the page: letters, digits, - _ . only."""
    return "".join(c if c.isalnum() and c.isascii() or c in "-_." else "-" for c in name)[:80].strip(".") or "upscaled"


def failed_count(folders: Folders) -> int:
    """Files in failed/ now (each with its NAME.error.json), whichever daemon run put them there."""
    return sum(1 for _ in _walk(folders.failed, suffixes=(ERROR_SUFFIX,)))


def progress(folders: Folders, st: dict[str, Any] | None, names: list[str], since: str) -> list[dict[str, Any]]:
    """What became of files dropped into the inbox (as saved there) at or after `since` (ISO):
    queued (still in the inbox), working (the daemon has it), done (with its output) or failed
    (with the reason), from the daemon's own records."""
    recs = records(folders, st)
    out = []
    for name in names[:ZIP_LIMIT]:
        row: dict[str, Any] = {"file": name, "state": "working"}
        done = next((e for e in recs if e.get("file") == name and str(e.get("time") or "") >= since), None)
        err = sidecar(folders.failed / name, ERROR_SUFFIX)
        if done is not None:
            out_rel = rel_to(folders.outbox, done.get("output"))
            row.update(state="done", output=out_rel, in_outbox=bool(out_rel) and (folders.outbox / out_rel).is_file())
        elif err.is_file() and _iso(err.stat().st_mtime) >= since:
            try:
                reason = json.loads(err.read_text()).get("reason")
            except (OSError, ValueError):
                reason = None
            row.update(state="failed", reason=reason or "unknown (unreadable error record)")
        elif (folders.inbox / name).is_file():
            row["state"] = "queued"
        out.append(row)
    return out

