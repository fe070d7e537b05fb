"""The Models view: what can be served, with its validation figures; promote and roll back;
and `upscaled learn`'s block: the material kept, the last run's table and its before/after crop.

Promote and rollback call the functions `upscaled models` runs (model/promote.py), so the page
applies exactly the checks `upscaled models promote` does (the daemon's verification, the probe
against bicubic and against the served model, `--force` to override the last two). Their log
lines, which say why a model was refused, are captured from the calling thread and shown.
torch is imported only here, on first use, never on the request loop.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from loguru import logger

from core.config import Config, ConfigError
from web.security import Refused, clean_relative, resolve_under

CHECKPOINTS_IN_RUN = ("best.safetensors", "last.safetensors")
_acting = threading.Lock()  # one promote or rollback at a time
_info_cache: dict[tuple[str, int, int], Any] = {}


def _info(path: Path):
    from model.checkpoint import read_info

    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _info_cache:
        _info_cache[key] = read_info(path)
    return _info_cache[key]


def _figures(info) -> dict[str, Any]:
    """Validation figures as the page shows them, and the set they were measured on."""
    m = info.metrics
    v = info.validation or {}
    out: dict[str, Any] = {k: m[k] for k in ("psnr_y", "bicubic_psnr_y", "ssim_y", "bicubic_ssim_y") if k in m}
    if "psnr_y" in m and "bicubic_psnr_y" in m:
        out["gain_db"] = round(m["psnr_y"] - m["bicubic_psnr_y"], 3)
    if v.get("data"):
        out["set"] = Path(str(v["data"])).name
        out["fingerprint"] = str(v.get("fingerprint", ""))
    if v.get("lr_jpeg"):
        out["lr_jpeg"] = v["lr_jpeg"]
    return out


def _row(path: Path, origin: str, name: str, current: bool) -> dict[str, Any]:
    try:
        info = _info(path)
    except Exception as e:  # noqa: BLE001 - a damaged file is listed with its problem
        return {"name": name, "origin": origin, "file": path.name, "problem": f"{type(e).__name__}: {e}"}
    return {"name": name, "origin": origin, "file": path.name, "version": info.version, "created": info.created,
            "step": info.step, "current": current, "figures": _figures(info)}


def listing(cfg: Config, served_version: str | None, refused: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bundled models, published versions (newest last) and the checkpoints of training runs.
    `served_version`: what the running daemon serves (None: no daemon runs); `refused`: the
    last candidate it refused, from its status, shown on that row with the reason."""
    from model import store
    from model.checkpoint import BUNDLED, BUNDLED_DEFAULT

    models_dir = cfg.path("models")
    try:
        cur = store.current_checkpoint(models_dir)
    except ValueError:
        cur = None
    rows = [_row(p, "bundled", n, cur is None and p == BUNDLED_DEFAULT) for n, p in BUNDLED.items()]
    for p, info in store.published(models_dir) if models_dir.is_dir() else []:
        rows.append(_row(p, "published", info.version, cur is not None and p.name == cur.name))
    runs = cfg.path("runs")
    for run in sorted(runs.iterdir()) if runs.is_dir() else []:
        if run.name.startswith(".") or not run.is_dir():
            continue
        for ck in CHECKPOINTS_IN_RUN:
            if (run / ck).is_file():
                rows.append(_row(run / ck, "run", f"{run.name}/{ck}", False))
    served = next((r for r in rows if r.get("version") == served_version), None)
    fp = (served or {}).get("figures", {}).get("fingerprint")
    for r in rows:  # figures are only comparable on one validation set
        r["served"] = bool(served_version) and r.get("version") == served_version
        r["same_set"] = bool(fp) and r.get("figures", {}).get("fingerprint") == fp
        if refused and r.get("origin") == "published" and r.get("file") == refused.get("file"):
            r["refused"] = {"reason": refused.get("reason"), "time": refused.get("time")}
    return {"pinned": bool(cfg.model.path), "current": cur.name if cur else "bundled", "models": rows,
            "daemon_running": served_version is not None, "served": served_version,
            "history": store.history(models_dir) if models_dir.is_dir() else []}


