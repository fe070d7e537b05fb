"""`upscaled models …`: list, show, promote and roll back the models the daemon serves."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from core.config import Config
from model import store
from model.checkpoint import BUNDLED, BUNDLED_DEFAULT, CheckpointError, CheckpointInfo, read_info
from model.promote import cmd_promote, cmd_rollback, find_version


def _row(path: Path, info: CheckpointInfo, current: Path | None, bundled: str | None = None) -> dict:
    return {
        "version": info.version,
        "bundled": bundled,  # its bundled name, for the models that ship with upscaled
        "file": str(path),
        # With no `current` pointer the daemon serves the bundled default.
        "current": (path == BUNDLED_DEFAULT) if current is None else (bundled is None and path.name == current.name),
        "created": info.created,
        "step": info.step,
        "scale": info.scale,
        **({"generator": info.generator.to_dict()} if info.generator else {}),
        **({"imported": info.foreign} if info.foreign else {}),
        "validation": info.validation,
    }


def _metrics_text(info: CheckpointInfo) -> str:
    m = info.metrics
    if "psnr_y" not in m:
        return "no validation metrics"
    gain = f" ({m['psnr_y'] - m['bicubic_psnr_y']:+.2f} dB over bicubic)".replace("-", "\u2212") if "bicubic_psnr_y" in m else ""
    ssim = f", SSIM {m['ssim_y']:.4f}" if "ssim_y" in m else ""
    # Figures are only comparable on one validation set: say which (its name and fingerprint).
    v = info.validation
    where = f" on {Path(str(v.get('data', '?'))).name} [{str(v.get('fingerprint', ''))[7:15]}]" if v.get("data") else ""
    jpeg = f", LR as JPEG q{v['lr_jpeg']}" if v.get("lr_jpeg") else ""
    return f"PSNR-Y {m['psnr_y']:.2f} dB{gain}{ssim}{where}{jpeg}"


def cmd_list(cfg: Config, as_json: bool) -> int:
    models_dir = cfg.path("models")
    current = store.current_checkpoint(models_dir)
    # The bundled models first (the oldest choices), then the published versions, newest last.
    entries = [(p, read_info(p), name) for name, p in BUNDLED.items()]
    entries += [(p, i, None) for p, i in store.published(models_dir)]
    rows = [_row(p, i, current, b) for p, i, b in entries]
    if as_json:
        print(json.dumps({"models": str(models_dir), "current": current.name if current else "bundled",
                          "bundled": str(BUNDLED_DEFAULT), "versions": rows}, indent=2))
        return 0
    for r, (_, info, _b) in zip(rows, entries):
        mark = "*" if r["current"] else " "
        name = f"{r['version']} ({r['bundled']}, bundled)" if r["bundled"] else r["version"]
        kind = f"  {info.foreign['architecture']} (imported)" if info.foreign else ""
        print(f"{mark} {name}  step {r['step']:>7}  x{r['scale']}{kind}  {_metrics_text(info)}")
    if current is None:
        print(f"(* nothing published is current: the daemon serves the bundled default, {BUNDLED_DEFAULT.stem})")
    return 0


def cmd_show(cfg: Config, version: str) -> int:
    models_dir = cfg.path("models")
    path = find_version(models_dir, version)
    bundled = next((n for n, p in BUNDLED.items() if p == path), None)
    row = _row(path, read_info(path), store.current_checkpoint(models_dir), bundled)
    print(json.dumps(row, indent=2))
    return 0


def cmd_import(cfg: Config, file: Path, name: str | None, val: Path | None, licence: str | None) -> int:
    """Convert a checkpoint trained elsewhere into upscaled's format, in the models folder (not
    served until promoted). The one place a foreign file is read: see model/foreign.py."""
    from model.checkpoint import CheckpointInfo, new_version, write_checkpoint
    from model.foreign import FOREIGN_ARCH, ForeignSpec, detect, read_foreign_weights, servable, sha256_file, slug

    if not file.is_file():
        raise CheckpointError(f"{file}: no such file")
    if licence and Path(licence).is_file():
        licence = Path(licence).read_text(errors="replace")
    state = read_foreign_weights(file)
    desc = detect(state, str(file))
    servable(desc, str(file))
    source = {"file": file.name, "sha256": sha256_file(file), **({"licence": licence} if licence else {})}
    spec = ForeignSpec.of(desc, source)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in desc.model.state_dict().items()}
    version, created = new_version(weights, slug(name or f"{file.stem}"))
    logger.info("{}: {}", file.name, spec.describe())
    validation = {}
    if val is not None:
        from model.foreign import ForeignNet
        from trainer.validation import ValidationSet, score

        vs = ValidationSet.load(val, spec.scale)
        logger.info("validating on {} images from {} (fingerprint {})", len(vs.images), val, vs.fingerprint)
        report = score(ForeignNet(desc, spec), vs, cfg.inference.device if cfg.inference.device != "auto" else "cpu")
        validation = {**vs.describe(), "metrics": report.metrics()}
        m = validation["metrics"]
        logger.info("PSNR-Y {:.3f} dB ({:+.3f} dB over bicubic), SSIM-Y {:.4f}", m["psnr_y"],
                    m["psnr_y"] - m["bicubic_psnr_y"], m["ssim_y"])
    info = CheckpointInfo(arch=FOREIGN_ARCH, generator=None, version=version, created=created, step=0,
                          validation=validation, foreign=spec.to_dict())
    models_dir = cfg.path("models")
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"{version}{store.SUFFIX}"
    write_checkpoint(target, weights, info)
    logger.success("imported as {} ({}); serve it with: upscaled models promote {}", version, target, version)
    return 0


def trainer_gate(cfg: Config, val: Path):
    """`--gate VAL_DIR`: the trainer's publishing gate on the HR images in `val`, passed down to
    `cmd_promote` (the model store never imports trainer code)."""
    from trainer.publish import publish_if_better
    from trainer.validation import ValidationSet

    def gate(path: Path):
        return publish_if_better(path, ValidationSet.load(val, cfg.model.scale), cfg.path("models"),
                                 tolerance_db=cfg.trainer.publish_tolerance_db, keep=cfg.models.keep,
                                 device=cfg.inference.device)

    return gate


def main(cfg: Config, args) -> int:
    if args.models_command == "import":
        return cmd_import(cfg, Path(args.file), args.name, Path(args.val) if args.val else None, args.license)
    if args.models_command == "list":
        return cmd_list(cfg, args.json)
    if args.models_command == "show":
        return cmd_show(cfg, args.version)
    if args.models_command == "promote":
        return cmd_promote(cfg, Path(args.path), trainer_gate(cfg, Path(args.gate)) if args.gate else None, force=args.force)
    if args.models_command == "rollback":
        return cmd_rollback(cfg, args.version)
    raise AssertionError(args.models_command)
