"""One runtime of ours beside SPAN, image by image, with nothing else in the process.

    .venv/bin/python bench/runtime_pairs.py                      # ncnn bf16, photos/val and mixed/val
    .venv/bin/python bench/runtime_pairs.py --runtime openvino --precision fp32 --rounds 5

bench/benchmark.py's runtime rows keep every runtime alive in one process and run them in turn,
which is fair among them but not what the service runs: it serves one runtime. Here one engine
and SPAN (ncnn) take turns on the same centre crops (the benchmark's: at most 768 px, reduced
4x), each image's time the best of --rounds, so a swing in a shared machine's speed does not
count against either. Prints one row per image and the sums per set, with the CPU's flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmark import MIXED, PHOTOS, cpu_flags, downscale, val_crops  # noqa: E402
from model.checkpoint import BUNDLED_DEFAULT, load_model  # noqa: E402
from model.engine import EngineOptions, Upscaler  # noqa: E402
from model.peers import span  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(BUNDLED_DEFAULT))
    ap.add_argument("--runtime", default="ncnn", help="torch, openvino, onnxruntime or ncnn (default ncnn)")
    ap.add_argument("--precision", default="bf16", help="fp32 or bf16 (default bf16)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", type=int, default=768, help="centre crops of at most this side (HR px)")
    ap.add_argument("--val", nargs="*", default=[str(PHOTOS / "val"), str(MIXED / "val")])
    args = ap.parse_args()
    gen, info = load_model(args.model)
    up = Upscaler(gen, info, EngineOptions(device="cpu", precision=args.precision, runtime=args.runtime))
    peer = span(gen.descriptor.scale)
    ours = f"{up.runtime.name} {up.runtime.precision}"
    c = cpu_flags()
    print(f"{ours} beside SPAN (ncnn) on {c['model']} (flags: {' '.join(c['flags'])}), model {info.version}, "
          f"best of {args.rounds} per image\n")
    print(f"| image | LR size | {ours} s | SPAN s | x SPAN |\n|---|---|---:|---:|---:|")
    sums: dict[str, list[float]] = {}
    for name, hr in val_crops([Path(v) for v in args.val], args.side):
        lr = downscale(hr, gen.descriptor.scale).astype(np.float32) / 255.0
        up.upscale_rgb(lr)  # warm: first calls allocate
        peer(lr)
        a = b = float("inf")
        for _ in range(args.rounds):
            t = time.perf_counter()
            up.upscale_rgb(lr)
            a = min(a, time.perf_counter() - t)
            t = time.perf_counter()
            peer(lr)
            b = min(b, time.perf_counter() - t)
        s = sums.setdefault(name.split("/")[0], [0.0, 0.0, 0.0])
        s[0], s[1], s[2] = s[0] + a, s[1] + b, s[2] + hr.shape[0] * hr.shape[1] / 1e6
        print(f"| {name} | {lr.shape[1]}x{lr.shape[0]} | {a:.3f} | {b:.3f} | {a / b:.2f} |")
    print(f"\n| set | output MP | {ours} s/MP | SPAN s/MP | x SPAN |\n|---|---:|---:|---:|---:|")
    for k, (a, b, mp) in sums.items():
        print(f"| {k} | {mp:.1f} | {a / mp:.3f} | {b / mp:.3f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
