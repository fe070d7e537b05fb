"""`upscaled train`: L1 pre-training, then the SRGAN, in one loop that reads top to bottom.

    LR -> validate (+ maybe publish) -> discriminator step -> generator step -> log -> save/stop

Run folder: state.pt (everything needed to continue exactly), metrics.jsonl, samples/,
best.safetensors (best EMA generator by validation PSNR) and last.safetensors (the final EMA
generator). Only the main process writes. Multi-GPU: `torchrun --nproc-per-node N -m upscaled
train ...` (DistributedDataParallel; each process draws its own `batch` crops).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from tqdm import tqdm

from core.atomic import atomic_open
from model.checkpoint import bundled_checkpoint, load_generator, read_info, save_checkpoint
from model.discriminator import Discriminator
from model.engine import cpu_has_native_bf16, resolve_device
from model.generator import Generator, GeneratorConfig
from trainer.data import (
    DataError,
    Degradations,
    HRData,
    MixedData,
    PairedData,
    check_hr_folder,
    check_pairs,
)
from core.config import Config, ConfigError, TrainerConfig
from model.runtime import checkpoint_for
from trainer.publish import publish_if_better
from trainer.validation import ValidationSet, sample_sheet, score

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_LOCKED = 75  # EX_TEMPFAIL: try again later
STATE = "state.pt"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- small helpers


def lr_factor(step: int, tc: TrainerConfig) -> float:
    """Each phase (pre-training, GAN) warms up linearly, then follows the schedule."""
    # A run shorter than pretrain_steps is all pre-training: its cosine ends with the run.
    start, end = (0, min(tc.pretrain_steps, tc.steps)) if step < tc.pretrain_steps else (tc.pretrain_steps, tc.steps)
    n = max(1, end - start)
    warmup = min(100, max(1, n // 20))
    warm = min(1.0, (step - start + 1) / warmup)
    if tc.lr_schedule == "constant":
        return warm
    return warm * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - start) / n)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def rng_state() -> dict:
    """Every RNG, as tensors and plain values so that torch.load(weights_only=True) reads it."""
    _, mt, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"mt": torch.from_numpy(mt.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["mt"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class StopFlag:
    """SIGINT/SIGTERM: the first asks the loop to save and stop; the second stops at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt  # second signal: leave now (state.pt is replaced atomically)
        self.requested = signal.Signals(signum).name

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def load_vgg(path: Path, device: torch.device) -> torch.nn.Module:
    """torchvision's VGG19 features up to relu5_4 from a local weights file (nothing downloaded)."""
    try:
        from torchvision.models import vgg19
    except ImportError:
        raise ConfigError("trainer.perceptual_weight", "torchvision for the VGG loss: pip install -e '.[perceptual]'",
                          "torchvision is not installed") from None

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net = vgg19(weights=None)
    state = {k if k.startswith(("features.", "classifier.")) else f"features.{k}": v for k, v in state.items()}
    net.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")}, strict=False)
    missing = [k for k in net.features.state_dict() if f"features.{k}" not in state]
    if missing:
        raise ConfigError("trainer.vgg_weights", "a VGG19 state dict (features.N.weight/bias)", f"{path} lacks {missing[:3]}")
    features = net.features[:36].eval().to(device)  # through relu5_4 ("VGG54" of the SRGAN paper)
    features.requires_grad_(False)
    return features


def vgg_loss(vgg: torch.nn.Module, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406], device=sr.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=sr.device).view(1, 3, 1, 1)
    return F.mse_loss(vgg((sr - mean) / std), vgg((hr - mean) / std))


