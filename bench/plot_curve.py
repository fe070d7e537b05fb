"""Validation PSNR-Y against training step, from one or more runs' metrics.jsonl, as a PNG.

    .venv/bin/python bench/plot_curve.py runs/a/metrics.jsonl [runs/b/metrics.jsonl ...] -o docs/curve.png

Runs are drawn one after another on the step axis (a fine-tune continues its parent's curve);
bicubic and Lanczos on the same images are the horizontal reference lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

W, H, L, R, T, B = 900, 520, 70, 20, 40, 50


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--title", default="validation PSNR-Y (x4, val photos)")
    args = ap.parse_args()
    points, offset, refs = [], 0, {}
    for m in args.metrics:
        vals = [r for r in map(json.loads, Path(m).read_text().splitlines()) if r.get("event") == "val" and "psnr_y" in r]
        points += [(offset + r["step"], r["psnr_y"]) for r in vals]
        refs = {"bicubic": vals[-1]["bicubic_psnr_y"], "Lanczos": vals[-1].get("lanczos_psnr_y")}
        offset += max(r["step"] for r in vals)
    lo = min([p for _, p in points] + [v for v in refs.values() if v]) - 0.3
    hi = max([p for _, p in points] + [v for v in refs.values() if v]) + 0.3
    xmax = max(s for s, _ in points)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    x = lambda s: L + (W - L - R) * s / xmax  # noqa: E731
    y = lambda p: T + (H - T - B) * (hi - p) / (hi - lo)  # noqa: E731
    d.rectangle((L, T, W - R, H - B), outline="black")
    for i in range(6):
        p = lo + (hi - lo) * i / 5
        d.text((5, y(p) - 6), f"{p:.2f} dB", fill="black")
        s = xmax * i / 5
        d.text((x(s) - 15, H - B + 8), f"{s:.0f}", fill="black")
    d.text((W // 2 - 20, H - 22), "step", fill="black")
    d.text((L, 12), args.title, fill="black")
    for (name, v), colour in zip(refs.items(), ("gray", "orange")):
        if v:
            d.line((L, y(v), W - R, y(v)), fill=colour, width=1)
            d.text((W - R - 140, y(v) - 14), f"{name} {v:.2f} dB", fill=colour)
    d.line([(x(s), y(p)) for s, p in points], fill="blue", width=2)
    for s, p in points:
        d.ellipse((x(s) - 3, y(p) - 3, x(s) + 3, y(p) + 3), fill="blue")
    d.text((x(points[-1][0]) - 120, y(points[-1][1]) - 18), f"model {points[-1][1]:.2f} dB", fill="blue")
    img.save(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
