"""config.yaml, parsed once into frozen dataclasses.

Defaults live here, in the dataclasses; `config.yaml` at the repository root documents them
(a test keeps the two equal). Unknown keys, wrong types and impossible values fail at start-up
with the key's full name and what is expected.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_VAR = "UPSCALED_CONFIG"
MAX_OUTPUT_SCALE = 16.0  # output.scale's limit, and the most output.long_side may enlarge an image


class ConfigError(ValueError):
    """A config problem; `str()` names the key and what is expected."""

    def __init__(self, key: str, expected: str, got: Any = dataclasses.MISSING, source: str = ""):
        self.key, self.expected, self.got, self.source = key, expected, got, source
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.source}: " if self.source else ""
        got = "" if self.got is dataclasses.MISSING else f", got {self.got!r}"
        return f"{where}{self.key}: expected {self.expected}{got}"

    def within(self, prefix: str, source: str = "") -> "ConfigError":
        key = f"{prefix}.{self.key}" if prefix else self.key
        return ConfigError(key, self.expected, self.got, source or self.source)


def _need(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(key, expected, got)


@dataclass(frozen=True)
class PathsConfig:
    """Folders; relative paths resolve against the config file's folder."""

    inbox: str = "data/inbox"
    outbox: str = "data/outbox"
    done: str = "data/done"
    failed: str = "data/failed"
    work: str = "data/inbox/.upscaled-work"  # must be on the inbox's filesystem (claims are renames)
    models: str = "data/models"
    status: str = "data/status.json"
    runs: str = "runs"
    learn: str = "data/learn"  # originals kept for `upscaled learn` (learn.keep_mb > 0); the daemon's own copies


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # serve this checkpoint instead of the published/bundled one
    scale: int = 4  # every served model must have this scale
    for_jpeg: str | None = "real"  # JPEGs below for_jpeg_below go to this model (bundled name or file); None = off
    for_jpeg_below: int = 90  # estimated JPEG quality (1-100) under which for_jpeg applies; 101 = every JPEG

    def __post_init__(self) -> None:
        _need(self.scale in (1, 2, 3, 4, 8), "scale", "one of 1, 2, 3, 4, 8", self.scale)
        _need(1 <= self.for_jpeg_below <= 101, "for_jpeg_below", "a JPEG quality 1..101", self.for_jpeg_below)


@dataclass(frozen=True)
class InferenceConfig:
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    tile: int = 0
    overlap: int = -1
    batch: int = 0
    threads: int = 0
    memory_budget_mb: int = 0
    self_ensemble: int = 1
    runtime: Literal["auto", "torch", "openvino", "onnxruntime", "ncnn"] = "auto"
    runtime_cache: str | None = None

    def __post_init__(self) -> None:
        d = self.device
        _need(d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit()),
              "device", "auto, cpu, cuda or cuda:N", d)
        _need(self.tile == 0 or self.tile >= 16, "tile", "0 (auto) or an integer >= 16", self.tile)
        _need(self.overlap >= -1, "overlap", "-1 (the model's receptive radius) or an integer >= 0", self.overlap)
        _need(self.tile == 0 or self.overlap < self.tile, "overlap",
              f"less than inference.tile ({self.tile})", self.overlap)
        _need(self.batch >= 0, "batch", "0 (auto) or a positive integer", self.batch)
        _need(self.threads >= 0, "threads", "0 (all cores) or a positive integer", self.threads)
        _need(self.memory_budget_mb >= 0, "memory_budget_mb", "0 (auto) or megabytes", self.memory_budget_mb)
        _need(self.self_ensemble in (1, 2, 4, 8), "self_ensemble", "1, 2, 4 or 8", self.self_ensemble)


