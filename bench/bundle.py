"""Make a trained checkpoint one of the bundled models: fp16 storage, metrics re-measured on it.

    .venv/bin/python bench/bundle.py RUN/best.safetensors --kind fidelity --val ../shared/data/photos/val --recipe "..."
    .venv/bin/python bench/bundle.py RUN/last.safetensors --kind gan --val ../shared/data/photos/val --recipe "..."

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

from model.checkpoint import BUNDLED, load_generator, save_checkpoint  # noqa: E402
from trainer.validation import ValidationSet, score  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--val", required=True, help="validation folder (HR)")
    ap.add_argument("--val-extra", help="a second validation folder, measured and stored beside --val")
    ap.add_argument("--lr-jpeg", type=int, default=0, metavar="Q",
                    help="measure on LR images saved as JPEG quality Q (a model for compressed inputs)")
    ap.add_argument("--recipe", default="", help="how it was trained, stored in the metadata")
    ap.add_argument("--kind", choices=sorted(BUNDLED), required=True, help="which bundled model it becomes")
    ap.add_argument("--out", help="write here instead of the package's bundled file")
    args = ap.parse_args()
    args.out = args.out or str(BUNDLED[args.kind])
    g, info = load_generator(args.checkpoint)
    tmp = Path(args.out).with_suffix(".candidate.safetensors")
    save_checkpoint(tmp, g, step=info.step, dtype=torch.float16)
    g16, _ = load_generator(tmp)
    val = ValidationSet.load(Path(args.val), info.scale)
    report = score(g16, val, lr_jpeg=args.lr_jpeg)
    validation = {**val.describe(), "data": Path(args.val).name, "metrics": report.metrics(),
                  "lanczos_psnr_y": report.mean_psnr_y["lanczos"], **({"lr_jpeg": args.lr_jpeg} if args.lr_jpeg else {})}
    if args.val_extra:
        extra_val = ValidationSet.load(Path(args.val_extra), info.scale)
        mx = score(g16, extra_val, lr_jpeg=args.lr_jpeg).metrics()
        validation["extra"] = {**extra_val.describe(), "data": Path(args.val_extra).name, "metrics": mx}
        print(f"{args.val_extra}: PSNR-Y {mx['psnr_y']:.3f} dB (bicubic {mx['bicubic_psnr_y']:.3f}, "
              f"+{mx['psnr_y'] - mx['bicubic_psnr_y']:.3f} dB)")
    extra = {**{k: v for k, v in info.extra.items() if k in ("cpu", "isa", "cpu_minutes", "precision")},
             "kind": args.kind, "recipe": args.recipe, "source": info.version, "storage": "float16",
             "seconds_per_mp_fp32": round(report.model_seconds_per_mp, 3)}
    out = save_checkpoint(args.out, g16, step=info.step, validation=validation, extra=extra, dtype=torch.float16)
    tmp.unlink()
    m = report.metrics()
    print(f"bundled {out.version}: PSNR-Y {m['psnr_y']:.3f} dB (bicubic {m['bicubic_psnr_y']:.3f}, "
          f"+{m['psnr_y'] - m['bicubic_psnr_y']:.3f} dB), SSIM-Y {m['ssim_y']:.4f} (bicubic {m['bicubic_ssim_y']:.4f}), "
          f"detail {m['detail']:.2f} (bicubic {report.mean_detail['bicubic']:.2f}), "
          f"largest colour shift {m['max_colour_shift']:.2%}")
    for s in report.images:
        print(f"  {s.name}: model {s.psnr_y['model']:.2f} dB, bicubic {s.psnr_y['bicubic']:.2f} dB, "
              f"lanczos {s.psnr_y['lanczos']:.2f} dB, {s.psnr_y['model'] - s.psnr_y['bicubic']:+.2f}, "
              f"detail {s.detail['model']:.2f}, colour shift {s.colour_shift:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
