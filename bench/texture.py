"""Where does a model's fine texture come from? Three measures side by side, for GAN checkpoints.

    .venv/bin/python bench/texture.py --val ../shared/data/photos/val fidelity gan runs/gan-6/best.safetensors

- `detail`: the mean over images of |Laplacian of Y| relative to the original's (what validation
  stores). A smooth photo's ratio is large for a little grain, so it can rise on grain alone.
- all pixels: the Laplacian energy of all outputs over that of all originals (images weighted by
  their own texture).
- textured quarter: the same on the pixels where the original's Laplacian is in its top quarter
  (grass, fur, lettering): texture where there is texture to restore.
Then the detail on the four test crops of docs/comparison.png (tests/test_bundled.py), against the
first model named. Models: checkpoint paths or bundled names.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imaging.quality import detail, downscale, laplacian_y  # noqa: E402
from model.checkpoint import bundled_checkpoint, load_generator  # noqa: E402
from model.engine import EngineOptions, Upscaler  # noqa: E402
from trainer.data import load_validation  # noqa: E402
from trainer.train import cpu_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoint files or bundled names; the first is the reference")
    ap.add_argument("--val", required=True, type=Path, help="folder of HR validation images")
    args = ap.parse_args()
    engines = {m: Upscaler(*load_generator(bundled_checkpoint(m) or Path(m)), EngineOptions(device="cpu")) for m in args.models}
    ratios = {m: [] for m in engines}
    energy = {m: [0.0, 0.0] for m in engines}  # all pixels, textured quarter
    orig = [0.0, 0.0]
    images, _ = load_validation(args.val, 4)
    for _name, hr in images:
        lr = downscale(hr, 4).astype(np.float32) / 255.0
        lap = laplacian_y(hr)
        textured = lap > np.percentile(lap, 75)
        orig[0] += lap.sum()
        orig[1] += lap[textured].sum()
        for m, e in engines.items():
            out_lap = laplacian_y(e.upscale_rgb(lr))
            ratios[m].append(out_lap.mean() / lap.mean())
            energy[m][0] += out_lap.sum()
            energy[m][1] += out_lap[textured].sum()
    with Image.open(ROOT / "docs" / "comparison.png") as im:
        boxes = json.loads(im.text["upscaled:originals"])
        sheet = np.asarray(im.convert("RGB"))
    crops = [sheet[y : y + h, x : x + w] for x, y, w, h in boxes]
    crop_detail = {m: [detail(e.upscale_rgb(downscale(c, 4).astype(np.float32) / 255.0)) for c in crops]
                   for m, e in engines.items()}
    ref = args.models[0]
    print(f"x4 on {args.val} ({len(ratios[ref])} images) and the {len(crops)} test crops; {cpu_name()}")
    print(f"{'model':48} {'detail':>7} {'all px':>7} {'textured':>9}  crops: detail each (above {ref}?)")
    for m in engines:
        above = sum(a > b for a, b in zip(crop_detail[m], crop_detail[ref]))
        crops_text = " ".join(f"{v:.2f}" for v in crop_detail[m]) + ("" if m == ref else f"  ({above} of {len(crops)})")
        print(f"{m[-48:]:48} {np.mean(ratios[m]):7.3f} {energy[m][0] / orig[0]:7.3f} {energy[m][1] / orig[1]:9.3f}  {crops_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