@dataclass(frozen=True)
class OutputConfig:
    format: Literal["keep", "png", "jpg", "webp"] = "keep"
    jpeg_quality: int = 95
    webp_quality: int = 95
    webp_lossless: bool = False
    png_strategy: Literal["fast", "rle", "default"] = "fast"  # how PNGs are compressed (imaging/png.py, Pillow)
    png_compress_level: int = 4  # zlib level 0..9, for png_strategy rle and default
    # An output name already taken (photo.png and photo.gif both become photo.png; the same name
    # dropped twice): suffix = photo-1.png, as done/ does; overwrite = replace it; skip = the
    # input goes to failed/ saying so. Never does one input's output silently replace another's.
    on_conflict: Literal["suffix", "overwrite", "skip"] = "suffix"
    name: str = "{stem}"  # output file name before its extension: {stem}, {scale}, {model}
    jpeg_background: str = "#ffffff"  # what transparent pixels become in a JPEG output (it has no alpha)
    # The output's size. The model runs at its native scale; its output is then resized (Lanczos)
    # to scale x the input, or to a long side of long_side pixels. Neither: the model's own size.
    scale: float | None = None  # final factor relative to the input, > 0 and <= 16; None = the model's scale
    long_side: int | None = None  # the output's long side in pixels; None = off (not with scale)

    def __post_init__(self) -> None:
        _need(self.scale is None or 0 < self.scale <= MAX_OUTPUT_SCALE, "scale",
              f"null (the model's own scale) or a number > 0 and <= {MAX_OUTPUT_SCALE:g}", self.scale)
        _need(self.long_side is None or self.long_side >= 1, "long_side", "null or a number of pixels >= 1",
              self.long_side)
        _need(self.scale is None or self.long_side is None, "scale",
              "output.scale or output.long_side, not both (set the other to null)", (self.scale, self.long_side))
        _need(0 <= self.png_compress_level <= 9, "png_compress_level", "an integer 0..9", self.png_compress_level)
        _need(1 <= self.jpeg_quality <= 100, "jpeg_quality", "an integer 1..100", self.jpeg_quality)
        _need(1 <= self.webp_quality <= 100, "webp_quality", "an integer 1..100", self.webp_quality)
        _need(re.fullmatch(r"#[0-9a-fA-F]{6}", self.jpeg_background) is not None, "jpeg_background",
              "a colour as #rrggbb", self.jpeg_background)
        try:
            filled = self.name.format(stem="x", scale=4, model="m")
        except (KeyError, IndexError, ValueError):
            filled = None
        _need(filled is not None and "{stem}" in self.name and "/" not in filled, "name",
              "a template with {stem} and optionally {scale}, {model} (no other fields, no /)", self.name)

    def encode_options(self) -> dict:
        """The keyword arguments of imaging.images.encode_to."""
        return {"jpeg_quality": self.jpeg_quality, "webp_quality": self.webp_quality,
                "webp_lossless": self.webp_lossless, "png_compress_level": self.png_compress_level,
                "png_strategy": self.png_strategy,
                "jpeg_background": tuple(int(self.jpeg_background[i : i + 2], 16) for i in (1, 3, 5))}


@dataclass(frozen=True)
class WatchConfig:
    mode: Literal["native", "polling"] = "native"
    poll_interval: float = 1.0  # seconds, polling mode
    settle_seconds: float = 2.0  # size and mtime unchanged this long => the file is complete
    rescan_interval: float = 30.0  # seconds between reconciliation scans
    closed_grace: float = 0.5  # a file closed after writing is ready once untouched this long
    incomplete_wait: float = 30.0  # an image whose end is missing is waited for this long after its last change

    def __post_init__(self) -> None:
        _need(self.closed_grace >= 0, "closed_grace", "seconds >= 0", self.closed_grace)
        _need(self.incomplete_wait >= 0, "incomplete_wait", "seconds >= 0", self.incomplete_wait)
        _need(self.poll_interval > 0, "poll_interval", "seconds > 0", self.poll_interval)
        _need(self.settle_seconds >= 0, "settle_seconds", "seconds >= 0", self.settle_seconds)
        _need(self.rescan_interval > 0, "rescan_interval", "seconds > 0", self.rescan_interval)


