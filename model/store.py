"""The models folder: the only thing the trainer and the daemon share besides model/ itself.

Published checkpoints are immutable `<version>.safetensors` files; a small `current` file names
the one to serve and is replaced atomically, so a reader sees either the old or the new name,
never a half-written file. `history` lists the versions `current` has pointed to, oldest first,
for rollback. With nothing published, the checkpoint bundled inside this package is served.

Only what `publish` wrote is served. Anyone who can drop a file into the models folder (a
mistake, or a hostile chain such as issue 23's Retry through a symlinked inbox folder) could
otherwise name any checkpoint in `current` and skip promote's probe and margin gates. So
`publish` records the sha256 of the checkpoint it copied, and `current` and each line of
`records` carry that digest with an HMAC-SHA256 over name and digest, keyed by `.publish-key`: 32
random bytes made on the first publish, mode 0600, owned by the service's user (the daemon, the
page and the trainer all run as that user; no unit is given a group or other access to it).
The daemon serves a published model only when the HMAC checks with that key and the bytes it
loads hash to the recorded digest (`verified_current`, and `load_checkpoint(sha256=...)`, which
hashes the very bytes it parses, so a file swapped after the check is caught). A keyed HMAC
rather than a bare digest: whoever can write `current` can also write a digest, but cannot
compute an HMAC without reading the key, which no file drop or rename can do. The key is
checked to be ours (owner, no group or other bits) before it is trusted, so a key put there by
another user of a group-writable folder is refused rather than used.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_open, atomic_write_text
from model.checkpoint import BUNDLED_DEFAULT, CheckpointInfo, load_checkpoint, read_info
from core.errors import CheckpointError, Untrusted

CURRENT = "current"
HISTORY = "history"
RECORDS = "records"  # what publish recorded: a signed line per published version kept
KEY = ".publish-key"
SUFFIX = ".safetensors"
_DOMAIN = b"upscaled published checkpoint v1\0"  # what the HMAC is for, so it signs nothing else


@dataclass(frozen=True)
class Record:
    """One published checkpoint as `publish` recorded it: a line of `current` or `records`."""

    name: str
    sha256: str | None = None  # None: a line without a record (an older upscaled, or not ours)
    mac: str | None = None

    def line(self) -> str:
        return f"{self.name} sha256:{self.sha256} hmac-sha256:{self.mac}"

    @classmethod
    def parse(cls, line: str) -> "Record":
        name, *rest = line.split()
        fields = dict(f.split(":", 1) for f in rest if ":" in f)
        return cls(name, fields.get("sha256"), fields.get("hmac-sha256"))


def _mac(key: bytes, name: str, sha256: str) -> str:
    return hmac.new(key, _DOMAIN + name.encode("utf-8", "surrogateescape") + b"\0" + sha256.encode(),
                    hashlib.sha256).hexdigest()


def _key(models_dir: Path, create: bool = False) -> bytes:
    """The publishing key; made (0600) when `create` and there is none. Raises Untrusted when it
    is missing, unreadable, or not this user's alone."""
    path = models_dir / KEY
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if not create:
            raise Untrusted(f"{path}: no publishing key, so nothing in {models_dir} was published by this "
                            "installation's promote; publish with `upscaled models promote`") from None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another publisher made it first: use theirs
            return _key(models_dir)
        try:
            if os.geteuid() == 0:  # root publishing for the service: the folder's owner must read it
                os.fchown(fd, models_dir.stat().st_uid, -1)
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return _key(models_dir)
    except OSError as e:
        raise Untrusted(f"{path}: cannot read the publishing key ({e.strerror or e}"
                        f"{'; a symbolic link is never followed' if e.errno == errno.ELOOP else ''})") from None
    try:
        st = os.fstat(fd)
        data = os.read(fd, 4096).strip()
    finally:
        os.close(fd)
    owners = {os.geteuid()} | ({models_dir.stat().st_uid} if os.geteuid() == 0 else set())
    if st.st_uid not in owners or st.st_mode & 0o077:
        raise Untrusted(f"{path}: the publishing key must belong to this user (uid {os.geteuid()}) and be readable "
                        f"by it alone (it is uid {st.st_uid}, mode {st.st_mode & 0o777:o}); not trusted")
    if len(data) < 32:
        raise Untrusted(f"{path}: the publishing key is too short to be one")
    return data


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_current(models_dir: Path) -> Record | None:
    pointer = models_dir / CURRENT
    try:
        text = pointer.read_text(errors="surrogateescape").strip()
    except FileNotFoundError:
        return None
    rec = Record.parse(text) if text else Record("")
    if not rec.name or "/" in rec.name or rec.name.startswith(".") or "\n" in text:
        raise ValueError(f"{pointer}: does not name a checkpoint file in {models_dir} (content {text[:200]!r})")
    return rec


