"""`upscaled backfill SRC DST`: a whole archive upscaled on Ray Data, on one machine or a cluster.

The driver (this process) lists SRC and plans every output name; Ray Data then streams the files
through an actor pool whose actors hold the model, resident for the whole run:

    on GPUs:  decode (CPU tasks) -> upscale (one actor per GPU) -> publish (CPU tasks)
    on CPUs:  decode, upscale, publish, in turn, in each actor (a few per node, splitting its cores)

On GPUs, decoding and publishing on the CPUs keep the GPU fed. On CPUs they would only compete
with the model for the same cores: its torch threads work in lockstep, so a decode task that
preempts one stalls them all (measured: +42 % over a bare loop with separate stages on 2 cores,
docs/scaling.md). There each actor works through its files as `upscaled upscale` and each daemon
worker do, and the PNG encoder takes the model's threads while the model waits. Every output is published as `upscaled upscale` publishes
it (upscaled.upscale.write_output: resize to output.scale / long_side, provenance metadata, temp
name, fsync, rename), but never over an existing file.

Resumable. The plan (input -> output name) is written to DST/.upscaled-backfill/plan.jsonl before
any work starts; a later run keeps those names, so an output that exists (outputs appear only
complete, by rename) is a finished input and is skipped. Failures are listed with their reasons
in DST/.upscaled-backfill/failures.jsonl (rewritten by each run: a failed input is tried again).
One backfill per DST at a time (an flock on DST/.upscaled-backfill/lock).

Ray moves our own objects (decoded images, model outputs) between our own workers with pickle;
input files themselves are only ever read by the image decoders (model/images.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from loguru import logger

from core.atomic import atomic_write_text
from imaging.images import PILLOW_READS_RGBX, Decoded, Encoded, ImageError, decode
from core.config import Config
from upscaled.upscale import collect, describe, plan, scale_labels, write_output

STATE_DIR = ".upscaled-backfill"
EXIT_LOCKED = 75  # EX_TEMPFAIL, as a second `serve` on one status file
# model/atomic.py's temp names: ".NAME.<12 hex>.tmp"
_TEMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


# -- the plan: which output each input gets, kept across runs ------------------------------------


def settings_of(cfg: Config) -> dict:
    """What decides output names and sizes: a resumed run must plan with the same."""
    o = cfg.output
    return {"format": o.format, "name": o.name, "scale": o.scale, "long_side": o.long_side}


def read_plan(path: Path) -> tuple[dict | None, dict[str, tuple[str, str]]]:
    """(settings, {input rel: (output rel, format)}) of an earlier run; (None, {}) if there was none.
    A line cut short by a crash while the file was being replaced cannot happen (it is written by
    rename); a damaged line is skipped with a warning (its input is planned anew)."""
    try:
        lines = path.read_text(errors="surrogateescape").splitlines()
    except FileNotFoundError:
        return None, {}
    settings, entries = None, {}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            if "settings" in rec:
                settings = rec["settings"]
            else:
                entries[rec["in"]] = (rec["out"], rec["format"])
        except (ValueError, KeyError, TypeError):
            logger.warning("{}:{}: not a plan entry, ignored", path, n)
    return settings, entries


def write_plan(path: Path, settings: dict, entries: dict[str, tuple[str, str]]) -> None:
    # json escapes undecodable name bytes (surrogates) as \\udcXX; read_plan gets them back exactly.
    lines = [json.dumps({"settings": settings})]
    lines += [json.dumps({"in": rel, "out": out, "format": fmt}) for rel, (out, fmt) in entries.items()]
    atomic_write_text(path, "\n".join(lines) + "\n")


@dataclass
class Planned:
    todo: list[tuple[Path, Path, Path, str]]  # (input, its rel, output, format)
    finished: int  # inputs whose output exists from an earlier run
    entries: dict[str, tuple[str, str]]


def make_plan(cfg: Config, jobs, dst: Path, native: int, version: str,
              earlier: dict[str, tuple[str, str]]) -> Planned:
    """Outputs for `jobs` (upscaled.upscale.Job): an input planned by an earlier run keeps its
    name (done when that file exists); a new one gets a name that neither another input of this
    or an earlier run nor a file already in DST has (photo-1.png, as the daemon would)."""
    entries = dict(earlier)
    reserved = {dst / out for out, _ in earlier.values()}
    todo, new, finished = [], [], 0
    for job in jobs:
        rel = str(job.rel)
        if rel in earlier:
            out, fmt = earlier[rel]
            if (dst / out).exists():
                finished += 1
            else:
                todo.append((job.src, job.rel, dst / out, fmt))
        else:
            new.append(job)
    requested = None if cfg.output.format == "keep" else cfg.output.format
    label, label_of = scale_labels(cfg.output, native)
    for job, out, fmt in plan(new, dst, requested, cfg.output.name, label, version, label_of,
                              unavailable=lambda p: p in reserved or os.path.lexists(p)):
        entries[str(job.rel)] = (str(out.relative_to(dst)), fmt)
        todo.append((job.src, job.rel, out, fmt))
    return Planned(todo, finished, entries)


def remove_stale_temps(dst: Path) -> int:
    """Temp files left by workers killed mid-write (model/atomic.py names: .NAME.<hex>.tmp).
    Only called under the DST lock, so no live backfill owns them."""
    n = 0
    for folder, dirs, files in os.walk(dst):
        dirs[:] = [d for d in dirs if d != STATE_DIR]
        for name in files:
            if _TEMP.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, name))
                    n += 1
    return n


@contextlib.contextmanager
def locked(state: Path):
    """One backfill per DST: an flock the kernel (or the NFS server) drops when the process dies."""
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise BlockingIOError(f"another backfill into {state.parent} is running") from None
        raise
    try:
        yield
    finally:
        os.close(fd)


# -- what travels through the pipeline ------------------------------------------------------------


@dataclass
class Item:
    """One file on its way through decode -> upscale -> publish. Names are bytes, as the file
    system has them (Arrow strings must be UTF-8; a name need not be)."""

    src: bytes
    rel: bytes
    dst: bytes
    fmt: str
    decoded: Decoded | None = None
    encoded: Encoded | None = None
    size: tuple[int, int] = (0, 0)
    out_size: tuple[int, int] = (0, 0)
    model_version: str = ""
    model_scale: int = 0
    output: bytes = b""  # the name it was published under
    stage: str = ""  # where it failed; "" while all is well
    reason: str = ""
    exception: str = ""
    seconds: dict = field(default_factory=dict)

    def fail(self, stage: str, e: BaseException) -> "Item":
        from daemon.worker import human_reason

        self.decoded = self.encoded = None
        self.stage, self.reason = stage, human_reason(e)
        self.exception = "".join(traceback.format_exception_only(type(e), e)).strip()
        return self


def decode_row(row: dict) -> dict:
    """Ray Data task: read and decode one input (the decoders of model/images.py, nothing else)."""
    item: Item = row["item"]
    t0 = time.perf_counter()
    try:
        item.decoded = decode(os.fsdecode(item.src))
        item.size = item.decoded.size
    except Exception as e:  # noqa: BLE001 - a bad file is listed, the run goes on
        item.fail("decode", e)
    item.seconds["decode"] = time.perf_counter() - t0
    return {"item": item}


class Upscale:
    """Ray Data actor: the model, resident for the whole run (on its GPU when it was given one)."""

    def __init__(self, cfg: Config, model_path: str, jpeg_model_path: str | None, pool: "Pool"):
        from core.logs import setup_logging
        from model.runtime import build_upscaler

        setup_logging(quiet=True)  # one line per actor below; per-file lines come from the driver
        inference = cfg.inference
        if pool.threads:
            inference = replace(inference, threads=pool.threads)
        if not inference.memory_budget_mb and pool.per_node > 1:
            # The engine's automatic budget is a share of the memory free now; actors on one node
            # would each take it. They split it instead.
            from model.engine import available_memory_bytes
            import torch

            share = available_memory_bytes(torch.device("cpu")) // 4 // pool.per_node
            inference = replace(inference, memory_budget_mb=max(64, min(2 << 10, share >> 20)))
        cfg = replace(cfg, inference=inference)
        self.cfg, self.whole, self.threads = cfg, pool.whole, pool.threads or 1
        self.up = build_upscaler(cfg, model_path)
        self.up_jpeg = build_upscaler(cfg, jpeg_model_path) if jpeg_model_path else None
        import ray

        node = ray.get_runtime_context().get_node_id()
        logger.warning("backfill worker pid {} on node {}: model {} on {} ({} torch threads)", os.getpid(), node[:12],
                       self.up.version, self.up.device, pool.threads or "all")

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from model.pipeline import compressed

        out = []
        for item in batch["item"]:
            if self.whole:
                item = decode_row({"item": item})["item"]
            if not item.stage:
                t0 = time.perf_counter()
                try:
                    u = self.up_jpeg if self.up_jpeg is not None and compressed(item.decoded, self.cfg) else self.up
                    item.model_version, item.model_scale = u.version, u.scale
                    item.encoded = u.upscale_decoded(item.decoded, for_pillow=item.fmt in PILLOW_READS_RGBX)
                    item.decoded = None
                except Exception as e:  # noqa: BLE001 - out of memory on one huge image, say
                    item.fail("upscale", e)
                item.seconds["upscale"] = time.perf_counter() - t0
            if self.whole:  # the model is idle while its output is encoded: the PNG writer takes its threads
                item = publish_row({"item": item}, self.cfg, png_threads=self.threads)["outcome"]
            out.append(item)
        return {"outcome" if self.whole else "item": np.array(out, dtype=object)}


def publish_row(row: dict, cfg: Config, png_threads: int = 1) -> dict:
    """Ray Data task: resize, label, encode and publish one output; returns only the outcome."""
    item: Item = row["item"]
    if not item.stage:
        t0 = time.perf_counter()
        dst = Path(os.fsdecode(item.dst))
        try:
            # "skip": never over an existing file, even one that appeared after the plan was made
            name, item.out_size = write_output(item.encoded, item.size, item.model_scale, item.model_version, dst,
                                               item.fmt, cfg.output, conflict="skip", png_threads=png_threads)
            item.output = os.fsencode(name)
        except FileExistsError:
            # Another writer, or this very task's first attempt on a worker Ray lost after the rename.
            item.fail("write", ImageError(f"{dst.name} appeared in the output folder during the run and was left "
                                          "as it is (a backfill never overwrites); the next run counts it as done"))
        except Exception as e:  # noqa: BLE001
            item.fail("encode+write", e)
        item.seconds["write"] = time.perf_counter() - t0
    item.encoded = item.decoded = None
    return {"outcome": item}  # a small row: no pixels travel back to the driver


# -- where it runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """The model actors: how many, and what each asks of Ray."""

    actors: int
    gpus: float  # per actor
    cpus: float  # per actor, as Ray counts them
    threads: int  # torch threads per CPU actor (0: the engine's default)
    per_node: int = 1  # actors on one node (they split its memory)
    whole: bool = False  # each actor decodes and publishes its own files (CPU actors)

    def describe(self) -> str:
        if self.gpus:
            return f"{self.actors} GPU worker(s)"
        return f"{self.actors} CPU worker(s) of {self.threads} torch thread(s), each decoding and publishing its own files"


IO_CPUS = 0.5  # what one decode or publish task asks of Ray
# Files per call of a CPU actor: it works through them in turn, publishing each as it goes, so a
# batch holds no pixels; fewer, larger calls leave less scheduling work to Ray beside the model.
CPU_BATCH = 4


def pool_shape(gpus: float, node_cpus: list[float], workers: int | None, device: str = "auto") -> Pool:
    """One actor per GPU when the cluster has GPUs (and inference.device allows them), fed by
    decode and publish tasks on the CPUs; else a few CPU actors (one per 16 cores of a node, at
    least one per node) whose torch threads split the node's cores, each doing its own decoding
    and publishing. A CPU actor asks Ray for three quarters of the cores its threads use, so that
    Ray's own small tasks are never starved (all of the cores are its threads' to use)."""
    if gpus >= 1 and device != "cpu":
        n = workers or int(gpus)
        return Pool(n, 1.0, 1.0, 0, per_node=1)
    cores = [c for c in node_cpus if c > 0] or [1.0]
    n = workers or sum(max(1, int(c) // 16) for c in cores)
    per_node = max(1, math.ceil(n / len(cores)))
    threads = max(1, int(min(cores)) // per_node)
    return Pool(n, 0.0, max(IO_CPUS + 0.25, 0.75 * threads), threads, per_node=per_node, whole=True)


def connect(address: str | None, quiet: bool):
    """Join the cluster at `address` ("auto": the one this machine belongs to), or start a
    local Ray for this run."""
    import logging

    import ray

    level = logging.WARNING if quiet or not sys.stderr.isatty() else logging.INFO
    # Ray Data's own lines (its execution plan; that its bars are off: ours count files instead)
    logging.getLogger("ray.data").setLevel(level)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    if address:
        ray.init(address=address, logging_level=level, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=True,
                 num_cpus=len(os.sched_getaffinity(0)))
    return ray


# -- the run --------------------------------------------------------------------------------------


def run(cfg: Config, src: str, dst_arg: str, model: str | None, ray_address: str | None, workers: int | None,
        quiet: bool = False) -> int:
    from tqdm import tqdm

    from model.checkpoint import read_info
    from core.config import ConfigError
    from model.runtime import checkpoint_for, config_model

    source, dst = Path(src), Path(dst_arg)
    if not source.is_dir():
        logger.error("no such folder: {}", src)
        return 2
    # The model every worker loads, resolved once here: a model published mid-run does not mix in.
    model_path, origin = checkpoint_for(cfg, model)
    info = read_info(model_path)
    if model is None and info.scale != cfg.model.scale:
        raise ConfigError("model.scale", f"{info.scale} to match the checkpoint {model_path} (a x{info.scale} model)",
                          cfg.model.scale)
    jpeg_path = config_model(cfg, cfg.model.for_jpeg) if cfg.model.for_jpeg and not model else None
    dst.mkdir(parents=True, exist_ok=True)
    state = dst / STATE_DIR
    try:
        with locked(state):
            return _run_locked(cfg, source, dst, state, str(model_path.resolve()), origin, info, jpeg_path,
                               ray_address, workers, quiet, tqdm)
    except BlockingIOError as e:
        logger.error("{}", e)
        return EXIT_LOCKED


def _run_locked(cfg, source, dst, state, model_path, origin, info, jpeg_path, ray_address, workers, quiet, tqdm) -> int:
    settings = settings_of(cfg)
    earlier_settings, earlier = read_plan(state / "plan.jsonl")
    if earlier_settings is not None and earlier_settings != settings:
        logger.error("{} was filled with other output settings ({}); this run asks for {}. Use another output "
                     "folder, or remove {} to plan anew (finished outputs are kept and never overwritten)",
                     dst, earlier_settings, settings, state / "plan.jsonl")
        return 2
    jobs, problems = collect([str(source)], dst)
    planned = make_plan(cfg, jobs, dst, info.scale, info.version, earlier)
    write_plan(state / "plan.jsonl", settings, planned.entries)  # before any output: names survive a crash
    if stale := remove_stale_temps(dst):
        logger.info("removed {} temp file(s) left by an interrupted run", stale)
    logger.info("backfill {} -> {}: {} image(s) to upscale {} with model {} ({} checkpoint {}); {} already done",
                source, dst, len(planned.todo), describe(cfg.output, info.scale), info.version, origin,
                Path(model_path).name, planned.finished)
    failures: list[dict] = [{"file": p, "stage": "list", "reason": p.split(": ", 1)[-1]} for p in problems]
    done = 0
    mp_in = mp_out = 0.0
    t0 = time.perf_counter()
    if planned.todo:
        ray = connect(ray_address, quiet)
        try:
            done, mp_in, mp_out = _stream(ray, cfg, planned, model_path, jpeg_path, workers, failures, quiet, tqdm)
        finally:
            ray.shutdown()
    dt = time.perf_counter() - t0
    _write_failures(state / "failures.jsonl", failures)
    rate = f", {dt / mp_out:.2f} s per output megapixel" if mp_out else ""
    logger.info("backfill: {} file(s) upscaled in {:.1f} s ({:.2f} MP in, {:.1f} MP out{}); {} already done; "
                "{} failed{}", done, dt, mp_in, mp_out, rate, planned.finished, len(failures),
                f" (reasons in {state / 'failures.jsonl'})" if failures else "")
    return 1 if failures else 0


def _stream(ray, cfg, planned: Planned, model_path, jpeg_path, workers, failures, quiet, tqdm):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours below counts files, on terminals only
    ctx.enable_fallback_to_arrow_object_ext_type = True  # Items travel as (our own) Python objects
    resources = ray.cluster_resources()
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    pool = pool_shape(resources.get("GPU", 0.0), node_cpus, workers, cfg.inference.device)
    logger.info("Ray cluster: {:g} CPU(s), {:g} GPU(s) on {} node(s); {}", resources.get("CPU", 0),
                resources.get("GPU", 0), len(node_cpus), pool.describe())
    rows = [{"item": Item(os.fsencode(s), os.fsencode(str(r)), os.fsencode(d), f)} for s, r, d, f in planned.todo]
    # Small blocks stream (a decoded photo is tens of MB); capped so a million files stay cheap to schedule.
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 10_000))
    if not pool.whole:
        ds = ds.map(decode_row, num_cpus=IO_CPUS)
    ds = ds.map_batches(Upscale, batch_size=1 if pool.gpus else CPU_BATCH, batch_format="numpy", num_cpus=pool.cpus, num_gpus=pool.gpus,
                        compute=ray.data.ActorPoolStrategy(size=pool.actors),
                        fn_constructor_args=(cfg, model_path, jpeg_path, pool))
    if not pool.whole:
        ds = ds.map(publish_row, num_cpus=IO_CPUS, fn_kwargs={"cfg": cfg})
    done = 0
    mp_in = mp_out = 0.0
    last_note = time.monotonic()
    with tqdm(total=len(rows), unit="img", desc="backfill", dynamic_ncols=True,
              disable=quiet or not sys.stderr.isatty()) as bar:
        for row in ds.iter_rows():
            item: Item = row["outcome"]
            rel = os.fsdecode(item.rel)
            if item.stage:
                failures.append({"file": rel, "stage": item.stage, "reason": item.reason, "exception": item.exception,
                                 "model_version": item.model_version})
                logger.error("failed: {}: {}", rel, item.reason)
            else:
                done += 1
                mp_in += item.size[0] * item.size[1] / 1e6
                mp_out += item.out_size[0] * item.out_size[1] / 1e6
                s = item.seconds
                logger.debug("done {}: {}x{} -> {} {}x{}; decode {:.0f} ms, upscale {:.0f} ms, encode+write {:.0f} ms",
                             rel, *item.size, os.fsdecode(item.output), *item.out_size, 1000 * s.get("decode", 0),
                             1000 * s.get("upscale", 0), 1000 * s.get("write", 0))
            bar.update(1)
            if bar.disable and not quiet and time.monotonic() - last_note > 30:
                last_note = time.monotonic()
                logger.info("backfill: {} of {} file(s) through, {} failed", bar.n, len(rows), len(failures))
    return done, mp_in, mp_out


def _write_failures(path: Path, failures: list[dict]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(path, "".join(json.dumps({**f, "time": now}) + "\n" for f in failures))