@dataclass(frozen=True)
class DaemonConfig:
    originals: Literal["move", "delete", "keep"] = "move"  # what happens to an input once its output exists
    io_workers: int | Literal["auto"] = "auto"  # decode/encode threads: auto = 2 beside a CPU model, more beside a GPU
    io_nice: int | Literal["auto", "idle"] = "auto"  # I/O threads' CPU priority: auto, idle (SCHED_IDLE), or 0..19 below inference
    retry_initial: float = 5.0  # seconds before retrying after a transient error (disk full, ...)
    retry_max: float = 300.0
    shutdown_timeout: float = 60.0  # seconds to finish in-flight images on SIGTERM
    status_interval: float = 2.0  # seconds between status-file updates while busy
    lease_interval: float = 10.0  # seconds between claim-lease heartbeats; 6 missed = owner presumed dead
    allow_root: bool = False  # run as root anyway (a daemon reading files anyone can drop should not)
    memory_budget_mb: int = 0  # images whose estimated peak exceeds this go to failed/; 0 = the cgroup's limit, else RAM

    def __post_init__(self) -> None:
        _need(self.memory_budget_mb >= 0, "memory_budget_mb", "0 (auto) or megabytes", self.memory_budget_mb)
        _need(self.lease_interval > 0, "lease_interval", "seconds > 0", self.lease_interval)
        _need(self.io_workers == "auto" or self.io_workers >= 1, "io_workers", "auto or an integer >= 1", self.io_workers)
        _need(self.io_nice in ("auto", "idle") or 0 <= self.io_nice <= 19, "io_nice", "auto, idle or an integer 0..19", self.io_nice)
        _need(0 < self.retry_initial <= self.retry_max, "retry_initial", "0 < retry_initial <= retry_max", self.retry_initial)
        _need(self.shutdown_timeout > 0, "shutdown_timeout", "seconds > 0", self.shutdown_timeout)
        _need(self.status_interval > 0, "status_interval", "seconds > 0", self.status_interval)


@dataclass(frozen=True)
class ModelsConfig:
    keep: int = 5  # published versions kept in the models folder (the current one always is)
    verify_probe: bool = True  # run a probe image through a candidate before serving it
    probe_tolerance_db: float = 3.0  # refuse a model claiming to beat bicubic that trails it by more on the probe
    promote_margin_db: float = 0.5  # `models promote` refuses a model this far below the served one on the probe

    def __post_init__(self) -> None:
        _need(self.keep >= 1, "keep", "an integer >= 1", self.keep)
        _need(self.probe_tolerance_db >= 0, "probe_tolerance_db", "decibels >= 0", self.probe_tolerance_db)


