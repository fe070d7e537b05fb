"""The checkpoint format: generator weights in safetensors, self-describing JSON metadata.

A checkpoint is the only thing the trainer and the daemon share, so loading it is strict: it
must be safetensors (never a pickle), carry our metadata, and every tensor must match the
generator that metadata describes.

Reading the metadata (`read_info`, the header parse) needs no torch, so `upscaled models list`,
`show` and `rollback` never import it (seconds per call): torch, safetensors.torch and the
generator are imported inside the functions that handle tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import atomic_write_bytes
from core.errors import CheckpointError, Untrusted
from model.spec import ARCH, FOREIGN_ARCH, GeneratorConfig

if TYPE_CHECKING:  # annotations only (they stay strings): importing torch here would cost every reader seconds
    import torch

    from model.generator import Generator

META_KEY = "upscaled"
FORMAT_VERSION = 1
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointInfo:
    arch: str  # "srresnet" (our generator, described by `generator`) or "spandrel" (imported, `foreign`)
    generator: GeneratorConfig | None
    version: str
    created: str
    step: int
    validation: dict[str, Any] = field(default_factory=dict)  # {"data", "fingerprint", "metrics": {...}}
    extra: dict[str, Any] = field(default_factory=dict)
    foreign: dict[str, Any] | None = None  # model.foreign.ForeignSpec as a dict, for imported models

    @property
    def scale(self) -> int:
        return int(self.foreign["scale"]) if self.foreign else self.generator.scale

    @property
    def imported(self) -> bool:
        return self.foreign is not None

    def describe(self) -> str:
        """The network in a few words, for logs and listings."""
        if self.foreign:
            from model.foreign import ForeignSpec

            return "imported " + ForeignSpec.from_dict(self.foreign).describe()
        g = self.generator
        return f"{g.blocks} blocks x {g.channels} channels{', ' + g.upsampler if g.upsampler != 'stages' else ''}"

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.validation.get("metrics", {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "arch": self.arch,
            **({"generator": self.generator.to_dict()} if self.generator else {}),
            **({"foreign": self.foreign} if self.foreign else {}),
            "scale": self.scale,
            "version": self.version,
            "created": self.created,
            "step": self.step,
            "validation": self.validation,
            "extra": self.extra,
        }


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    generator: Generator,
    *,
    step: int = 0,
    validation: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> CheckpointInfo:
    """Write `generator` atomically to `path`; returns the metadata written. `dtype`: of the
    floating-point tensors stored (None: float32)."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    state = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    # BatchNorm's batch counter is training bookkeeping, and an int64 the daemon never needs.
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    now = datetime.now(timezone.utc)
    info = CheckpointInfo(
        arch=ARCH,
        generator=generator.cfg,
        version=f"{now:%Y%m%dT%H%M%SZ}-{weights_digest(state)[:8]}",
        created=now.isoformat(timespec="milliseconds"),
        step=int(step),
        validation=dict(validation or {}),
        extra=dict(extra or {}),
    )
    write_checkpoint(path, state, info)
    return info


def write_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], info: CheckpointInfo) -> None:
    """Tensors and metadata to `path`, atomically (temp name, fsync, rename)."""
    from safetensors.torch import save as st_save

    data = st_save(state, metadata={META_KEY: json.dumps(info.to_dict(), sort_keys=True)})
    atomic_write_bytes(path, data)


def new_version(state: dict[str, torch.Tensor], name: str | None = None) -> tuple[str, str]:
    """(version, created): the creation time and the weights' digest, or a name and the digest."""
    now = datetime.now(timezone.utc)
    digest = weights_digest(state)[:8]
    return (f"{name}-{digest}" if name else f"{now:%Y%m%dT%H%M%SZ}-{digest}"), now.isoformat(timespec="milliseconds")


def _not_safetensors(path: Path, raw: bytes, why: str) -> CheckpointError:
    # Only diagnose after the safetensors parse failed: a valid header length can start with
    # the same bytes as a pickle or a zip.
    if raw[:2] == b"PK" or raw[:1] == b"\x80":
        return CheckpointError(
            f"{path}: is a PyTorch/pickle file, not safetensors; upscaled never unpickles model "
            "files (they can run code) — convert it to .safetensors"
        )
    return CheckpointError(f"{path}: not a safetensors file, or truncated ({why})")


