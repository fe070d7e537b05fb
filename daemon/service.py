"""`upscaled serve`: startup → run → shutdown.

startup: open our claims folder, recover what dead daemons left, load and warm the model, start
the pipeline threads and the observer, scan the inbox, tell systemd READY=1.
run: one loop on the main thread — drain watcher hints, rescan now and then, collect finished
jobs, re-submit due retries, claim ready files while the pipeline has room, heartbeat the lease,
ping the systemd watchdog, keep the status file current, and hot-swap the model when a new one
is published (daemon/models.py: verified on a background thread, taken by the inference thread
between two images).
shutdown: stop claiming, let in-flight images finish (at most daemon.shutdown_timeout), give the
rest back to the inbox, remove our claims folder.

Signal handlers only set flags: the first SIGTERM/SIGINT asks for a graceful stop, a second one
makes the loop exit at once (claims stay and are recovered on the next start); SIGHUP reloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import heapq
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from loguru import logger

from daemon import history
from daemon.claims import Claims, NameTooLong
from daemon.job import Failure, Job, JobState, Stage
from daemon.models import ModelSlot
from daemon.notify import Notifier
from daemon.status import ServiceState, StatusBoard
from daemon.watcher import Hint, InboxFilter, InboxHandler, Settler, make_observer, scan
from daemon.worker import Pipeline, Worker, io_thread_count, out_path
from core.errors import CheckpointError
from core.names import PATH_MAX
from imaging import outscale
from core.config import Config, ConfigError

TICK = 0.25  # seconds the loop sleeps when nothing wakes it
INBOX_CHECK = 1.0  # seconds between checks that the watched inbox is still the same folder
EXIT_FORCED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL, as `upscaled train` when another run holds its lock


class AlreadyRunning(RuntimeError):
    pass


class StatusLock:
    """One daemon per status file: an flock on STATUS.lock, released by the kernel when we die.

    Several daemons may share an inbox (each with its own paths.status); two writing one status
    file would each overwrite the other's, so the second is refused.
    """

    def __init__(self, status: Path):
        self.path = status.with_name(status.name + ".lock")
        self._f = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise AlreadyRunning(
                f"another upscaled serve ({holder}) is running with the status file {self.path.with_suffix('')}; "
                "stop it first, or give each daemon its own paths.status (several may share one inbox)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._f = f

    def release(self) -> None:
        if self._f is not None:
            self._f.close()  # closing drops the lock; the file stays (removing it would race a new holder)
            self._f = None

# Settings that only take effect on a restart (the rest apply on SIGHUP).
RESTART_ONLY = {
    "paths": None,  # every key
    "model": None,
    "inference": None,
    "watch": ("mode", "poll_interval"),
    "daemon": ("io_workers", "io_nice", "lease_interval"),
}


class Signals:
    """Flags set by signal handlers, read by the loop."""

    def __init__(self) -> None:
        self.stops = 0
        self.reload = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum, frame) -> None:
        self.stops += 1

    def _on_hup(self, signum, frame) -> None:
        self.reload = True


class Service:
    def __init__(self, cfg: Config, once: bool = False, config_path: str | os.PathLike | None = None,
                 overrides: list[str] = (),
                 notifier: Notifier | None = None):
        self.cfg = cfg
        self.once = once
        self.config_path = config_path
        self.overrides = list(overrides)  # --set: laid over the file again at every reload
        self.signals = Signals()
        self.notify = notifier or Notifier()
        self.wake = threading.Event()
        self.hints: queue.SimpleQueue = queue.SimpleQueue()
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.inbox = cfg.path("inbox")
        self.board = StatusBoard(cfg.path("status"), cfg.daemon.status_interval)
        self.claims = Claims(self.inbox, cfg.path("work"), cfg.daemon.lease_interval)
        self.filter = InboxFilter(self.inbox, [cfg.path("work"), cfg.path("models"), cfg.path("status")])
        self.settler = Settler(self.inbox, cfg.watch.settle_seconds, trust_mtime=once, skip=self._skip,
                               closed_grace=cfg.watch.closed_grace, incomplete_wait=cfg.watch.incomplete_wait)
        self.retries: list[tuple[float, int, Job]] = []  # heap by retry_at
        self.upscaler = None
        self.slot = ModelSlot(cfg, self.wake, watch=not once)
        self.worker: Worker | None = None
        self.pipeline: Pipeline | None = None
        self.io_workers = 0  # daemon.io_workers as applied, once the model's device is known
        self.observer = None
        self.stopping = False
        self.stop_deadline = 0.0
        self.next_rescan = 0.0
        self.gave_up: set[str] = set()  # --once: left in the inbox after a transient error
        self.blocked: dict[str, dict] = {}  # inbox paths we cannot claim or read: retried at each rescan
        self.ignored: set[str] = set()  # deliberately passed over (temp names, symlinks...), logged once
        self.lock = StatusLock(cfg.path("status"))
        self._inbox_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the inbox being watched
        self._next_inbox_check = 0.0
        self.exit_code = 0
        self._seq = 0
        self._claims_open = False
        self._stall_logged = False

    # -- startup -------------------------------------------------------------------------------

    def startup(self) -> None:
        cfg = self.cfg
        self.board.write(force=True)
        try:
            self.claims.open()
        except OSError as e:
            raise ConfigError("paths.work", f"a usable folder on the inbox's file system ({e.strerror or e})",
                              str(self.claims.work)) from None
        self._claims_open = True
        self._recover()
        self.upscaler = self.slot.start()
        self.worker = Worker(cfg, self.upscaler, self.claims)
        if cfg.model.for_jpeg:
            from model.runtime import build_upscaler, config_model

            self.worker.jpeg_upscaler = build_upscaler(cfg, config_model(cfg, cfg.model.for_jpeg))
            logger.info("JPEG inputs below quality {} go to model {} (model.for_jpeg: {})", cfg.model.for_jpeg_below,
                        self.worker.jpeg_upscaler.version, cfg.model.for_jpeg)
        self.io_workers = io_thread_count(cfg.daemon.io_workers, self.upscaler.device.type)
        self.pipeline = Pipeline(self.worker, self.io_workers, self._on_finished, cfg.daemon.io_nice)
        self.pipeline.start()
        if not self.once:
            self._watch()
        self.rescan(time.monotonic())
        self.board.set(state=ServiceState.RUNNING, model_version=self.upscaler.version, device=str(self.upscaler.device),
                       model=self.slot.describe())
        self.board.write(force=True)
        io = self.pipeline.io_nice
        logger.info("{} {} -> {} (model {}, {} watching, {} I/O threads at {})",
                    "processing" if self.once else "serving", self.inbox, cfg.path("outbox"), self.upscaler.version,
                    "no" if self.once else cfg.watch.mode, self.io_workers,
                    "SCHED_IDLE" if io == "idle" else f"nice +{io}")
        self.notify.ready(self.board.summary())

    def _watch(self) -> None:
        """(Re)start the observer on the inbox as it is now (and on the models folder)."""
        cfg = self.cfg
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(2.0)
        handler = InboxHandler(self.filter, self.hints, self.wake, polling=cfg.watch.mode == "polling")
        self.observer = make_observer(cfg.watch.mode, cfg.watch.poll_interval, self.inbox, handler)
        self.slot.schedule(self.observer)
        st = os.stat(self.inbox)
        self._inbox_id = (st.st_dev, st.st_ino)
        self.observer.start()

    def _check_inbox(self, now: float) -> None:
        """A share unmounted and mounted again, or an inbox deleted and made anew, is another
        folder: inotify watches the old one. Watch the new one within a second, and scan it."""
        if self.once or self.stopping or now < self._next_inbox_check:
            return
        self._next_inbox_check = now + INBOX_CHECK
        try:
            st = os.stat(self.inbox)
        except OSError as e:
            if self._inbox_id is not None:
                logger.error("the inbox {} is gone ({}); watching for it to come back", self.inbox, e.strerror or e)
                self._problem("inbox", f"the inbox {self.inbox} is gone ({e.strerror or e})")
                self._inbox_id = None
            return
        if (st.st_dev, st.st_ino) == self._inbox_id:
            return
        logger.warning("the inbox {} is a new folder (recreated or remounted): watching it again", self.inbox)
        with contextlib.suppress(OSError):
            self.claims.open(again=True)
        self._watch()
        self.blocked.pop("inbox", None)
        self.next_rescan = 0.0

    def _problem(self, key: str, reason: str) -> None:
        """Something that stops part of the inbox from flowing: logged once, shown in the status
        until it is gone, retried at each rescan."""
        if self.blocked.get(key, {}).get("reason") != reason:
            if key != "inbox":
                logger.error("cannot take {}: {}; skipping it, retried every {:.0f} s", key, reason, self.cfg.watch.rescan_interval)
            self.blocked[key] = {"file": key, "reason": reason, "since": _iso()}
            self.board.last_error = {"file": key, "reason": reason, "time": _iso()}

    def _on_finished(self, job: Job) -> None:
        # Pipeline threads: enqueue and wake the loop, nothing else.
        self.finished.put(job)
        self.wake.set()

    # -- run -----------------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            if self.signals.stops >= 2:
                logger.warning("second stop signal: exiting now; claimed files are recovered on the next start")
                self.exit_code = EXIT_FORCED
                return
            if self.signals.stops == 1 and not self.stopping:
                self.begin_stop("stop signal")
            now = time.monotonic()
            if self.stopping and (self.pipeline.in_flight() == 0 or now >= self.stop_deadline):
                return
            self.tick(now)
            if self.once and not self.stopping and self._idle() and self.rescan(now) == 0:
                self.begin_stop("inbox processed")
                continue
            self.wake.wait(TICK)
            self.wake.clear()

    def _idle(self) -> bool:
        return (len(self.settler) == 0 and self.pipeline.in_flight() == 0 and not self.retries
                and self.finished.empty())

    def tick(self, now: float) -> None:
        """One pass of the loop (tests call it directly)."""
        if self.signals.reload:
            self.signals.reload = False
            self.reload()
        if not self.pipeline.alive():
            raise RuntimeError("a pipeline thread died; exiting so the service manager restarts us")
        if not self.stopping:
            self._models()
        self._check_inbox(now)
        self._drain_hints(now)
        if now >= self.next_rescan and not self.stopping:
            self.rescan(now)
        self._collect(now)
        if not self.stopping:
            self._resubmit_due(now)
            self._claim_ready(now)
        self.claims.heartbeat()
        self._watchdog(now)
        self._update_board(now)

    def _models(self) -> None:
        """Hot swap: check the models folder's pointer; hand a verified new model to the pipeline
        (the inference thread takes it between two images); notice when it is in use."""
        new = self.slot.poll()
        if new is not None:
            # Drop our reference to the old model now: the inference thread holds the last one
            # and frees it (and the GPU's cache) when it switches.
            self.upscaler = new.upscaler
            self.slot.installed(new)
            self.pipeline.swap(new.upscaler)
        if self.slot.confirm(self.worker.upscaler):
            self.board.set(model_version=self.upscaler.version, device=str(self.upscaler.device))
            self.board.write(force=True)
        self.board.set(model=self.slot.describe())

    def _watchdog(self, now: float) -> None:
        """Ping systemd's watchdog unless the inference thread is stuck: an upscale that has not
        finished one batch of tiles for a whole watchdog period is a hang (a GPU fault, a
        deadlock), and the restart it earns recovers our claims."""
        period = self.notify.watchdog_interval
        if period is not None and self.pipeline.stalled(2 * period):
            if not self._stall_logged:
                logger.error("inference has made no progress for {:.0f} s; no longer pinging the watchdog", 2 * period)
                self._stall_logged = True
            return
        self._stall_logged = False
        self.notify.watchdog(now)

    def _drain_hints(self, now: float) -> None:
        while True:
            try:
                hint, rel = self.hints.get_nowait()
            except queue.Empty:
                return
            if hint is Hint.SCANNED:
                self.next_rescan = 0.0  # a folder moved in: scan it now
            elif rel not in self.gave_up:
                self.settler.note(hint, rel, now=now)

    def rescan(self, now: float) -> int:
        """Reconcile with the folder: recover dead owners' claims, note every file events missed."""
        self.next_rescan = now + self.cfg.watch.rescan_interval
        self._recover()
        new = 0
        unreadable: dict[str, str] = {}
        ignored: dict[str, str] = {}
        for rel, st in scan(self.inbox, self.filter, unreadable, ignored):
            if rel in self.settler.candidates or rel in self.gave_up:
                continue
            if self._skip(rel, st):
                continue
            self.settler.note(Hint.SCANNED, rel, st, now)
            new += 1
        for rel, why in ignored.items():
            if rel not in self.ignored:
                logger.info("ignored {}: {}", rel, why)
        self.ignored = set(ignored)  # logged once while it stays; again if it comes back
        for rel, reason in unreadable.items():
            self._problem(rel, reason)
        for key, b in list(self.blocked.items()):
            gone = key != "inbox" and not b.get("folder") and not os.path.lexists(self.inbox / key)
            if gone or (b.get("folder") and key not in unreadable):
                del self.blocked[key]  # removed by its owner, or readable again
        for key in unreadable:
            self.blocked[key]["folder"] = True
        return new

    def _recover(self) -> None:
        """Give dead daemons' claims back to the inbox, and remove the temp outputs they were
        writing when they died (complete outputs are never temp files)."""
        try:
            back = self.claims.recover()
        except OSError as e:
            logger.warning("cannot recover claims in {}: {}", self.claims.work, e)
            return
        requested = None if self.cfg.output.format == "keep" else self.cfg.output.format
        for rel in back:
            try:
                out, _ = out_path(self.cfg.path("outbox"), rel, requested, self.cfg.output.name,
                                  outscale.label(outscale.factor(self.cfg.output, (0, 0), self.cfg.model.scale)))
            except ValueError:
                continue
            for tmp in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
                    logger.info("removed {}, a partial output of a dead daemon", tmp)

    def _skip(self, rel: str, st: os.stat_result) -> bool:
        return self.cfg.daemon.originals == "keep" and self.claims.is_kept(rel, st)

    def capacity(self) -> int:
        # One job per I/O thread, one batch being upscaled and one decoded and waiting for the
        # device (a batch is one image on a CPU, several small ones on a GPU).
        batch = max(1, self.pipeline.worker.upscaler.tile_and_batch()[1]) if self.pipeline else 1
        return self.io_workers + 1 + batch

    def _claim_ready(self, now: float) -> None:
        free = self.capacity() - self.pipeline.in_flight()
        if free <= 0 or len(self.settler) == 0:
            return
        for rel in self.settler.ready(now, want=free):
            if free <= 0:
                break
            seen = self.settler.take(rel)
            try:
                claimed = self.claims.claim(rel)
            except NameTooLong as e:
                self._too_long(rel, e, now)
                continue
            except OSError as e:  # a file or folder our user may not move: skip it, keep the rest flowing
                self._problem(rel, f"cannot move it into the work folder ({e.strerror or e}); "
                              f"the daemon's user (uid {os.geteuid()}) needs write access to its folder")
                continue
            if claimed is None:
                self.blocked.pop(rel, None)
                continue  # another daemon won it, or it is gone
            self.blocked.pop(rel, None)
            st = claimed.stat()
            if seen is not None and (st.st_size, st.st_mtime_ns) != (seen.size, seen.mtime_ns):
                # Written to since it was found complete: not ready after all.
                if self.claims.release(rel):
                    self.settler.note(Hint.CHANGED, rel, now=now)
                    continue
            self.pipeline.submit(Job(rel, claimed))
            free -= 1

    def _too_long(self, rel: str, e: OSError, now: float) -> None:
        """An input whose path the work folder cannot hold (the inbox can: its path is shorter)
        goes straight from the inbox to failed/, as no retry will ever make it fit."""
        n = len(os.fsencode(self.claims.files / rel))
        reason = (f"the path is too long for the work folder: {n} bytes there, system calls take at most "
                  f"{PATH_MAX - 1} (shorten the folder names, or move paths.work to a shorter path)")
        try:
            dest = self.claims.take_failed(rel, self.cfg.path("failed"))
        except OSError as err:
            self._problem(rel, f"{reason}; cannot move it to failed/ either ({err.strerror or err})")
            return
        if dest is None:
            return  # gone, or another daemon took it
        self.blocked.pop(rel, None)
        job = Job(rel, dest, state=JobState.FAILED, failure=Failure(Stage.CLAIM, reason, f"{type(e).__name__}: {e}"))
        self.worker.record_failure(job, dest)
        self._account(job, now)

    def _resubmit_due(self, now: float) -> None:
        while self.retries and self.retries[0][0] <= now and self.pipeline.in_flight() < self.capacity():
            _, _, job = heapq.heappop(self.retries)
            logger.info("retrying {} (attempt {})", job.rel, job.attempts + 1)
            self.pipeline.submit(self.worker.advance(job))  # RETRY -> where it stopped

    def _collect(self, now: float) -> None:
        while True:
            try:
                job = self.finished.get_nowait()
            except queue.Empty:
                return
            self._account(job, now)

    def _account(self, job: Job, now: float) -> None:
        w, h = job.size
        if job.state is JobState.DONE:
            native = job.model_scale or self.cfg.model.scale
            ow, oh = job.out_size if job.out_size[0] else (w * native, h * native)
            entry = self.board.record_done(ow * oh / 1e6, now, file=job.rel, model_version=job.model_version,
                                           timings=job.timings, input_bytes=job.input_bytes, output=job.output,
                                           size=job.size, scale=job.scale or native, model_scale=native,
                                           original=job.original, request=job.request)
            if entry is not None:
                history.append(history.path_for(self.cfg.path("status")), entry)
            t = job.timings
            logger.info(
                "done {}: {}x{} {} -> {} {}x{} (x{}, model x{}); decode {:.0f} ms, upscale {:.0f} ms, "
                "encode+write {:.0f} ms; model {}",
                job.rel, w, h, _size(job.input_bytes), job.output, ow, oh, outscale.label(job.scale or native), native,
                1000 * t.get("decode", 0), 1000 * t.get("upscale", 0), 1000 * t.get("write", 0),
                job.model_version or self.worker.model_version,
            )
        elif job.state is JobState.FAILED:
            f = job.failure
            self.board.record_failed(job.rel, f.reason if f else "unknown")
            logger.error("failed {} ({} stage): {}; moved to {}", job.rel, f.stage.value if f else "?",
                         f.reason if f else "?", self.cfg.path("failed"))
            self.board.write(force=True, now=now)
        elif job.state is JobState.RETRY:
            if self.once or self.stopping:
                self._give_back(job)
                if self.once:
                    self.gave_up.add(job.rel)
                    self.exit_code = 1
                logger.warning("{}: {}; left in the inbox for the next run", job.rel, job.problem)
                return
            delay = min(self.cfg.daemon.retry_max, self.cfg.daemon.retry_initial * 2 ** (job.attempts - 1))
            job.retry_at = now + delay
            self._seq += 1
            heapq.heappush(self.retries, (job.retry_at, self._seq, job))
            logger.warning("{}: {}; retrying in {:.0f} s (attempt {})", job.rel, job.problem, delay, job.attempts)
            self.board.last_error = {"file": job.rel, "reason": job.problem, "time": _iso()}
            self._update_board(now)
            self.board.write(force=True, now=now)
        elif job.state is JobState.RELEASED:
            logger.info("gave {} back to the inbox unfinished", job.rel)

    def _give_back(self, job: Job) -> None:
        """A job in RETRY holds a claim: return the file to the inbox (outputs are already durable
        for a retry after WRITTEN, so that file is simply processed again later)."""
        if job.resume is JobState.REJECTED:
            return  # leave it claimed; it goes to failed/ after recovery and a new attempt
        self.claims.release(job.rel)

    def _update_board(self, now: float) -> None:
        self.board.set(queued=len(self.settler), in_flight=self.pipeline.in_flight() + len(self.retries))
        self.board.retrying = [
            {"file": j.rel, "problem": j.problem, "attempts": j.attempts, "next_in_s": round(max(0.0, t - now), 1)}
            for t, _, j in sorted(self.retries, key=lambda r: r[0])
        ]
        self.board.set(blocked=[{k: v for k, v in b.items() if k != "folder"} for b in self.blocked.values()])
        if not self.retries and not self.blocked and self.board.last_error is not None:
            self.board.set(last_error=None)  # the condition is gone
        if self.board.write(now=now):
            self.notify.status(self.board.summary())

    # -- reload --------------------------------------------------------------------------------

    def reload(self) -> None:
        from core.config import load_file

        self.slot.force()  # check the models folder now; a refused candidate gets one more try
        if not self.config_path:
            logger.warning("SIGHUP: started without a config file; nothing to reload")
            return
        try:
            new = load_file(Path(self.config_path), self.overrides)
        except ConfigError as e:
            logger.error("SIGHUP: config rejected, keeping the running one: {}", e)
            return
        old = self.cfg
        changed, needs_restart = [], []
        for section in ("paths", "model", "inference", "watch", "daemon", "output"):
            a, b = getattr(old, section), getattr(new, section)
            for f in dataclasses.fields(a):
                if getattr(a, f.name) != getattr(b, f.name):
                    key = f"{section}.{f.name}"
                    only = RESTART_ONLY.get(section, ())
                    (needs_restart if section in RESTART_ONLY and (only is None or f.name in only) else changed).append(key)
        merged = dataclasses.replace(
            new, paths=old.paths, model=old.model, inference=old.inference, base_dir=old.base_dir,
            watch=dataclasses.replace(new.watch, mode=old.watch.mode, poll_interval=old.watch.poll_interval),
            daemon=dataclasses.replace(new.daemon, io_workers=old.daemon.io_workers, io_nice=old.daemon.io_nice,
                                       lease_interval=old.daemon.lease_interval),
        )
        self.cfg = merged
        self.worker.cfg = merged
        self.slot.cfg = merged
        self.settler.settle_seconds = merged.watch.settle_seconds
        self.settler.closed_grace = min(merged.watch.closed_grace, merged.watch.settle_seconds)
        self.settler.incomplete_wait = merged.watch.incomplete_wait
        self.board.interval = merged.daemon.status_interval
        self.next_rescan = min(self.next_rescan, time.monotonic() + merged.watch.rescan_interval)
        logger.info("SIGHUP: config reloaded from {}; applied: {}", self.config_path, ", ".join(changed) or "nothing changed")
        if needs_restart:
            logger.warning("SIGHUP: these changes need a restart to take effect: {}", ", ".join(needs_restart))

    # -- shutdown ------------------------------------------------------------------------------

    def begin_stop(self, why: str) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.daemon.shutdown_timeout
        if self.pipeline is not None and self.pipeline.in_flight():
            logger.info("{}: finishing {} image(s) in flight (at most {:.0f} s)", why,
                        self.pipeline.in_flight(), self.cfg.daemon.shutdown_timeout)
        else:
            logger.info("{}: stopping", why)
        self.notify.stopping()
        self.board.set(state=ServiceState.STOPPING)
        self.board.write(force=True)
        if self.observer is not None:
            self.observer.stop()
        while self.retries:  # waiting out a back-off is not "in flight": give them back now
            _, _, job = heapq.heappop(self.retries)
            self._give_back(job)

    def shutdown(self) -> bool:
        """Returns False when a pipeline thread is still busy (the caller then exits hard)."""
        clean = True
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(2.0)
        if self.pipeline is not None:
            if self.exit_code != EXIT_FORCED:
                n = self.pipeline.release_unfinished()
                if n:
                    logger.warning("shutdown timeout: gave {} unfinished image(s) back to the inbox", n)
                clean = self.pipeline.stop(timeout=2.0)
                self._collect(time.monotonic())
            else:
                clean = False
        if not self.slot.close(timeout=5.0):
            clean = False  # a candidate is still loading inside torch
        if self._claims_open and self.exit_code != EXIT_FORCED:
            self.claims.close()
        self.lock.release()
        self.board.set(state=ServiceState.STOPPED, in_flight=0 if clean else self.board.in_flight)
        self.board.write(force=True)
        self.notify.close()
        logger.info("stopped: {} done, {} failed", self.board.processed, self.board.failed)
        return clean


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def main(cfg: Config, once: bool = False, config_path: str | os.PathLike | None = None,
         overrides: list[str] = ()) -> int:
    """`upscaled serve [--once]`; returns the exit code."""
    if config_path is None:
        logger.info("no config file (--config, ${}, ./config.yaml): built-in defaults, folders under {}: inbox {}, "
                    "outbox {}, done {}, failed {}", "UPSCALED_CONFIG", cfg.base_dir, cfg.path("inbox"),
                    cfg.path("outbox"), cfg.path("done"), cfg.path("failed"))
    else:
        logger.info("config {}: inbox {}, outbox {}", config_path, cfg.path("inbox"), cfg.path("outbox"))
    if os.geteuid() == 0 and not cfg.daemon.allow_root:
        logger.error("refusing to run as root: the inbox takes files from anyone, and a decoder bug should not "
                     "hand them the machine. Run as an ordinary user (systemd/upscaled.service does), or set "
                     "daemon.allow_root: true")
        return EXIT_USAGE
    svc = Service(cfg, once=once, config_path=config_path, overrides=overrides)
    try:
        svc.lock.acquire()  # before anything is written: a second daemon must not touch the first's files
    except AlreadyRunning as e:
        logger.error("{}", e)
        return EXIT_LOCKED
    if threading.current_thread() is threading.main_thread():
        svc.signals.install()
    clean = True
    try:
        svc.startup()
        svc.run()
    except (ConfigError, CheckpointError):
        svc.exit_code = svc.exit_code or EXIT_USAGE
        raise  # the command line reports them, naming the key or the file
    except Exception as e:  # noqa: BLE001 - anything else is fatal: say what and where before exiting
        svc.exit_code = svc.exit_code or 1
        reason = f"{type(e).__name__}: {e}"
        logger.opt(exception=e).critical("fatal error, exiting: {}", reason)
        svc.board.fatal = {"reason": reason, "time": _iso(), "traceback": traceback.format_exc(limit=20)}
        svc.board.last_error = {"file": "", "reason": f"fatal: {reason}", "time": _iso()}
    except BaseException:
        svc.exit_code = svc.exit_code or 1
        raise
    finally:
        clean = svc.shutdown()
        if not clean:
            # A thread is still inside torch; let the process go without tearing the interpreter down under it.
            logger.complete()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(svc.exit_code)
    return svc.exit_code