@dataclass(frozen=True)
class TrainerConfig:
    data: str | None = None  # folder of HR images (LR made on the fly)
    data_extra: str | None = None  # a second HR folder (e.g. text, art, UI beside photos) ...
    data_extra_share: float = 0.5  # ... that this share of each batch's crops is drawn from
    paired_lr: str | None = None
    paired_hr: str | None = None
    val: str | None = None
    val_extra: str | None = None  # a second validation folder, reported beside val; with it the
    # best checkpoint is the one with the highest mean gain over bicubic across both
    val_lr_jpeg: int = 0  # > 0: validate on LR images saved as JPEG of this quality (a model for compressed inputs)
    out: str | None = None  # run folder; default: paths.runs/<timestamp>
    init: str | None = None  # start from this checkpoint (fine-tune)
    # The bundled fidelity model's layout (run 6): 24 x 32, low-resolution tail, bilinear skip,
    # 59 GFLOP per output MP. The seed's design is channels 64, blocks 16, batchnorm true,
    # upsampler stages, skip none (277 GFLOP/MP, 5x slower to train and to run).
    generator_channels: int = 32
    generator_blocks: int = 24
    generator_batchnorm: bool = False
    generator_upsampler: Literal["stages", "lowres"] = "lowres"
    generator_skip: Literal["none", "bilinear", "bicubic"] = "bilinear"
    discriminator_width: int = 64  # channels of the discriminator's first conv (64 -> 512 in 4 stages)
    steps: int = 20000
    pretrain_steps: int = 10000  # phase 1, L1 only; 0 = straight to the GAN
    batch: int = 16
    crop: int = 96  # HR crop side
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.9
    beta2: float = 0.99
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    pixel_loss: Literal["l1", "mse"] = "l1"  # mse: for a short final fine-tune at a low rate
    adv_weight: float = 1e-3  # lambda of the adversarial MSE term
    perceptual_weight: float = 0.0  # VGG loss; needs vgg_weights
    vgg_weights: str | None = None  # a local VGG19 safetensors/state file; nothing is downloaded
    ema: float = 0.999
    downscale_min: float = 0.25  # large photos are shrunk by a random factor in this range first
    downscale_max: float = 0.5
    max_side: int = 0  # cap on the decoded photo's long side (0 = none), before the random shrink
    degrade_blur: float = 0.0  # probability of each degradation on LR
    degrade_noise: float = 0.0
    degrade_jpeg: float = 0.0
    degrade_jpeg_min: int = 40  # JPEG quality drawn uniformly from [min, max]
    degrade_jpeg_max: int = 95
    cache_mb: int = 4096  # decoded images kept in memory
    workers: int = 1  # data loader processes
    seed: int | None = None
    val_every: int = 1000
    val_max_images: int = 0  # 0 = all
    log_every: int = 50  # steps between metrics.jsonl records
    save_every: int = 500
    publish_every_val: bool = False
    publish_tolerance_db: float = 0.0  # candidate must beat current PSNR by more than this
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        for k in ("steps", "batch", "crop", "val_every", "save_every", "log_every", "generator_channels",
                  "generator_blocks", "discriminator_width"):
            _need(getattr(self, k) >= 1, k, "a positive integer", getattr(self, k))
        _need(self.pretrain_steps >= 0, "pretrain_steps", "an integer >= 0", self.pretrain_steps)
        _need(0 < self.downscale_min <= self.downscale_max <= 1, "downscale_min",
              "0 < downscale_min <= downscale_max <= 1", (self.downscale_min, self.downscale_max))
        _need(0 <= self.ema < 1, "ema", "a number in [0, 1)", self.ema)
        _need(0 <= self.val_lr_jpeg <= 100, "val_lr_jpeg", "0 (off) or a JPEG quality 1..100", self.val_lr_jpeg)
        _need(0 <= self.data_extra_share <= 1, "data_extra_share", "a share in [0, 1]", self.data_extra_share)
        _need(1 <= self.degrade_jpeg_min <= self.degrade_jpeg_max <= 100, "degrade_jpeg_min",
              "1 <= degrade_jpeg_min <= degrade_jpeg_max <= 100", (self.degrade_jpeg_min, self.degrade_jpeg_max))
        for k in ("degrade_blur", "degrade_noise", "degrade_jpeg"):
            _need(0 <= getattr(self, k) <= 1, k, "a probability in [0, 1]", getattr(self, k))
        _need(self.perceptual_weight == 0 or self.vgg_weights is not None, "vgg_weights",
              "a local VGG19 weights file when perceptual_weight > 0", self.vgg_weights)
        _need((self.paired_lr is None) == (self.paired_hr is None), "paired_lr",
              "paired_lr and paired_hr set together", (self.paired_lr, self.paired_hr))