# ----------------------------------------------------------------------------- the run


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cpu_isa() -> str:
    """The widest matrix/vector ISA the CPU offers, as these machines differ: amx, avx512_bf16, ..."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    for isa in ("amx_bf16", "avx512_bf16", "avx512f", "avx2"):
        if isa in flags:
            return isa
    return "other"


def autocast_dtype(tc: TrainerConfig, device: torch.device) -> torch.dtype | None:
    if tc.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if tc.precision == "bf16" or cpu_has_native_bf16():
        if not cpu_has_native_bf16():
            logger.warning("bf16 requested, but this CPU emulates bf16 (no AMX / AVX-512 BF16): expect it to be slow")
        return torch.bfloat16
    return None


def build_data(tc: TrainerConfig, scale: int, seed: int, rank: int):
    lr_side = tc.crop // scale
    common = {"scale": scale, "crop": lr_side * scale, "batch": tc.batch, "seed": seed, "rank": rank,
              "cache_mb": max(64, tc.cache_mb // max(1, tc.workers)), "max_side": tc.max_side}
    if tc.paired_lr:
        pairs = check_pairs(Path(tc.paired_lr), Path(tc.paired_hr), scale, common["crop"])
        logger.info("training on {} LR/HR pairs from {} and {}", len(pairs), tc.paired_lr, tc.paired_hr)
        return PairedData(pairs, **common)
    degradations = Degradations(tc.degrade_blur, tc.degrade_noise, tc.degrade_jpeg, (tc.degrade_jpeg_min, tc.degrade_jpeg_max))

    def hr_data(folder: str, cache_mb: int) -> HRData:
        files = check_hr_folder(Path(folder), common["crop"])
        logger.info("training on {} images from {} (LR by antialiased bicubic)", len(files), folder)
        return HRData(files, shrink=(tc.downscale_min, tc.downscale_max), degradations=degradations,
                      **{**common, "cache_mb": cache_mb})

    if not tc.data_extra:
        return hr_data(tc.data, common["cache_mb"])
    half = max(32, common["cache_mb"] // 2)
    logger.info("{:.0%} of the crops from {}", tc.data_extra_share, tc.data_extra)
    return MixedData(hr_data(tc.data, half), hr_data(tc.data_extra, half), tc.data_extra_share, **common)


def train(
    tc: TrainerConfig,
    run_dir: Path,
    *,
    scale: int = 4,
    models_dir: Path | None = None,
    keep: int = 5,
    publish: bool = False,
    resume: bool = False,
    until: int | None = None,
) -> int:
    """Train until `tc.steps` (or `until`, which stops like a signal would: save, return 130)."""
    # --- distributed set-up (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK)
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, resolve_device(tc.device)
    master = rank == 0
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "samples").mkdir(exist_ok=True)
    state_path = run_dir / STATE
    state = torch.load(state_path, map_location="cpu", weights_only=True) if resume else None

    seed = int(state["seed"]) if state else (tc.seed if tc.seed is not None else int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)

    # --- data (every problem reported before anything trains)
    data = build_data(tc, scale, seed, rank)
    val = ValidationSet.load(Path(tc.val), scale, tc.val_max_images) if tc.val and master else None
    val_extra = ValidationSet.load(Path(tc.val_extra), scale, tc.val_max_images) if val and tc.val_extra else None
    for v in (val, val_extra):
        if v:
            logger.info("validating on {} images from {} (fingerprint {})", len(v.images), v.folder, v.fingerprint)

    # --- models
    if state:
        gcfg = GeneratorConfig.from_dict(state["generator_config"])
        g = Generator(gcfg)
    elif tc.init:
        g, info = load_generator(tc.init)
        gcfg = info.generator
        if gcfg.scale != scale:
            raise ConfigError("trainer.init", f"a x{scale} checkpoint (model.scale)", f"{tc.init} is x{gcfg.scale}")
        g.train()
        logger.info("fine-tuning {} (version {}, {})", tc.init, info.version, gcfg)
    else:
        gcfg = GeneratorConfig(scale=scale, channels=tc.generator_channels, blocks=tc.generator_blocks,
                               batchnorm=tc.generator_batchnorm, upsampler=tc.generator_upsampler, skip=tc.generator_skip)
        g = Generator(gcfg)
    d = Discriminator(tc.discriminator_width)
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    opt_g = torch.optim.Adam(g.parameters(), lr=tc.lr_g, betas=(tc.beta1, tc.beta2))
    opt_d = torch.optim.Adam(d.parameters(), lr=tc.lr_d, betas=(tc.beta1, tc.beta2))
    # best_psnr: the selection score, PSNR-Y on val, or with val_extra the mean gain over bicubic
    step, best_psnr, cpu_seconds = 0, -math.inf, 0.0
    if state:
        g.load_state_dict(state["generator"])
        d.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step, best_psnr = int(state["step"]), float(state["best_psnr"])
        cpu_seconds = float(state.get("cpu_seconds", 0.0))
        set_rng_state(state["rng"])
        if (run_dir / "best.safetensors").exists():  # a validation after the last save may have improved it
            m = read_info(run_dir / "best.safetensors").metrics
            best_psnr = max(best_psnr, float(m.get("selection", m.get("psnr_y", -math.inf))))
        logger.info("resuming {} at step {} of {}", run_dir, step, tc.steps)
    g.to(device, memory_format=torch.channels_last)
    d.to(device, memory_format=torch.channels_last)
    ema.to(device)
    for opt in (opt_g, opt_d):  # optimizer state loaded on the CPU follows the parameters
        for st in opt.state.values():
            for k, v in st.items():
                if torch.is_tensor(v) and k != "step":
                    st[k] = v.to(device)
    gm, dm = g, d
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        gm = DDP(g, device_ids=[device.index] if device.type == "cuda" else None)
        dm = DDP(d, device_ids=[device.index] if device.type == "cuda" else None)
    vgg = load_vgg(Path(tc.vgg_weights), device) if tc.vgg_weights and tc.perceptual_weight > 0 else None
    amp = autocast_dtype(tc, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    if master:
        logger.info(
            "generator {} ({:.2f} M params), discriminator width {}, device {}, {}, {} process(es) x {} crops of {} px, {} steps ({})",
            gcfg, sum(p.numel() for p in g.parameters()) / 1e6, tc.discriminator_width, device,
            f"{amp} autocast".replace("torch.", "") if amp else "fp32", world, tc.batch, data.crop, tc.steps,
            # A run shorter than trainer.pretrain_steps never reaches the GAN: say that, not "20 steps (10000 pre-training)".
            "all pre-training (L1), no GAN phase" if tc.steps <= tc.pretrain_steps
            else f"{tc.pretrain_steps} pre-training, then {tc.steps - tc.pretrain_steps} GAN",
        )

    log = MetricsLog(run_dir / "metrics.jsonl", master)
    config_record = {k: v for k, v in dataclasses.asdict(tc).items()}
    log.write({"event": "resume" if state else "start", "step": step, "time": time.time(), "seed": seed, "config": config_record})
    gate_cache: dict = {}
    last_val_step = -1
    cpu_start = time.process_time() - cpu_seconds  # CPU time of every thread, across resumes

    def provenance() -> dict:
        """What trained this model and for how long: the table in docs/training.md reads it."""
        return {"run": str(run_dir), "seed": seed, "cpu": cpu_name(), "isa": cpu_isa(),
                "cpu_minutes": round((time.process_time() - cpu_start) / 60, 1),
                "precision": str(amp).replace("torch.", "") if amp else "fp32", "device": str(device),
                "pixel_loss": tc.pixel_loss, "crop": tc.crop, "batch": tc.batch}

    def save_state(done: int) -> None:
        payload = {
            "version": STATE_VERSION, "step": done, "seed": seed, "best_psnr": best_psnr,
            "generator_config": gcfg.to_dict(), "config": config_record, "scale": scale,
            "cpu_seconds": time.process_time() - cpu_start,
            "generator": g.state_dict(), "discriminator": d.state_dict(), "ema": ema.state_dict(),
            "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "rng": rng_state(),
        }
        with atomic_open(state_path, "wb") as f:
            torch.save(payload, f)

    def validate(at: int) -> None:
        nonlocal best_psnr, last_val_step
        last_val_step = at
        t0 = time.time()
        ema_cpu = copy.deepcopy(ema).to("cpu") if device.type != "cpu" else ema
        report = score(ema_cpu, val, str(device), lr_jpeg=tc.val_lr_jpeg)
        m = report.metrics()
        validation = {**val.describe(), "metrics": m, **({"lr_jpeg": tc.val_lr_jpeg} if tc.val_lr_jpeg else {})}
        m["selection"] = m["psnr_y"]
        if val_extra:
            mx = score(ema_cpu, val_extra, str(device), lr_jpeg=tc.val_lr_jpeg).metrics()
            validation["extra"] = {**val_extra.describe(), "metrics": mx}
            m["selection"] = 0.5 * (m["psnr_y"] - m["bicubic_psnr_y"] + mx["psnr_y"] - mx["bicubic_psnr_y"])
        sheet = sample_sheet(ema_cpu, val, str(device))
        with atomic_open(run_dir / "samples" / f"step_{at:07d}.png", "wb") as f:
            sheet.save(f, "PNG")
        improved = m["selection"] > best_psnr
        if improved:
            best_psnr = m["selection"]
            save_checkpoint(run_dir / "best.safetensors", ema_cpu, step=at, validation=validation, extra=provenance())
        logger.info(
            "step {}: val PSNR-Y {:.3f} dB (bicubic {:.3f}), SSIM-Y {:.4f} (bicubic {:.4f}){}{} [{:.1f} s]",
            at, m["psnr_y"], m["bicubic_psnr_y"], m["ssim_y"], m["bicubic_ssim_y"],
            f"; {val_extra.folder.name}: {mx['psnr_y']:.3f} dB (bicubic {mx['bicubic_psnr_y']:.3f})" if val_extra else "",
            ", new best" if improved else "", time.time() - t0,
        )
        extra_record = {f"extra_{k}": v for k, v in mx.items()} if val_extra else {}
        log.write({"event": "val", "step": at, **m, **extra_record, "lanczos_psnr_y": report.mean_psnr_y["lanczos"],
                   "best": improved, "seconds": time.time() - t0, "cpu_minutes": provenance()["cpu_minutes"]})

    def maybe_publish(at: int) -> None:
        if not (publish and (run_dir / "best.safetensors").exists()):
            return
        r = publish_if_better(run_dir / "best.safetensors", val, models_dir, tolerance_db=tc.publish_tolerance_db,
                              keep=keep, device=str(device), _cache=gate_cache)
        (logger.success if r.published else logger.info)("publishing gate: {}", r.reason)
        log.write({"event": "gate", "step": at, **r.to_dict()})

    stop = StopFlag()
    stop.install()
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(step, tc.steps), num_workers=tc.workers,
        persistent_workers=False, prefetch_factor=2 if tc.workers else None,
    )
    batches = iter(loader)
    # A progress bar on a terminal; in a log (systemd, a file) one line per log_every steps instead.
    bar = tqdm(total=tc.steps, initial=step, disable=not master or not sys.stderr.isatty(), dynamic_ncols=True, unit="step")
    sums: dict[str, float] = {}
    count, t_log = 0, time.time()
    ones = zeros = None
    try:
        while step < tc.steps:
            # 1. learning rate of this step's phase
            gan = step >= tc.pretrain_steps
            f = lr_factor(step, tc)
            for group in opt_g.param_groups:
                group["lr"] = tc.lr_g * f
            for group in opt_d.param_groups:
                group["lr"] = tc.lr_d * f

            # 2. validation (EMA weights) and maybe publishing
            if master and val and step > 0 and step % tc.val_every == 0 and step != last_val_step:
                validate(step)
                if tc.publish_every_val:
                    maybe_publish(step)

            lr, hr = next(batches)
            lr = lr.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            hr = hr.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with autocast():
                sr = gm(lr)
            losses = {}

            # 3. discriminator step: 1/2 [MSE(D(hr), 1) + MSE(D(G(lr)), 0)]
            if gan:
                d.requires_grad_(True)
                with autocast():  # one pass over real and fake (DDP allows one forward per backward)
                    real, fake = dm(torch.cat([hr, sr.detach()])).float().chunk(2)
                if ones is None or ones.shape != real.shape:
                    ones, zeros = torch.ones_like(real), torch.zeros_like(real)
                loss_d = 0.5 * (F.mse_loss(real, ones) + F.mse_loss(fake, zeros))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                losses.update(loss_d=loss_d.item(), d_real=real.mean().item(), d_fake=fake.mean().item())

            # 4. generator step: L1 (+ lambda MSE(D(G(lr)), 1)) (+ VGG)
            sr32 = sr.float()
            l1 = F.l1_loss(sr32, hr)
            loss_g = l1 if tc.pixel_loss == "l1" else F.mse_loss(sr32, hr)
            if gan:
                d.requires_grad_(False)  # D's own weights do not move in the generator's step
                with autocast():
                    adv = F.mse_loss(d(sr).float(), ones)
                loss_g = loss_g + tc.adv_weight * adv
                losses["adv"] = adv.item()
            if gan and vgg is not None:  # phase 1 is pixel loss only
                with autocast():
                    perc = vgg_loss(vgg, sr32, hr).float()
                loss_g = loss_g + tc.perceptual_weight * perc
                losses["perceptual"] = perc.item()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            ema_update(ema, g, min(tc.ema, (1 + step) / (10 + step)))
            losses.update(l1=l1.item(), loss_g=loss_g.item())
            step += 1

            # 5. log
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            if master and (step % tc.log_every == 0 or step == tc.steps):
                now = time.time()
                avg = {k: v / count for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.4g}" for k, v in avg.items() if k in ("l1", "adv", "loss_d")}, refresh=False)
                log.write({"event": "train", "step": step, "phase": "gan" if gan else "pretrain", "lr_g": tc.lr_g * f,
                           "lr_d": tc.lr_d * f, **avg, "steps_per_s": count / max(now - t_log, 1e-9), "time": now})
                if bar.disable:
                    logger.info("step {}/{}: {}, {:.2f} steps/s", step, tc.steps,
                                ", ".join(f"{k} {v:.4g}" for k, v in avg.items() if k in ("l1", "adv", "loss_d")),
                                count / max(now - t_log, 1e-9))
                sums, count, t_log = {}, 0, now

            # 6. save and stop
            requested = stop.requested
            if ddp:  # every process stops at the same step
                flag = torch.tensor([1.0 if requested else 0.0], device=device)
                dist.all_reduce(flag)
                requested = requested or ("signal" if flag.item() else None)
            if until is not None and step >= until and step < tc.steps:
                requested = requested or "until"
            if master and (step % tc.save_every == 0 or requested or step == tc.steps):
                save_state(step)
            if requested:
                bar.close()
                logger.warning("stopped by {} at step {}; state saved in {} (continue with --resume)", requested, step, state_path)
                return EXIT_INTERRUPTED

        bar.close()
        if master:
            save_checkpoint(run_dir / "last.safetensors", copy.deepcopy(ema).to("cpu"), step=step, extra=provenance())
            if val:
                if last_val_step != step:
                    validate(step)
                maybe_publish(step)
            logger.info("done: {} steps in {}", step, run_dir)
        return 0
    finally:
        stop.restore()
        bar.close()
        if ddp:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- the command


def settings(cfg: Config, args) -> TrainerConfig:
    """The trainer section with command-line overrides; folders made absolute."""
    tc = cfg.trainer
    over = {k: getattr(args, k, None) for k in ("data", "paired_lr", "paired_hr", "val", "steps", "out", "init")}
    for k in ("data", "paired_lr", "paired_hr", "val", "out", "init"):  # the shell's paths are relative to its cwd
        if over[k] and not (k == "init" and (over[k] == "current" or bundled_checkpoint(over[k]) is not None)):
            over[k] = os.path.abspath(os.path.expanduser(over[k]))
    tc = dataclasses.replace(tc, **{k: v for k, v in over.items() if v is not None})
    if over["paired_lr"] or over["paired_hr"]:  # the command line's data replaces the config's
        tc = dataclasses.replace(tc, data=over["data"])
    elif over["data"]:
        tc = dataclasses.replace(tc, paired_lr=None, paired_hr=None)
    if tc.init == "current":  # fine-tune whatever the daemon serves now (the periodic retraining)
        tc = dataclasses.replace(tc, init=str(checkpoint_for(cfg)[0]))
    elif tc.init and bundled_checkpoint(tc.init) is not None:  # "fidelity" / "gan": a shipped model
        tc = dataclasses.replace(tc, init=str(bundled_checkpoint(tc.init)))
    paths = {k: str(cfg.resolve(getattr(tc, k))) for k in ("data", "data_extra", "paired_lr", "paired_hr", "val", "val_extra", "out", "init", "vgg_weights") if getattr(tc, k)}
    return dataclasses.replace(tc, **paths)


class LockedError(RuntimeError):
    pass


@contextlib.contextmanager
def training_lock(runs_dir: Path, run_dir: Path):
    """One training run at a time per runs folder (the periodic timer and a person at the shell).

    An flock is released by the kernel when its holder dies, so a crash never leaves a stale lock.
    Under torchrun only the first process takes it: the others belong to the same run.
    """
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    import fcntl

    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / ".train.lock"
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockedError(f"another training run holds {path} ({holder}); not starting a second one") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}, run {run_dir}, since {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()


def main(cfg: Config, args) -> int:
    scale = cfg.model.scale
    tc = settings(cfg, args)
    resume = bool(getattr(args, "resume", False))
    if tc.out:
        run_dir = Path(tc.out)
    elif resume:
        logger.error("--resume needs the run folder: --out RUN_DIR (or trainer.out)")
        return EXIT_USAGE
    else:
        run_dir = cfg.path("runs") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if resume:
        if not (run_dir / STATE).is_file():
            logger.error("--resume: no {} in {}", STATE, run_dir)
            return EXIT_USAGE
        saved = torch.load(run_dir / STATE, map_location="cpu", weights_only=True)
        steps = tc.steps if getattr(args, "steps", None) is not None else saved["config"]["steps"]
        tc = TrainerConfig(**{**saved["config"], "steps": steps})
        scale = int(saved["scale"])
        logger.info("resuming with the run's saved trainer settings (steps {})", steps)
    elif any((run_dir / f).exists() for f in (STATE, "best.safetensors", "last.safetensors")) \
            and not getattr(args, "restart", False):
        logger.error("{} already holds a training run: --resume to continue it, or --restart to start over "
                     "(its checkpoints are then replaced)", run_dir)
        return EXIT_USAGE
    if not tc.val:
        logger.warning("no validation folder (--val / trainer.val): nothing is measured while training, no "
                       "best.safetensors is written (only last.safetensors at the end), and --publish is unavailable")
    if not (tc.data or tc.paired_lr):
        logger.error("no training data: give --data DIR or --paired-lr DIR --paired-hr DIR (or set them in the trainer section)")
        return EXIT_USAGE
    if args.publish and not tc.val:
        logger.error("--publish needs a validation folder (--val DIR): a model is promoted only if it measurably beats the current one")
        return EXIT_USAGE
    if tc.crop // scale < 4:
        logger.error("trainer.crop {} is too small for x{} (LR crop under 4 pixels)", tc.crop, scale)
        return EXIT_USAGE
    try:
        with training_lock(cfg.path("runs"), run_dir):
            return train(tc, run_dir, scale=scale, models_dir=cfg.path("models"), keep=cfg.models.keep,
                         publish=bool(args.publish), resume=resume)
    except LockedError as e:
        logger.error("{}", e)
        return EXIT_LOCKED
    except DataError as e:
        logger.error("{}", e)
        return EXIT_USAGE
