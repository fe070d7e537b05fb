"""Moving jobs through their states: `Worker.advance` does one transition, `Pipeline` runs it on
the right thread.

Decoding and encoding run on `daemon.io_workers` threads; one inference thread owns the
Upscaler. A new model (hot swap, daemon/models.py) is handed over with `Pipeline.swap` and taken
by the inference thread between two images, so each image is upscaled wholly by one model and
`Job.model_version` names it. The service keeps a few more jobs claimed than threads, so a decoded image is always
waiting when the inference thread finishes one.

Errors are sorted once, in `advance`: an OSError is the environment's fault (disk full, outbox
not writable, read-only file system...) and is retried with back-off for as long as it lasts,
the input kept claimed; an OSError that is the input's own (`input_fault`: a name too long for
the outbox, an input the daemon may not read) is retried a few times, then the input goes to
failed/; anything else is the image's fault and sends it to failed/ with a reason.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import gc
import heapq
import itertools
import json
import os
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from loguru import logger

from daemon import memory, requests
from daemon.claims import POISON, Claims, place
from daemon.keep import keep_quietly
from daemon.job import STAGE_OF, TERMINAL, Failure, Job, JobState, Stage
from core.atomic import atomic_write_text, sidecar
from imaging.images import ImageError, output_name, read_header
from imaging import outscale
from core.config import Config
from model import pipeline

# Which thread performs a state's next transition: DECODED goes to the inference thread, these
# to the I/O threads.
IO_STATES = (JobState.CLAIMED, JobState.UPSCALED, JobState.WRITTEN, JobState.REJECTED)
_FINISHING = {JobState.WRITTEN: 0, JobState.REJECTED: 0, JobState.UPSCALED: 1}


def out_path(outbox: Path, rel: str, requested: str | None, template: str = "{stem}", scale: int | str = 4,
             model: str = "") -> tuple[Path, str]:
    """Output path and format: same relative path and name (output.name), the extension changes
    only with the format."""
    name, fmt = output_name(Path(rel), requested, template, scale, model)
    return outbox / name, fmt


INPUT_FAULT_ATTEMPTS = 3  # an OSError that is the input's own is tried this often before failed/
CONFLICT = {"suffix": "suffix", "overwrite": "replace", "skip": "skip"}  # output.on_conflict -> atomic_open


def input_fault(e: OSError, job: Job, state: JobState) -> bool:
    """True when the OSError is the input's fault, not the environment's: retrying will not help."""
    if e.errno in (errno.ENAMETOOLONG, errno.EISDIR, errno.ELOOP):
        return True
    reading_input = state is JobState.CLAIMED and e.filename in (str(job.claimed), os.fsencode(job.claimed))
    return reading_input and e.errno in (errno.EACCES, errno.EPERM)


def human_reason(e: BaseException) -> str:
    if isinstance(e, ImageError):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        return f"the file name is too long for the output folder ({os.path.basename(os.fsdecode(e.filename or ''))!r})"
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return "out of memory while processing this image"
    return f"internal error while processing this image ({type(e).__name__}: {e})"


@dataclass(frozen=True)
class Folders:
    inbox: Path
    outbox: Path
    done: Path
    failed: Path


class Worker:
    """Performs job transitions. `upscaler` is only ever used (and replaced, see
    `Pipeline.swap`) by the one inference thread."""

    def __init__(self, cfg: Config, upscaler, claims: Claims):
        self.cfg = cfg  # replaced by the service on reload (output.* and daemon.originals apply live)
        self.upscaler = upscaler
        self.jpeg_upscaler = None  # model.for_jpeg: JPEG inputs go to this model instead (not hot-swapped)
        self.claims = claims
        self.on_progress: Callable[[int, int], None] | None = None  # tile progress of the running upscale
        self.folders = Folders(cfg.path("inbox"), cfg.path("outbox"), cfg.path("done"), cfg.path("failed"))
        self.requests = requests.folder_for(cfg.path("status"))  # per-upload output requests (web page)
        self.baseline = memory.resident()  # the daemon with its model loaded

    @property
    def model_version(self) -> str:
        return getattr(self.upscaler, "version", "unknown")

    def advance(self, job: Job) -> Job:
        """Perform the next transition of `job` (the only place a job's state changes)."""
        state = job.state
        t0 = time.perf_counter()
        try:
            if job.released:
                raise _Released()
            if state is JobState.RETRY:
                job.state = job.resume  # the back-off is over
            elif state is JobState.CLAIMED:
                st = job.claimed.stat()
                if not job.request_checked:  # once: a retry keeps what the first claim found
                    job.request = requests.take(self.requests, st, job.rel)
                    job.request_file = requests.file_for(self.requests, st) if job.request else None
                    job.request_checked = True
                job.output, fmt = self._out(job)
                job.input_bytes = st.st_size
                deaths = self.claims.deaths(job.rel, st)
                if deaths >= POISON:
                    raise ImageError(f"poison: the daemon died {deaths} times in a row while processing this file "
                                     "(killed for memory, or a crash in a decoder); it is not tried again")
                self._check_fits(job, fmt)
                self.claims.running(job.rel, st)
                job.decoded = pipeline.decode(job.claimed)
                job.size = job.decoded.size
                job.timings["decode"] = time.perf_counter() - t0
                job.state = JobState.DECODED
            elif state is JobState.DECODED:
                up = self.model_for(job)  # one model for the whole image
                job.model_version = getattr(up, "version", "unknown")
                job.model_scale = getattr(up, "scale", self.cfg.model.scale)
                fmt = self._out(job)[1]
                job.encoded = pipeline.upscale(up, job.decoded, fmt, self.on_progress)
                job.decoded = None
                job.timings["upscale"] = time.perf_counter() - t0
                job.state = JobState.UPSCALED
            elif state is JobState.UPSCALED:
                # output.scale / long_side (as configured now): resized unless that is the model's
                # own size, and labelled with the model and scale (PNG text, JPEG comment, WebP XMP)
                job.encoded, job.scale = pipeline.output_scale(job.encoded, job.size, job.model_scale or self.cfg.model.scale,
                                                               job.model_version, self.output_of(job))
                if job.request:  # the provenance says the upload asked for this size/format
                    job.encoded.text["upscaled:request"] = requests.describe(job.request)
                job.out_size = (job.encoded.pixels.shape[1], job.encoded.pixels.shape[0])
                wanted, fmt = self._out(job)
                if fmt == "JPEG" and job.encoded.pixels.shape[2] in (2, 4):
                    logger.info("{}: JPEG has no alpha; transparent pixels flattened onto {} (output.jpeg_background)",
                                job.rel, self.cfg.output.jpeg_background)
                wanted.parent.mkdir(parents=True, exist_ok=True)
                locked = []

                def sealed(f) -> None:
                    job.encoded = None
                    self.claims.mark_written(job.rel, wanted, os.fstat(f.fileno()), st)  # before the rename
                    job.lock.acquire()
                    locked.append(True)
                    if job.released:
                        raise _Released()  # the temp file is removed, nothing is published

                try:
                    # Encoded straight into the temp file (a huge PNG never sits in memory as
                    # bytes); the lock covers only the check and the rename that publishes it.
                    conflict, target = CONFLICT[self.cfg.output.on_conflict], wanted
                    st = job.claimed.stat()
                    own = self.claims.written_output(job.rel, st)
                    if own is not None:  # this input's own output, from before a crash: replace it, no name-1
                        conflict, target = "replace", own
                    # consume: a retry after an error starts over from the input anyway.
                    job.output = pipeline.publish(job.encoded, target, fmt, self.cfg.output, conflict=conflict,
                                                  sealed=sealed)
                    job.state = JobState.WRITTEN
                except FileExistsError:  # output.on_conflict: skip
                    raise ImageError(f"its output {wanted.name} already exists in the outbox and output.on_conflict "
                                     "is skip (remove that file, or set suffix or overwrite, and drop this again)") from None
                finally:
                    if locked:
                        job.lock.release()
                if job.output != wanted:
                    logger.info("{}: {} was taken (output.on_conflict: suffix); wrote {}", job.rel, wanted.name, job.output.name)
                job.timings["write"] = time.perf_counter() - t0
            elif state is JobState.WRITTEN:
                with job.lock:
                    learn = self.cfg.learn  # material for `upscaled learn`, before the original moves on
                    keep_quietly(job.claimed, self.cfg.path("learn"), learn.keep_mb, learn.keep_days)
                    self._dispose_original(job)
                    self.claims.clear_written(job.rel)
                    self.claims.clear_deaths(job.rel)
                    self._drop_request(job)
                    job.state = JobState.DONE
            elif state is JobState.REJECTED:
                with job.lock:
                    self._to_failed(job)
                    self.claims.clear_deaths(job.rel)
                    self._drop_request(job)
                    job.state = JobState.FAILED
            else:
                raise AssertionError(f"no transition from {state}")
        except _Released:
            job.decoded = job.encoded = None
            job.state = JobState.RELEASED
        except Exception as e:  # noqa: BLE001 - a bad image never stops the daemon
            job.decoded = job.encoded = None
            lost = state is JobState.CLAIMED and isinstance(e, FileNotFoundError) and not job.claimed.exists()
            given_up = (isinstance(e, OSError) and state is not JobState.REJECTED and input_fault(e, job, state)
                        and job.attempts + 1 >= INPUT_FAULT_ATTEMPTS)
            if (isinstance(e, OSError) and not lost and not given_up) or state is JobState.REJECTED:
                if not isinstance(e, OSError):
                    logger.opt(exception=e).error("cannot record the failure of {}; keeping it claimed", job.rel)
                job.attempts += 1
                job.problem = f"{STAGE_OF[state].value}: {human_reason(e)}"
                # Output pixels are not kept across a back-off: a retry before WRITTEN starts over.
                job.resume = state if state in (JobState.WRITTEN, JobState.REJECTED) else JobState.CLAIMED
                job.state = JobState.RETRY
            else:
                reason = "the file vanished from the work folder" if lost else human_reason(e)
                if given_up and e.errno in (errno.EACCES, errno.EPERM):
                    reason = f"the daemon's user (uid {os.geteuid()}) may not read this file (permission denied)"
                if given_up:
                    reason += f"; tried {INPUT_FAULT_ATTEMPTS} times"
                exc = "".join(traceback.format_exception_only(type(e), e)).strip()
                job.failure = Failure(STAGE_OF[state], reason, exc)
                job.state = JobState.REJECTED
        if job.state not in (JobState.DECODED, JobState.UPSCALED) and state in (JobState.CLAIMED, JobState.DECODED,
                                                                                 JobState.UPSCALED):
            with contextlib.suppress(OSError):
                self.claims.not_running(job.rel)  # out of decode, upscale and encode: a death now is not its fault
        return job

    def _check_fits(self, job: Job, fmt: str) -> None:
        """Refuse, before decoding, an image whose estimated peak memory the budget cannot hold."""
        header = read_header(job.claimed)
        if header is None:
            return  # not an image we read: decode says why
        up = self.upscaler
        model_scale = getattr(up, "scale", self.cfg.model.scale)
        scale = outscale.factor(self.output_of(job), (header.width, header.height), model_scale)
        tiles = up.working_set((header.width, header.height)) if hasattr(up, "working_set") else 0
        need = memory.peak_bytes(header, model_scale, scale, fmt, self.cfg.output.png_strategy == "fast", tiles)
        budget = memory.budget(self.cfg.daemon.memory_budget_mb)  # read each time: SIGHUP may change it
        if need > budget.bytes - self.baseline:
            raise ImageError(
                f"too large to process within the memory budget: a {header.width}x{header.height} image upscaled "
                f"x{outscale.label(max(model_scale, scale))} is {memory.out_size(header, max(model_scale, scale))} and "
                f"needs about {memory.describe(need)}; the budget is {memory.describe(budget.bytes)} "
                f"({budget.source}), {memory.describe(self.baseline)} of it held by the daemon and its model")

    def model_for(self, job: Job):
        """The served model, or model.for_jpeg's for a JPEG compressed harder than
        model.for_jpeg_below (blocking and ringing the served model would sharpen)."""
        return pipeline.model_for(job.decoded, self.cfg, self.upscaler, self.jpeg_upscaler)

    def output_of(self, job: Job):
        """output.* for this job: the configured one (as reloaded), with an upload's request over it."""
        return requests.apply(self.cfg.output, job.request) if job.request else self.cfg.output

    def _drop_request(self, job: Job) -> None:
        """The used request goes; one that cannot be removed is only logged (it is never applied
        to another file: its size and mtime are checked), never a reason to retry the job."""
        if job.request_file is not None:
            try:
                os.unlink(job.request_file)
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("{}: cannot remove its upload request {}: {}", job.rel, job.request_file, e.strerror or e)

    def _out(self, job: Job) -> tuple[Path, str]:
        o = self.output_of(job)
        # {scale}: the output's scale once known (UPSCALED), before that the configured or model's one
        scale = job.scale or outscale.factor(o, job.size, job.model_scale or self.cfg.model.scale)
        requested = None if o.format == "keep" else o.format
        return out_path(self.folders.outbox, job.rel, requested, o.name, outscale.label(scale), job.model_version)

    def _dispose_original(self, job: Job) -> None:
        originals = self.cfg.daemon.originals
        rel = job.rel
        if originals == "delete":
            os.unlink(job.claimed)
        elif originals == "keep":
            if self.claims.keep(rel):
                job.original = self.folders.inbox / rel
            else:
                job.original = place(job.claimed, self.folders.done / rel)  # a new file took its name in the inbox
        else:
            job.original = place(job.claimed, self.folders.done / rel)
        self.claims.forget(job.claimed)

    def advance_together(self, jobs: list[Job]) -> list[Job]:
        """DECODED -> UPSCALED for equal-size images in one forward pass (the engine batches them).

        Any problem sends every job through `advance` on its own, so an error is attributed to
        its image and handled exactly as for a single one.
        """
        live = [j for j in jobs if j.state is JobState.DECODED and not j.released and j.decoded is not None]
        if len(live) < 2 or len(live) != len(jobs):
            return [self.advance(j) for j in jobs]
        models = {id(self.model_for(j)) for j in live}
        if len(models) > 1:  # JPEGs and others in one group: each through its own model
            return [self.advance(j) for j in jobs]
        up = self.model_for(live[0])  # one model for the whole group
        t0 = time.perf_counter()
        try:
            encoded = pipeline.upscale_many(up, [j.decoded for j in live])
        except Exception:  # noqa: BLE001 - retried one by one below, where errors are sorted
            return [self.advance(j) for j in jobs]
        per = (time.perf_counter() - t0) / len(live)
        for j, enc in zip(live, encoded):
            j.model_version = getattr(up, "version", "unknown")
            j.model_scale = getattr(up, "scale", self.cfg.model.scale)
            j.encoded, j.decoded = enc, None
            j.timings["upscale"] = per
            j.state = JobState.UPSCALED
        return live

    def _to_failed(self, job: Job) -> None:
        dest = self.folders.failed / job.rel
        if job.claimed.exists():
            dest = place(job.claimed, dest)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
        self.record_failure(job, dest)
        self.claims.forget(job.claimed)

    def record_failure(self, job: Job, dest: Path) -> None:
        """NAME.error.json beside the input in failed/ (`dest`), saying why."""
        f = job.failure or Failure(Stage.DECODE, "unknown", "")
        record = {
            "file": job.rel,
            "stage": f.stage.value,
            "reason": f.reason,
            "exception": f.exception,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model_version": job.model_version or self.model_version,
        }
        atomic_write_text(sidecar(dest, ".error.json"), json.dumps(record, indent=2) + "\n")


class _Released(Exception):
    """The job was given back to the inbox (shutdown) while a thread held it."""


def alone_in_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup"),
                    pid: int | None = None) -> bool:
    """True when this process is the only one in its CPU cgroup: under its own systemd unit or in
    a container. A SCHED_IDLE thread then waits only for this process's own threads; sharing a
    cgroup (a login session's), any busy process starves it, and the daemon stalls."""
    pid = os.getpid() if pid is None else pid
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":  # cgroup v2
                folder = root / path.lstrip("/")
            elif "cpu" in controllers.split(","):  # v1, mounted as cpu or cpu,cpuacct
                folder = next(root / d / path.lstrip("/") for d in (controllers, "cpu") if (root / d).is_dir())
            else:
                continue
            if path.strip("/"):  # the root cgroup holds everything
                return (folder / "cgroup.procs").read_text().split() == [str(pid)]
    except (OSError, ValueError, StopIteration):
        pass
    return False


