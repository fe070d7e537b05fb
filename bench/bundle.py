"""Make a trained checkpoint the bundled default: fp16 storage, metrics re-measured on it.

    .venv/bin/python bench/bundle.py RUN/best.safetensors --val ../shared/data/photos/val --recipe "..."

fp16 halves the file; the metrics stored are those of the fp16 file itself (measured here), so
nothing claims more than the shipped weights deliver.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.checkpoint import BUNDLED_DEFAULT, load_generator, save_checkpoint  # noqa: E402
from trainer.validation import ValidationSet, score  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--val", required=True, help="validation folder (HR)")
    ap.add_argument("--recipe", default="", help="how it was trained, stored in the metadata")
    ap.add_argument("--out", default=str(BUNDLED_DEFAULT))
    args = ap.parse_args()
    g, info = load_generator(args.checkpoint)
    tmp = Path(args.out).with_suffix(".candidate.safetensors")
    save_checkpoint(tmp, g, step=info.step, dtype=torch.float16)
    g16, _ = load_generator(tmp)
    val = ValidationSet.load(Path(args.val), info.scale)
    report = score(g16, val)
    validation = {**val.describe(), "data": Path(args.val).name, "metrics": report.metrics(),
                  "lanczos_psnr_y": report.mean_psnr_y["lanczos"]}
    extra = {"recipe": args.recipe, "source": info.version, "storage": "float16"}
    out = save_checkpoint(args.out, g16, step=info.step, validation=validation, extra=extra, dtype=torch.float16)
    tmp.unlink()
    m = report.metrics()
    print(f"bundled {out.version}: PSNR-Y {m['psnr_y']:.3f} dB (bicubic {m['bicubic_psnr_y']:.3f}, "
          f"+{m['psnr_y'] - m['bicubic_psnr_y']:.3f} dB), SSIM-Y {m['ssim_y']:.4f} (bicubic {m['bicubic_ssim_y']:.4f})")
    for s in report.images:
        print(f"  {s.name}: model {s.psnr_y['model']:.2f} dB, bicubic {s.psnr_y['bicubic']:.2f} dB, "
              f"lanczos {s.psnr_y['lanczos']:.2f} dB, {s.psnr_y['model'] - s.psnr_y['bicubic']:+.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
