"""`upscaled learn`: fine-tune the served model on the images that passed through the inbox.

    material (paths.learn) -> slice / training split by a hash of the name -> (teacher labels)
    -> measure the served model -> fine-tune within the time budget -> measure the candidate
    -> gate -> publish (the running daemon swaps it in)

Pairs are made at the scale of use: a crop of a kept original is the HR target and its LR is
the trainer's degradation (antialiased bicubic, trainer.degrade_*) at the model's scale, so the
model learns the folder's own textures one octave below where it serves them. A kept JPEG also
gets JPEG LR (at its own estimated quality). Crops of images with transparency come only from
fully opaque parts: the colour under alpha 0 is never a target. Each batch mixes the base
training set (trainer.data) in at learn.base_ratio, so the photos are not forgotten.

The gate: learn.holdout of the kept images (chosen by a hash of the name; never trained on,
never labelled by the teacher) is the slice. The candidate is published only if its PSNR-Y on
the slice (cross-scale: each image shrunk by the scale, then upscaled) gains at least
learn.min_gain_db over the served model AND it loses at most learn.max_regression_db on
trainer.val (and trainer.val_extra). Figures and decision go into the checkpoint's metadata
(extra.learn), the run folder's learn.json and paths.runs/learn-last.json.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from loguru import logger
from PIL import Image

from model import store
from core.atomic import atomic_write_bytes, atomic_write_text
from model.checkpoint import load_generator, load_model, read_info, save_checkpoint
from model.engine import resolve_device
from imaging.images import ImageError, decode
from imaging.quality import downscale, fingerprint, resize_up, to_uint8
from trainer.data import BICUBIC, DataError, Degradations, TrainingData, augment, header_size, list_images
from trainer.train import (
    EXIT_LOCKED, EXIT_USAGE, LockedError, autocast_dtype, build_data, cpu_isa, cpu_name, ema_update, settings,
    training_lock,
)
from trainer.validation import ValidationSet, engine_for, label_panel, score
from core.config import Config, LearnConfig
from model.runtime import checkpoint_for

LAST_RUN = "learn-last.json"  # in paths.runs: the last run's table, for the web page
LAST_CROP = "learn-last.png"  # beside it: bicubic | served | candidate | original, a crop of the slice
CROP_SIDE = 96  # HR pixels of each panel of that picture
TEACHER_CROPS_PER_IMAGE = 8


# ----------------------------------------------------------------------------- material


def slice_key(name: str) -> str:
    """What the slice is chosen by: the content digest of a kept file's name (`<time>-<digest>.ext`,
    daemon/keep.py), so an image kept twice lands on the same side; else the whole name."""
    stem = name.rsplit(".", 1)[0]
    return stem.rsplit("-", 1)[-1]


def in_slice(name: str, share: float) -> bool:
    h = int.from_bytes(hashlib.sha256(slice_key(name).encode("utf-8", "surrogateescape")).digest()[:8], "big")
    return h / 2**64 < share


def opaque_corners(alpha: np.ndarray | None, side: int, stride: int = 4) -> np.ndarray | None:
    """Top-left corners (y, x), on a `stride` grid, of `side`-pixel squares whose every pixel is
    fully opaque; None when the image has no alpha (every corner is fine)."""
    if alpha is None:
        return None
    a = alpha if alpha.dtype == np.uint8 else to_uint8(alpha)
    clear = (a < 255).astype(np.int32)
    integral = np.pad(clear.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = a.shape
    ys, xs = np.arange(0, h - side + 1, stride), np.arange(0, w - side + 1, stride)
    if not len(ys) or not len(xs):
        return np.zeros((0, 2), np.int32)
    y0, x0 = np.meshgrid(ys, xs, indexing="ij")
    count = integral[y0 + side, x0 + side] - integral[y0, x0 + side] - integral[y0 + side, x0] + integral[y0, x0]
    return np.stack([y0[count == 0], x0[count == 0]], axis=1).astype(np.int32)


@dataclass
class KeptImage:
    path: Path
    rgb: np.ndarray  # uint8 H x W x 3
    corners: np.ndarray | None  # opaque crop corners, None = anywhere
    jpeg_quality: int | None  # a JPEG's estimated quality: its LR is made a JPEG too

    def crop_at(self, rng: np.random.Generator, side: int) -> np.ndarray:
        h, w = self.rgb.shape[:2]
        if self.corners is None:
            y, x = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        else:
            y, x = map(int, self.corners[int(rng.integers(len(self.corners)))])
        return self.rgb[y : y + side, x : x + side]


def load_kept(path: Path, crop: int) -> KeptImage:
    dec = decode(path)
    rgb = to_uint8(dec.rgb)
    quality = dec.jpeg_quality if dec.format == "JPEG" else None
    if dec.format == "JPEG" and quality is None:
        quality = 90
    return KeptImage(path, rgb, opaque_corners(dec.alpha, crop), quality)


@dataclass
class Material:
    train: list[Path]
    slice: list[Path]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> names

    def count_skipped(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.skipped.items()}


def survey(folder: Path, lc: LearnConfig) -> Material:
    """Split the kept originals into training images and the slice; skip (and count) what cannot
    give a crop: unreadable, smaller than learn.crop, or no fully opaque crop."""
    m = Material([], [])
    try:
        files = list_images(folder)
    except DataError:
        files = []
    for f in files:
        try:
            w, h = header_size(f)
            if min(w, h) < lc.crop:
                m.skipped.setdefault("smaller than learn.crop", []).append(f.name)
                continue
            with Image.open(f) as im:
                maybe_alpha = im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
            if maybe_alpha:
                corners = opaque_corners(decode(f).alpha, lc.crop)
                if corners is not None and not len(corners):
                    m.skipped.setdefault("no fully opaque crop", []).append(f.name)
                    continue
        except (ImageError, OSError, ValueError, SyntaxError) as e:
            m.skipped.setdefault("unreadable", []).append(f"{f.name} ({e})")
            continue
        (m.slice if in_slice(f.name, lc.holdout) else m.train).append(f)
    return m


def slice_set(files: list[Path], lc: LearnConfig, scale: int, folder: Path) -> ValidationSet:
    """The slice as a validation set: a centre-most fully opaque square of each image, at most
    learn.slice_max_side, cropped to a multiple of the scale."""
    images = []
    for f in files:
        dec = decode(f)
        rgb = to_uint8(dec.rgb)
        h, w = rgb.shape[:2]
        side = min(lc.slice_max_side, h, w) // scale * scale
        for s in (side, lc.crop // scale * scale):
            corners = opaque_corners(dec.alpha, s, stride=max(1, s // 8))
            if corners is None:
                y, x = (h - s) // 2, (w - s) // 2
            elif len(corners):
                centre = np.array([(h - s) / 2, (w - s) / 2])
                y, x = map(int, corners[np.argmin(((corners - centre) ** 2).sum(1))])
            else:
                continue
            images.append((f.name, np.ascontiguousarray(rgb[y : y + s, x : x + s])))
            break
    return ValidationSet(folder, images, fingerprint(files, folder, scale), scale)


# ----------------------------------------------------------------------------- the teacher


def teacher_cache(learn_dir: Path, version: str) -> Path:
    return learn_dir / ".teacher" / version


def teacher_boxes(path: Path, lr_side: int, rng_seed: str) -> list[tuple[int, int]]:
    """The crops of one image the teacher labels: fixed per image, so labels are reused across runs."""
    kept = load_kept(path, lr_side)
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(rng_seed.encode("utf-8", "surrogateescape")).digest()[:8], "big"))
    h, w = kept.rgb.shape[:2]
    out = []
    for _ in range(TEACHER_CROPS_PER_IMAGE):
        if kept.corners is None:
            out.append((int(rng.integers(h - lr_side + 1)), int(rng.integers(w - lr_side + 1))))
        elif len(kept.corners):
            y, x = kept.corners[int(rng.integers(len(kept.corners)))]
            out.append((int(y), int(x)))
    return list(dict.fromkeys(out))  # a box drawn twice is labelled (and trained on) once


def label(teacher: str, files: list[str], lr_side: int, cache: str, cpu_seconds: float) -> None:
    """In a child process at idle priority: teacher x4 of `lr_side` crops of each file, cached as
    PNGs named <image>@<y>,<x>.png, until `cpu_seconds` of this process's CPU time are spent."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # threads started from now on inherit it
    else:
        os.nice(19)
    net, _ = load_model(teacher)
    out = Path(cache)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        for f in map(Path, files):
            for y, x in teacher_boxes(f, lr_side, f.name):
                target = out / f"{f.name}@{y},{x}.png"
                if target.exists():
                    continue
                if time.process_time() > cpu_seconds:
                    return
                rgb = load_kept(f, lr_side).rgb[y : y + lr_side, x : x + lr_side]
                t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
                sr = net(t).clamp(0, 1)[0].permute(1, 2, 0).mul(255).round().byte().numpy()
                buf = io.BytesIO()
                Image.fromarray(sr).save(buf, "PNG")
                atomic_write_bytes(target, buf.getvalue())