def current_checkpoint(models_dir: str | os.PathLike) -> Path | None:
    """The published checkpoint the `current` pointer names, or None when nothing is published.
    For listings only: what is served is `verified_current`'s."""
    rec = _read_current(Path(models_dir))
    return None if rec is None else Path(models_dir) / rec.name


def _check(models_dir: Path, rec: Record, what: str) -> None:
    if rec.sha256 is None or rec.mac is None:
        raise Untrusted(f"{what} names {rec.name} without a publishing record (written by hand, by something other "
                        f"than promote, or by an upscaled from before records were kept); serve it again with "
                        f"`upscaled models promote {Path(rec.name).stem}`")
    if not hmac.compare_digest(_mac(_key(models_dir), rec.name, rec.sha256), rec.mac):
        raise Untrusted(f"{what} names {rec.name} with a record that this installation's promote did not sign; "
                        "not served")


def verified_current(models_dir: str | os.PathLike) -> tuple[Path, str] | None:
    """(checkpoint, its recorded sha256) that `current` names, once its record checks with the
    publishing key; None when nothing is published. Raises Untrusted (or ValueError for a
    malformed pointer). The caller loads the file with `load_checkpoint(sha256=...)`."""
    models_dir = Path(models_dir)
    rec = _read_current(models_dir)
    if rec is None:
        return None
    _check(models_dir, rec, f"{models_dir / CURRENT}")
    return models_dir / rec.name, rec.sha256


