"""Equal-budget ablation: which generator layout and training setting gives the most quality
per CPU-minute (issue 17).

Every variant trains from scratch on the same data (photos/train + mixed/train, half of each
batch each) with L1 and Adam 5e-4 over one cosine cycle, in one process on one thread, for the
same CPU budget. The step count that fills the budget is measured first: a few training steps
on random crops of the variant's size, timed with the process's CPU clock. Then `upscaled
train` runs that many steps, validates once at the end on both validation sets, and the table
gets the gain of PSNR-Y over bicubic on each, the CPU time the run really took and the GFLOP
per output MP. Results go to runs/ablation/<variant>/ and a table to stdout (and --out).

    .venv/bin/python bench/ablation.py --budget 6 --jobs 2 [--only old-8x32,lowres-24x32] [--out FILE]

One thread per run (`--jobs 2` trains two at once on two cores); the budget is the training
steps' CPU time, and the table reports each run's whole CPU time (start-up and validation too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data"
BASE = {
    "data": str(SHARED / "photos" / "train"), "data_extra": str(SHARED / "mixed" / "train"), "data_extra_share": 0.5,
    "val": str(SHARED / "photos" / "val"), "val_extra": str(SHARED / "mixed" / "val"),
    "lr_g": 5e-4, "pixel_loss": "l1", "workers": 0, "max_side": 1280, "downscale_min": 0.6, "downscale_max": 1.0,
    "log_every": 200, "save_every": 100000, "seed": 17, "generator_batchnorm": False,
    # The validated weights are an EMA of the trained ones. The trainer's 0.999 averages over the
    # last ~1000 steps, most of a short run, so early weights would weigh on every variant (the
    # more, the fewer steps it gets): 0.99 averages over the last ~100.
    "ema": 0.99,
}
LOWRES = {"generator_upsampler": "lowres", "generator_skip": "bilinear", "crop": 192, "batch": 8}
# name: (what it asks, trainer settings over BASE)
VARIANTS: dict[str, tuple[str, dict]] = {
    "seed-16x64-bn": ("the seed's default: 16 x 64 with BatchNorm, two x2 stages, 96 px x 16",
                      {"generator_blocks": 16, "generator_channels": 64, "generator_batchnorm": True,
                       "generator_upsampler": "stages", "generator_skip": "none", "crop": 96, "batch": 16}),
    "old-8x32": ("runs 1-5's layout: 8 x 32, two x2 stages, no skip, 96 px x 16",
                 {"generator_blocks": 8, "generator_channels": 32, "generator_upsampler": "stages",
                  "generator_skip": "none", "crop": 96, "batch": 16}),
    "lowres-24x32": ("run 6's layout: 24 x 32, low-resolution tail, bilinear skip, 192 px x 8",
                     {"generator_blocks": 24, "generator_channels": 32, **LOWRES}),
    "lowres-24x32-noskip": ("the same without the bilinear skip",
                            {"generator_blocks": 24, "generator_channels": 32, **LOWRES, "generator_skip": "none"}),
    "lowres-48x24": ("deeper and narrower at about the same FLOPs: 48 x 24",
                     {"generator_blocks": 48, "generator_channels": 24, **LOWRES}),
    "lowres-12x48": ("shallower and wider at about the same FLOPs: 12 x 48",
                     {"generator_blocks": 12, "generator_channels": 48, **LOWRES}),
    "lowres-24x32-fp32": ("run 6's layout trained in fp32 instead of bf16 autocast",
                          {"generator_blocks": 24, "generator_channels": 32, **LOWRES, "precision": "fp32"}),
    "lowres-24x32-crop96": ("run 6's layout on 96-px crops at batch 32 (same pixels per step)",
                            {"generator_blocks": 24, "generator_channels": 32, **LOWRES, "crop": 96, "batch": 32}),
}


def cpu_seconds_per_step(settings: dict, steps: int = 6) -> float:
    """CPU time of one training step of this variant (forward, L1, backward, Adam, EMA) on random
    crops, on this process's single thread; the first two steps warm up and are not counted."""
    import copy

    import torch
    import torch.nn.functional as F

    from model.generator import Generator, GeneratorConfig
    from trainer.train import autocast_dtype, ema_update
    from core.config import TrainerConfig

    tc = TrainerConfig(**{k: v for k, v in settings.items() if k in TrainerConfig.__dataclass_fields__})
    g = Generator(GeneratorConfig(scale=4, channels=tc.generator_channels, blocks=tc.generator_blocks,
                                  batchnorm=tc.generator_batchnorm, upsampler=tc.generator_upsampler,
                                  skip=tc.generator_skip)).to(memory_format=torch.channels_last)
    ema = copy.deepcopy(g).requires_grad_(False)
    opt = torch.optim.Adam(g.parameters(), lr=tc.lr_g)
    amp = autocast_dtype(tc, torch.device("cpu"))
    lr = torch.rand(tc.batch, 3, tc.crop // 4, tc.crop // 4).contiguous(memory_format=torch.channels_last)
    hr = torch.rand(tc.batch, 3, tc.crop, tc.crop).contiguous(memory_format=torch.channels_last)
    t = 0.0
    for i in range(steps):
        t0 = time.process_time()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            sr = g(lr)
        loss = F.l1_loss(sr.float(), hr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema_update(ema, g, 0.999)
        if i >= 2:
            t += time.process_time() - t0
    return t / (steps - 2)


def gflop_per_mp(settings: dict) -> float:
    from model.generator import Generator, GeneratorConfig

    return Generator(GeneratorConfig(scale=4, channels=settings["generator_channels"],
                                               blocks=settings["generator_blocks"],
                                               batchnorm=settings["generator_batchnorm"],
                                               upsampler=settings["generator_upsampler"],
                                               skip=settings["generator_skip"])).flops_per_output_pixel() * 1e6 / 1e9


def run_variant(name: str, settings: dict, budget_min: float, runs: Path, per_step: float) -> dict:
    out = runs / name
    result_file = out / "ablation.json"
    if result_file.exists():  # finished earlier: the table is rebuilt from what it measured
        return json.loads(result_file.read_text())
    steps = max(100, int(budget_min * 60 / per_step))
    sets = [f"trainer.{k}={v}" for k, v in {**settings, "steps": steps, "pretrain_steps": steps, "val_every": steps}.items()]
    # Each run its own runs folder: the trainer allows one run at a time per folder (its lock).
    cmd = [sys.executable, "-m", "upscaled", "train", "--out", str(out), "--restart", "--set", f"paths.runs={out}"]
    for s in sets:
        cmd += ["--set", s]
    print(f"{name}: {per_step:.3f} CPU-s per step -> {steps} steps", flush=True)
    t0 = time.time()
    with open(runs / f"{name}.log", "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        _, status, usage = os.wait4(p.pid, 0)  # this child's own CPU time, whatever else runs
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{name}: training exited {p.returncode}; see {runs / (name + '.log')}")
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    v = [e for e in val if e.get("event") == "val"][-1]
    r = {
        "name": name, "what": VARIANTS[name][0], "steps": steps, "cpu_s_per_step": per_step,
        "cpu_minutes_total": (usage.ru_utime + usage.ru_stime) / 60,
        "cpu_minutes_at_val": v.get("cpu_minutes"), "val_seconds": v.get("seconds"), "wall_minutes": (time.time() - t0) / 60,
        "photos_gain": v["psnr_y"] - v["bicubic_psnr_y"], "mixed_gain": v["extra_psnr_y"] - v["extra_bicubic_psnr_y"],
        "gflop_per_mp": gflop_per_mp(settings), "budget_minutes": budget_min,
    }
    result_file.write_text(json.dumps(r, indent=1))
    return r


def table(results: list[dict], budget: float) -> str:
    from trainer.train import cpu_isa, cpu_name

    lines = [f"Equal budget: {budget:g} CPU-minutes of training steps each, 1 thread; {cpu_name()} ({cpu_isa()}), "
             f"torch {__import__('torch').__version__}, Python {platform.python_version()}",
             "gain = PSNR-Y over bicubic, x4, whole validation images (photos/val 10, mixed/val 18), EMA weights in fp32",
             "",
             f"{'variant':<22} {'GFLOP/MP':>8} {'CPU-s/step':>10} {'steps':>6} {'CPU-min':>7} {'photos':>7} {'mixed':>7} {'mean':>7}",
             "-" * 82]
    for r in results:
        mean = (r["photos_gain"] + r["mixed_gain"]) / 2
        lines.append(f"{r['name']:<22} {r['gflop_per_mp']:>8.0f} {r['cpu_s_per_step']:>10.3f} {r['steps']:>6} "
                     f"{r['cpu_minutes_total']:>7.1f} {r['photos_gain']:>+7.2f} {r['mixed_gain']:>+7.2f} {mean:>+7.2f}")
    lines.append("CPU-min: the whole run's CPU time (start-up, data, training, one validation of both sets)")
    lines += [""] + [f"{r['name']}: {r['what']}" for r in results]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=8.0, help="CPU-minutes of training steps per variant")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "ablation")
    ap.add_argument("--out", type=Path, help="also write the table here")
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once, one core each")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    names = [n for n in a.only.split(",") if n] or list(VARIANTS)
    a.runs.mkdir(parents=True, exist_ok=True)
    # Step costs first, one variant at a time, before any training competes for the CPU.
    cost = {n: cpu_seconds_per_step({**BASE, **VARIANTS[n][1]}) for n in names}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run_variant, n, {**BASE, **VARIANTS[n][1]}, a.budget, a.runs, cost[n]) for n in names]
        results = []
        for f in futures:
            results.append(f.result())
            print(table(results, a.budget), flush=True)
    if a.out:
        a.out.write_text(table(results, a.budget) + "\n")


if __name__ == "__main__":
    main()