@dataclass(frozen=True)
class LearnConfig:
    """`upscaled learn`: fine-tune the served model on the images that passed through the inbox."""

    keep_mb: int = 0  # megabytes of finished originals kept in paths.learn; 0 = keep nothing (off)
    keep_days: float = 30.0  # a kept original older than this is deleted
    minutes: float = 20.0  # wall-clock budget of one run (measuring included)
    min_images: int = 8  # fewer usable kept images than this: say so and do not train
    holdout: float = 0.2  # share of kept images (by a hash of the name) never trained on: the gate's slice
    base_ratio: float = 0.75  # share of each batch's crops from trainer.data (no forgetting; 0.5 forgot mixed/val: config.yaml)
    min_gain_db: float = 0.05  # publish only if PSNR-Y on the slice gains at least this ...
    max_regression_db: float = 0.1  # ... and PSNR-Y on trainer.val (and val_extra) loses at most this
    lr: float = 5e-5  # fine-tuning rate (cosine to 1% over the run)
    max_steps: int = 0  # stop after this many steps even with time left (reproducible comparisons); 0 = no cap
    batch: int = 8
    crop: int = 96  # HR crop side
    slice_max_side: int = 512  # slice images are centre-cropped to this side for measuring (time)
    teacher: str | None = None  # an imported model (models list version or file) labelling crops at their own size
    teacher_share: float = 0.25  # share of the folder's crops that are teacher pairs, when there is a teacher
    teacher_cpu_seconds: float = 600.0  # CPU-seconds budget per run for new teacher labels (cached across runs)

    def __post_init__(self) -> None:
        _need(self.keep_mb >= 0, "keep_mb", "megabytes >= 0 (0 = keep nothing)", self.keep_mb)
        _need(self.keep_days > 0, "keep_days", "days > 0", self.keep_days)
        _need(self.minutes > 0, "minutes", "minutes > 0", self.minutes)
        _need(self.min_images >= 2, "min_images", "an integer >= 2", self.min_images)
        _need(0 < self.holdout < 1, "holdout", "a share in (0, 1)", self.holdout)
        for k in ("base_ratio", "teacher_share"):
            _need(0 <= getattr(self, k) < 1, k, "a share in [0, 1)", getattr(self, k))
        _need(self.lr > 0, "lr", "a learning rate > 0", self.lr)
        _need(self.max_steps >= 0, "max_steps", "an integer >= 0 (0 = no cap)", self.max_steps)
        _need(self.batch >= 1, "batch", "a positive integer", self.batch)
        _need(self.crop >= 16, "crop", "pixels >= 16", self.crop)
        _need(self.slice_max_side >= 32, "slice_max_side", "pixels >= 32", self.slice_max_side)
        _need(self.teacher_cpu_seconds >= 0, "teacher_cpu_seconds", "seconds >= 0", self.teacher_cpu_seconds)


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as (host, port); ValueError when it is not one."""
    host, sep, port = listen.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or " " in host:
        raise ValueError(listen)
    return host, int(port)


@dataclass(frozen=True)
class WebConfig:
    """`upscaled web`: the page, /metrics and the health endpoints (docs/web.md)."""

    listen: str = "127.0.0.1:8470"  # HOST:PORT; anything but loopback needs token/token_file or read_only
    token: str | None = None  # writes (upload, retry, promote, rollback, training) need it when set
    token_file: str | None = None  # ... or read from this file (first line), e.g. a systemd credential
    read_only: bool = False  # no write actions at all: watch, compare, metrics
    upload_max_mb: int = 200  # largest file accepted through the page, checked while it streams
    preview_max_side: int = 1600  # long side of the compare previews sent to the browser
    data_root: str | None = None  # the Train page may name data/val folders under this one; null =
    # only trainer.data and trainer.val as configured

    def __post_init__(self) -> None:
        try:
            split_listen(self.listen)
        except ValueError:
            raise ConfigError("listen", "HOST:PORT, e.g. 127.0.0.1:8470 or [::1]:8470", self.listen) from None
        _need(self.token is None or len(self.token) >= 16, "token", "a secret of at least 16 characters", "(hidden)")
        _need(self.token is None or self.token_file is None, "token_file", "unset when web.token is set (one or the other)",
              self.token_file)
        _need(self.upload_max_mb >= 1, "upload_max_mb", "megabytes >= 1", self.upload_max_mb)
        _need(self.preview_max_side >= 64, "preview_max_side", "pixels >= 64", self.preview_max_side)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    learn: LearnConfig = field(default_factory=LearnConfig)
    web: WebConfig = field(default_factory=WebConfig)
    base_dir: str = "."  # folder of the config file; not a YAML key

    def resolve(self, p: str | os.PathLike) -> Path:
        """A path from the config, made absolute against the config file's folder."""
        p = Path(os.path.expanduser(str(p)))
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    def path(self, name: str) -> Path:
        return self.resolve(getattr(self.paths, name))


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        expected = []
        for arm in inner:  # the first arm that takes the value
            try:
                return _convert(arm, value, key)
            except ConfigError as e:
                expected.append(e.expected)
        raise ConfigError(key, " or ".join(expected), value)
    if origin is Literal:
        choices = typing.get_args(tp)
        _need(value in choices, key, "one of " + ", ".join(map(str, choices)), value)
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        _need(isinstance(value, dict), key, "a mapping of settings", value)
        return _build(tp, value, key)
    if tp is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is int:
        _need(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
        return value
    if tp is bool:
        _need(isinstance(value, bool), key, "true or false", value)
        return value
    if tp is str:
        _need(isinstance(value, str), key, "a string", value)
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def replace_checked(obj: Any, prefix: str, changes: dict[str, Any]) -> Any:
    """`obj` (a config section) with `changes`, each checked exactly as the config file's keys
    are (type, choices, limits); a ConfigError names PREFIX.KEY."""
    current = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "base_dir"}
    return _build(type(obj), {**current, **changes}, prefix)


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "base_dir"]
    for k in data:
        if k not in names:
            raise ConfigError(f"{prefix}.{k}" if prefix else str(k), "a known key (one of " + ", ".join(names) + ")")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.within(prefix) from None


