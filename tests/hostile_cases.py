"""Hostile and unusual inbox files: each built as real bytes on disk, run through a real
`upscaled serve`, and found afterwards in exactly one place: the outbox (original in done/),
failed/ (with NAME.error.json saying why), or still in the inbox, ignored and logged.

`tests/test_hostile.py` asserts where each case ends; `python -m tests.hostile_cases` runs them
the same way and prints the README's table.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tests.daemon_helpers import files_under, make_config, serve, stop, tiny_checkpoint, wait_for

OUTBOX, FAILED, IGNORED = "outbox", "failed", "ignored"
MARKER = "/tmp/upscaled-hostile-pickle-ran"  # the pickle payload would create this


def _img(mode: str = "RGB", size: tuple[int, int] = (24, 16), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(a, "RGBA").convert(mode)


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A 60000 x 60000 PNG header (3.6 gigapixels) with a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def _exif_rotated() -> bytes:
    im = _img(size=(30, 12), seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6
    return _enc(im, "JPEG", exif=exif.tobytes())


def _animated(fmt: str) -> bytes:
    frames = [_img("RGB", seed=i) for i in range(3)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    return _enc(frames[0], fmt, save_all=True, append_images=frames[1:])


def _with_bad_crc() -> bytes:
    data = bytearray(_enc(_img(), "PNG"))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


@dataclass
class Case:
    name: str  # what the case is, for the table
    path: str  # inbox-relative path
    make: Callable[[Path], None]  # writes the thing at the given absolute path
    expect: str  # OUTBOX | FAILED | IGNORED
    outputs: tuple[str, ...] = ()  # for OUTBOX: the outbox names expected (default: path)


def data(b: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    def write(p: Path) -> None:
        p.write_bytes(b() if callable(b) else b)
    return write


def old(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Written an hour ago: no longer being written."""
    def write(p: Path) -> None:
        make(p)
        t = time.time() - 3600
        os.utime(p, (t, t))
    return write


def _symlink(p: Path) -> None:
    target = p.parent.parent / "outside.png"
    target.write_bytes(_enc(_img(), "PNG"))
    os.symlink(target, p)


def _fifo(p: Path) -> None:
    os.mkfifo(p)


LONG = "l" * 246  # + ".png": 250 bytes, the temp name and NAME.error.json would not fit unshortened