def _header(path: Path, raw: bytes, size: int) -> dict[str, Any]:
    """Parse the safetensors header from `raw` (at least its first 8 + n bytes); `size` = file size."""
    if len(raw) < 8:
        raise _not_safetensors(path, raw, f"only {len(raw)} bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise _not_safetensors(path, raw, f"header claims {n} bytes, file has {size}")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_safetensors(path, raw, f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, raw, "header is not a JSON object")
    return header


def _info_from_header(path: Path, header: dict[str, Any]) -> CheckpointInfo:
    meta = header.get("__metadata__") or {}
    if META_KEY not in meta:
        raise CheckpointError(
            f"{path}: safetensors file without upscaled metadata (key {META_KEY!r}); it was not "
            "written by upscaled, so its architecture is unknown"
        )
    try:
        m = json.loads(meta[META_KEY])
        if m.get("arch") not in (ARCH, FOREIGN_ARCH):
            raise CheckpointError(f"{path}: architecture {m.get('arch')!r} is not supported (expected {ARCH!r}, "
                                  f"or {FOREIGN_ARCH!r} for an imported model)")
        foreign = m["foreign"] if m["arch"] == FOREIGN_ARCH else None
        if foreign is not None and not isinstance(foreign, dict):
            raise CheckpointError(f"{path}: imported model's metadata 'foreign' is not an object")
        if int(m.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: checkpoint format {m['format_version']} is newer than this upscaled "
                f"understands ({FORMAT_VERSION}); upgrade upscaled"
            )
        return CheckpointInfo(
            arch=m["arch"],
            generator=None if foreign is not None else GeneratorConfig.from_dict(m["generator"]),
            version=str(m["version"]),
            created=str(m["created"]),
            step=int(m.get("step", 0)),
            validation=dict(m.get("validation") or {}),
            extra=dict(m.get("extra") or {}),
            foreign=foreign,
        )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: upscaled metadata is incomplete or invalid: {e}") from None


def read_info(path: str | os.PathLike) -> CheckpointInfo:
    """Metadata only; cheap, and as strict about the format as a full load."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) == 8:
                (n,) = struct.unpack("<Q", raw)
                if n <= _MAX_HEADER and 8 + n <= size:
                    raw += f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    return _info_from_header(path, _header(path, raw, size))


def load_checkpoint(path: str | os.PathLike, sha256: str | None = None) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read and validate a checkpoint; returns float32 CPU tensors and the metadata. `sha256`: the
    digest the bytes must have (what publish recorded); the bytes hashed are the bytes parsed."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    from model.generator import Generator

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if sha256 is not None and (actual := hashlib.sha256(raw).hexdigest()) != sha256:
        raise Untrusted(f"{path}: not the checkpoint that was published (sha256 {actual[:12]}…, recorded "
                        f"{sha256[:12]}…); not served")
    info = _info_from_header(path, _header(path, raw, len(raw)))
    try:
        state = st_load(raw)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: damaged safetensors data ({e})") from None
    if info.foreign is not None:  # the shapes are checked when spandrel rebuilds it (load_model)
        from model.foreign import finite_weights

        finite_weights(state, str(path))
        return {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}, info
    expected = {
        k: v
        for k, v in Generator(info.generator).state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the declared generator {info.generator}: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )
    for k, want in expected.items():
        got = state[k]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{path}: tensor {k} has shape {tuple(got.shape)}, but the declared generator "
                f"{info.generator} needs {tuple(want.shape)}"
            )
        if not got.is_floating_point():
            raise CheckpointError(f"{path}: tensor {k} has dtype {got.dtype}, expected floating point")
        state[k] = got.to(torch.float32)
        if not torch.isfinite(state[k]).all():
            raise CheckpointError(f"{path}: tensor {k} contains NaN or infinite values")
    return state, info


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", sha256: str | None = None):
    """Any servable checkpoint, ours or imported: (network in eval mode, info). The network has
    a `descriptor` (scale, size rules, tiling) and maps N x 3 x H x W in [0, 1] to x scale.
    `sha256`: see load_checkpoint."""
    from model.generator import Generator

    state, info = load_checkpoint(path, sha256)
    if info.foreign is not None:
        from model.foreign import ForeignSpec, build

        return build(state, ForeignSpec.from_dict(info.foreign), str(path)).eval().to(device), info
    g = Generator(info.generator)
    g.load_state_dict(state, strict=False)
    return g.eval().to(device), info


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Generator, CheckpointInfo]:
    """Rebuild our generator from the metadata alone and load its weights, in eval mode (for
    training and tools that need our architecture; serving uses load_model)."""
    from model.generator import Generator

    state, info = load_checkpoint(path)
    if info.foreign is not None:
        raise CheckpointError(f"{path}: an imported {info.foreign.get('architecture')} model; this needs an "
                              "upscaled SRResNet checkpoint (imported models can be served and evaluated, not trained)")
    g = Generator(info.generator)
    g.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (checked above)
    return g.eval().to(device), info


BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
# The checkpoints shipped inside the package, by the names users give them in `model.path` and
# `--model`: the fidelity model (PSNR-oriented, the default) and its GAN fine-tune (sharper).
BUNDLED = {"fidelity": BUNDLED_DIR / "fidelity.safetensors", "gan": BUNDLED_DIR / "gan.safetensors",
           "real": BUNDLED_DIR / "real.safetensors"}  # real: for compressed inputs (JPEGs from phones, the web)
BUNDLED_DEFAULT = BUNDLED["fidelity"]


def bundled_checkpoint(value: str | os.PathLike) -> Path | None:
    """The bundled checkpoint `value` names ("fidelity", "gan", "real"), or None when it is a path."""
    return BUNDLED.get(str(value))