def teacher_pairs(cfg: Config, lc: LearnConfig, train_files: list[Path], scale: int, lr_side: int,
                  until: float | None = None) -> tuple[list, dict]:
    """(LR crop, teacher target) pairs for the training images: new labels made by a child
    process at idle priority within learn.teacher_cpu_seconds, and stopped at `until` (a
    time.time(); the run's budget: at idle priority on a busy machine the child may get no CPU at
    all), then everything cached read. Labels are written one by one, atomically, so a stopped
    child loses only the one in hand."""
    path, _ = checkpoint_for(cfg, lc.teacher)
    info = read_info(path)
    if info.scale != scale:
        raise DataError("learn.teacher", [f"{path} is a x{info.scale} model; the served model is x{scale}"])
    cache = teacher_cache(cfg.path("learn"), info.version)
    t0 = time.time()
    if lc.teacher_cpu_seconds > 0:
        import multiprocessing

        p = multiprocessing.get_context("spawn").Process(
            target=label, args=(str(path), [str(f) for f in train_files], lr_side, str(cache), lc.teacher_cpu_seconds))
        p.start()
        p.join(None if until is None else max(1.0, until - time.time()))
        if p.is_alive():
            logger.warning("the teacher's labelling (idle priority) is stopped at the run's time budget; "
                           "the labels cached so far are used, the next run goes on from there")
            p.terminate()
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        elif p.exitcode:
            logger.warning("the teacher's labelling process exited with {}; using the labels cached so far", p.exitcode)
    pairs = []
    for f in train_files:
        kept = None
        for y, x in teacher_boxes(f, lr_side, f.name):
            target = cache / f"{f.name}@{y},{x}.png"
            if not target.exists():
                continue
            kept = kept or load_kept(f, lr_side)
            lr = np.ascontiguousarray(kept.rgb[y : y + lr_side, x : x + lr_side])
            pairs.append((lr, np.asarray(Image.open(target).convert("RGB"))))
    logger.info("teacher {}: {} labelled crops of {} training images ({:.0f} s)", info.version, len(pairs),
                len(train_files), time.time() - t0)
    return pairs, {"teacher": info.version, "teacher_pairs": len(pairs)}