def io_priority(setting: int | str, alone: bool) -> int | str:
    """`daemon.io_nice` as applied: auto is SCHED_IDLE where that is safe (alone in a cgroup), nice 10 elsewhere."""
    if setting == "auto":
        return "idle" if alone else 10
    return setting


def io_thread_count(setting: int | str, device_type: str, cores: int | None = None) -> int:
    """`daemon.io_workers` as applied. Beside a CPU model, 2: inference takes every core, and the
    I/O threads (below its priority) only fill its gaps. Beside a GPU the CPU does little but
    decode and encode, and a 4x PNG takes several times the GPU's upscale (12 MP: 0.13 s on one
    core), so every core but the one feeding the GPU encodes, up to 8 (each job in flight holds
    an output image)."""
    if setting != "auto":
        return int(setting)
    if device_type != "cuda":
        return 2
    cores = len(os.sched_getaffinity(0)) if cores is None else cores  # the cores this process may use
    return max(2, min(8, cores - 1))


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel as well (15 bytes at most), so `top -H`,
    `ps -L` and /proc/PID/task/*/comm tell the inference thread from the I/O threads; Python 3.11
    names threads only for itself. Threads this one starts later inherit the name: torch's
    OpenMP workers for the inference thread's forward passes are listed as "inference" too."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)  # PR_SET_NAME


class Pipeline:
    """The threads: `io_workers` for decode/encode/write/move, one for inference."""

    def __init__(self, worker: Worker, io_workers: int, on_finished: Callable[[Job], None], io_nice: int | str = 0):
        self.worker = worker
        self.io_nice = io_priority(io_nice, alone_in_cgroup() if io_nice == "auto" else False)
        worker.on_progress = self.progress
        self.on_finished = on_finished  # called on a pipeline thread; must only enqueue
        # I/O work in two lists under one condition: decodes, and the rest (encode, write, move).
        self._io_cv = threading.Condition()
        self._decode: collections.deque[Job] = collections.deque()
        self._finish: list[tuple[int, int, Job]] = []  # heap: later stages first
        self._infer: queue.Queue = queue.Queue()
        self._held: collections.deque[Job] = collections.deque()  # decoded, set aside by _gather
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._io_loop, name=f"io-{i}", daemon=True) for i in range(io_workers)]
        self._threads.append(threading.Thread(target=self._infer_loop, name="inference", daemon=True))
        self._stop = threading.Event()
        self.jobs: set[Job] = set()  # in flight (not yet handed back through on_finished)
        self._lock = threading.Lock()
        self.inference_progress: float | None = None  # last sign of life of a running upscale; None when idle
        self._next_upscaler = None  # handed over by swap(), taken by the inference thread between images

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    def submit(self, job: Job) -> None:
        with self._lock:
            self.jobs.add(job)
        self._route(job)

    def in_flight(self) -> int:
        with self._lock:
            return len(self.jobs)

    def _route(self, job: Job) -> None:
        if job.state in TERMINAL:
            with self._lock:
                self.jobs.discard(job)
            self.on_finished(job)
        elif job.state is JobState.DECODED:
            self._infer.put(job)
        else:
            with self._io_cv:
                if job.state is JobState.CLAIMED:
                    self._decode.append(job)
                else:
                    heapq.heappush(self._finish, (_FINISHING[job.state], next(self._seq), job))
                self._io_cv.notify()

    def _next_io(self) -> Job | None:
        """A decode first when the inference thread has nothing waiting (the device must not
        starve), otherwise finishing work first (it frees memory and claims)."""
        with self._io_cv:
            while not self._stop.is_set():
                starving = self._infer.empty() and not self._held
                if self._decode and (starving or not self._finish):
                    return self._decode.popleft()
                if self._finish:
                    return heapq.heappop(self._finish)[2]
                self._io_cv.wait(0.5)
        return None

    def _io_loop(self) -> None:
        name_os_thread(threading.current_thread().name)
        if self.io_nice:
            # Linux schedules threads, so this lowers only this thread. On a CPU, inference runs
            # torch's threads in lockstep: an encoder that preempts one of them stalls them all,
            # while a lower-priority encoder runs in the gaps between and around forward passes.
            # SCHED_IDLE is the far end of that: measured on 100 small images, daemon/bare
            # throughput 0.82-0.84 at nice 10 and 0.89 idle (bench/results/2026-12-01.md); but
            # other busy processes in our cgroup starve it (see alone_in_cgroup).
            with contextlib.suppress(OSError, AttributeError):
                tid = threading.get_native_id()
                if self.io_nice == "idle":
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                else:  # relative to the daemon's own nice (systemd's Nice=, or `nice upscaled serve`)
                    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.io_nice))
        while True:
            job = self._next_io()
            if job is None:
                return
            self._route(self.worker.advance(job))

    def swap(self, upscaler) -> None:
        """Serve `upscaler` from the next image on (the one being upscaled finishes with the old)."""
        with self._lock:
            self._next_upscaler = upscaler
        self._infer.put(None)  # wake an idle inference thread

    def _take_new_model(self) -> None:
        """On the inference thread, between two images: switch models and free the old one."""
        with self._lock:
            new, self._next_upscaler = self._next_upscaler, None
        if new is None:
            return
        old, self.worker.upscaler = self.worker.upscaler, new
        cuda = getattr(getattr(old, "device", None), "type", None) == "cuda"
        del old  # the service and the model slot dropped theirs when they handed the new one over
        gc.collect()
        if cuda:
            import torch

            torch.cuda.empty_cache()

    def _gather(self, first: Job) -> list[Job]:
        """`first` and the decoded images of the same size waiting behind it, up to what one
        forward pass takes (one on a CPU; several small images on a GPU). The others wait in
        `_held`, in order, for the next round."""
        limit = self.worker.upscaler.batch_limit(first.size) if first.size else 1
        group = [first]
        while True:
            try:
                job = self._infer.get_nowait()
            except queue.Empty:
                break
            if job is None:
                continue  # a swap() wake-up: the new model is taken before the next group
            if len(group) < limit and job.size == first.size and job.decoded is not None \
                    and first.decoded is not None and job.decoded.bits == first.decoded.bits:
                group.append(job)
            else:
                self._held.append(job)
        return group

    def _infer_loop(self) -> None:
        name_os_thread("inference")
        while not self._stop.is_set():
            self._take_new_model()
            if self._held:
                job = self._held.popleft()
            else:
                try:
                    job = self._infer.get(timeout=0.5)
                except queue.Empty:
                    continue
                if job is None:
                    continue  # swap() woke us
            self._take_new_model()
            group = self._gather(job)
            self.inference_progress = time.monotonic()
            try:
                done = self.worker.advance_together(group) if len(group) > 1 else [self.worker.advance(job)]
            finally:
                self.inference_progress = None
            for j in done:
                self._route(j)

    def progress(self, done: int, total: int) -> None:
        """Called by the engine after each batch of tiles, on the inference thread."""
        self.inference_progress = time.monotonic()

    def stalled(self, limit: float) -> bool:
        """True when an upscale has shown no progress (not even one batch of tiles) for `limit` s."""
        t = self.inference_progress
        return t is not None and time.monotonic() - t > limit

    def release_unfinished(self) -> int:
        """Give every in-flight job whose output is not yet durable back to the inbox."""
        n = 0
        with self._lock:
            jobs = list(self.jobs)
        for job in jobs:
            with job.lock:
                if job.state in (JobState.CLAIMED, JobState.DECODED, JobState.UPSCALED) and not job.released:
                    if self.worker.claims.release(job.rel):
                        job.released = True
                        n += 1
        return n

    def stop(self, timeout: float = 1.0) -> bool:
        self._stop.set()
        with self._io_cv:
            self._io_cv.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)
