"""The status file: written (atomically) by the daemon, read by `upscaled status`."""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from loguru import logger

from core.atomic import atomic_write_text
from core.config import Config
from daemon.claims import proc_start as _proc_start
from core.names import shown

EXIT_RUNNING = 0
EXIT_NOT_RUNNING = 3  # as `systemctl status` says for an inactive unit
THROUGHPUT_WINDOW = 300.0  # seconds of history behind the throughput figures
IDLE_REFRESH = 15.0  # the file is rewritten at least this often, so readers can tell we are alive
RECENT = 20  # last finished files listed in the status, each with the model version that made it
# Per-stage duration histograms (seconds), cumulative since the daemon started: `upscaled web`
# exposes them as Prometheus histograms. Job.timings key -> stage name ("write" is encode+write).
STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
STAGES = {"decode": "decode", "upscale": "upscale", "write": "encode"}
# Failure reasons in a few classes (a metric label must not be free text): a phrase of the
# reason the worker wrote (imaging/images.py, daemon/worker.py) -> its class; else "other".
REASON_CLASSES = (
    ("not a supported image type", "unsupported_type"),
    ("not an image", "not_an_image"),
    ("the file is empty", "not_an_image"),
    ("not a readable image", "unreadable"),
    ("animated/multi-page", "animated"),
    ("too large to process", "too_large"),
    ("poison:", "poison"),
    ("already exists in the outbox", "output_exists"),
    ("file name is too long", "name_too_long"),
    ("path is too long", "name_too_long"),
    ("permission denied", "permission"),
    ("out of memory", "out_of_memory"),
    ("vanished from the work folder", "vanished"),
    ("cannot encode", "encode"),
    ("internal error", "internal"),
)


def reason_class(reason: str) -> str:
    low = reason.lower()
    return next((cls for phrase, cls in REASON_CLASSES if phrase in low), "other")