# ----------------------------------------------------------------------------- the data


class LearnData(TrainingData):
    """Crops of the kept training images (LR by the trainer's degradation at the model's scale),
    teacher pairs at learn.teacher_share of those, and the base set at learn.base_ratio."""

    def __init__(self, files: list[Path], *, base: TrainingData | None, base_ratio: float, degradations: Degradations,
                 teacher: list[tuple[np.ndarray, np.ndarray]], teacher_share: float, **kw):
        super().__init__(**kw)
        self.files, self.base, self.base_ratio = files, base, base_ratio if base is not None else 0.0
        self.degradations, self.teacher, self.teacher_share = degradations, teacher, teacher_share if teacher else 0.0
        self.kept: dict[Path, KeptImage] = {}

    def image(self, path: Path) -> KeptImage:
        img = self.kept.get(path)
        if img is None:  # the material is bounded by learn.keep_mb; decoded it is kept whole
            img = self.kept[path] = load_kept(path, self.crop)
        return img

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        u, v = rng.random(2)
        if u < self.base_ratio:
            return self.base.sample(rng)
        if v < self.teacher_share:
            lr, hr = self.teacher[int(rng.integers(len(self.teacher)))]
            lr, hr = augment([lr, hr], rng)
            return lr, hr
        kept = self.image(self.files[int(rng.integers(len(self.files)))])
        (hr,) = augment([kept.crop_at(rng, self.crop)], rng)
        side = self.crop // self.scale
        lr = self.degradations.apply(np.asarray(Image.fromarray(hr).resize((side, side), BICUBIC)), rng)
        if kept.jpeg_quality is not None:
            buf = io.BytesIO()
            Image.fromarray(lr).save(buf, "JPEG", quality=int(kept.jpeg_quality))
            lr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        return lr, hr


