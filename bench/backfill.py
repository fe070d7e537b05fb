"""One set of images through every way upscaled scales out, against a bare engine loop.

    .venv/bin/python bench/backfill.py                 # 24 crops of 256x192 from the val photos
    .venv/bin/python bench/backfill.py --count 8 --size 128x96 --model fidelity

Rows, each on the same PNG inputs, with the same model, into an empty output folder:
  - bare engine loop: this process, the model loaded once, then decode -> upscale -> publish
    (upscaled.upscale.write_output) for each file in turn: the cost of the work itself;
  - SPAN x4 (ncnn) in the same bare loop, the reference every speed figure stands beside;
  - `upscaled upscale` (a subprocess);
  - `upscaled backfill` on a local Ray, with 1 and with 2 model workers;
  - two `upscaled serve` daemons on one inbox (each its own status file, inference.threads
    splitting the cores as backfill's two workers do), the files renamed into the inbox at once.

Per row: the wall time for all images, and what each further image costs. For commands that
start from nothing (`upscale`, `backfill`: loading torch and the model, starting Ray and its
actors) that is (wall for all n - wall for one image) / (n - 1), so start-up drops out; the
one-image wall is shown as start-up. The bare loop's clock starts with the model loaded, the
daemons' when the files are renamed into the inbox of the running daemons: their wall / n.
Overhead = seconds per further image over the bare loop's. With --rounds N every row runs N
times in alternating order and its fastest round counts (other processes only slow a row down). Ray's goal: <= 10 % at one worker,
and near-linear with workers where there are cores to add (not on a 2-core machine: two workers
there split the same two cores). Other processes on the machine disturb every row: the load
average before each row is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHOTOS = [Path("/work/shared/data/photos/val"), ROOT.parent / "shared" / "data" / "photos" / "val"]


def cpu_line() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    extra = [f for f in ("avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{name}, {len(os.sched_getaffinity(0))} cores usable, flags: {' '.join(extra) or 'no avx512/amx'}"


def make_inputs(folder: Path, count: int, size: tuple[int, int], photos: Path | None) -> None:
    """`count` PNG crops of `size` from the photos (several per photo, at different places), or
    smooth gradients with noise where there are none."""
    folder.mkdir(parents=True)
    w, h = size
    files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if photos else []
    rng = np.random.default_rng(0)
    for i in range(count):
        if files:
            with Image.open(files[i % len(files)]) as im:
                im = im.convert("RGB")
                x = int(rng.integers(0, max(1, im.width - w)))
                y = int(rng.integers(0, max(1, im.height - h)))
                crop = im.crop((x, y, x + w, y + h))
        else:
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            a = np.stack([np.sin(xx / (5 + i)) * 0.4 + 0.5, np.cos(yy / 7) * 0.4 + 0.5, (xx + yy) / (w + h)], 2)
            crop = Image.fromarray((np.clip(a + rng.normal(0, 0.03, a.shape), 0, 1) * 255).astype(np.uint8))
        crop.save(folder / f"img{i:03d}.png")


def outputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.png") if not any(part.startswith(".") for part in p.relative_to(folder).parts))


def timing(out: Path, t0_wall: float, n: int) -> dict:
    files = outputs(out)
    if len(files) != n:
        raise RuntimeError(f"{out}: {len(files)} outputs, expected {n}")
    mtimes = sorted(p.stat().st_mtime for p in files)
    wall = mtimes[-1] - t0_wall
    return {"wall": wall, "per_image": wall / n, "outputs_span": mtimes[-1] - mtimes[0],
            "mp_out": sum(Image.open(p).size[0] * Image.open(p).size[1] for p in files) / 1e6}


def bare_loop(src: Path, out: Path, model: str, n: int, span: bool = False) -> dict:
    import torch

    from imaging.images import decode
    from core.config import from_dict
    from model.runtime import build_upscaler
    from upscaled.upscale import write_output

    cfg = from_dict({})
    if span:
        from imaging.images import Encoded, unit_float
        from model.peers import span as load_span

        up_span = load_span(4)
    else:
        up = build_upscaler(cfg, model)
    t0 = time.time()
    for f in sorted(src.glob("*.png")):
        dec = decode(f)
        if span:
            enc = Encoded(up_span(unit_float(dec.rgb)), 8)
            native, version = 4, "span-x4"
        else:
            enc = up.upscale_decoded(dec)
            native, version = up.scale, up.version
        write_output(enc, dec.size, native, version, out / f.name, "PNG", cfg.output, conflict="skip",
                     png_threads=torch.get_num_threads())
    return timing(out, t0, n)


def command(cmd: str, flags: list[str], src: Path, out: Path, n: int, log: Path) -> dict:
    """`upscaled CMD SRC [-o] OUT FLAGS`, twice: on one image (start-up and one image) and on all n; the
    difference over n - 1 is what each further image costs, whatever the start-up."""
    walls = []
    for folder, count in ((src.parent / "one", 1), (src, n)):
        if count == 1 and not folder.exists():
            folder.mkdir()
            shutil.copy(sorted(src.glob("*.png"))[0], folder)
        dst = out.with_name(out.name + "-one") if count == 1 else out
        t0 = time.time()
        with open(log, "ab") as f:
            argv = [cmd, str(folder), *(["-o"] if cmd == "upscale" else []), str(dst), *flags]
            r = subprocess.run([sys.executable, "-m", "upscaled", *argv],
                               cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                               env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, timeout=3600)
        if r.returncode != 0:
            raise RuntimeError(f"upscaled {' '.join(argv)} exited {r.returncode}; see {log}")
        walls.append(time.time() - t0)
    t = timing(out, t0, n)
    return {**t, "start": walls[0], "wall": walls[1], "per_image": (walls[1] - walls[0]) / (n - 1)}


def two_daemons(src: Path, base: Path, model: str, n: int) -> dict:
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    folders = {k: base / k for k in ("inbox", "outbox", "done", "failed", "models")}
    for p in folders.values():
        p.mkdir(parents=True)
    procs, logs = [], []
    try:
        for k in range(2):
            data = {"model": {"path": model, "for_jpeg": None}, "inference": {"threads": threads},
                    "paths": {**{name: str(p) for name, p in folders.items()}, "work": str(folders["inbox"] / ".upscaled-work"),
                              "status": str(base / f"status-{k}.json")},
                    "daemon": {"allow_root": True}}
            (base / f"config-{k}.yaml").write_text(yaml.safe_dump(data))
            logs.append(open(base / f"daemon-{k}.log", "wb"))
            procs.append(subprocess.Popen([sys.executable, "-m", "upscaled", "serve", "--config", str(base / f"config-{k}.yaml")],
                                          cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
        deadline = time.time() + 300
        for k in range(2):
            while True:
                try:
                    if json.loads((base / f"status-{k}.json").read_text()).get("state") == "running":
                        break
                except (FileNotFoundError, ValueError):
                    pass
                if time.time() > deadline or procs[k].poll() is not None:
                    raise RuntimeError(f"daemon {k} did not start; see {base / f'daemon-{k}.log'}")
                time.sleep(0.2)
        staging = base / "staging"
        shutil.copytree(src, staging)
        t0 = time.time()
        for f in sorted(staging.glob("*.png")):
            os.rename(f, folders["inbox"] / f.name)
        while len(outputs(folders["outbox"])) < n or len(list(folders["done"].glob("*.png"))) < n:
            if time.time() - t0 > 3600:
                raise RuntimeError("the daemons did not finish within an hour")
            time.sleep(0.1)
        return timing(folders["outbox"], t0, n)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()


def split(base: Path) -> list[int]:
    """Files each daemon did, from its per-file log lines."""
    return [(base / f"daemon-{k}.log").read_text(errors="replace").count(" done ") for k in range(2)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=24, help="images (default 24)")
    p.add_argument("--size", default="256x192", help="input size WxH (default 256x192)")
    p.add_argument("--model", default="fidelity", help="checkpoint or bundled name (default fidelity)")
    p.add_argument("--photos", type=Path, help="folder of photos to crop (default: the shared val photos)")
    p.add_argument("--only", default="bare,span,upscale,ray1,ray2,daemons", help="rows to run, comma-separated")
    p.add_argument("--rounds", type=int, default=1, help="run every row this often, in alternating order, and keep "
                   "each row's fastest round (default 1)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    photos = args.photos or next((c for c in PHOTOS if c.is_dir()), None)
    base = Path(tempfile.mkdtemp(prefix="bench-backfill-", dir="/tmp"))
    rows: dict[str, dict] = {}
    try:
        src = base / "src"
        make_inputs(src, args.count, (w, h), photos)
        n = args.count
        plan = {
            "bare": ("bare engine loop (this process)", lambda out: bare_loop(src, out, args.model, n)),
            "span": ("SPAN x4 (ncnn), bare loop", lambda out: bare_loop(src, out, args.model, n, span=True)),
            "upscale": ("upscaled upscale", lambda out: command(
                "upscale", ["--model", args.model], src, out, n, base / "upscale.log")),
            "ray1": ("upscaled backfill, local Ray, 1 worker", lambda out: command(
                "backfill", ["--model", args.model, "--workers", "1"], src, out, n, base / "ray1.log")),
            "ray2": ("upscaled backfill, local Ray, 2 workers", lambda out: command(
                "backfill", ["--model", args.model, "--workers", "2"], src, out, n, base / "ray2.log")),
            "daemons": ("two daemons on one inbox", lambda out: two_daemons(src, out, args.model, n)),
        }
        keys = args.only.split(",")
        runs: dict[str, list[dict]] = {k: [] for k in keys}
        for r in range(args.rounds):  # alternating order, so that a busy spell of the machine hits different rows
            for key in keys if r % 2 == 0 else keys[::-1]:
                label, fn = plan[key]
                load = os.getloadavg()[0]
                print(f"round {r + 1}: {label} ...", file=sys.stderr, flush=True)
                out = base / f"out-{key}-{r}"
                out.mkdir()
                try:
                    res = {"label": label, "load_before": load, **fn(out)}
                    if key == "daemons":
                        res["split"] = split(out)
                except Exception as e:  # noqa: BLE001 - one row failing still prints the others
                    res = {"label": label, "error": str(e)}
                runs[key].append(res)
        for key, results in runs.items():
            ok = [x for x in results if "error" not in x]
            # the least disturbed round: other processes only ever make a row slower
            rows[key] = {**min(ok, key=lambda x: x["per_image"]), "rounds": [x["per_image"] for x in ok]} if ok else results[0]
    finally:
        keep = os.environ.get("BENCH_KEEP")
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.count} PNG inputs of {w}x{h}, model {args.model}, x4; {cpu_line()}")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load average before each row in the last column "
          "(other processes share this machine)\n")
    print("| way | start-up s | wall s, all images | s per further image (each round) | img/s | output MP/s | overhead vs bare | load |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    bare = rows.get("bare", {}).get("per_image")
    for key, r in rows.items():
        if "error" in r:
            print(f"| {r['label']} | failed: {r['error']} | | | | | | |")
            continue
        s = r["per_image"]
        over = f"{(s / bare - 1) * 100:+.0f} %" if bare and key != "bare" else "—"
        start = f"{r['start']:.1f}" if "start" in r else "—"
        extra = f" (split {r['split'][0]}/{r['split'][1]})" if "split" in r else ""
        every = "/".join(f"{x:.2f}" for x in r["rounds"]) if len(r.get("rounds", [])) > 1 else f"{s:.3f}"
        print(f"| {r['label']}{extra} | {start} | {r['wall']:.1f} | {every} | {1 / s:.2f} | {r['mp_out'] / n / s:.2f} | "
              f"{over} | {r['load_before']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_line(), "count": n, "size": [w, h], "model": args.model,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
