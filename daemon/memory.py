"""Will an image fit? Its peak memory, estimated from the file's header before any pixel is
decoded, against the daemon's memory budget.

A 12000x12000 PNG can be 0.4 MB on disk; upscaled 4x it is 2.3 gigapixels, gigabytes of output
pixels. Decoding it anyway under a memory limit gets the daemon killed, and a service manager's
restarts then take the same image again: a crash loop. The budget is the cgroup's memory limit
(a systemd unit's MemoryMax=, a container's limit) when there is one, `daemon.memory_budget_mb`
when set (the lower of the two when both), else the machine's RAM. What the daemon holds once
its model is loaded (its resident set then) is not available to images.

The estimate (bytes), for W x H in, s the larger of the model's scale and the output's:
  decode:  W·H·11 (8-bit: file bytes aside, Pillow's 4-byte pixels, a copy, the RGB array), 32 for 16-bit
  output:  W·H·s²·4 (the engine's RGBX buffer; 6 for 16-bit RGB), plus a gray plane, plus an
           alpha plane and the array colour and alpha are joined into, plus Pillow's own copy
           for formats Pillow encodes from a copy (all but the fast PNG writer, and JPEG/WebP
           from the RGBX buffer)
  resize:  the resized output, when output.scale/long_side differ from the model's scale
  tiles:   the engine's working set for one batch of tiles (Upscaler.working_set)
The input stays in memory while the output is made, so the peak is the larger of decode and
input + output + resize, plus the tiles.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from imaging.images import Header

GIB = 1 << 30
UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a number near 2**63


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where it came from, for the failure reason


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        v = int(text)
    except ValueError:
        return None
    return v if 0 < v < UNLIMITED else None


def cgroup_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The lowest memory limit of our cgroup and its parents (v2 memory.max, v1
    memory.limit_in_bytes), or None when there is none."""
    found: list[int] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            _, controllers, path = line.split(":", 2)
        except ValueError:
            continue
        if controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        folder = base / path.lstrip("/")
        if not folder.is_dir():
            folder = base  # a namespaced view: the mount's root is our cgroup
        while True:
            v = _read_int(folder / name)
            if v is not None:
                found.append(v)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(found) if found else None


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 4 * GIB


def resident() -> int:
    """This process's resident set size, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def budget(configured_mb: int, limit: int | None = None) -> Budget:
    """`daemon.memory_budget_mb` (0 = auto) and the cgroup's limit (read when not given)."""
    limit = cgroup_limit() if limit is None else limit
    if configured_mb and (limit is None or configured_mb << 20 <= limit):
        return Budget(configured_mb << 20, "daemon.memory_budget_mb")
    if limit is not None:
        return Budget(limit, "the cgroup's memory limit (MemoryMax=, memory.max)")
    return Budget(physical_memory(), "the machine's memory; set daemon.memory_budget_mb to lower it")


def peak_bytes(h: Header, model_scale: int, out_scale: float, fmt: str, png_fast: bool, tiles: int) -> int:
    """Estimated peak memory of upscaling an image with this header (see the module's docstring)."""
    px = h.width * h.height
    s = max(float(model_scale), out_scale)
    deep = h.bits > 8
    decode = px * (32 if deep else 11)
    held = px * ((12 if deep else 3) + (4 if deep and h.alpha else 1 if h.alpha else 0))  # the decoded input
    model_px = px * model_scale**2
    per = 6 if deep else 4  # the engine's buffer: RGBX uint8, or RGB uint16
    sample = 2 if deep else 1
    out = model_px * per
    if h.gray:
        out += model_px * sample  # the gray plane made from it
    if h.alpha:  # the upscaled alpha plane, and the array colour and alpha are joined into
        out += model_px * sample + model_px * sample * (2 if h.gray else 4)
    pillow_copies = not (fmt == "PNG" and png_fast) and not (fmt in ("JPEG", "WEBP") and not deep and not h.alpha and not h.gray)
    final_px = px * s * s
    if pillow_copies:
        out += int(final_px * per)
    if s != model_scale:
        out += int(final_px * per)
    return int(max(decode, held + out)) + tiles


def describe(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def out_size(h: Header, scale: float) -> str:
    return f"{math.floor(h.width * scale + 0.5)}x{math.floor(h.height * scale + 0.5)}"