# ----------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Decision:
    publish: bool
    reason: str


def decide(slice_gain: float, standard_loss: float | None, lc: LearnConfig) -> Decision:
    """The gate: a gain on the folder's own images, paid for by no real loss on the standard set."""
    if not slice_gain >= lc.min_gain_db:
        return Decision(False, f"gains {slice_gain:+.3f} dB on the folder slice, less than learn.min_gain_db "
                               f"({lc.min_gain_db:+.3f} dB)")
    if standard_loss is None:
        return Decision(False, "no standard validation set (trainer.val) to check it against")
    if not standard_loss <= lc.max_regression_db:
        return Decision(False, f"loses {standard_loss:.3f} dB on the standard set, more than learn.max_regression_db "
                               f"({lc.max_regression_db:.3f} dB)")
    return Decision(True, f"gains {slice_gain:+.3f} dB on the folder slice (>= {lc.min_gain_db}) and loses "
                          f"{max(standard_loss, 0):.3f} dB on the standard set (<= {lc.max_regression_db})")


def measure(g: torch.nn.Module, sets: dict[str, ValidationSet]) -> dict[str, float]:
    return {name: score(g, v, "cpu", baselines=False).mean_psnr_y["model"] for name, v in sets.items()}


def before_after(served: torch.nn.Module, candidate: torch.nn.Module, slice_: ValidationSet,
                 side: int = CROP_SIDE) -> tuple[bytes, dict]:
    """A small PNG: bicubic | served | candidate | original, the centre `side` square of the first
    slice image (held out: never trained on), upscaled from its LR as the gate measures it."""
    name, hr = slice_.images[0]
    s = slice_.scale
    h, w = hr.shape[:2]
    c = min(side, h, w) // s * s
    y, x = (h - c) // 2 // s * s, (w - c) // 2 // s * s
    hr_c = np.ascontiguousarray(hr[y : y + c, x : x + c])
    lr = downscale(hr_c, s)
    lr_f = lr.astype(np.float32) / 255.0
    outs = {"bicubic": resize_up(lr, s, Image.Resampling.BICUBIC), "served": engine_for(served).upscale_rgb(lr_f),
            "candidate": engine_for(candidate).upscale_rgb(lr_f), "original": hr_c}
    gap = np.full((c, 2, 3), 255, np.uint8)
    panels = []
    for i, (what, img) in enumerate(outs.items()):
        panels += ([gap] if i else []) + [label_panel(to_uint8(img), what)]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buf, "PNG", optimize=True)
    return buf.getvalue(), {"image": name, "box": [x, y, c, c], "panels": list(outs)}


def table(rows: dict[str, tuple[int, float, float]]) -> str:
    """served vs candidate, one row per set: name -> (images, served, candidate)."""
    width = max(len(n) for n in rows) + 8
    lines = [f"{'':<{width}} {'served':>10} {'candidate':>10} {'change':>9}"]
    for name, (n, a, b) in rows.items():
        lines.append(f"{f'{name} ({n})':<{width}} {a:>7.3f} dB {b:>7.3f} dB {b - a:>+6.3f} dB")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


