"""The Train view: start, watch, stop and resume runs of `upscaled train`.

A run is the very command users type, started as a subprocess (`python -m upscaled train ...`),
never trainer code imported here: the web process stays small and the trainer keeps its own
lock, signals and state. Stop sends SIGINT, on which the trainer saves its state and exits 130;
Resume runs `upscaled train --out RUN --resume`. One run at a time: the trainer's lock
(paths.runs/.train.lock) says who holds it, and the trainer itself refuses a second run.
What the page shows comes from the run folder the trainer writes: metrics.jsonl, samples/,
state.pt, best/last.safetensors, and train.log (the subprocess's output).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from core.config import Config
from web.security import Refused

LOG = "train.log"
CURVE_POINTS = 400  # train-loss points sent to the page (evenly thinned)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_trainer(pid: int) -> bool:
    """The process is an `upscaled train` (so stopping it by pid signals nothing else)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"upscaled" in b" ".join(argv) and b"train" in argv


class Training:
    def __init__(self, cfg: Config, config_path: Path | None, overrides: list[str]):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = list(overrides)
        self.runs = cfg.path("runs")
        self.proc: subprocess.Popen | None = None
        self.proc_run: Path | None = None
        self.last_exit: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._curves: dict[str, tuple[tuple[int, int], dict]] = {}

    # -- who is training -----------------------------------------------------------------------

    def holder(self) -> dict[str, Any] | None:
        """The run holding the trainer's lock now: {pid, run, since}; None when nobody trains.
        The trainer writes `pid N, run DIR, since T` into the lock file and empties it on exit;
        a crash leaves the text but no process."""
        try:
            text = (self.runs / ".train.lock").read_text().strip()
        except OSError:
            return None
        if not text.startswith("pid "):
            return None
        try:
            head, rest = text[4:].split(", run ", 1)
            run, _, since = rest.rpartition(", since ")
            pid = int(head)
        except ValueError:
            return None
        return {"pid": pid, "run": run, "since": since} if _pid_alive(pid) else None

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            code = self.proc.returncode
            what = {0: "finished", 130: "stopped (state saved; resumable)", 75: "refused: another run holds the lock",
                    2: "refused (bad settings or data; see its train.log)"}.get(code, f"ended with exit code {code}")
            self.last_exit = {"run": self.proc_run.name if self.proc_run else None, "code": code, "what": what}
            logger.info("training run {} {}", self.proc_run, what)
            self.proc = None

    def state(self) -> dict[str, Any]:
        with self._lock:
            self._reap()
            h = self.holder()
            if self.proc is not None:
                run = self.proc_run
                return {"running": True, "ours": True, "pid": self.proc.pid, "run": run.name if run else None,
                        "phase": "training" if h else "starting", "last_exit": self.last_exit}
            if h is not None:
                run = Path(h["run"])
                inside = run.parent == self.runs
                return {"running": True, "ours": False, "pid": h["pid"], "run": run.name if inside else str(run),
                        "phase": "training", "since": h["since"], "last_exit": self.last_exit}
            return {"running": False, "last_exit": self.last_exit}

    # -- start, stop, resume -------------------------------------------------------------------

    def _base_args(self) -> list[str]:
        args = [sys.executable, "-m", "upscaled", "train"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        for o in self.overrides:
            args += ["--set", o]
        return args

    def _allowed_folder(self, value: str, key: str) -> Path:
        """A data or validation folder the page may name: the configured one, or one under web.data_root."""
        tc = self.cfg.trainer
        configured = {self.cfg.resolve(v) for v in (tc.data, tc.val, tc.data_extra, tc.val_extra) if v}
        path = Path(os.path.realpath(self.cfg.resolve(value)))
        root = self.cfg.web.data_root
        ok = path in {Path(os.path.realpath(c)) for c in configured} or (
            root is not None and path.is_relative_to(os.path.realpath(self.cfg.resolve(root))))
        if not ok:
            fix = ("set web.data_root to a folder that holds it (config.yaml `web: {data_root: /path/to/data}`, or "
                   "`upscaled web --set web.data_root=/path/to/data`) and restart the page" if root is None
                   else f"it must lie under web.data_root ({self.cfg.resolve(root)})")
            raise Refused(400, f"{key}: {value} is neither the configured trainer folder nor under web.data_root: {fix}")
        if not path.is_dir():
            raise Refused(400, f"{key}: {path} is not a folder")
        return path

    def plan(self, form: dict[str, Any]) -> tuple[list[str], Path, dict[str, Any]]:
        """The command line for the seed's parameters, checked; and the run folder."""
        tc, scale = self.cfg.trainer, self.cfg.model.scale

        def number(key: str, kind, lo, hi, default):
            raw = form.get(key)
            if raw in (None, ""):
                return default
            try:
                v = kind(raw)
            except (TypeError, ValueError):
                raise Refused(400, f"{key}: expected a number, got {raw!r}") from None
            if not (lo <= v <= hi) or (isinstance(v, float) and not math.isfinite(v)):
                raise Refused(400, f"{key}: expected {lo}..{hi}, got {raw!r}")
            return v

        data_s = form.get("data") or tc.data
        if not data_s:
            raise Refused(400, "data: name a folder of training images (or set trainer.data)")
        data = self._allowed_folder(str(data_s), "data")
        val_s = form.get("val") or tc.val
        val = self._allowed_folder(str(val_s), "val") if val_s else None
        crop = number("crop", int, 4 * scale, 2048, tc.crop)  # HR crop; the LR crop is crop / scale
        if crop % scale:
            raise Refused(400, f"crop: expected a multiple of the scale ({scale}), got {crop}")
        batch = number("batch", int, 1, 1024, tc.batch)
        lr = number("lr", float, 1e-7, 1.0, tc.lr_g)
        val_every = number("val_every", int, 1, 10_000_000, tc.val_every)
        epochs = number("epochs", float, 0.0, 1e6, 0.0)
        if epochs:  # the trainer counts steps; an epoch is one pass of `batch` crops per image
            images = sum(1 for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            steps = max(1, math.ceil(epochs * images / batch))
        else:
            steps = number("steps", int, 1, 100_000_000, tc.steps)
        init_current = str(form.get("init_current", "")).lower() in ("1", "true", "on", "yes")
        run = self.runs / datetime.now(timezone.utc).strftime("web-%Y%m%dT%H%M%SZ")
        args = self._base_args() + ["--data", str(data), "--out", str(run), "--steps", str(steps),
                                    "--set", f"trainer.crop={crop}", "--set", f"trainer.batch={batch}",
                                    "--set", f"trainer.lr_g={lr!r}", "--set", f"trainer.val_every={val_every}",
                                    "--set", f"trainer.log_every={max(1, min(tc.log_every, val_every))}"]
        if val is not None:
            args += ["--val", str(val)]
        if init_current:
            args += ["--init", "current"]
        params = {"data": str(data), "val": str(val) if val else None, "crop_out": crop, "crop_in": crop // scale,
                  "batch": batch, "steps": steps, "lr": lr, "val_every": val_every, "init_current": init_current}
        return args, run, params

    def _spawn(self, args: list[str], run: Path, what: str) -> dict[str, Any]:
        with self._lock:
            self._reap()
            if self.proc is not None or self.holder() is not None:
                raise Refused(409, "a training run is already going (one at a time: the trainer's lock)")
            run.mkdir(parents=True, exist_ok=True)
            log = open(run / LOG, "ab")
            try:
                # Its own session: a run outlives a restart of the page (systemd stops it with
                # the unit's cgroup, by SIGTERM, on which it saves its state as well).
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             cwd=self.cfg.base_dir, start_new_session=True)
            finally:
                log.close()
            self.proc_run = run
            self.last_exit = None
        logger.info("training run {} {} (pid {}): {}", run.name, what, self.proc.pid, " ".join(args[1:]))
        return {"run": run.name, "pid": self.proc.pid}

    def start(self, form: dict[str, Any]) -> dict[str, Any]:
        args, run, params = self.plan(form)
        out = self._spawn(args, run, "started")
        (run / "web-params.json").write_text(json.dumps(params, indent=2) + "\n")
        return {**out, "params": params}

    def resume(self, name: str) -> dict[str, Any]:
        run = self.run_dir(name)
        if not (run / "state.pt").is_file():
            raise Refused(409, f"{name} has no saved state to resume from")
        if (run / "last.safetensors").is_file():
            raise Refused(409, f"{name} has finished")
        return self._spawn(self._base_args() + ["--out", str(run), "--resume"], run, "resumed")

    def stop(self) -> dict[str, Any]:
        """SIGINT to the running trainer: it finishes its step, saves state.pt and exits 130."""
        with self._lock:
            self._reap()
            if self.proc is not None:
                pid, run = self.proc.pid, self.proc_run.name if self.proc_run else "?"
            else:
                h = self.holder()
                if h is None:
                    raise Refused(409, "no training run is going")
                if not _is_trainer(h["pid"]):
                    raise Refused(409, f"pid {h['pid']} holds the trainer's lock but is not an upscaled train")
                pid, run = h["pid"], Path(h["run"]).name
            os.kill(pid, signal.SIGINT)
        logger.info("training run {} (pid {}): stop requested (SIGINT: it saves its state)", run, pid)
        return {"run": run, "pid": pid}

    # -- run folders ---------------------------------------------------------------------------

    def run_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith(".") or "\x00" in name:
            raise Refused(404, "no such run")
        run = self.runs / name
        if not run.is_dir() or not Path(os.path.realpath(run)).is_relative_to(os.path.realpath(self.runs)):
            raise Refused(404, "no such run")
        return run

    def list_runs(self) -> list[dict[str, Any]]:
        st = self.state()
        out = []
        for run in sorted(self.runs.iterdir(), key=lambda p: p.name, reverse=True) if self.runs.is_dir() else []:
            if run.name.startswith(".") or not run.is_dir() or not (run / "metrics.jsonl").exists() and not (run / LOG).exists():
                continue
            out.append(self.summary(run, st))
        return out

    def summary(self, run: Path, st: dict[str, Any] | None = None) -> dict[str, Any]:
        st = st or self.state()
        c = self.curve(run)
        running = st.get("running") and st.get("run") == run.name
        if running:
            state = "running"
        elif (run / "last.safetensors").is_file():
            state = "finished"
        elif (run / "state.pt").is_file():
            state = "stopped"
        else:
            state = "ended"
        samples = sorted(p.name for p in (run / "samples").glob("step_*.png")) if (run / "samples").is_dir() else []
        vals = c["val"]
        return {"name": run.name, "state": state, "resumable": state == "stopped", "step": c["step"], "steps": c["steps"],
                "best": max((v["psnr_y"] for v in vals), default=None), "last_val": vals[-1] if vals else None,
                "samples": samples[-8:], "checkpoints": [n for n in ("best.safetensors", "last.safetensors") if (run / n).is_file()],
                "params": _read_json(run / "web-params.json")}

    def curve(self, run: Path) -> dict[str, Any]:
        """Loss and validation records from metrics.jsonl (cached until the file grows)."""
        path = run / "metrics.jsonl"
        try:
            s = path.stat()
            key = (s.st_size, s.st_mtime_ns)
        except OSError:
            return {"train": [], "val": [], "step": 0, "steps": None}
        cached = self._curves.get(str(path))
        if cached and cached[0] == key:
            return cached[1]
        train, val, steps, step = [], [], None, 0
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line being written
            ev = r.get("event")
            if ev in ("start", "resume"):
                steps = (r.get("config") or {}).get("steps", steps)
                step = max(step, int(r.get("step") or 0))
            elif ev == "train":
                step = max(step, int(r["step"]))
                train.append({"step": r["step"], "l1": r.get("l1"), "loss_g": r.get("loss_g"), "phase": r.get("phase")})
            elif ev == "val":
                val.append({"step": r["step"], "psnr_y": r.get("psnr_y"), "bicubic_psnr_y": r.get("bicubic_psnr_y"),
                            "ssim_y": r.get("ssim_y")})
        if len(train) > CURVE_POINTS:
            every = math.ceil(len(train) / CURVE_POINTS)
            train = train[::every] + ([train[-1]] if (len(train) - 1) % every else [])
        out = {"train": train, "val": val, "step": step, "steps": steps}
        self._curves[str(path)] = (key, out)
        return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# -- run-time estimate (the Train form) -------------------------------------------------------------

CPU_DEFAULT_STEPS = 1000  # the form's default where training runs on the CPU: a fine-tune of about an hour on 2 cores
_probes: dict[tuple, dict[str, Any]] = {}
_probe_lock = threading.Lock()


def probe_step_seconds(cfg: Config, batch: int, crop: int) -> dict[str, Any]:
    """Seconds per training step on this machine, measured: a few real steps of the configured
    generator (L1: forward and backward) and of the GAN phase (plus the discriminator's step and
    its adversarial term), on random crops of the form's size. Cached per (batch, crop)."""
    import time

    import torch
    import torch.nn.functional as F

    from model.discriminator import Discriminator
    from model.generator import Generator, GeneratorConfig

    tc, scale = cfg.trainer, cfg.model.scale
    device = tc.device if tc.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    key = (batch, crop, device)
    with _probe_lock:
        if key in _probes:
            return _probes[key]
        torch.manual_seed(0)
        g = Generator(GeneratorConfig(scale=scale, channels=tc.generator_channels, blocks=tc.generator_blocks,
                                      upsampler=tc.generator_upsampler, skip=tc.generator_skip,
                                      batchnorm=tc.generator_batchnorm)).to(device).train()
        d = Discriminator(tc.discriminator_width).to(device).train()
        opt_g, opt_d = torch.optim.Adam(g.parameters(), 1e-4), torch.optim.Adam(d.parameters(), 1e-4)
        lr = torch.rand(batch, 3, crop // scale, crop // scale, device=device)
        hr = torch.rand(batch, 3, crop, crop, device=device)

        def step(gan: bool) -> None:
            sr = g(lr)
            loss = F.l1_loss(sr, hr)
            if gan:
                real, fake = d(torch.cat([hr, sr.detach()])).chunk(2)
                loss_d = F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                loss = loss + 1e-3 * F.mse_loss(d(sr), torch.ones_like(real))
            opt_g.zero_grad()
            loss.backward()
            opt_g.step()

        def timed(gan: bool, n: int = 2) -> float:
            step(gan)  # warm-up: first-call costs are not per step
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                step(gan)
            if device == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n

        out = {"device": device, "batch": batch, "crop": crop, "pretrain_s": round(timed(False), 4),
               "gan_s": round(timed(True), 4), "pretrain_steps": tc.pretrain_steps,
               "suggested_steps": tc.steps if device == "cuda" else min(tc.steps, CPU_DEFAULT_STEPS)}
        _probes[key] = out
        logger.info("training step probe (batch {}, crop {}, {}): {:.2f} s per pre-training step, {:.2f} s per GAN step",
                    batch, crop, device, out["pretrain_s"], out["gan_s"])
        return out
