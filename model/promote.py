"""Promote and roll back the model the daemon serves: the store's operations with their checks.

`promote` verifies a checkpoint the way the daemon will load it, refuses one below bicubic or
clearly below the served model unless forced, then publishes it. A publishing gate (the
trainer's, for `upscaled models promote --gate`) is passed in by the caller, so the store never
imports trainer code. The command line (upscaled/models_cmd.py) and the web page
(web/models.py) both call these, so both apply exactly the same checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from loguru import logger

from core.config import Config
from model import store
from model.checkpoint import BUNDLED, BUNDLED_DEFAULT, CheckpointError, read_info

BUNDLED_NAMES = ("bundled", *BUNDLED)  # `bundled` = the default a fresh install serves


def find_version(models_dir: Path, version: str) -> Path:
    """A published version by id or file name, or a bundled model by name."""
    if version in BUNDLED_NAMES:
        return BUNDLED_DEFAULT if version == "bundled" else BUNDLED[version]
    for path, info in store.published(models_dir):
        if info.version == version or path.name == version or path.stem == version:
            return path
    raise CheckpointError(f"no published version {version!r} in {models_dir}, and no bundled model of that name "
                          f"({', '.join(BUNDLED_NAMES)}); see `upscaled models list`")


def served_path(cfg: Config) -> Path:
    return store.current_checkpoint(cfg.path("models")) or BUNDLED_DEFAULT


def cmd_promote(cfg: Config, path: Path, gate: Callable[[Path], object] | None, force: bool = False) -> int:
    """`gate(path)`, when given, decides instead of publishing outright; it returns what the
    trainer's gate does (`.published`, `.reason`) and publishes the model itself when it passes."""
    from model.verify import run_probe, verify_checkpoint

    if str(path) in BUNDLED_NAMES or (not path.exists() and "/" not in str(path)):
        path = find_version(cfg.path("models"), str(path))  # a bundled name, or a version already in the folder
    _, info, probe = verify_checkpoint(path, cfg.model.scale, probe=True, tolerance_db=cfg.models.probe_tolerance_db)
    logger.info("{} passes verification (probe {:+.2f} dB vs bicubic)", info.version, probe.gain_db)
    # A model worse than bicubic, or clearly worse than the one served, is almost always a
    # mistake (a 10-step test run, the wrong file): refuse it unless --force, with both numbers.
    m = info.metrics
    problems = []
    if probe.gain_db < 0:
        problems.append(f"on the probe image it scores {probe.psnr_y:.2f} dB, {-probe.gain_db:.2f} dB below bicubic "
                        f"({probe.bicubic_psnr_y:.2f} dB)")
    if "psnr_y" in m and "bicubic_psnr_y" in m and m["psnr_y"] < m["bicubic_psnr_y"]:
        problems.append(f"its own validation says {m['psnr_y']:.2f} dB against bicubic's {m['bicubic_psnr_y']:.2f} dB")
    served = served_path(cfg)
    if served.is_file() and served.resolve() != Path(path).resolve():
        from model.checkpoint import load_model

        sp = run_probe(load_model(served)[0])
        if probe.psnr_y < sp.psnr_y - cfg.models.promote_margin_db:
            problems.append(f"on the probe image it scores {probe.psnr_y:.2f} dB, {sp.psnr_y - probe.psnr_y:.2f} dB below "
                            f"the served model {read_info(served).version} ({sp.psnr_y:.2f} dB; models.promote_margin_db "
                            f"{cfg.models.promote_margin_db})")
    if problems and not force:
        for p in problems:
            logger.error("not promoted: {}", p)
        logger.error("promote it anyway with --force")
        return 1
    for p in problems:
        logger.warning("promoted despite: {} (--force)", p)
    if gate is not None:
        # The trainer's publishing gate, so a promotion by hand is judged exactly like a trained one.
        result = gate(path)
        if not result.published:
            logger.error("not promoted: {}", result.reason)
            return 1
        logger.info("gate passed: {}", result.reason)
        return 0
    target = store.publish(cfg.path("models"), path, keep=cfg.models.keep)
    logger.info("published {} as {}; it is now current", info.version, target)
    return 0


def cmd_rollback(cfg: Config, version: str | None) -> int:
    """One step back through what was served, down to the bundled default; or to a named version."""
    models_dir = cfg.path("models")
    current = store.current_checkpoint(models_dir)
    was = current.name if current else "the bundled default"
    if version in BUNDLED_NAMES and version != "bundled":
        return cmd_promote(cfg, BUNDLED[version], None, force=True)  # a shipped model: publish it, no questions
    if version == "bundled" or (not version and store.step_back(models_dir) is None):
        if current is None and not version:
            raise CheckpointError(f"nothing to roll back to: {models_dir} has no current model, so the bundled "
                                  f"default already serves (name a version, or `upscaled models promote FILE`)")
        store.clear_current(models_dir)
        logger.info("current model is now the bundled default (was {})", was)
        return 0
    if version:
        store.set_current(models_dir, find_version(models_dir, version).name)
    logger.info("current model is now {} (was {})", store.current_checkpoint(models_dir).name, was)
    return 0