def learn(cfg: Config, run_dir: Path, *, minutes: float, publish: bool, teacher: str | None = None,
          seed: int | None = None) -> int:
    lc = cfg.learn if teacher is None else dataclasses.replace(cfg.learn, teacher=teacher)
    tc = cfg.trainer
    t_start, cpu_start = time.time(), time.process_time()
    deadline = t_start + minutes * 60
    served_path, origin = checkpoint_for(cfg)
    if read_info(served_path).imported:
        logger.error("the served model {} is imported; learn fine-tunes upscaled's own models only "
                     "(serve one, or learn.teacher: {} to learn from it)", served_path, served_path.stem)
        return EXIT_USAGE
    g, info = load_generator(served_path)
    scale = info.scale
    crop = lc.crop // scale * scale
    learn_dir = cfg.path("learn")
    material = survey(learn_dir, lc)
    skipped = material.count_skipped()
    logger.info("material in {}: {} training images, {} in the slice, skipped {}", learn_dir, len(material.train),
                len(material.slice), skipped or "none")
    if len(material.train) + len(material.slice) < lc.min_images or not material.slice or not material.train:
        print(f"too little material in {learn_dir}: {len(material.train)} training and {len(material.slice)} held-out "
              f"images usable (learn.min_images {lc.min_images}, and at least one of each)"
              + (f"; skipped {skipped}" if skipped else "") + ". Nothing trained."
              + ("" if cfg.learn.keep_mb else " learn.keep_mb is 0: the daemon keeps nothing to learn from."))
        return 0
    if publish and not tc.val:
        logger.error("the gate needs the standard validation set (trainer.val); or --no-publish to only measure")
        return EXIT_USAGE

    # --- what is measured: the slice, and the standard set(s)
    sets = {"folder slice": slice_set(material.slice, lc, scale, learn_dir)}
    for key in ("val", "val_extra"):
        folder = getattr(tc, key)
        if folder:
            v = ValidationSet.load(Path(folder), scale, tc.val_max_images)
            sets[f"{key} {Path(folder).name}"] = v
    t0 = time.time()
    before = measure(g, sets)
    measuring = time.time() - t0
    logger.info("served model {} ({}): {} [{:.0f} s]", info.version, origin,
                ", ".join(f"{k} {v:.3f} dB" for k, v in before.items()), measuring)

    # --- the data
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    base = None
    if (tc.data or tc.paired_lr) and lc.base_ratio > 0:
        base = build_data(dataclasses.replace(tc, crop=crop, batch=1, workers=0), scale, seed, 0)
    elif lc.base_ratio > 0 and not tc.paired_lr:
        logger.warning("no trainer.data: batches are the folder's crops only (learn.base_ratio needs the base set)")
    provenance: dict = {}
    pairs: list = []
    if lc.teacher:
        # labelling may take half of what is left of the budget; training and measuring the rest
        pairs, provenance = teacher_pairs(cfg, lc, material.train, scale, crop // scale,
                                          until=time.time() + 0.5 * max(0.0, deadline - time.time()))
    degradations = Degradations(tc.degrade_blur, tc.degrade_noise, tc.degrade_jpeg, (tc.degrade_jpeg_min, tc.degrade_jpeg_max))
    data = LearnData(material.train, base=base, base_ratio=lc.base_ratio, degradations=degradations, teacher=pairs,
                     teacher_share=lc.teacher_share, scale=scale, crop=crop, batch=lc.batch, seed=seed, rank=0,
                     cache_mb=64, max_side=0)

    # --- fine-tune within the budget, leaving time to measure the candidate as the served model was
    device = resolve_device(tc.device)
    served = copy.deepcopy(g).eval()  # for the before/after picture
    g.to(device).train()
    ema = copy.deepcopy(g).eval().requires_grad_(False)
    opt = torch.optim.Adam(g.parameters(), lr=lc.lr, betas=(tc.beta1, tc.beta2))
    amp = autocast_dtype(tc, device)
    train_until = deadline - 1.2 * measuring - 2
    t_train, step, losses = time.time(), 0, []
    span = max(1.0, train_until - t_train)
    while time.time() < train_until and not (lc.max_steps and step >= lc.max_steps):
        # the cosine follows the time budget, or the step cap when that comes first
        frac = min(1.0, max((time.time() - t_train) / span, step / lc.max_steps if lc.max_steps else 0.0))
        for group in opt.param_groups:
            group["lr"] = lc.lr * min(1.0, (step + 1) / 20) * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
        lr, hr = data[step]
        lr, hr = lr.to(device), hr.to(device)
        with torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False):
            sr = g(lr)
        loss = F.l1_loss(sr.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, g, min(tc.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            logger.info("step {}: L1 {:.4f}, {:.0f} s left", step, float(np.mean(losses[-50:])), train_until - time.time())
    candidate = ema.to("cpu")
    after = measure(candidate, sets) if step else dict(before)

    # --- the gate
    slice_gain = after["folder slice"] - before["folder slice"]
    standard = [k for k in sets if k != "folder slice"]
    standard_loss = max(before[k] - after[k] for k in standard) if standard else None
    decision = decide(slice_gain, standard_loss, lc) if step else Decision(False, "no time left to train a single step")
    figures = {
        "served": info.version, "served_origin": origin, "steps": step, "seed": seed,
        "minutes": round((time.time() - t_start) / 60, 2), "cpu_minutes": round((time.process_time() - cpu_start) / 60, 1),
        "cpu": cpu_name(), "isa": cpu_isa(), "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "train_images": len(material.train), "slice_images": len(material.slice), "skipped": skipped,
        "base_ratio": lc.base_ratio if base is not None else 0.0, **provenance,
        "sets": {k: {"images": len(v.images), "fingerprint": v.fingerprint, "served": before[k], "candidate": after[k]}
                 for k, v in sets.items()},
        "slice_gain_db": slice_gain, "standard_loss_db": standard_loss,
        "min_gain_db": lc.min_gain_db, "max_regression_db": lc.max_regression_db,
        "decision": "published" if decision.publish and publish else ("passed, not published (--no-publish)"
                                                                        if decision.publish else "refused"),
        "reason": decision.reason,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    validation = {}
    if standard:
        first = sets[standard[0]]
        m = score(candidate, first, "cpu").metrics()
        validation = {**first.describe(), "metrics": m}
    cand_path = run_dir / "candidate.safetensors"
    saved = save_checkpoint(cand_path, candidate, step=info.step + step, validation=validation,
                            extra={"learn": figures, "init": info.version})
    figures["candidate"] = saved.version
    try:  # the picture is a courtesy: a failure to make it never costs the run
        png, figures["crop"] = before_after(served, candidate, sets["folder slice"])
        atomic_write_bytes(run_dir / "before-after.png", png)
        atomic_write_bytes(cfg.path("runs") / LAST_CROP, png)
    except (OSError, ValueError, RuntimeError) as e:
        logger.warning("no before/after picture: {}", e)
        figures.pop("crop", None)
    if decision.publish and publish:
        target = store.publish(cfg.path("models"), cand_path, keep=cfg.models.keep)
        figures["published"] = target.name
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": str(run_dir), **figures}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    atomic_write_text(run_dir / "learn.json", text)
    atomic_write_text(cfg.path("runs") / LAST_RUN, text)

    rows = {k: (len(v.images), before[k], after[k]) for k, v in sets.items()}
    print(table(rows))
    print(f"{figures['decision']}: {decision.reason}" + (f"; now serving {figures['published']}" if "published" in figures else ""))
    print(f"({step} steps in {figures['minutes']} min, {figures['cpu_minutes']} CPU min on {figures['cpu']}; "
          f"{len(material.train)} training images, {len(material.slice)} held out, skipped {skipped or 'none'}; run {run_dir})")
    return 0


def main(cfg: Config, args) -> int:
    # The trainer section with its folders resolved against the config's folder, as `train` does.
    ns = type("Args", (), {})()
    cfg = dataclasses.replace(cfg, trainer=settings(cfg, ns))
    minutes = args.minutes if args.minutes is not None else cfg.learn.minutes
    if minutes <= 0:
        logger.error("--minutes must be > 0")
        return EXIT_USAGE
    run_dir = cfg.path("runs") / f"learn-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    try:
        with training_lock(cfg.path("runs"), run_dir):
            return learn(cfg, run_dir, minutes=minutes, publish=not args.no_publish, teacher=args.teacher,
                         seed=cfg.trainer.seed)
    except LockedError as e:
        logger.error("{}", e)
        return EXIT_LOCKED
    except DataError as e:
        logger.error("{}", e)
        return EXIT_USAGE
