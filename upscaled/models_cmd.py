"""`upscaled models …`: list, show, promote and roll back the models the daemon serves."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loguru import logger

from core.config import Config
from model import store
from model.checkpoint import BUNDLED, BUNDLED_DEFAULT, CheckpointInfo, read_info
from daemon.status import daemon_model
from model.promote import cmd_promote, cmd_rollback, find_version

VERDICT_WAIT = 60.0  # seconds promote waits for a running daemon to load or refuse the new model


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
    d = m["psnr_y"] - m["bicubic_psnr_y"] if "bicubic_psnr_y" in m else None
    gain = "" if d is None else f" (+{d:.2f} dB over bicubic)" if d >= 0 else f" ({-d:.2f} dB below bicubic)"
    ssim = f", SSIM {m['ssim_y']:.4f}" if "ssim_y" in m else ""
    # Figures are only comparable on one validation set: say which (its name and fingerprint).
    v = info.validation
    where = f" on {Path(str(v.get('data', '?'))).name} [{str(v.get('fingerprint', ''))[7:15]}]" if v.get("data") else ""
    jpeg = f", LR as JPEG q{v['lr_jpeg']}" if v.get("lr_jpeg") else ""
    return f"PSNR-Y {m['psnr_y']:.2f} dB{gain}{ssim}{where}{jpeg}"


def _learn_text(lr: dict) -> str:
    """`upscaled learn`'s gate figures, kept in the checkpoint's metadata."""
    loss = lr.get("standard_loss_db")
    std = f", standard set {-loss:+.2f} dB" if loss is not None else ""
    return (f"learn: slice {lr['slice_gain_db']:+.2f} dB on {lr.get('slice_images', '?')} held-out images{std} "
            f"({lr.get('steps', '?')} steps from {lr.get('served', '?')}): {lr.get('decision', '?')}")


def cmd_list(cfg: Config, as_json: bool) -> int:
    models_dir = cfg.path("models")
    current = store.current_checkpoint(models_dir)
    # The bundled models first (the oldest choices), then the published versions, newest last.
    entries = [(p, read_info(p), name) for name, p in BUNDLED.items()]
    entries += [(p, i, None) for p, i in store.published(models_dir)]
    rows = [_row(p, i, current, b) for p, i, b in entries]
    daemon = daemon_model(cfg)
    served = daemon.get("version") if daemon else None
    refused = (daemon or {}).get("refused") or None
    current_name = current.name if current else None
    for r in rows:
        r["served"] = bool(served) and r["version"] == served
    if as_json:
        print(json.dumps({"models": str(models_dir), "current": current_name or "bundled",
                          "bundled": str(BUNDLED_DEFAULT), "daemon_running": daemon is not None, "served": served,
                          "refused": refused, "versions": rows}, indent=2))
        return 0
    for r, (_, info, _b) in zip(rows, entries):
        mark = ("*" if r["current"] else " ") + (">" if r["served"] else " ")
        name = f"{r['version']} ({r['bundled']}, bundled)" if r["bundled"] else r["version"]
        kind = f"  {info.foreign['architecture']} (imported)" if info.foreign else ""
        print(f"{mark} {name}  step {r['step']:>7}  x{r['scale']}{kind}  {_metrics_text(info)}")
        if info.extra.get("learn"):
            print(f"      {_learn_text(info.extra['learn'])}")
    print(f"* current ({current_name or 'nothing published: the bundled default, ' + BUNDLED_DEFAULT.stem}), "
          "what the daemon is told to serve")
    if daemon is None:
        print("> no daemon is running (a daemon started now serves the * model)")
    else:
        print(f"> what the running daemon serves: {served or 'nothing yet'}" + (
            "" if daemon.get("watching", True) else " (it does not watch the models folder: model.path pins it)"))
        if refused and refused.get("file") == current_name:
            print(f"! the daemon refused the current model {refused.get('version') or refused.get('file')} at "
                  f"{refused.get('time')}: {refused.get('reason')}")
    return 0


LICENCE_SHOWN = 400  # characters of an imported model's licence `models show` prints


def readable(row: dict[str, Any]) -> dict[str, Any]:
    """A row as people read it: class reprs spandrel stored as hyperparameters ("<class
    'torch.nn.modules.activation.GELU'>") by their names (GELU), a long licence cut short."""
    import re

    def tidy(v: Any) -> Any:
        if isinstance(v, str):
            return re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", v)
        if isinstance(v, dict):
            return {k: tidy(x) for k, x in v.items()}
        if isinstance(v, list):
            return [tidy(x) for x in v]
        return v

    out = tidy(row)
    src = (out.get("imported") or {}).get("source") or {}
    text = src.get("licence")
    if isinstance(text, str) and len(text) > LICENCE_SHOWN:
        src["licence"] = f"{text[:LICENCE_SHOWN].rstrip()} … ({len(text) - LICENCE_SHOWN} more characters: `--json` prints it all)"
    return out


def cmd_show(cfg: Config, version: str, full: bool = False) -> int:
    models_dir = cfg.path("models")
    path = find_version(models_dir, version)
    bundled = next((n for n, p in BUNDLED.items() if p == path), None)
    row = _row(path, read_info(path), store.current_checkpoint(models_dir), bundled)
    print(json.dumps(row if full else readable(row), indent=2))
    return 0


def promote(cfg: Config, path: Path, gate: Path | None, force: bool = False) -> int:
    """`upscaled models promote`: the store's promote (model/promote.py), then, with a daemon
    running, its verdict on what was published."""
    since = datetime.now(timezone.utc).replace(microsecond=0).isoformat(timespec="seconds")
    code = cmd_promote(cfg, path, trainer_gate(cfg, gate) if gate else None, force=force)
    target = store.current_checkpoint(cfg.path("models"))
    if code != 0 or target is None:
        return code
    return await_verdict(cfg, read_info(target).version, target, since)


def _refused_it(refused: dict[str, Any], target: Path, since: str) -> bool:
    """Whether the daemon's last refusal is its verdict on `target`: made since we published,
    or made on this very file before (the daemon does not try an unchanged refused file again)."""
    if refused.get("file") != target.name:
        return False
    when = str(refused.get("time") or "")
    if when >= since:
        return True
    try:
        return datetime.fromisoformat(when).timestamp() >= int(target.stat().st_mtime)
    except (OSError, ValueError):
        return False


def await_verdict(cfg: Config, version: str, target: Path, since: str, wait: float = VERDICT_WAIT) -> int:
    """After publishing: wait for a running daemon to serve `version` (0) or refuse `target` (1,
    with its reason); no daemon, or one that does not watch the models folder, is said so (0)."""
    daemon = daemon_model(cfg)
    if daemon is None:
        logger.info("no daemon is running; it serves {} when started", version)
        return 0
    if not daemon.get("watching", True):
        logger.warning("the running daemon does not watch the models folder (model.path pins it): it keeps serving {}",
                       daemon.get("version"))
        return 0
    deadline = time.monotonic() + wait
    while True:
        if daemon is None:
            logger.warning("the daemon stopped before taking {}; it serves it when started again", version)
            return 0
        if daemon.get("version") == version:
            logger.info("the running daemon now serves {}", version)
            return 0
        r = daemon.get("refused") or {}
        if _refused_it(r, target, since):
            logger.error("the running daemon refused {}: {}; it still serves {} (back to that one: upscaled models "
                         "rollback)", version, r.get("reason"), daemon.get("version"))
            return 1
        if time.monotonic() > deadline:
            logger.warning("the running daemon has not taken {} within {:.0f} s (it still serves {}); see "
                           "`upscaled status`", version, wait, daemon.get("version"))
            return 0
        time.sleep(0.2)
        daemon = daemon_model(cfg)


def cmd_import(cfg: Config, file: Path, name: str | None, val: Path | None, licence: str | None) -> int:
    """Convert a checkpoint trained elsewhere into upscaled's format, in the models folder (not
    served until promoted). The one place a foreign file is read: see model/foreign.py."""
    from model.checkpoint import CheckpointInfo, new_version, write_checkpoint
    from model.foreign import FOREIGN_ARCH, ForeignSpec, detect, read_foreign_weights, servable, slug

    from core.errors import UsageError
    from trainer.data import DataError, list_images

    # Arguments first: a wrong --val must not cost reading (and converting) the checkpoint.
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    if val is not None:
        try:
            if not list_images(val):
                raise DataError(str(val), [f"{val} holds no image files"])
        except DataError as e:
            raise UsageError(f"--val {val}: {'; '.join(e.problems)} (a folder of high-resolution images)") from None
    if licence and Path(licence).is_file():
        licence = Path(licence).read_text(errors="replace")
    state = read_foreign_weights(file)
    desc = detect(state, str(file))
    servable(desc, str(file))
    source = {"file": file.name, "sha256": store.sha256_of(file), **({"licence": licence} if licence else {})}
    spec = ForeignSpec.of(desc, source)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in desc.model.state_dict().items()}
    version, created = new_version(weights, slug(name or f"{file.stem}"))
    logger.info("{}: {}", file.name, spec.describe())
    validation = {}
    if val is not None:
        from model.foreign import ForeignNet
        from trainer.validation import ValidationSet, score

        try:
            vs = ValidationSet.load(val, spec.scale)
        except DataError as e:
            raise UsageError(f"--val {val}: {'; '.join(e.problems)}") from None
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
        return cmd_show(cfg, args.version, full=args.json)
    if args.models_command == "promote":
        return promote(cfg, Path(args.path), Path(args.gate) if args.gate else None, force=args.force)
    if args.models_command == "rollback":
        return cmd_rollback(cfg, args.version)
    raise AssertionError(args.models_command)