class ServiceState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class StatusBoard:
    """Counters the service updates, and the file they are written to."""

    def __init__(self, path: Path, interval: float):
        self.path = path
        self.interval = interval
        self.state = ServiceState.STARTING
        self.started = _now_iso()
        self.model_version = ""
        self.model: dict[str, Any] = {}  # serving model: version, origin, file, loaded_at; refused; loading
        self.recent: collections.deque[dict[str, str]] = collections.deque(maxlen=RECENT)
        self.by_model: dict[str, int] = {}  # files done per model version
        self.device = ""
        self.queued = 0
        self.in_flight = 0
        self.processed = 0
        self.failed = 0
        self.last_error: dict[str, str] | None = None  # the current problem; cleared once it is gone
        self.last_failed: dict[str, str] | None = None  # the last file that went to failed/
        self.retrying: list[dict[str, Any]] = []
        self.blocked: list[dict[str, Any]] = []  # inbox files or folders the daemon cannot take
        self.fatal: dict[str, str] | None = None  # the error that ended the daemon
        self._done: collections.deque[tuple[float, float]] = collections.deque()  # (monotonic, output MP)
        # Cumulative counters for /metrics (upscaled web): they only grow while the daemon runs.
        self.stage_counts = {s: [0] * (len(STAGE_BUCKETS) + 1) for s in STAGES.values()}  # per bucket, +Inf last
        self.stage_sums = {s: 0.0 for s in STAGES.values()}
        self.failed_by_class: dict[str, int] = {}
        self.output_mp = 0.0
        self.swaps = 0  # a new model taken into service
        self.refusals = 0  # candidates refused by verification
        self._shown_model: tuple | None = None
        self._refusal_seen: tuple | None = None
        self._written = 0.0
        self._dirty = True

    def record_done(self, output_mp: float, now: float | None = None, file: str | None = None,
                    model_version: str | None = None, timings: dict[str, float] | None = None,
                    input_bytes: int | None = None, output: str | os.PathLike | None = None,
                    size: tuple[int, int] | None = None, scale: float | None = None,
                    model_scale: int | None = None, original: str | os.PathLike | None = None,
                    request: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Count a finished input; with `file`, also list it (and return that entry, which the
        service also keeps in the history file, daemon/history.py)."""
        self.processed += 1
        entry: dict[str, Any] | None = None
        self.output_mp += output_mp
        if file is not None:
            entry: dict[str, Any] = {"file": file, "model_version": model_version or "", "time": _now_iso()}
            if scale:  # the output's scale relative to the input (output.scale), and the model's own
                entry.update(scale=int(scale) if float(scale).is_integer() else round(scale, 4), model_scale=model_scale)
            if output is not None:  # what the web page lists: size in -> out, per-stage times
                entry.update(output=str(output), input_bytes=input_bytes, size=list(size or ()),
                             seconds={STAGES.get(k, k): round(v, 4) for k, v in (timings or {}).items()})
            if original is not None:  # where the daemon put this input's original: the web pairs by it
                entry["original"] = str(original)
            if request:  # the upload's own output.scale/long_side/format (daemon/requests.py)
                entry["request"] = dict(request)
            self.recent.append(entry)
        for key, seconds in (timings or {}).items():
            stage = STAGES.get(key)
            if stage is not None:
                i = next((i for i, le in enumerate(STAGE_BUCKETS) if seconds <= le), len(STAGE_BUCKETS))
                self.stage_counts[stage][i] += 1
                self.stage_sums[stage] += seconds
        if model_version:
            self.by_model[model_version] = self.by_model.get(model_version, 0) + 1
        self._done.append((time.monotonic() if now is None else now, output_mp))
        self._dirty = True
        return entry

    def record_failed(self, file: str, reason: str) -> None:
        self.failed += 1
        cls = reason_class(reason)
        self.failed_by_class[cls] = self.failed_by_class.get(cls, 0) + 1
        self.last_failed = {"file": file, "reason": reason, "time": _now_iso()}
        self._dirty = True

    def _count_model_events(self, model: dict[str, Any]) -> None:
        """Swaps and refusals, counted from what the model slot shows: the model in use changes
        only when a new one is taken into service, and every refusal carries a new time."""
        shown = (model.get("version"), model.get("file"), model.get("loaded_at"))
        if shown[0] and self._shown_model is not None and shown != self._shown_model:
            self.swaps += 1
        if shown[0]:
            self._shown_model = shown
        r = model.get("refused")
        seen = (r.get("file"), r.get("reason"), r.get("time")) if r else None
        if seen is not None and seen != self._refusal_seen:
            self.refusals += 1
        self._refusal_seen = seen or self._refusal_seen

    def set(self, **values: Any) -> None:
        if isinstance(values.get("model"), dict):
            self._count_model_events(values["model"])
        for k, v in values.items():
            if getattr(self, k) != v:
                setattr(self, k, v)
                self._dirty = True

    def throughput(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        while self._done and now - self._done[0][0] > THROUGHPUT_WINDOW:
            self._done.popleft()
        if not self._done:
            return {"images_per_min": 0.0, "output_mp_per_s": 0.0, "window_s": 0.0}
        span = max(now - self._done[0][0], 1.0)
        mp = sum(m for _, m in self._done)
        return {"images_per_min": round(len(self._done) / span * 60, 2),
                "output_mp_per_s": round(mp / span, 3), "window_s": round(span, 1)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "pid": os.getpid(),
            "proc_start": _proc_start(os.getpid()),
            "host": socket.gethostname(),
            "started": self.started,
            "updated": _now_iso(),
            "model_version": self.model_version,
            "model": self.model,
            "device": self.device,
            "queued": self.queued,
            "in_flight": self.in_flight,
            "processed": self.processed,
            "failed": self.failed,
            "retrying": self.retrying,
            "blocked": self.blocked,
            "last_error": self.last_error,
            "last_failed": self.last_failed,
            "fatal": self.fatal,
            "throughput": self.throughput(),
            "processed_by_model": self.by_model,
            "recent": list(self.recent),
            "heartbeat": round(time.time(), 3),  # unix time of this write: readers compute its age
            "counters": self.counters(),
        }

    def counters(self) -> dict[str, Any]:
        """Cumulative since start, for Prometheus (upscaled web): histogram buckets cumulative
        as Prometheus counts them, the last one (+Inf) equal to the count."""
        stages = {}
        for stage, counts in self.stage_counts.items():
            cumulative = [sum(counts[: i + 1]) for i in range(len(counts))]
            stages[stage] = {"le": list(STAGE_BUCKETS), "cumulative": cumulative, "sum": round(self.stage_sums[stage], 6),
                             "count": cumulative[-1]}
        return {"failed_by_class": dict(self.failed_by_class), "output_megapixels": round(self.output_mp, 6),
                "model_swaps": self.swaps, "model_refusals": self.refusals, "stage_seconds": stages}

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        t = self.throughput()
        s = (f"{self.state.value}: {self.processed} done, {self.failed} failed, {self.queued} queued, "
             f"{self.in_flight} in flight, {t['images_per_min']:.1f} img/min")
        if self.retrying:
            s += f", {len(self.retrying)} retrying ({shown(self.retrying[0]['problem'])})"
        return s

    def write(self, force: bool = False, now: float | None = None) -> bool:
        """Write the file if something changed and `interval` has passed (or `force`)."""
        now = time.monotonic() if now is None else now
        due = now - self._written >= self.interval
        if not (force or (self._dirty and due) or now - self._written >= IDLE_REFRESH):
            return False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.snapshot(), indent=2) + "\n")
        except OSError as e:
            logger.warning("cannot write the status file {}: {}", self.path, e.strerror or e)
            return False
        self._written = now
        self._dirty = False
        return True


# ---------------------------------------------------------------------------------------------
# `upscaled status`


def read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        return {"state": "unknown", "error": f"unreadable status file: {e}"}


def is_running(st: dict[str, Any], stale_after: float) -> bool:
    """Whether the daemon that wrote `st` is alive: its pid (same host), else a fresh file."""
    from daemon.claims import pid_alive

    if st.get("state") == ServiceState.STOPPED.value:
        return False
    if st.get("host") == socket.gethostname() and isinstance(st.get("pid"), int):
        return pid_alive(st["pid"], st.get("proc_start"))
    try:
        updated = datetime.fromisoformat(st["updated"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return False
    return time.time() - updated <= stale_after


def running_status(cfg: Config) -> dict[str, Any] | None:
    """The status of the daemon that runs with this config's status file; None when none runs."""
    st = read(cfg.path("status"))
    if not st or not is_running(st, max(3 * cfg.daemon.status_interval, 4 * IDLE_REFRESH)):
        return None
    return st


def daemon_model(cfg: Config) -> dict[str, Any] | None:
    """What the running daemon reports about its model (its status file): `version` served,
    `refused` (the last candidate it refused, with the reason), `watching`; None when no daemon
    runs. The `current` pointer only says what it should serve."""
    st = running_status(cfg)
    if st is None:
        return None
    return {**(st.get("model") or {}), "version": st.get("model_version")}


def render(st: dict[str, Any]) -> str:
    t = st.get("throughput") or {}
    lines = [
        f"upscaled daemon: {st.get('state')} (pid {st.get('pid')} on {st.get('host')}, since {st.get('started')})",
        f"  model:       {st.get('model_version')} on {st.get('device')}" + _runtime(st.get("model") or {}) + _model_detail(st.get("model") or {}),
        f"  queued:      {st.get('queued')}",
        f"  in flight:   {st.get('in_flight')}",
        f"  processed:   {st.get('processed')}",
        f"  failed:      {st.get('failed')}",
        f"  throughput:  {t.get('images_per_min', 0):.1f} images/min, {t.get('output_mp_per_s', 0):.2f} output MP/s"
        f" (last {t.get('window_s', 0):.0f} s)",
    ]
    m = st.get("model") or {}
    if m.get("loading"):
        ld = m["loading"]
        lines.append(f"  loading:     {ld.get('file')} ({ld.get('origin')}): {ld.get('step', 'verifying')} (since {ld.get('since')})")
    if m.get("refused"):
        r = m["refused"]
        lines.append(f"  refused:     {r.get('file')}{' (version ' + r['version'] + ')' if r.get('version') else ''}: "
                     f"{r.get('reason')} ({r.get('time')})")
    if st.get("last_error"):
        e = st["last_error"]
        lines.append(f"  last error:  {e.get('file')}: {e.get('reason')} ({e.get('time')})")
    if st.get("last_failed"):
        e = st["last_failed"]
        lines.append(f"  last failed: {e.get('file')}: {e.get('reason')} ({e.get('time')})")
    for r in st.get("retrying") or []:
        lines.append(f"  retrying:    {r.get('file')}: {r.get('problem')} (attempt {r.get('attempts')}, next in {r.get('next_in_s')} s)")
    for b in st.get("blocked") or []:
        lines.append(f"  skipped:     {b.get('file')}: {b.get('reason')} (since {b.get('since')})")
    lines.append(f"  updated:     {st.get('updated')}")
    # Names come from whoever writes to the inbox: each line shown escaped, so no newline,
    # ESC or OSC sequence in a name reaches the terminal.
    return "\n".join(shown(line) for line in lines)


def _runtime(m: dict[str, Any]) -> str:
    """ via openvino fp32: what runs the model (model/runtimes.py), when the status says."""
    return f" via {m['runtime']} {m.get('precision', '')}".rstrip() if m.get("runtime") else ""


def _model_detail(m: dict[str, Any]) -> str:
    if not m.get("origin"):
        return ""
    s = f" ({m['origin']} {m.get('file')}, loaded {m.get('loaded_at')})"
    if m.get("origin") == "configured":
        s += ", pinned by model.path"
    elif not m.get("watching", True):
        s += ", models folder not watched"
    return s


def main(cfg: Config | None, as_json: bool = False, path: Path | None = None) -> int:
    """`upscaled status`; `cfg` None (an invalid config) reads `path` with default timings."""
    path = cfg.path("status") if cfg is not None else path
    st = read(path)
    interval = cfg.daemon.status_interval if cfg is not None else 2.0
    stale_after = max(3 * interval, 4 * IDLE_REFRESH)
    if st is None:
        if as_json:
            print(json.dumps({"running": False, "status_file": str(path)}))
        else:
            print(f"upscaled daemon: not running (no status file at {path})")
        return EXIT_NOT_RUNNING
    running = is_running(st, stale_after)
    if as_json:
        print(json.dumps({"running": running, **st}, indent=2))
    elif running:
        print(render(st))
    else:
        print(f"upscaled daemon: not running (last seen {st.get('updated', 'never')}, pid {st.get('pid')} on {st.get('host')})")
        if st.get("processed") is not None:
            print(f"  processed {st.get('processed')}, failed {st.get('failed')} in its last run")
        if st.get("fatal"):
            print(f"  it ended with a fatal error: {shown(st['fatal'].get('reason'))} ({st['fatal'].get('time')}); "
                  "the traceback is in its log")
    sys.stdout.flush()
    return EXIT_RUNNING if running else EXIT_NOT_RUNNING
