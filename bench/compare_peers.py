"""Before/after beside SPAN: input | bicubic | SPAN | ours | original, for a photo, a text page,
an illustration and a compressed JPEG (the same photo, its LR saved as JPEG quality 75).

    .venv/bin/python bench/compare_peers.py -o docs/comparison-span.png \\
        --photo ../shared/data/photos/val:tiktok --text ../shared/data/mixed/val:gnuplot-p17 \\
        --art ../shared/data/mixed/val:widelands --jpeg-model real

Each image is downscaled by the evaluation protocol (antialiased bicubic), upscaled by every
method, and the crop shown is its most textured square (bench/compare.py). "input" is the LR
crop shown with nearest-neighbour pixels, the size the others are made to. The PSNR-Y of each
method on the whole image is written under its crop. Needs the peers extra (SPAN through ncnn).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare import label, most_textured, side_by_side  # noqa: E402

from core.config import from_dict  # noqa: E402
from imaging.quality import crop_to_multiple, downscale, jpeg, psnr_ssim_y, resize_up  # noqa: E402
from model.checkpoint import load_generator  # noqa: E402
from model.engine import EngineOptions, Upscaler  # noqa: E402
from model.peers import span  # noqa: E402
from model.runtime import checkpoint_for  # noqa: E402
from trainer.data import load_validation  # noqa: E402


def pick(spec: str) -> tuple[str, np.ndarray]:
    """FOLDER:SUBSTRING -> (name, HR image) of the first validation image whose path has it."""
    folder, needle = spec.rsplit(":", 1)
    images, _ = load_validation(Path(folder), 4, 0)
    return next((n, im) for n, im in images if needle in n)


def engine(model: str) -> Upscaler:
    path, _ = checkpoint_for(from_dict({}), model)
    g, info = load_generator(path)
    return Upscaler(g, info, EngineOptions(device="cpu", precision="fp32"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--photo", required=True, help="FOLDER:NAME-SUBSTRING")
    ap.add_argument("--text", required=True, help="FOLDER:NAME-SUBSTRING")
    ap.add_argument("--art", required=True, help="FOLDER:NAME-SUBSTRING")
    ap.add_argument("--model", default="fidelity", help="ours: a bundled name or a checkpoint (default fidelity)")
    ap.add_argument("--jpeg-model", default=None, help="ours on the JPEG row (default: --model)")
    ap.add_argument("--jpeg-quality", type=int, default=75)
    ap.add_argument("--side", type=int, default=128, help="HR crop side (a multiple of 4)")
    args = ap.parse_args()
    ours, ours_jpeg = engine(args.model), engine(args.jpeg_model or args.model)
    peer = span(4)
    photo = pick(args.photo)
    cases = [("photo", *photo, 0, ours), ("text page", *pick(args.text), 0, ours),
             ("illustration", *pick(args.art), 0, ours), (f"JPEG q{args.jpeg_quality}", *photo, args.jpeg_quality, ours_jpeg)]
    side, rows = args.side, []
    for what, name, hr, q, up in cases:
        hr = crop_to_multiple(hr, 4)
        lr = downscale(hr, 4)
        if q:
            lr = jpeg(lr, q)
        outs = {"bicubic": resize_up(lr, 4, Image.Resampling.BICUBIC), "SPAN": peer(lr.astype(np.float32) / 255.0),
                f"ours ({up.version[-8:]})": up.upscale_rgb(lr.astype(np.float32) / 255.0)}
        x, y = most_textured(hr, side)
        lr_crop = lr[y // 4 : (y + side) // 4, x // 4 : (x + side) // 4]
        panels = [np.asarray(Image.fromarray(lr_crop).resize((side, side), Image.Resampling.NEAREST))]
        titles = ["input"]
        for t, o in outs.items():
            panels.append(o[y : y + side, x : x + side])
            titles.append(f"{t} {psnr_ssim_y(o, hr, 4)[0]:.2f} dB")
        panels.append(hr[y : y + side, x : x + side])
        titles.append("original")
        rows += [label(f"{what}: {name}", (side + 4) * len(panels) - 4), side_by_side([label(t, side) for t in titles], 0),
                 side_by_side(panels, 255)]
    sheet = np.concatenate(rows, axis=0)
    Image.fromarray(sheet).save(args.out, optimize=True)
    print(f"wrote {args.out}: {sheet.shape[1]}x{sheet.shape[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
