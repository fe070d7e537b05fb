"""File names as Linux has them (bytes) shown to people: logs, `upscaled status`, the web page.

Names come from anyone who can write to the inbox. Python holds an undecodable byte of a name
as a lone surrogate (os.fsdecode, "surrogateescape"); a name may also hold a newline (which
forges a log line) or ESC/OSC sequences (which reach the admin's terminal). `shown` makes any
such text safe to print, on one line.
"""

from __future__ import annotations

import os
import unicodedata

PATH_MAX = 4096  # bytes in a path given to one system call, terminating NUL included (Linux)

# Control characters (C0, DEL, C1), format characters (bidi overrides, zero-width...), line and
# paragraph separators, and lone surrogates (undecodable bytes).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, as os.fsdecode keeps it
        return f"\\x{o - 0xDC00:02x}"
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def shown(name: str | bytes | os.PathLike | None) -> str:
    """`name` for people: printable characters as they are, every other character (newline,
    ESC, bidi overrides, an undecodable byte...) as a Python-style escape (\\n, \\x1b, \\u202e,
    \\xff). The result is one line of valid UTF-8 text without control characters."""
    if name is None:
        return ""
    text = os.fsdecode(name) if isinstance(name, (bytes, os.PathLike)) else str(name)
    if text.isprintable():  # the common case, fast: no control, format or surrogate character
        return text
    return "".join(_escape(ch) if unicodedata.category(ch) in _ESCAPED_CATEGORIES else ch for ch in text)


def fits(path: str | os.PathLike) -> bool:
    """Whether system calls take `path` whole: under PATH_MAX bytes (our claims, the decoder and
    the encoders use whole paths)."""
    return len(os.fsencode(path)) < PATH_MAX
