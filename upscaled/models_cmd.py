"""`upscaled models …`: list, show, promote and roll back the models the daemon serves."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from model import store
from model.checkpoint import BUNDLED_DEFAULT, CheckpointError, CheckpointInfo, read_info
from upscaled.config import Config


def _row(path: Path, info: CheckpointInfo, current: Path | None) -> dict:
    return {
        "version": info.version,
        "file": str(path),
        "current": current is not None and path.name == current.name,
        "created": info.created,
        "step": info.step,
        "scale": info.scale,
        "generator": info.generator.to_dict(),
        "validation": info.validation,
    }


def _metrics_text(info: CheckpointInfo) -> str:
    m = info.metrics
    if "psnr_y" not in m:
        return "no validation metrics"
    gain = f" ({m['psnr_y'] - m['bicubic_psnr_y']:+.2f} dB over bicubic)".replace("-", "\u2212") if "bicubic_psnr_y" in m else ""
    ssim = f", SSIM {m['ssim_y']:.4f}" if "ssim_y" in m else ""
    return f"PSNR-Y {m['psnr_y']:.2f} dB{gain}{ssim}"


def find_version(models_dir: Path, version: str) -> Path:
    for path, info in store.published(models_dir):
        if info.version == version or path.name == version or path.stem == version:
            return path
    raise CheckpointError(f"no published version {version!r} in {models_dir} (see `upscaled models list`)")


def cmd_list(cfg: Config, as_json: bool) -> int:
    models_dir = cfg.path("models")
    current = store.current_checkpoint(models_dir)
    rows = [_row(p, i, current) for p, i in store.published(models_dir)]
    if as_json:
        print(json.dumps({"models": str(models_dir), "current": current.name if current else None,
                          "bundled": str(BUNDLED_DEFAULT), "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"no published models in {models_dir}; serving the bundled default {read_info(BUNDLED_DEFAULT).version}")
        return 0
    for r, (_, info) in zip(rows, store.published(models_dir)):
        mark = "*" if r["current"] else " "
        print(f"{mark} {r['version']}  created {r['created']}  step {r['step']:>7}  x{r['scale']}  {_metrics_text(info)}")
    if current is None:
        print(f"(no current pointer: serving the bundled default {read_info(BUNDLED_DEFAULT).version})")
    return 0


def cmd_show(cfg: Config, version: str) -> int:
    models_dir = cfg.path("models")
    path = BUNDLED_DEFAULT if version == "bundled" else find_version(models_dir, version)
    row = _row(path, read_info(path), store.current_checkpoint(models_dir))
    print(json.dumps(row, indent=2))
    return 0


def cmd_promote(cfg: Config, path: Path, gate: Path | None) -> int:
    from model.verify import verify_checkpoint

    _, info, probe = verify_checkpoint(path, cfg.model.scale, probe=cfg.models.verify_probe,
                                       tolerance_db=cfg.models.probe_tolerance_db)
    if probe:
        logger.info("{} passes verification (probe {:+.2f} dB vs bicubic)", info.version, probe.gain_db)
    if gate is not None:
        # The trainer's publishing gate, so a promotion by hand is judged exactly like a trained one.
        from trainer.publish import publish_if_better
        from trainer.validation import ValidationSet

        result = publish_if_better(path, ValidationSet.load(gate, cfg.model.scale), cfg.path("models"),
                                   tolerance_db=cfg.trainer.publish_tolerance_db, keep=cfg.models.keep,
                                   device=cfg.inference.device)
        if not result.published:
            logger.error("not promoted: {}", result.reason)
            return 1
        logger.info("gate passed: {}", result.reason)
        return 0
    target = store.publish(cfg.path("models"), path, keep=cfg.models.keep)
    logger.info("published {} as {}; it is now current", info.version, target)
    return 0


def cmd_rollback(cfg: Config, version: str | None) -> int:
    models_dir = cfg.path("models")
    current = store.current_checkpoint(models_dir)
    if version:
        target = find_version(models_dir, version)
    else:
        present = {p.name for p, _ in store.published(models_dir)}
        earlier = [n for n in store.history(models_dir) if n in present and (current is None or n != current.name)]
        if not earlier:
            raise CheckpointError(f"nothing to roll back to in {models_dir}: no earlier published version is kept")
        target = models_dir / earlier[-1]
    store.set_current(models_dir, target.name)
    logger.info("current model is now {} (was {})", target.name, current.name if current else "the bundled default")
    return 0


def main(cfg: Config, args) -> int:
    if args.models_command == "list":
        return cmd_list(cfg, args.json)
    if args.models_command == "show":
        return cmd_show(cfg, args.version)
    if args.models_command == "promote":
        return cmd_promote(cfg, Path(args.path), Path(args.gate) if args.gate else None)
    if args.models_command == "rollback":
        return cmd_rollback(cfg, args.version)
    raise AssertionError(args.models_command)
