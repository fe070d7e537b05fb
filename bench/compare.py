"""Before/after picture: crops of bicubic | fidelity | GAN | original from the val photos.

    .venv/bin/python bench/compare.py --val ../shared/data/photos/val -o docs/comparison.png

Each whole val photo is downscaled by the evaluation protocol (antialiased bicubic) and upscaled
by every method; the crop shown is the most textured `--side`-pixel square of the original (by
|Laplacian|), so the picture shows where upscalers differ, not sky. The originals' boxes in the
picture are stored in its PNG text chunk `upscaled:originals` (JSON [x, y, side, side] list):
tests/test_bundled.py checks the shipped models against exactly these crops of unseen photos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, PngImagePlugin

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaging.quality import crop_to_multiple, downscale, laplacian_y, resize_up
from model.checkpoint import BUNDLED, load_generator
from model.engine import EngineOptions, Upscaler
from trainer.data import load_validation

LABEL_H = 16


def most_textured(hr: np.ndarray, side: int, step: int = 16) -> tuple[int, int]:
    """Top-left (x, y) of the `side` square with the most |Laplacian| energy, on a `step` grid."""
    lap = np.pad(laplacian_y(hr), 1)
    integral = np.pad(lap.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    best, at = -1.0, (0, 0)
    for y0 in range(0, lap.shape[0] - side + 1, step):
        for x0 in range(0, lap.shape[1] - side + 1, step):
            e = integral[y0 + side, x0 + side] - integral[y0, x0 + side] - integral[y0 + side, x0] + integral[y0, x0]
            if e > best:
                best, at = e, (x0, y0)
    return at


def label(text: str, width: int) -> np.ndarray:
    img = Image.new("RGB", (width, LABEL_H), (0, 0, 0))
    ImageDraw.Draw(img).text((3, 2), text, fill=(255, 255, 255))
    return np.asarray(img)


def side_by_side(panels: list[np.ndarray], gap_value: int, gap: int = 4) -> np.ndarray:
    parts = []
    for i, p in enumerate(panels):
        if i:
            parts.append(np.full((p.shape[0], gap, 3), gap_value, np.uint8))
        parts.append(p)
    return np.concatenate(parts, axis=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--val", required=True, help="folder of HR photos the models never trained on")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--images", default="", help="comma-separated substrings of the photos to use (default: the first 4)")
    ap.add_argument("--side", type=int, default=160, help="HR crop side (a multiple of 4)")
    ap.add_argument("--fidelity", default=str(BUNDLED["fidelity"]), help="fidelity checkpoint (default: the bundled one)")
    ap.add_argument("--gan", default=str(BUNDLED["gan"]), help="GAN checkpoint (default: the bundled one)")
    args = ap.parse_args()
    images, _ = load_validation(Path(args.val), 4, 0)
    if args.images:
        wanted = args.images.split(",")
        images = [next(im for im in images if w in im[0]) for w in wanted]
    else:
        images = images[:4]
    ups = {}
    for kind in ("fidelity", "gan"):
        g, info = load_generator(getattr(args, kind))
        ups[kind] = Upscaler(g, info, EngineOptions(device="cpu", precision="fp32"))
    side, rows, boxes = args.side, [], []
    titles = ("bicubic", "fidelity model", "GAN model", "original")
    for n, (name, hr) in enumerate(images):
        hr = crop_to_multiple(hr, 4)
        lr = downscale(hr, 4)
        outs = [resize_up(lr, 4, Image.Resampling.BICUBIC)]
        outs += [ups[k].upscale_rgb(lr.astype(np.float32) / 255.0) for k in ("fidelity", "gan")]
        outs.append(hr)
        x, y = most_textured(hr, side)
        panels = [o[y : y + side, x : x + side] for o in outs]
        row = side_by_side(panels, 255)
        head = side_by_side([label(t, side) for t in titles], 0)
        caption = label(f"{name} ({x},{y})", row.shape[1])
        top = sum(r.shape[0] for r in rows) + LABEL_H * 2
        boxes.append([3 * (side + 4), top, side, side])
        rows += [caption, head, row]
    sheet = np.concatenate(rows, axis=0)
    info = PngImagePlugin.PngInfo()
    info.add_text("upscaled:originals", json.dumps(boxes))
    info.add_text("upscaled:source", "val photos: " + ", ".join(n for n, _ in images))
    Image.fromarray(sheet).save(args.out, pnginfo=info, optimize=True)
    print(f"wrote {args.out}: {sheet.shape[1]}x{sheet.shape[0]}, {len(images)} photos, crops of {side} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
