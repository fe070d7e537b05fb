"""`upscaled upscale`: files and folders in, upscaled images out (the model's scale, or
output.scale / --outscale, output.long_side / --long-side), one line per failure."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loguru import logger

from core.atomic import Conflict, numbered
from imaging.images import EXTENSIONS, READ_FORMATS, Encoded, ImageError, is_supported, output_name
from imaging import outscale
from core.config import Config, OutputConfig
from model import pipeline


@dataclass(frozen=True)
class Job:
    src: Path
    rel: Path  # relative output path, before any change of extension


def collect(inputs: list[str], outdir: Path | None = None) -> tuple[list[Job], list[str]]:
    """Expand files and folders (recursively) into jobs; returns (jobs, problems). Files under
    `outdir` are never inputs: `upscale DIR -o DIR/up`, run twice, must not upscale its own outputs."""
    jobs: list[Job] = []
    problems: list[str] = []
    out = outdir.resolve() if outdir is not None else None
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if any(part.startswith(".") for part in rel.parts):
                    continue  # hidden files and our own temp files
                if out is not None and f.resolve().is_relative_to(out):
                    continue
                if f.is_file() and is_supported(f):
                    jobs.append(Job(f, rel))
        elif p.is_file():
            if is_supported(p):
                jobs.append(Job(p, Path(p.name)))
            else:
                problems.append(f"{p}: not a supported image type ({p.suffix or 'no extension'})")
        else:
            problems.append(f"{p}: no such file or folder")
    return jobs, problems


def plan(jobs: list[Job], outdir: Path, requested: str | None, template: str = "{stem}", scale: int | str = 4,
         model: str = "", scale_of: Callable[[Job], str] | None = None,
         unavailable: Callable[[Path], bool] | None = None) -> list[tuple[Job, Path, str]]:
    """Each job's output path and format, no two the same: an input whose output name another
    input of this run already has (photo.gif and photo.png both make photo.png) gets photo-1.png,
    as the daemon does. Outputs that existed before the run are --overwrite's business, unless
    `unavailable(path)` says a name may not be used (backfill: never overwrite, never reuse).
    {scale} is `scale`, or `scale_of(job)` where it differs from image to image (output.long_side)."""
    taken: set[Path] = set()
    out = []
    for job in jobs:
        name, fmt = output_name(job.rel, requested, template, scale_of(job) if scale_of else scale, model)
        dst = outdir / name
        n = 0
        while numbered(dst, n) in taken or (unavailable is not None and unavailable(numbered(dst, n))):
            n += 1
        if n:
            logger.info("{}: {} is taken (another input's output in this run, or already there); writing {}",
                        job.src, dst.name, numbered(dst, n).name)
        taken.add(numbered(dst, n))
        out.append((job, numbered(dst, n), fmt))
    return out


def header_size(path: Path) -> tuple[int, int]:
    """An image's (W, H) from its header, without decoding it; (0, 0) when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path, formats=READ_FORMATS) as im:
            return im.size
    except (OSError, ValueError, SyntaxError):
        return 0, 0


def scale_labels(out: OutputConfig, native: int) -> tuple[str, Callable[[Job], str] | None]:
    """{scale} for output names: one label for the run, or (output.long_side in the name) one
    per image, from its size."""
    if out.long_side is not None and "{scale}" in out.name:
        return "", lambda job: outscale.label(outscale.factor(out, header_size(job.src), native))
    return outscale.label(outscale.factor(out, (0, 0), native)), None


def describe(out: OutputConfig, native: int) -> str:
    """The run's output size in words: x4, x2 (model x4), to a long side of 1000 px (model x4)."""
    if out.scale is not None:
        return f"x{outscale.label(out.scale)}" + (f" (model x{native})" if out.scale != native else "")
    if out.long_side is not None:
        return f"to a long side of {out.long_side} px (model x{native})"
    return f"x{native}"


def tile_bar(files_bar, name: str):
    """A second bar under the files bar for images large enough to take many tiles."""
    from tqdm import tqdm

    state: dict = {}

    def progress(done: int, total: int) -> None:
        if total < 4:
            return
        if "bar" not in state:
            state["bar"] = tqdm(total=total, unit="tile", desc=f"  {name[-30:]}", leave=False, dynamic_ncols=True,
                                position=1, disable=files_bar.disable)
        state["bar"].update(done - state["bar"].n)
        if done >= total:
            state["bar"].close()

    return progress


