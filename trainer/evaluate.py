"""`upscaled eval`: the validation protocol as a table (per image and mean) for any folder of HR
images: the model (through the same engine users get: configured device and precision, tiled,
BatchNorm folded) against bicubic and Lanczos."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loguru import logger

from core.config import Config
from imaging.quality import evaluate_images, fingerprint
from model.runtime import build_upscaler
from trainer.data import DataError, load_validation

EXIT_USAGE = 2


def format_table(report, model_name: str) -> str:
    methods = list(report.mean_psnr_y)
    name_w = max([len("image"), len("mean")] + [len(s.name) for s in report.images])
    head = (f"{'image':<{name_w}}  {'size':>11}" + "".join(f"  {m + ' PSNR':>13} {'SSIM':>6} {'detail':>6}" for m in methods)
            + f"  {'colour':>6}  {'s/MP':>6}")
    lines = [f"x{report.scale}, Y (BT.601) PSNR dB / SSIM, {report.scale}-pixel border shaved, 8-bit outputs; model: {model_name}",
             "detail = fine texture (|Laplacian| of Y) relative to the original; colour = the model's largest "
             "change of a channel's mean colour (mean row: the worst image)", head, "-" * len(head)]
    for s in report.images:
        row = f"{s.name:<{name_w}}  {f'{s.size[0]}x{s.size[1]}':>11}"
        row += "".join(f"  {s.psnr_y[m]:>13.3f} {s.ssim_y[m]:>6.4f} {s.detail[m]:>6.2f}" for m in methods)
        mp = s.size[0] * s.size[1] / 1e6
        lines.append(row + f"  {s.colour_shift:>6.2%}  {s.seconds / mp:>6.2f}")
    lines.append("-" * len(head))
    mean = f"{'mean':<{name_w}}  {'':>11}" + "".join(
        f"  {report.mean_psnr_y[m]:>13.3f} {report.mean_ssim_y[m]:>6.4f} {report.mean_detail[m]:>6.2f}" for m in methods)
    lines.append(mean + f"  {report.max_colour_shift:>6.2%}  {report.model_seconds_per_mp:>6.2f}")
    bic = report.mean_psnr_y["bicubic"]
    gains = "; ".join(f"{m} {report.mean_psnr_y[m] - bic:+.3f} dB" for m in methods if m not in ("bicubic",))
    lines.append(f"gain over bicubic (PSNR-Y): {gains}")
    if report.peer_seconds_per_mp:
        lines.append("seconds per output MP, same run: model " + f"{report.model_seconds_per_mp:.3f}; " + "; ".join(
            f"{p} {v:.3f}" for p, v in report.peer_seconds_per_mp.items()))
    if report.lr_jpeg:
        lines.append(f"LR images saved as JPEG quality {report.lr_jpeg} before upscaling (every method)")
    return "\n".join(lines)


def main(cfg: Config, args) -> int:
    up = build_upscaler(cfg, args.model)
    folder = Path(args.data)
    try:
        skipped: list[str] = []
        images, files = load_validation(folder, up.scale, args.max_images, skipped)
    except DataError as e:
        logger.error("{}", e)
        return EXIT_USAGE
    peers = {}
    for name in args.peer or []:
        from model.peers import PeerUnavailable, load_peer

        try:
            peers[name] = load_peer(name, up.scale, threads=cfg.inference.threads)
        except PeerUnavailable as e:
            logger.error("{}", e)
            return EXIT_USAGE
    for problem in skipped:
        logger.error("skipped {}", problem)
    up.warm_up()  # the first forward pays for lazy initialisation; keep it out of the timings
    report = evaluate_images(up.upscale_rgb, images, up.scale, peers=peers, lr_jpeg=args.lr_jpeg or 0)
    if args.json:
        out = report.to_dict()
        out.update(skipped=skipped, model=up.version, fingerprint=fingerprint(files, folder, up.scale), data=str(folder),
                   device=str(up.device), precision=str(up.dtype).replace("torch.", ""), self_ensemble=up.ensemble)
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        views = f", self-ensemble of {up.ensemble}" if up.ensemble > 1 else ""
        print(format_table(report, f"{up.version} on {up.device} ({str(up.dtype).replace('torch.', '')}{views})"))
    return 1 if skipped else 0  # like upscale: some files could not be used
