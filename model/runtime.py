"""Building the resident upscaler from the config: which checkpoint it names, and the engine options."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from core.config import Config, ConfigError


def engine_options(cfg: Config):
    from model.engine import EngineOptions

    i = cfg.inference
    return EngineOptions(
        device=i.device, precision=i.precision, tile=i.tile, overlap=i.overlap, batch=i.batch,
        threads=i.threads, memory_budget_mb=i.memory_budget_mb, self_ensemble=i.self_ensemble,
        runtime=i.runtime, runtime_cache=str(cfg.resolve(i.runtime_cache)) if i.runtime_cache else "",
    )


def checkpoint_for(cfg: Config, override: str | None = None) -> tuple[Path, str]:
    from model.checkpoint import bundled_checkpoint
    from model.store import select_checkpoint

    value = override or cfg.model.path
    if value and (bundled := bundled_checkpoint(value)) is not None:
        return bundled, f"bundled {value}"
    explicit = override or (cfg.resolve(cfg.model.path) if cfg.model.path else None)
    if explicit and not Path(explicit).exists() and "/" not in str(explicit):
        # A version in the models folder, by name (as `models list` shows it: an import, say).
        candidate = cfg.path("models") / f"{explicit}.safetensors"
        if candidate.is_file():
            return candidate, "published"
    return select_checkpoint(explicit, cfg.path("models"))


def config_model(cfg: Config, value: str) -> str:
    """A model named in the config: a bundled name as it is, a path resolved against the config's folder."""
    from model.checkpoint import bundled_checkpoint

    return value if bundled_checkpoint(value) is not None else str(cfg.resolve(value))


def build_upscaler(cfg: Config, override: str | None = None):
    """Load the checkpoint the config selects and make it resident on the configured device.

    Raises CheckpointError for an unusable file and ConfigError when its scale is not the
    configured one.
    """
    from model.checkpoint import load_model
    from model.engine import Upscaler

    path, origin = checkpoint_for(cfg, override)
    generator, info = load_model(path)
    # The configured scale guards what the config serves; a model named on the command line
    # (upscale/eval --model) is used at its own scale.
    if override is None and info.scale != cfg.model.scale:
        raise ConfigError(
            "model.scale", f"{info.scale} to match the checkpoint {path} (a x{info.scale} model)", cfg.model.scale
        )
    up = Upscaler(generator, info, engine_options(cfg))
    logger.info(
        "model {} ({} checkpoint {}), x{}, {}, on {} in {}, runtime {}{}",
        info.version, origin, path.name, info.scale, info.describe(),
        up.device, str(up.dtype).replace("torch.", ""), up.runtime.name, f", self-ensemble of {up.ensemble} views" if up.ensemble > 1 else "",
    )
    return up