def write_output(enc: Encoded, size: tuple[int, int], native: int, model_version: str, dst: Path, fmt: str,
                 out: OutputConfig, conflict: Conflict = "replace", png_threads: int = 1) -> tuple[Path, tuple[int, int]]:
    """The model's output `enc` for an input of `size`, finished as output.scale / long_side say
    (resized when that differs from the model's scale, labelled with its provenance) and encoded
    into `dst` by temp name, fsync and rename (`conflict`: model/atomic.py). `enc` is consumed.
    Returns the name it got and the output's (W, H). `upscaled upscale` and `upscaled backfill`
    both publish through here; the daemon's worker runs the same model/pipeline.py steps between its states."""
    enc, _ = pipeline.output_scale(enc, size, native, model_version, out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    h, w = enc.pixels.shape[:2]
    return pipeline.publish(enc, dst, fmt, out, conflict=conflict, png_threads=png_threads), (w, h)


def run(cfg: Config, inputs: list[str], outdir: Path, model: str | None, fmt: str | None, overwrite: bool,
        quiet: bool = False) -> int:
    from tqdm import tqdm

    import torch

    from model.runtime import build_upscaler, config_model

    missing = [raw for raw in inputs if not Path(raw).exists()]
    if missing:  # a mistyped path is a usage error (exit 2), before anything is loaded or written
        logger.error("no such file or folder: {}", ", ".join(missing))
        return 2
    jobs, problems = collect(inputs, outdir)
    for p in problems:
        logger.error("failed: {}", p)
    if not jobs:
        logger.error("no images to upscale in {}", ", ".join(inputs))
        return 1
    requested = fmt or (None if cfg.output.format == "keep" else cfg.output.format)
    up = build_upscaler(cfg, model)
    # model.for_jpeg applies unless --model names one model for everything
    any_jpeg = any(EXTENSIONS.get(j.src.suffix.lower()) == "JPEG" for j in jobs)  # else it is not loaded at all
    up_jpeg = build_upscaler(cfg, config_model(cfg, cfg.model.for_jpeg)) if cfg.model.for_jpeg and not model and any_jpeg else None
    done = skipped = 0
    failed = len(problems)
    mp_in = mp_out = 0.0
    t0 = time.perf_counter()
    # Progress bars on a terminal only (not in logs), and not with -q.
    with tqdm(total=len(jobs), unit="img", desc="upscaling", dynamic_ncols=True,
              disable=quiet or not sys.stderr.isatty()) as bar:
        label, label_of = scale_labels(cfg.output, up.scale)
        for job, dst, out_fmt in plan(jobs, outdir, requested, cfg.output.name, label, up.version, label_of):
            bar.set_postfix_str(job.rel.as_posix()[-40:], refresh=False)
            try:
                if dst.exists() and not overwrite:
                    logger.warning("skipped {}: {} exists (use --overwrite)", job.src, dst)
                    skipped += 1
                    continue
                dec = pipeline.decode(job.src)
                if out_fmt == "JPEG" and dec.alpha is not None:
                    logger.warning("{}: JPEG has no alpha; transparent pixels flattened onto {} (output.jpeg_background)",
                                   job.src, cfg.output.jpeg_background)
                u = pipeline.model_for(dec, cfg, up, up_jpeg)
                enc = pipeline.upscale(u, dec, out_fmt, tile_bar(bar, job.rel.name))
                size = dec.size
                del dec  # free the input before encoding
                # The model is idle while its output is encoded: the PNG writer takes its threads.
                _, (w, h) = write_output(enc, size, u.scale, u.version, dst, out_fmt, cfg.output,
                                         png_threads=torch.get_num_threads())
                del enc
                done += 1
                mp_in += size[0] * size[1] / 1e6
                mp_out += w * h / 1e6
            except (ImageError, OSError) as e:
                failed += 1
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                logger.error("failed: {}: {}", job.src, reason)
            finally:
                bar.update(1)
    dt = time.perf_counter() - t0
    rate = f", {dt / mp_out:.2f} s per output megapixel" if mp_out else ""
    logger.info(
        "upscaled {} image(s) {} with model {} in {:.1f} s ({:.2f} MP in, {:.1f} MP out{}); {} failed, {} skipped",
        done, describe(cfg.output, up.scale), up.version + (f" (JPEGs: {up_jpeg.version})" if up_jpeg else ""), dt, mp_in, mp_out, rate, failed, skipped,
    )
    return 1 if failed else 0
