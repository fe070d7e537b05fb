"""The publishing gate: promote a candidate checkpoint to the models folder only if it beats the
model being served now, measured on the same validation set with the same protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from model.checkpoint import CheckpointError, load_model, read_info
from model.store import publish, select_checkpoint
from trainer.validation import ValidationSet, score


@dataclass
class GateResult:
    published: bool
    reason: str
    candidate: str
    candidate_psnr_y: float | None
    current: str | None  # the served checkpoint it was compared with
    current_origin: str | None  # published | bundled | untrusted (a `current` that publish did not write)
    current_psnr_y: float | None
    tolerance_db: float
    target: str | None = None  # the published file, when published

    def to_dict(self) -> dict:
        return asdict(self)


def candidate_psnr(candidate: Path, val: ValidationSet, device: str) -> float:
    """The candidate's PSNR from its own metadata when it was measured on this very set."""
    info = read_info(candidate)
    if info.validation.get("fingerprint") == val.fingerprint and "psnr_y" in info.metrics:
        return float(info.metrics["psnr_y"])
    g, _ = load_model(candidate)  # promote --gate judges imported models too
    return score(g, val, device, baselines=False).mean_psnr_y["model"]


def publish_if_better(
    candidate: Path, val: ValidationSet, models_dir: Path, *, tolerance_db: float = 0.0, keep: int = 5, device: str = "cpu",
    _cache: dict | None = None,
) -> GateResult:
    """Compare `candidate` with the served model (published `current`, else the bundled default)
    and publish it only if its PSNR is higher by more than `tolerance_db`.

    `_cache` (path+version -> PSNR) spares re-measuring the same served model at every validation.
    """
    cand_info = read_info(candidate)
    cand = candidate_psnr(candidate, val, device)
    try:
        current, origin = select_checkpoint(None, models_dir)
    except (CheckpointError, ValueError, OSError) as e:  # e.g. a `current` that publish did not write
        logger.warning("the published `current` cannot be the bar ({}); any valid candidate beats it", e)
        current, origin = None, "untrusted"
    result = GateResult(False, "", str(candidate), cand, str(current) if current else None, origin, None, tolerance_db)
    try:
        if current is None:
            raise CheckpointError("no trusted current model")
        cur_info = read_info(current)
        if cur_info.version == cand_info.version:
            result.reason = f"already published (version {cand_info.version} is current)"
            return result
        key = f"{current}|{cur_info.version}|{val.fingerprint}"
        if _cache is not None and key in _cache:
            result.current_psnr_y = _cache[key]
        elif cur_info.scale != val.scale:
            logger.warning("the served model {} is x{}, not x{}: any valid candidate beats it", current, cur_info.scale, val.scale)
        else:
            g, _ = load_model(current)  # the served model may be an imported one
            result.current_psnr_y = score(g, val, device, baselines=False).mean_psnr_y["model"]
            if _cache is not None:
                _cache[key] = result.current_psnr_y
    except (CheckpointError, OSError) as e:
        logger.warning("the served model {} cannot be evaluated ({}); any valid candidate beats it", current, e)
    cur = result.current_psnr_y
    if cur is not None and not cand > cur + tolerance_db:
        result.reason = (
            f"not better: candidate {cand:.3f} dB vs current ({origin}) {cur:.3f} dB; needs more than "
            f"{cur + tolerance_db:.3f} dB (tolerance {tolerance_db} dB). Kept in the run folder"
        )
        return result
    target = publish(models_dir, candidate, keep=keep)
    result.published, result.target = True, str(target)
    result.reason = (
        f"better: candidate {cand:.3f} dB vs current ({origin}) "
        + (f"{cur:.3f} dB" if cur is not None else "unusable")
        + f"; published as {target.name}"
    )
    return result