def learning(cfg: Config) -> dict[str, Any]:
    """`upscaled learn` as the page shows it: the material the daemon keeps (against
    learn.keep_mb), and the last run (paths.runs/learn-last.json): its table of served vs
    candidate per set, the gate's decision, and whether its before/after crop is there."""
    from daemon.keep import kept_files
    from trainer.learn import LAST_CROP, LAST_RUN

    lc = cfg.learn
    kept = kept_files(cfg.path("learn"))
    out: dict[str, Any] = {"on": lc.keep_mb > 0, "keep_mb": lc.keep_mb, "keep_days": lc.keep_days,
                           "files": len(kept), "mb": round(sum(k.size for k in kept) / 2**20, 2),
                           "oldest": kept[0].when.isoformat(timespec="seconds") if kept else None,
                           "last": None, "crop": None}
    runs = cfg.path("runs")
    try:
        rec = json.loads((runs / LAST_RUN).read_text())
    except FileNotFoundError:
        return out
    except (OSError, ValueError) as e:
        out["problem"] = f"{LAST_RUN}: {e}"
        return out
    if not isinstance(rec, dict):
        out["problem"] = f"{LAST_RUN}: not a JSON object"
        return out
    sets = rec.get("sets") if isinstance(rec.get("sets"), dict) else {}
    out["last"] = {
        **{k: rec.get(k) for k in ("time", "decision", "reason", "served", "candidate", "published", "steps", "minutes",
                                   "slice_gain_db", "standard_loss_db", "min_gain_db", "max_regression_db",
                                   "train_images", "slice_images", "teacher")},
        "rows": [{"set": name, "images": v.get("images"), "served": v.get("served"), "candidate": v.get("candidate")}
                 for name, v in sets.items() if isinstance(v, dict)],
    }
    crop = runs / LAST_CROP
    if isinstance(rec.get("crop"), dict) and crop.is_file() and not crop.is_symlink():
        # the page asks for /api/learn/crop?v=<v> (no URL here: relative_paths would cut it)
        out["crop"] = {"v": str(crop.stat().st_mtime_ns), "image": rec["crop"].get("image"),
                       "panels": rec["crop"].get("panels")}
    return out


def learn_crop(cfg: Config) -> bytes:
    """The last run's before/after PNG: one fixed name in paths.runs, never a link, never a name
    from the request."""
    from trainer.learn import LAST_CROP

    path = resolve_under(cfg.path("runs"), LAST_CROP)
    if path.name != LAST_CROP or (cfg.path("runs") / LAST_CROP).is_symlink():
        raise Refused(404, "no before/after crop")
    data = path.read_bytes()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise Refused(404, "no before/after crop")
    return data


def served_figures(cfg: Config, st: dict[str, Any] | None) -> dict[str, Any] | None:
    """The validation figures of the model the daemon serves (its checkpoint's metadata)."""
    from model.checkpoint import BUNDLED

    m = (st or {}).get("model") or {}
    path_s = m.get("path")
    path = Path(path_s) if path_s else None
    if path is None and m.get("file"):
        cand = [cfg.path("models") / m["file"], *[p for p in BUNDLED.values() if p.name == m["file"]]]
        path = next((p for p in cand if p.is_file()), None)
    if path is None or not path.is_file():
        return None
    try:
        return _figures(_info(path))
    except Exception:  # noqa: BLE001 - the overview shows what it can
        return None


def _captured(fn, *args) -> tuple[int, list[dict[str, str]]]:
    """Run a model.promote function, returning its exit code and its log lines (this thread's only)."""
    from core.errors import CheckpointError

    lines: list[dict[str, str]] = []
    me = threading.get_ident()
    sink = logger.add(lambda msg: lines.append({"level": msg.record["level"].name, "text": msg.record["message"]}),
                      level="INFO", format="{message}", filter=lambda r: r["thread"].id == me)
    try:
        code = fn(*args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        lines.append({"level": "ERROR", "text": str(e)})
        code = 2
    finally:
        logger.remove(sink)
    return code, lines


def run_checkpoint(cfg: Config, name: str) -> Path:
    """A run's checkpoint by `RUN/best.safetensors` or `RUN/last.safetensors`, under paths.runs only."""
    name = clean_relative(name)
    parts = name.split("/")
    if len(parts) != 2 or parts[1] not in CHECKPOINTS_IN_RUN:
        raise Refused(404, "no such run checkpoint")
    return resolve_under(cfg.path("runs"), name)


def promote(cfg: Config, path: Path, force: bool) -> tuple[int, list[dict[str, str]]]:
    from model.promote import cmd_promote

    if cfg.model.path:
        raise Refused(409, "model.path pins the daemon to one file: promoting would change nothing it serves")
    with _acting:
        logger.info("web: promote {}{}", path, " (force)" if force else "")
        return _captured(cmd_promote, cfg, path, None, force)


def rollback(cfg: Config, version: str | None) -> tuple[int, list[dict[str, str]]]:
    from model.promote import cmd_rollback

    if cfg.model.path:
        raise Refused(409, "model.path pins the daemon to one file: rolling back would change nothing it serves")
    if version is not None and ("/" in version or version.startswith(".") or os.sep in version):
        raise Refused(400, "name a version, a published file name, or bundled / fidelity / gan")
    with _acting:
        logger.info("web: rollback{}", f" to {version}" if version else " one step")
        return _captured(cmd_rollback, cfg, version)