def select_checkpoint(explicit: str | os.PathLike | None, models_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """Which checkpoint to serve and why: an explicit path, the published one (its record checked,
    and the file's digest; raises Untrusted otherwise), or the bundled default."""
    if explicit:
        return Path(explicit), "configured"
    if models_dir is not None:
        published = verified_current(models_dir)
        if published is not None:
            path, digest = published
            try:
                actual = sha256_of(path)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
            if actual != digest:
                raise Untrusted(f"{path}: changed since it was published (sha256 {actual[:12]}…, recorded "
                                f"{digest[:12]}…); not served")
            return path, "published"
    return BUNDLED_DEFAULT, "bundled"


def records(models_dir: str | os.PathLike) -> dict[str, Record]:
    """What publish recorded, by file name (the `records` file; a line per kept version)."""
    try:
        text = (Path(models_dir) / RECORDS).read_text(errors="surrogateescape")
    except FileNotFoundError:
        return {}
    return {r.name: r for r in map(Record.parse, text.splitlines()) if r.name}


def history(models_dir: str | os.PathLike) -> list[str]:
    try:
        return [line for line in (Path(models_dir) / HISTORY).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _trusted(models_dir: Path, name: str) -> Record | None:
    """The record publish wrote for `name`, if it checks and the file still hashes to it."""
    rec = records(models_dir).get(name)
    if rec is None:
        return None
    try:
        _check(models_dir, rec, RECORDS)
        return rec if sha256_of(models_dir / name) == rec.sha256 else None
    except (CheckpointError, OSError):
        return None


def _point(models_dir: Path, rec: Record, past: list[str]) -> None:
    atomic_write_text(models_dir / HISTORY, "\n".join(past[-100:]) + "\n")
    atomic_write_text(models_dir / CURRENT, rec.line() + "\n")


def set_current(models_dir: str | os.PathLike, name: str) -> None:
    """Point `current` (atomically) at a version `publish` wrote, and remember it in `history`.
    Raises Untrusted when its record does not check or the file changed since."""
    models_dir = Path(models_dir)
    if not (models_dir / name).is_file():
        raise FileNotFoundError(f"{models_dir / name}: no such published checkpoint")
    rec = _trusted(models_dir, name)
    if rec is None:
        raise Untrusted(f"{models_dir / name} has no valid publishing record (it was not published by promote, or "
                        f"it changed since); serve it with `upscaled models promote {Path(name).stem}`, which "
                        "checks it first")
    _point(models_dir, rec, [n for n in history(models_dir) if n != name] + [name])


def step_back(models_dir: str | os.PathLike) -> str | None:
    """Drop the current version from the history and point `current` at the one before it that
    is still kept (and still matches its record); None (nothing changed) when there is none: the
    bundled default comes next."""
    models_dir = Path(models_dir)
    past = history(models_dir)
    cur = current_checkpoint(models_dir)
    if cur is not None and past and past[-1] == cur.name:
        past = past[:-1]
    kept = [(n, r) for n in past if (r := _trusted(models_dir, n)) is not None]
    if not kept:
        return None
    _point(models_dir, kept[-1][1], [n for n, _ in kept])
    return kept[-1][0]


def clear_current(models_dir: str | os.PathLike) -> None:
    """Serve the bundled default: no `current` pointer, an empty history."""
    models_dir = Path(models_dir)
    for name in (CURRENT, HISTORY):
        (models_dir / name).unlink(missing_ok=True)


def published(models_dir: str | os.PathLike) -> list[tuple[Path, CheckpointInfo]]:
    """Readable published checkpoints, oldest first (unreadable files are skipped)."""
    out = []
    for p in Path(models_dir).glob(f"*{SUFFIX}"):
        if p.name.startswith("."):
            continue
        try:
            out.append((p, read_info(p)))
        except Exception:  # a damaged file in the folder must not hide the others
            continue
    return sorted(out, key=lambda pi: (pi[1].created, pi[0].name))


def _write_records(models_dir: Path, recs: dict[str, Record]) -> None:
    atomic_write_text(models_dir / RECORDS, "".join(r.line() + "\n" for r in recs.values()))


def prune(models_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` most recently published versions; the current one is always kept.
    Imported models are never deleted: each was an operator's explicit choice (delete the file)."""
    models_dir = Path(models_dir)
    cur = current_checkpoint(models_dir)
    rank = {name: i for i, name in enumerate(history(models_dir))}
    versions = sorted([pi for pi in published(models_dir) if not pi[1].imported], key=lambda pi: rank.get(pi[0].name, -1))  # stable: by creation otherwise
    doomed = [p for p, _ in versions[: max(0, len(versions) - keep)] if cur is None or p.name != cur.name]
    for p in doomed:
        p.unlink(missing_ok=True)
    recs = records(models_dir)
    if any(p.name in recs for p in doomed):
        _write_records(models_dir, {n: r for n, r in recs.items() if (models_dir / n).is_file()})
    return doomed


def publish(models_dir: str | os.PathLike, checkpoint: str | os.PathLike, keep: int = 5) -> Path:
    """Verify `checkpoint`, copy it into the models folder as an immutable version, record its
    sha256 (signed, see the module's notes) and make it current.

    Raises CheckpointError (nothing changes) if the file is not a valid checkpoint.
    """
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    digest = sha256_of(checkpoint)
    _, info = load_checkpoint(checkpoint, sha256=digest)
    target = models_dir / f"{info.version}{SUFFIX}"
    if target.is_symlink() or not target.is_file() or sha256_of(target) != digest:
        # Not there, or a file of that name that is not this checkpoint (dropped there by someone
        # else): our copy replaces it, and must be the bytes just verified.
        h = hashlib.sha256()
        with open(checkpoint, "rb") as src, atomic_open(target, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
            if h.hexdigest() != digest:
                raise CheckpointError(f"{checkpoint}: changed while it was being published; nothing changed")
    rec = Record(target.name, digest, _mac(_key(models_dir, create=True), target.name, digest))
    _write_records(models_dir, {**records(models_dir), rec.name: rec})
    _point(models_dir, rec, [n for n in history(models_dir) if n != rec.name] + [rec.name])
    prune(models_dir, keep)
    return target
