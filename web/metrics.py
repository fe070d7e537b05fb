"""/metrics: the daemon's status file as Prometheus metrics, and what /readyz decides from it.

A prometheus_client custom collector reads the status file at every scrape, so the figures are
the daemon's own (cumulative since it started; a restart resets them, which Prometheus's rate()
handles) and the web process keeps no second count that could drift. The exposition text is
prometheus_client's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from daemon.status import IDLE_REFRESH, is_running
from daemon.status import read as read_status


def stale_after(status_interval: float) -> float:
    """How old the status file may be while the daemon counts as alive (as `upscaled status`)."""
    return max(3 * status_interval, 4 * IDLE_REFRESH)


def heartbeat_age(st: dict[str, Any], now: float | None = None) -> float | None:
    now = time.time() if now is None else now
    beat = st.get("heartbeat")
    if isinstance(beat, (int, float)):
        return max(0.0, now - beat)
    try:  # a daemon from before the heartbeat field: its ISO `updated`
        from datetime import datetime

        return max(0.0, now - datetime.fromisoformat(st["updated"]).timestamp())
    except (KeyError, TypeError, ValueError):
        return None


def readiness(st: dict[str, Any] | None, status_interval: float) -> tuple[bool, list[str]]:
    """Ready: the daemon runs, its heartbeat is fresh and a model is loaded; else the reasons."""
    if st is None:
        return False, ["no status file: the daemon has not started"]
    problems = []
    limit = stale_after(status_interval)
    if not is_running(st, limit):
        problems.append(f"the daemon is not running (state {st.get('state')})")
    elif st.get("state") != "running":
        problems.append(f"the daemon is {st.get('state')}")
    age = heartbeat_age(st)
    if age is None or age > limit:
        problems.append(f"heartbeat too old ({'never' if age is None else f'{age:.0f} s'}, limit {limit:.0f} s)")
    if not st.get("model_version"):
        problems.append("no model loaded yet")
    return not problems, problems


class StatusCollector(Collector):
    def __init__(self, status_path: Path, status_interval: float):
        self.path = status_path
        self.interval = status_interval

    def describe(self):
        return []  # read at scrape time; nothing to declare up front

    def collect(self):
        st = read_status(self.path) or {}
        up = bool(st) and is_running(st, stale_after(self.interval))
        yield _gauge("upscaled_daemon_up", "1 when the daemon that writes the status file is running", 1 if up else 0)
        age = heartbeat_age(st) if st else None
        if age is not None:
            yield _gauge("upscaled_heartbeat_age_seconds", "seconds since the daemon last wrote its status file", age)
        if not st:
            return
        c = st.get("counters") or {}
        yield _counter("upscaled_files_processed", "files upscaled since the daemon started", st.get("processed") or 0)
        failed = CounterMetricFamily("upscaled_files_failed", "files sent to failed/ since the daemon started, by reason class",
                                     labels=["reason"])
        by_class = dict(c.get("failed_by_class") or {})
        if not by_class and st.get("failed"):
            by_class = {"other": st["failed"]}  # a daemon from before the classes
        for cls, n in sorted(by_class.items()):
            failed.add_metric([cls], n)
        yield failed
        yield _gauge("upscaled_queue_depth", "files waiting in the inbox, ready to be claimed", st.get("queued") or 0)
        yield _gauge("upscaled_in_flight", "files claimed and being processed (retries included)", st.get("in_flight") or 0)
        yield _gauge("upscaled_retrying", "files waiting out a back-off after a transient error", len(st.get("retrying") or []))
        yield _gauge("upscaled_blocked", "inbox files or folders the daemon cannot take", len(st.get("blocked") or []))
        yield _counter("upscaled_output_megapixels", "output megapixels written since the daemon started",
                       c.get("output_megapixels") or 0.0)
        hist = HistogramMetricFamily("upscaled_stage_duration_seconds",
                                     "time per file in each stage (encode includes the write)", labels=["stage"])
        for stage, h in sorted((c.get("stage_seconds") or {}).items()):
            les, cum = h.get("le") or [], h.get("cumulative") or []
            if len(cum) != len(les) + 1:
                continue
            buckets = [(_le(le), n) for le, n in zip(les, cum)] + [("+Inf", cum[-1])]
            hist.add_metric([stage], buckets, h.get("sum", 0.0))
        yield hist
        m = st.get("model") or {}
        info = InfoMetricFamily("upscaled_model", "the model being served", labels=[])
        info.add_metric([], {"version": str(st.get("model_version") or ""), "origin": str(m.get("origin") or ""),
                             "file": str(m.get("file") or ""), "device": str(st.get("device") or "")})
        yield info
        yield _counter("upscaled_model_swaps", "new models taken into service without a restart", c.get("model_swaps") or 0)
        yield _counter("upscaled_model_refused", "candidate models refused by verification", c.get("model_refusals") or 0)
        t = st.get("throughput") or {}
        yield _gauge("upscaled_throughput_images_per_minute", "images per minute over the last minutes",
                     t.get("images_per_min") or 0.0)


def _le(v: float) -> str:
    return repr(float(v))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