def from_dict(data: dict | None, base_dir: str | os.PathLike = ".", source: str = "") -> Config:
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("(top level)", "a mapping of sections", type(data).__name__, source)
    try:
        cfg = _build(Config, data, "")
    except ConfigError as e:
        raise ConfigError(e.key, e.expected, e.got, source) from None
    cfg = dataclasses.replace(cfg, base_dir=str(Path(base_dir).resolve()))
    try:
        _cross_checks(cfg)
    except ConfigError as e:
        raise ConfigError(e.key, e.expected, e.got, source) from None
    return cfg


def _cross_checks(cfg: Config) -> None:
    folders = {k: cfg.path(k) for k in ("inbox", "outbox", "done", "failed")}
    for a, pa in folders.items():
        for b, pb in folders.items():
            if a != b and (pa == pb or (a == "inbox" and pb.is_relative_to(pa))):
                raise ConfigError(f"paths.{b}", f"a folder outside paths.{a} ({pa})", str(pb))
    if cfg.path("learn").is_relative_to(folders["inbox"]):  # the daemon would upscale what it keeps
        raise ConfigError("paths.learn", f"a folder outside paths.inbox ({folders['inbox']})", str(cfg.path("learn")))


def default_path() -> Path | None:
    """--config absent: $UPSCALED_CONFIG, else ./config.yaml if present, else built-in defaults."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    local = Path("config.yaml")
    return local if local.is_file() else None


def status_path_despite(path: Path | None) -> Path:
    """paths.status from a config that does not validate (being edited, say): the key as written
    if the YAML still parses, else the default; relative to the file's folder as always."""
    base = path.resolve().parent if path is not None else Path.cwd()
    value = PathsConfig.status
    try:
        data = yaml.safe_load(path.read_text()) if path is not None else None
        candidate = data["paths"]["status"]
        if isinstance(candidate, str):
            value = candidate
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else (base / p).resolve()


def load(path: str | os.PathLike | None = None) -> Config:
    path = Path(path) if path is not None else default_path()
    return load_file(path)


def apply_overrides(data: dict | None, overrides: list[str]) -> dict:
    """`section.key=value` settings (--set) laid over the file's, values parsed as YAML, so they
    are validated exactly like the file's own."""
    data = dict(data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(key.strip() or item, "--set SECTION.KEY=VALUE, e.g. --set trainer.batch=8", item)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"a YAML value ({e})", raw) from None
        section = data.get(parts[0])
        if not isinstance(section, dict):
            section = {}
        data[parts[0]] = {**section, parts[1]: value}
    return data


def load_file(path: Path | None, overrides: list[str] = ()) -> Config:
    if path is None:
        return from_dict(apply_overrides({}, list(overrides)), base_dir=Path.cwd(), source="--set" if overrides else "")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError("(file)", f"a readable config file at {path}", e.strerror) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("(syntax)", f"valid YAML ({e})", source=str(path)) from None
    if overrides:
        if data is not None and not isinstance(data, dict):
            raise ConfigError("(top level)", "a mapping of sections", type(data).__name__, str(path))
        data = apply_overrides(data, list(overrides))
    return from_dict(data, base_dir=path.resolve().parent, source=str(path) + (" with --set" if overrides else ""))
