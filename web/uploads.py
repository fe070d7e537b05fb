"""Files dropped on the Make view, streamed into the inbox the way any writer should.

The multipart body is parsed as it arrives (python-multipart's streaming parser: no spooling
to /tmp), each file written to a temp name inside the inbox (`.NAME.<hex>.tmp`: a dot-name
ending .tmp, which the daemon's watcher ignores), the size limit checked while it streams. Once
complete it is fsynced, checked with the decoders the daemon uses (the formats it reads, one
frame, readable), and renamed to its name without replacing anything (`name-1.ext` if taken):
the daemon sees a file moved in and takes it at once, complete.

The form's `scale`, `long_side` and `format` fields ask for another output for this upload's
files: checked as the output.* keys are (400 naming the field), and recorded for each file before
its rename into the inbox (daemon/requests.py), where the daemon finds them when it claims it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from loguru import logger
from PIL import Image
from python_multipart.multipart import MultipartParser, parse_options_header

from core.atomic import NAME_MAX, clip_name, fsync_dir, publish_as
from core.config import ConfigError
from daemon import requests
from imaging.images import READ_FORMATS, is_supported
from core.names import shown
from web.security import Refused

MAX_FILES = 100  # per request
MAX_FIELD = 64  # bytes of a plain form field (scale, long_side, format)
DRAIN_LIMIT = 64 << 20  # after a refusal, the rest of the body is read (and dropped) up to this much


def safe_name(name: str) -> str:
    """The file name a browser sent, as a plain name in the inbox: its last path component, no
    control characters, not hidden, not too long."""
    name = unicodedata.normalize("NFC", name.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    name = "".join(c for c in name if c.isprintable())
    if not name or name in (".", "..") or name.startswith("."):
        raise Refused(400, f"not a usable file name: {name!r}")
    return clip_name(name, NAME_MAX - 40)  # room for the temp name's dot, token and .tmp, and a -N


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    tmp: Path | None = None
    f: Any = None
    size: int = 0
    refused: str | None = None
    value: bytes = b""  # a plain field's value


class InboxUpload:
    """One request's files; `results` says what became of each."""

    def __init__(self, inbox: Path, max_bytes: int, requests_folder: Path | None = None):
        self.inbox = inbox
        self.max_bytes = max_bytes
        self.requests_folder = requests_folder
        self.fields: dict[str, str] = {}
        self.request: dict[str, Any] = {}  # output.* for these files (daemon/requests.py); {}: the configured
        self.parts: list[_Part] = []
        self.current = _Part()
        self._field = b""
        self._value = b""
        self.too_large: str | None = None

    # -- python-multipart callbacks (run inside parser.write) ---------------------------------

    def on_part_begin(self) -> None:
        self.current = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self.current.headers[self._field.lower()] = self._value
        self._field = self._value = b""

    def on_headers_finished(self) -> None:
        p = self.current
        _, opts = parse_options_header(p.headers.get(b"content-disposition", b""))
        p.name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in opts:
            return  # a plain field: its value is kept (on_part_data), the known ones used
        if len(self.parts) >= MAX_FILES:
            raise Refused(413, f"at most {MAX_FILES} files per upload")
        self.parts.append(p)
        raw = opts[b"filename"].decode("utf-8", "replace")
        try:
            p.filename = safe_name(raw)
        except Refused as e:
            p.filename, p.refused = raw, str(e)
            return
        if not is_supported(p.filename):
            p.refused = f"not a supported image type ({Path(p.filename).suffix or 'no extension'})"
            return
        p.tmp = self.inbox / f".{p.filename}.{secrets.token_hex(6)}.tmp"
        fd = os.open(p.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        p.f = os.fdopen(fd, "wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        p = self.current
        if p.f is None:
            if p.filename is None and p.name in requests.FIELDS:
                p.value += data[start:end]
                if len(p.value) > MAX_FIELD:
                    raise Refused(400, f"{p.name}: too long")
            return
        p.size += end - start
        if p.size > self.max_bytes:
            self.too_large = f"{p.filename}: larger than the upload limit ({self.max_bytes // (1 << 20)} MB, web.upload_max_mb)"
            raise Refused(413, self.too_large)
        p.f.write(data[start:end])

    def on_part_end(self) -> None:
        p = self.current
        if p.filename is None and p.name in requests.FIELDS:
            self.fields[p.name] = p.value.decode("utf-8", "replace")
        if p.f is not None:
            p.f.flush()
            os.fsync(p.f.fileno())
            p.f.close()
            p.f = None

    # -- the request ---------------------------------------------------------------------------

    def discard(self) -> None:
        """Remove every temp file (a refused or broken upload leaves nothing in the inbox)."""
        for p in self.parts:
            if p.f is not None:
                with contextlib.suppress(OSError):
                    p.f.close()
            if p.tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p.tmp)

    def finish(self) -> list[dict[str, Any]]:
        """Check each complete file and rename it into place (blocking: run it off the event loop)."""
        results = []
        for p in self.parts:
            if p.refused or p.tmp is None:
                results.append({"name": p.filename, "ok": False, "reason": p.refused or "not received"})
                continue
            problem = check_image(p.tmp)
            if problem:
                os.unlink(p.tmp)
                logger.info("upload {} refused: {}", shown(p.filename), shown(problem))
                results.append({"name": p.filename, "ok": False, "reason": problem})
                continue
            recorded = None
            if self.request and self.requests_folder is not None:  # before the daemon can see the file
                recorded = requests.write(self.requests_folder, p.tmp, self.request, p.filename)
            try:
                dest = publish_as(p.tmp, self.inbox / p.filename, "suffix")
            except BaseException:
                if recorded is not None:
                    recorded.unlink(missing_ok=True)
                raise
            p.tmp = None
            fsync_dir(self.inbox)
            logger.info("upload: {} ({} bytes) dropped into the inbox as {}", shown(p.filename), p.size, shown(dest.name))
            result = {"name": p.filename, "ok": True, "saved_as": dest.name, "bytes": p.size}
            if self.request:
                result["request"] = self.request
            results.append(result)
        return results


def check_image(path: Path) -> str | None:
    """Why the daemon would refuse this file at once, in its own words; None when it would take it."""
    if path.stat().st_size == 0:
        return "the file is empty"
    try:
        with Image.open(path, formats=READ_FORMATS) as im:
            frames = getattr(im, "n_frames", 1)
            fmt = im.format
            im.verify()  # structure and checksums, without decoding every pixel
    except Image.DecompressionBombError as e:
        return f"image is too large to process safely ({e})"
    except Image.UnidentifiedImageError:
        return f"not an image, or not one of the formats upscaled reads ({', '.join(READ_FORMATS)})"
    except (OSError, SyntaxError, ValueError) as e:
        return f"not a readable image ({e})"
    if frames > 1 and fmt in ("GIF", "WEBP", "PNG", "TIFF"):
        return f"{fmt} with {frames} frames: animated/multi-page images are not supported"
    return None


async def receive(headers, body: AsyncIterator[bytes], inbox: Path, max_bytes: int,
                  requests_folder: Path | None = None) -> InboxUpload:
    """Parse a multipart/form-data body as it streams, into temp files in the inbox; the form's
    output fields are checked once it is complete (a bad one: 400, nothing kept)."""
    ctype, opts = parse_options_header(headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise Refused(400, "expected multipart/form-data with files")
    length = headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_FILES * (max_bytes + 65536):
        raise Refused(413, f"the upload is larger than {MAX_FILES} files of the upload limit")
    up = InboxUpload(inbox, max_bytes, requests_folder)
    parser = MultipartParser(opts[b"boundary"], {
        "on_part_begin": up.on_part_begin, "on_part_data": up.on_part_data, "on_part_end": up.on_part_end,
        "on_header_field": up.on_header_field, "on_header_value": up.on_header_value,
        "on_header_end": up.on_header_end, "on_headers_finished": up.on_headers_finished,
    })
    try:
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except Refused:
        up.discard()
        raise
    except Exception as e:  # noqa: BLE001 - a malformed body: nothing is kept
        up.discard()
        raise Refused(400, f"a malformed upload ({type(e).__name__}: {e})") from None
    try:
        up.request = requests.parse(up.fields)
    except ConfigError as e:
        up.discard()
        raise Refused(400, str(e)) from None
    return up
