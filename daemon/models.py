"""Which model the daemon serves, and hot-swapping it when a new one is published.

`ModelSlot` owns the served model's identity and every candidate's life:

- it watches the models folder's `current` pointer: `poll()` runs on every pass of the service
  loop (one read of `current` and one stat of the file it names), a watchdog event on the models
  folder wakes the loop at once, and SIGHUP forces a check (and one more try of a refused file);
- only a `current` that promote wrote is taken: its record (the checkpoint's sha256, with an
  HMAC keyed by the models folder's publishing key, model/store.py) must check, and the bytes
  loaded must hash to it; anything else is refused like a bad candidate;
- a change starts a background "model-loader" thread that verifies the candidate exactly as
  `upscaled models promote` does (`model.verify.verify_checkpoint`: safetensors only, complete
  metadata, known architecture, shapes, finite weights, the configured scale, a probe inference
  in line with the claimed metrics), builds its Upscaler and warms it up — all while the old
  model keeps serving;
- a verified candidate is handed back by `poll()`; the service gives it to the pipeline, whose
  inference thread takes it between two images (so every image is upscaled wholly by one
  model) and drops the old one (GPU memory included);
- a refused candidate is remembered by (file, size, mtime): it is not tried again until the
  pointer or that file changes (or on SIGHUP); the old model keeps serving.

`model.path` set in the config pins the service to that file: nothing is watched.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from core.errors import CheckpointError
from model.store import CURRENT, current_checkpoint, verified_current
from core.config import Config

Key = tuple  # identity of a candidate: (path, size, mtime_ns), or a problem marker


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Loaded:
    """A model ready to serve (or serving)."""

    upscaler: Any
    version: str
    origin: str  # configured | published | bundled
    path: Path
    key: Key
    loaded_at: str = field(default_factory=_now_iso)
    probe: dict | None = None  # the verification probe's scores

    def describe(self) -> dict[str, Any]:
        d = {"version": self.version, "origin": self.origin, "file": self.path.name, "path": str(self.path),
             "loaded_at": self.loaded_at}
        if self.probe:
            d["probe"] = self.probe
        runtime = getattr(self.upscaler, "runtime", None)
        if runtime is not None:  # what serves: PyTorch or an exported graph, and in what precision
            d["runtime"], d["precision"] = runtime.name, runtime.precision
        return d


@dataclass
class Wanted:
    """What the pointer asks for now."""

    origin: str
    path: Path | None
    key: Key
    problem: str | None = None  # refused without loading (the pointer names nothing usable)
    sha256: str | None = None  # a published checkpoint: the digest promote recorded for it


class ModelSlot:
    def __init__(self, cfg: Config, wake: threading.Event | None = None, watch: bool = True):
        self.cfg = cfg  # replaced by the service on reload (models.verify_probe/probe_tolerance_db apply live)
        self.wake = wake or threading.Event()
        self.models_dir = cfg.path("models")
        self.pinned = bool(cfg.model.path)
        self.watching = watch and not self.pinned
        self.active: Loaded | None = None  # the model serving, or handed to the inference thread
        self.in_use = True  # the inference thread has taken `active`
        self._shown: dict[str, Any] = {}  # the model in use, for the status
        self.refused: dict[str, Any] | None = None  # the last refused candidate, for the status
        self._refused_key: Key | None = None
        self._loading: Wanted | None = None
        self._loading_since = ""
        self._thread: threading.Thread | None = None
        self._result: tuple[Wanted, Loaded | str] | None = None
        self._lock = threading.Lock()
        self._force = False

    # -- the first model, synchronously at start-up -----------------------------------------------

    def start(self) -> Any:
        """Load the model to serve at start-up (raises when there is none); returns its Upscaler.

        Configured: `model.path`, as before (a bad file stops the daemon). Otherwise the published
        `current`, verified; if it is refused, the bundled default (verified too), and the refusal
        is shown in the status so the operator sees why.
        """
        return on_passing_thread(self._start)

    def _start(self) -> Any:
        if self.pinned:
            from model.runtime import build_upscaler, checkpoint_for

            path, origin = checkpoint_for(self.cfg)
            up = build_upscaler(self.cfg)
            self._warm(up)
            self.active = Loaded(up, up.version, origin, path, _key_of(path))
            self._shown = self.active.describe()
            logger.info("model.path is set: serving {} only; the models folder {} is not watched "
                        "(unset model.path to pick up published models)", path, self.models_dir)
            return up
        wanted = self.wanted()
        result = self._build(wanted) if wanted.problem is None else wanted.problem
        if isinstance(result, str):
            self._refuse(wanted, result, serving=None)
            from model.checkpoint import BUNDLED_DEFAULT

            fallback = Wanted("bundled", BUNDLED_DEFAULT, _key_of(BUNDLED_DEFAULT))
            result = self._build(fallback)
            if isinstance(result, str):
                raise CheckpointError(f"no servable model: {self.refused['reason']}; and the bundled default: {result}")
        self.active = result
        self._shown = result.describe()
        self._log_loaded(result, "serving")
        if self.watching:
            logger.info("watching {} for newly published models", self.models_dir / CURRENT)
        return result.upscaler

    # -- watching ---------------------------------------------------------------------------------

    def schedule(self, observer) -> None:
        """Wake the service loop on any change of `current` (the loop's own check finds it anyway)."""
        if not self.watching or observer is None or not self.models_dir.is_dir():
            return
        from watchdog.events import FileSystemEventHandler

        wake = self.wake

        class _PointerHandler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                for p in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                    if p and os.path.basename(os.fsdecode(p)) == CURRENT:
                        wake.set()
                        return

        try:
            observer.schedule(_PointerHandler(), str(self.models_dir), recursive=False)
        except OSError as e:  # e.g. out of inotify watches: the loop's check still works
            logger.warning("cannot watch {} ({}); relying on the loop's check", self.models_dir, e)

    def force(self) -> None:
        """SIGHUP: check now, and give a refused candidate one more try."""
        self._force = True
        self.wake.set()

    def wanted(self) -> Wanted:
        """What the pointer names now: the published `current`, else the bundled default."""
        from model.checkpoint import BUNDLED_DEFAULT

        # Only what promote (model/store.py publish) recorded and signed: a `current` or a
        # checkpoint dropped into the folder any other way is refused before it is loaded.
        try:
            published = verified_current(self.models_dir)
        except CheckpointError as e:  # Untrusted: named in the status, never loaded
            try:
                named = current_checkpoint(self.models_dir)
            except (ValueError, OSError):  # rewritten since (a non-atomic write caught half done): no name
                named = None
            return Wanted("published", named, ("untrusted", str(e), _key_of(self.models_dir / CURRENT)), str(e))
        except ValueError as e:
            return Wanted("published", None, ("invalid", str(e)), str(e))
        except OSError as e:
            return Wanted("published", None, ("unreadable", str(e)), f"{self.models_dir / CURRENT}: cannot read: {e.strerror or e}")
        if published is None:
            return Wanted("bundled", BUNDLED_DEFAULT, _key_of(BUNDLED_DEFAULT))
        path, digest = published
        key = (*_key_of(path), digest)
        if key[1] is None:
            return Wanted("published", path, key,
                          f"`current` names {path.name}, which is not in {self.models_dir} (or cannot be read)")
        return Wanted("published", path, key, sha256=digest)

    def poll(self) -> Loaded | None:
        """Called on every pass of the service loop. Returns a verified model to swap in, once."""
        if not self.watching:
            return None
        out = None
        with self._lock:
            done, self._result = self._result, None
        if done is not None:
            self._thread = None
            self._loading = None
            wanted, result = done
            if isinstance(result, str):
                self._refuse(wanted, result, serving=self.active)
            elif self.wanted().key != wanted.key:
                logger.info("model {} verified, but `current` changed meanwhile; not swapping to it", result.version)
                _release(result)
            else:
                out = result
        if self._thread is not None:
            return out  # one candidate at a time; the next check looks at the pointer again
        forced, self._force = self._force, False
        wanted = self.wanted()
        if out is not None or wanted.key == (self.active.key if self.active else None):
            return out
        if wanted.key == self._refused_key and not forced:
            return None
        if wanted.problem is not None:
            self._refuse(wanted, wanted.problem, serving=self.active)
            return None
        self._loading, self._loading_since = wanted, _now_iso()
        logger.info("new model in {}: {} ({}); verifying it while {} keeps serving", self.models_dir,
                    wanted.path.name, wanted.origin, self.active.version if self.active else "nothing")
        self._thread = threading.Thread(target=self._load, args=(wanted,), name="model-loader", daemon=True)
        self._thread.start()
        return None

    def installed(self, loaded: Loaded) -> None:
        """The service handed `loaded` to the pipeline; `confirm` tells when it is in use."""
        if self.active is not None:
            self.active.upscaler = None  # the inference thread holds the last reference, and frees it
        self.active = loaded
        self.in_use = False

    def confirm(self, upscaler_in_use: Any) -> bool:
        """True once, when the inference thread has taken the new model."""
        if self.in_use or self.active is None or upscaler_in_use is not self.active.upscaler:
            return False
        self.in_use = True
        self._shown = self.active.describe()
        self._log_loaded(self.active, "now serving")
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Wait (a little) for a loader still running; False if it is still inside torch."""
        t = self._thread
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    # -- status -----------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """For the status: the model in use, what is being loaded, the last refusal."""
        d: dict[str, Any] = dict(self._shown)
        d["watching"] = self.watching
        d["refused"] = self.refused
        w = self._loading
        if w is not None:
            d["loading"] = {"file": w.path.name if w.path else None, "origin": w.origin, "since": self._loading_since,
                            "step": "verifying"}
        elif not self.in_use and self.active is not None:
            d["loading"] = {"file": self.active.path.name, "origin": self.active.origin, "since": self._loading_since,
                            "step": "verified; switching after the image being upscaled"}
        else:
            d["loading"] = None
        return d

    # -- internals --------------------------------------------------------------------------------

    def _load(self, wanted: Wanted) -> None:
        """The model-loader thread."""
        t0 = time.perf_counter()
        result = self._build(wanted)
        logger.debug("candidate {} took {:.2f} s to {}", wanted.path, time.perf_counter() - t0,
                     "refuse" if isinstance(result, str) else "load, verify and warm up")
        with self._lock:
            self._result = (wanted, result)
        self.wake.set()

    def _build(self, wanted: Wanted) -> Loaded | str:
        """Verify and load; a Loaded, or the reason it was refused."""
        from model.engine import Upscaler
        from model.verify import verify_checkpoint
        from model.runtime import engine_options

        cfg = self.cfg
        try:
            g, info, probe = verify_checkpoint(wanted.path, cfg.model.scale, probe=cfg.models.verify_probe,
                                               tolerance_db=cfg.models.probe_tolerance_db, sha256=wanted.sha256)
            up = Upscaler(g, info, engine_options(cfg))
            del g
            self._warm(up)
        except CheckpointError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a candidate never takes the daemon down
            logger.opt(exception=e).debug("loading {}", wanted.path)
            return f"{wanted.path}: cannot be loaded ({type(e).__name__}: {e})"
        p = {"psnr_y": round(float(probe.psnr_y), 3), "bicubic_psnr_y": round(float(probe.bicubic_psnr_y), 3)} if probe else None
        return Loaded(up, info.version, wanted.origin, wanted.path, wanted.key, probe=p)

    @staticmethod
    def _warm(up) -> None:
        t0 = time.perf_counter()
        up.warm_up()
        logger.debug("warm-up took {:.2f} s", time.perf_counter() - t0)

    def _refuse(self, wanted: Wanted, reason: str, serving: Loaded | None) -> None:
        version = None
        if wanted.path is not None:
            try:
                from model.checkpoint import read_info

                version = read_info(wanted.path).version
            except Exception:  # noqa: BLE001 - unreadable metadata is often the very reason
                version = None
        self._refused_key = wanted.key
        self.refused = {"file": wanted.path.name if wanted.path else None, "version": version,
                        "origin": wanted.origin, "reason": reason, "time": _now_iso()}
        logger.error("model {} refused: {}; {}", wanted.path.name if wanted.path else "(none)", reason,
                     f"still serving {serving.version}" if serving else "falling back to the bundled default")

    def _log_loaded(self, m: Loaded, what: str) -> None:
        up = m.upscaler
        views = getattr(up, "ensemble", 1)
        info = getattr(up, "info", None)
        logger.info("{} model {} ({} checkpoint {}), x{}, {}, on {} in {}, runtime {}{}{}", what, m.version, m.origin, m.path.name,
                    getattr(up, "scale", "?"), info.describe() if info else "?", getattr(up, "device", "?"), str(getattr(up, "dtype", "?")).replace("torch.", ""),
                    getattr(getattr(up, "runtime", None), "name", "torch"),
                    f", self-ensemble of {views} views" if views > 1 else "",
                    f"; probe {m.probe['psnr_y']:.2f} dB (bicubic {m.probe['bicubic_psnr_y']:.2f} dB)" if m.probe else "")


def _release(loaded: Loaded) -> None:
    """Free a model that will not be served (on CUDA, hand its cached memory back too)."""
    cuda = getattr(getattr(loaded.upscaler, "device", None), "type", None) == "cuda"
    loaded.upscaler = None
    if cuda:
        import torch

        torch.cuda.empty_cache()


def on_passing_thread(fn):
    """`fn()` on a thread of its own that ends when it returns: its result, or its exception.

    Why: libgomp gives every thread that runs a parallel torch op its own pool of OpenMP workers,
    alive as long as that thread. A model verified and warmed up on the main thread left the
    main thread a pool for the daemon's whole life; beside the inference thread's pool that is
    more OpenMP threads than cores, and libgomp then spins only briefly before putting a worker
    to sleep between two parallel regions. The inference thread's workers slept and were woken
    ~8,500 times in 33 images, and a small file took 30-36 ms longer than its model time to come
    out instead of 11-13 ms (bench/results/2026-12-02.md). A thread that ends takes its pool with it.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, name="model-loader", daemon=True)  # never holds up an exit
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _key_of(path: Path) -> Key:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None, None)
    return (str(path), st.st_size, st.st_mtime_ns)