CASES = [
    Case("PNG", "plain.png", data(lambda: _enc(_img(), "PNG")), OUTBOX),
    Case("JPEG", "plain.jpg", data(lambda: _enc(_img(), "JPEG")), OUTBOX),
    Case("JPEG, .jpeg extension", "plain2.jpeg", data(lambda: _enc(_img(), "JPEG")), OUTBOX),
    Case("upper-case extension", "SHOUT.JPG", data(lambda: _enc(_img(), "JPEG")), OUTBOX),
    Case("WebP", "plain.webp", data(lambda: _enc(_img(), "WEBP")), OUTBOX),
    Case("TIFF", "plain.tif", data(lambda: _enc(_img(), "TIFF")), OUTBOX),
    Case("BMP", "plain.bmp", data(lambda: _enc(_img(), "BMP")), OUTBOX),
    Case("GIF (becomes PNG)", "still.gif", data(lambda: _enc(_img("P"), "GIF")), OUTBOX, ("still.png",)),
    Case("grayscale PNG", "gray.png", data(lambda: _enc(_img("L"), "PNG")), OUTBOX),
    Case("PNG with alpha", "alpha.png", data(lambda: _enc(_img("RGBA"), "PNG")), OUTBOX),
    Case("16-bit PNG", "deep.png", data(lambda: _enc(Image.fromarray(np.arange(384, dtype=np.uint16).reshape(16, 24) * 170), "PNG")), OUTBOX),
    Case("palette PNG", "palette.png", data(lambda: _enc(_img("P"), "PNG")), OUTBOX),
    Case("CMYK JPEG", "cmyk.jpg", data(lambda: _enc(_img("CMYK"), "JPEG")), OUTBOX),
    Case("EXIF-rotated JPEG", "rotated.jpg", data(_exif_rotated), OUTBOX),
    Case("1x1 pixel", "dot.png", data(lambda: _enc(_img(size=(1, 1)), "PNG")), OUTBOX),
    Case("1x300 strip", "strip.png", data(lambda: _enc(_img(size=(1, 300)), "PNG")), OUTBOX),
    Case("JPEG content named .png", "liar.png", data(lambda: _enc(_img(), "JPEG")), OUTBOX),
    Case("WebP content named .jpg", "liar2.jpg", data(lambda: _enc(_img(), "WEBP")), OUTBOX),
    Case("unicode and spaces in the name", "фото кота 🐱 'x'.png", data(lambda: _enc(_img(), "PNG")), OUTBOX),
    Case("250-byte name", LONG + ".png", data(lambda: _enc(_img(), "PNG")), OUTBOX),
    Case("deep subfolders", "a/b/c/deep.png", data(lambda: _enc(_img(), "PNG")), OUTBOX),
    Case("a folder named like an image", "folder.png/inner.png", data(lambda: _enc(_img(), "PNG")), OUTBOX),
    Case("photo.png and photo.gif (same output name)", "photo.gif", data(lambda: _enc(_img("P", seed=3), "GIF")), OUTBOX,
         ("photo.png", "photo-1.png")),
    Case("(its pair)", "photo.png", data(lambda: _enc(_img(seed=4), "PNG")), OUTBOX, ("photo.png", "photo-1.png")),
    Case("empty file (old)", "empty.png", old(data(b"")), FAILED),
    Case("text named .png", "text.png", data(b"hello, this is not an image\n" * 10), FAILED),
    Case("truncated PNG (old)", "cut.png", old(data(lambda: _enc(_img(size=(64, 64)), "PNG")[:300])), FAILED),
    Case("PNG with a bad CRC", "crc.png", data(_with_bad_crc), FAILED),
    Case("ICO named .png", "icon.png", data(lambda: _enc(_img(size=(32, 32)), "ICO")), FAILED),
    Case("TGA named .png", "targa.png", data(lambda: _enc(_img(), "TGA")), FAILED),
    Case("PPM named .jpg", "netpbm.jpg", data(lambda: _enc(_img(), "PPM")), FAILED),
    Case("EPS named .png (would run Ghostscript)", "post.png",
         data(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"), FAILED),
    Case("PDF named .jpg", "doc.jpg", data(lambda: _enc(_img(), "PDF")), FAILED),
    Case("pickle payload named .png", "model.png", data(lambda: pickle.dumps(_Payload())), FAILED),
    Case("zip named .png", "archive.png", data(b"PK\x03\x04" + b"\0" * 60), FAILED),
    Case("decompression bomb (3.6 GP header)", "bomb.png", data(_bomb), FAILED),
    Case("animated GIF", "anim.gif", data(lambda: _animated("GIF")), FAILED),
    Case("multi-page TIFF", "pages.tif", data(lambda: _animated("TIFF")), FAILED),
    Case("unsupported extension", "notes.txt", data(b"notes\n"), FAILED),
    Case("no extension", "README", data(b"read me\n"), FAILED),
    Case("250-byte name, corrupt", "c" * 246 + ".png", data(b"\x89PNG\r\n\x1a\n garbage"), FAILED),
    Case("hidden file", ".secret.png", data(lambda: _enc(_img(), "PNG")), IGNORED),
    Case("partial download", "big.png.part", data(lambda: _enc(_img(), "PNG")), IGNORED),
    Case("browser download", "dl.crdownload", data(b"x"), IGNORED),
    Case("editor backup", "edit.png~", data(lambda: _enc(_img(), "PNG")), IGNORED),
    Case("Thumbs.db", "Thumbs.db", data(b"\0" * 32), IGNORED),
    Case("symbolic link to a file outside", "link.png", _symlink, IGNORED),
    Case("named pipe", "pipe.png", _fifo, IGNORED),
]


@dataclass
class Ended:
    case: Case
    where: str  # OUTBOX | FAILED | IGNORED | "lost"
    detail: str  # output name, failure reason, or why ignored


def run(root: Path, ckpt: Path, timeout: float = 120.0) -> tuple[list[Ended], str]:
    """Drop every case into a running daemon's inbox; returns where each ended and the log."""
    Path(MARKER).unlink(missing_ok=True)
    cfg, config = make_config(root, ckpt, watch={"incomplete_wait": 2.0})
    inbox = root / "inbox"
    for c in CASES:
        p = inbox / c.path
        p.parent.mkdir(parents=True, exist_ok=True)
        c.make(p)
    log = root / "daemon.log"
    proc = serve(config, log=log)
    processed = [c for c in CASES if c.expect != IGNORED]
    try:
        wait_for(lambda: len(files_under(root / "done")) + len([f for f in files_under(root / "failed")
                                                               if not f.endswith(".error.json")]) >= len(processed),
                 timeout, every=0.2, what="every processable case to end in done/ or failed/")
        wait_for(lambda: all(f"ignored {c.path}" in log.read_text() for c in CASES if c.expect == IGNORED), 10,
                 what="the ignored files to be logged")
    finally:
        code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    text = log.read_text()
    failed = {}
    for f in (root / "failed").rglob("*.error.json"):
        record = json.loads(f.read_text())
        failed[record["file"]] = record["reason"]
    outbox = set(files_under(root / "outbox"))
    done = set(files_under(root / "done"))
    ended = []
    for c in CASES:
        if c.expect == IGNORED and os.path.lexists(inbox / c.path):
            why = next((line.split(f"ignored {c.path}: ", 1)[1] for line in text.splitlines() if f"ignored {c.path}: " in line), "")
            ended.append(Ended(c, IGNORED if why else "not logged", why))
        elif c.path in failed:
            ended.append(Ended(c, FAILED, failed[c.path]))
        elif c.path in done and any(o in outbox for o in (c.outputs or (c.path,))):
            names = [o for o in (c.outputs or (c.path,)) if o in outbox]
            ended.append(Ended(c, OUTBOX, ", ".join(names)))
        else:
            ended.append(Ended(c, "lost", ""))
    return ended, text


def table(ended: list[Ended]) -> str:
    rows = ["| # | input | ended in | reason / output |", "|---|---|---|---|"]
    for i, e in enumerate(ended, 1):
        short = lambda n: n if len(n) < 40 else n[:12] + "…" + n[-8:]  # noqa: E731
        name = short(e.case.path)
        where = {OUTBOX: "outbox (original in done/)", FAILED: "failed/ + .error.json", IGNORED: "left in inbox, logged"}.get(e.where, e.where)
        detail = ", ".join(map(short, e.detail.split(", "))) if e.where == OUTBOX else e.detail
        detail = detail if len(detail) < 120 else detail[:117] + "…"
        rows.append(f"| {i} | {e.case.name}: `{name}` | {where} | {detail.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ended, _ = run(root, tiny_checkpoint(root / "tiny.safetensors"))
        print(table(ended))
