"""Write files for others to read: temp name in the same folder, flush, fsync, rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Literal

NAME_MAX = 255  # bytes in one file name on every Linux file system we write to

Conflict = Literal["replace", "suffix", "skip"]


def _umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux shows it here.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clip_name(name: str, limit: int = NAME_MAX) -> str:
    """`name` cut to at most `limit` bytes, never inside a character. Names are bytes: one that
    is not UTF-8 (held as os.fsdecode gives it) is cut as its bytes."""
    cut = os.fsdecode(os.fsencode(name)[:limit])
    n = 0  # the cut can only have split the last character, which then decodes differently
    while n < len(cut) and n < len(name) and cut[n] == name[n]:
        n += 1
    return cut[:n]


def numbered(path: Path, n: int) -> Path:
    """`name.ext`, `name-1.ext`, `name-2.ext`, ...; the stem is shortened if the name would not fit."""
    if n == 0:
        return path
    tail = f"-{n}{path.suffix}"
    return path.with_name(clip_name(path.stem, NAME_MAX - len(tail.encode())) + tail)


def sidecar(path: Path, suffix: str) -> Path:
    """`path` + `suffix` (e.g. NAME.error.json), the name shortened if it would not fit."""
    return path.with_name(clip_name(path.name, NAME_MAX - len(suffix.encode())) + suffix)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except (OSError, AttributeError):  # not glibc >= 2.28
    _renameat2 = None


def rename_noreplace(src: str | os.PathLike, dst: str | os.PathLike, *, src_dir_fd: int | None = None,
                     dst_dir_fd: int | None = None) -> None:
    """Rename `src` to `dst`, raising FileExistsError instead of replacing an existing `dst`;
    a name with a `*_dir_fd` is relative to that open folder (see `open_folder`).

    Atomic (renameat2 RENAME_NOREPLACE) where the file system supports it; elsewhere (NFS, SMB)
    an existence check followed by rename, which only races with another writer of the same name.
    """
    if _renameat2 is not None:
        r = _renameat2(_AT_FDCWD if src_dir_fd is None else src_dir_fd, os.fsencode(src),
                       _AT_FDCWD if dst_dir_fd is None else dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE)
        if r == 0:
            return
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(e, os.strerror(e), os.fsdecode(src), None, os.fsdecode(dst))
    try:
        os.lstat(dst, dir_fd=dst_dir_fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
    else:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))


_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_folder(root: str | os.PathLike, parts: list[str] | tuple[str, ...], create: bool = False) -> int:
    """An open descriptor of the folder `root`/`parts[0]`/`parts[1]`..., every part opened with
    O_NOFOLLOW relative to the one before it (`create`: made where missing). A part that is a
    symbolic link raises OSError (ELOOP or ENOTDIR), and so does one swapped for a link at any
    moment: the descriptor names the folder that was opened, whatever happens to its name later.
    `root` itself (configured by the admin) is followed. The caller closes the descriptor."""
    fd = os.open(root, _FOLDER)
    try:
        for part in parts:
            if part in ("", ".", "..") or "/" in part:
                raise OSError(errno.EINVAL, "not a plain folder name", part)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
            nfd = os.open(part, _FOLDER | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def folder_of(root: str | os.PathLike, rel: str, create: bool = False) -> Iterator[tuple[int, str]]:
    """(descriptor of the folder that holds `root`/`rel`, opened as `open_folder` does; the last
    part of `rel`), for *at() calls that never pass through a link under `root`."""
    *parts, name = rel.split("/")
    if name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "not a plain file name", rel)
    fd = open_folder(root, parts, create)
    try:
        yield fd, name
    finally:
        os.close(fd)


def lstat_under(root: str | os.PathLike, rel: str) -> os.stat_result:
    """os.lstat of `root`/`rel` without following a link anywhere under `root` (OSError if one is)."""
    with folder_of(root, rel) as (fd, name):
        return os.lstat(name, dir_fd=fd)


def publish_as(tmp: str | os.PathLike, path: Path, conflict: Conflict = "replace") -> Path:
    """Rename the finished `tmp` to `path`; returns the name it got.

    replace: over whatever is there; suffix: the first free one of name, name-1, name-2...;
    skip: raise FileExistsError when `path` exists (the caller decides what that means).
    """
    if conflict == "replace":
        os.replace(tmp, path)
        return path
    for n in range(100000 if conflict == "suffix" else 1):
        cand = numbered(path, n)
        try:
            rename_noreplace(tmp, cand)
            return cand
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "already exists", str(path))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", conflict: Conflict = "replace") -> Iterator[IO]:
    """Yield a file opened on a temp name beside `path`; on success it is renamed to `path`
    (see `publish_as` for `conflict`) and `f.published` holds the name it got.

    On any exception the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    # The temp name starts with a dot and ends in .tmp so that watchers (ours included) skip it;
    # the original name in it is shortened so that the temp name fits wherever `path` does.
    tmp = path.with_name(f".{clip_name(path.name, NAME_MAX - 18)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        os.fchmod(fd, _FILE_MODE)  # what open() would have given; 0600 would hide outputs from others
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        f.published = publish_as(tmp, path, conflict)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))

