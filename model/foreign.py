"""Models trained elsewhere (ESRGAN, SPAN, SwinIR, DAT, HAT, ...), through spandrel.

`upscaled models import` is the one place a foreign file is read, as an explicit operator
action. Pickled checkpoints (.pth, .pt, .ckpt) can run code when unpickled, so they are read
here with `torch.load(weights_only=True)` only; TorchScript archives (which carry code) are
refused outright. spandrel's own file loaders are not used for this reason: its `.pt` path may
call `torch.jit.load`. spandrel recognises the architecture from the tensors alone
(`ModelLoader().load_from_state_dict`), and the result is stored in upscaled's own format:
safetensors plus metadata naming the architecture, what spandrel detected (scale, purpose,
precisions, size rules, tiling advice, hyperparameters) and where the weights came from.

Serving an imported checkpoint rebuilds the network the same way, from the safetensors
tensors, and checks spandrel detects the architecture the metadata names.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import CheckpointError
from model.spec import FOREIGN_ARCH  # noqa: F401 - torch-free (model/spec.py), re-exported from here as before

PICKLED = (".pth", ".pt", ".ckpt", ".bin")
SAFETENSORS = (".safetensors",)
SERVED_PURPOSES = ("SR", "Restoration")  # image in, image (x scale) out; Restoration = x1
DEFAULT_CONTEXT = 16  # LR pixels of context around a tile when the receptive field is unknown
DEFAULT_FEATHER = 8  # LR pixels over which neighbouring tiles are blended
# Attention-based architectures hold far more activation memory per pixel than convnets.
TRANSFORMERS = {"SwinIR", "Swin2SR", "HAT", "DAT", "ATD", "DRCT", "RGT", "GRL", "SRFormer", "IPT", "FDAT", "MoESR",
                "MoSR", "Uformer", "FFTformer", "RestoreFormer", "CRAFT", "SeemoRe", "DITN", "OmniSR", "DCTLSA"}
# Keys under which training frameworks nest the weights (BasicSR: params / params_ema, ...).
WRAPPERS = ("params_ema", "params-ema", "params", "model_state_dict", "state_dict", "model", "net", "netG", "generator")


def _spandrel():
    try:
        import spandrel
        # Some architectures call torch.meshgrid the old way; the warning means nothing to users.
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
    except ImportError:
        raise CheckpointError("imported models need spandrel: pip install 'upscaled[foreign]'") from None
    return spandrel


@dataclass(frozen=True)
class ForeignSpec:
    """What spandrel detected, stored in the checkpoint's metadata (spandrel's descriptor, as data)."""

    architecture: str  # spandrel's architecture id, e.g. "ESRGAN", "SPAN", "DAT"
    scale: int
    purpose: str  # "SR" (scale > 1) or "Restoration" (x1)
    input_channels: int
    output_channels: int
    supports_half: bool
    supports_bfloat16: bool
    size_minimum: int  # input side at least this (padded up to it otherwise)
    size_multiple: int  # input sides a multiple of this (padded otherwise)
    size_square: bool
    tiling: str  # "supported" | "discouraged" | "internal"
    tags: list[str] = field(default_factory=list)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # file, sha256, licence text, name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ForeignSpec":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def of(cls, desc, source: dict[str, Any] | None = None) -> "ForeignSpec":
        req = desc.size_requirements
        hp = getattr(desc.model, "hyperparameters", {}) or {}
        return cls(
            architecture=desc.architecture.id, scale=int(desc.scale), purpose=str(desc.purpose),
            input_channels=int(desc.input_channels), output_channels=int(desc.output_channels),
            supports_half=bool(desc.supports_half), supports_bfloat16=bool(desc.supports_bfloat16),
            size_minimum=int(req.minimum), size_multiple=int(req.multiple_of), size_square=bool(req.square),
            tiling=desc.tiling.name.lower(), tags=[str(t) for t in desc.tags],
            hyperparameters=json.loads(json.dumps(hp, default=str)), source=dict(source or {}),
        )

    @property
    def bytes_per_out_px(self) -> int:
        """A rough bound on activation memory per output pixel of a tile, for the tile size:
        a 64-channel fp32 map and a few alive at once for convnets, four times that with attention."""
        return 1536 * (4 if self.architecture in TRANSFORMERS else 1)

    def describe(self) -> str:
        size = []
        if self.size_multiple > 1:
            size.append(f"sides padded to a multiple of {self.size_multiple}")
        if self.size_minimum:
            size.append(f"at least {self.size_minimum} px")
        if self.size_square:
            size.append("square")
        precisions = "fp32" + (", bf16" if self.supports_bfloat16 else "") + (", fp16" if self.supports_half else "")
        return (f"{self.architecture} x{self.scale} ({', '.join(self.tags) or 'no tags'}; {precisions}; "
                f"tiling {self.tiling}{'; ' + ', '.join(size) if size else ''})")


# ---------------------------------------------------------------------------------------------
# Reading a foreign file (import only)


def _damaged_zip(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: a damaged zip archive ({_first_line(e)}): not a checkpoint upscaled can read, "
                           "and whether it carries code cannot be checked; not imported")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with code (code/*.py, constants.pkl) besides the data.
    A zip whose directory cannot be read (zipfile raises BadZipFile, or NotImplementedError for
    a version field it does not know) is refused: what it holds cannot be checked."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError) as e:
        raise _damaged_zip(path, e) from None
    return any(n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names)


def _first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name (an EOFError from
    an empty file has no message at all)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


# Globals torch's weights-only reader allows in a checkpoint's pickle: tensors and plain data.
_PLAIN_GLOBALS = ("torch.", "collections.OrderedDict", "builtins.set", "builtins.frozenset", "builtins.bytearray",
                  "_codecs.encode", "numpy.")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def _pickled_globals(path: Path) -> list[str] | None:
    """The globals (module.name) the pickle in `path` names, read opcode by opcode with
    pickletools (which parses, never runs); None when the bytes are not a pickle at all. A zip
    (PyTorch's format) is read at its data.pkl; a legacy file is a few pickles in a row."""
    import io
    import pickletools

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            pkl = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not pkl:
                return None
            streams = [io.BytesIO(z.read(pkl[0]))]
    else:
        streams = [io.BytesIO(path.read_bytes()[: 64 << 20])]
    found: list[str] = []
    for stream in streams:
        for n in range(5):  # legacy: magic number, protocol, system info, the object, storage keys
            strings: list[str] = []
            memo: dict[int, str] = {}
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                        strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
                    elif op.name == "MEMOIZE" and strings:
                        memo[len(memo)] = strings[-1]
                    elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                        memo[int(arg)] = strings[-1]
                    elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                        strings.append(memo[int(arg)])
                    elif op.name == "GLOBAL":
                        found.append(".".join(str(arg).split(" ", 1)))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        found.append(f"{strings[-2]}.{strings[-1]}")
            except Exception:  # noqa: BLE001 - pickletools' way of saying "not a pickle" varies
                if n == 0:
                    return None
                break
            if stream.tell() >= len(stream.getbuffer()):
                break
    return found


def _refusal(path: Path, e: BaseException) -> CheckpointError:
    """Why torch's weights-only reader refused `path`, in words that fit what the file is."""
    try:
        globs = _pickled_globals(path)
    except (zipfile.BadZipFile, NotImplementedError, ValueError, EOFError, OSError) as z:
        return _damaged_zip(path, z)
    if globs is None:
        return CheckpointError(f"{path}: not a checkpoint: neither a PyTorch archive nor a pickle (random or damaged "
                               "bytes?); nothing was imported")
    risky = sorted({g for g in globs if not g.startswith(_PLAIN_GLOBALS)})
    if risky:
        return CheckpointError(f"{path}: refused: its pickle asks for {', '.join(risky[:5])}, more than tensors and "
                               f"plain data, which could run code; nothing in it was run")
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)})")


def _unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, out of the wrappers training frameworks put around them."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
            inner = next(iter(obj.values()))
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"the file holds a {type(obj).__name__}, not a dictionary of weights")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "netG."):  # DataParallel, some GAN repositories
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    if not state:
        raise CheckpointError(f"no weight tensors found (top-level keys: {sorted(map(str, obj))[:10]})")
    return state


def read_foreign_weights(path: Path) -> dict[str, torch.Tensor]:
    """The weight tensors of a foreign checkpoint, read without running anything it contains."""
    ext = path.suffix.lower()
    if ext in SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return _unwrap(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if ext not in PICKLED:
        raise CheckpointError(f"{path}: unsupported file type {ext or '(none)'}; import reads "
                              f"{', '.join(PICKLED + SAFETENSORS)}")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: an empty file (0 bytes), not a checkpoint")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if _is_torchscript(path):
        raise CheckpointError(f"{path}: is a TorchScript archive, which carries code as well as weights; upscaled "
                              "imports weights only (export the model's state_dict to .pth or .safetensors)")
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global that is not a tensor or plain data, before calling it;
        # and anything that is not a pickle at all. Which one it was is told apart by reading
        # the opcodes (pickletools), so random bytes are not called a pickle that could run code.
        raise _refusal(path, e) from None
    except Exception as e:  # noqa: BLE001 - torch.load on damaged bytes raises many kinds (KeyError, struct.error...)
        raise _refusal(path, e) from None
    return _unwrap(obj)


def detect(state: dict[str, torch.Tensor], where: str = "the file"):
    """spandrel's descriptor for these tensors; CheckpointError naming the keys when none matches."""
    spandrel = _spandrel()
    try:
        return spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        keys = sorted(state)
        raise CheckpointError(
            f"{where}: unknown architecture: spandrel {spandrel.__version__} recognises none from its {len(keys)} "
            f"tensors (keys {', '.join(keys[:8])}{', …' if len(keys) > 8 else ''})") from None
    except Exception as e:  # a known architecture with inconsistent shapes
        raise CheckpointError(f"{where}: looks like a known architecture but does not load: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None


def servable(desc, where: str) -> None:
    """Refuse what the hot folder cannot serve: not image-to-image SR, not RGB in and out."""
    spandrel = _spandrel()
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.purpose not in SERVED_PURPOSES:
        raise CheckpointError(f"{where}: a {desc.architecture.name} model for {desc.purpose}, not super-resolution; "
                              "upscaled serves super-resolution (and x1 restoration) models only")
    if (desc.input_channels, desc.output_channels) != (3, 3):
        raise CheckpointError(f"{where}: takes {desc.input_channels} and gives {desc.output_channels} channels; "
                              "upscaled serves RGB models (3 in, 3 out)")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:60] or "model"


# ---------------------------------------------------------------------------------------------
# Running an imported model


class ForeignNet(nn.Module):
    """An imported network in the shape the engine runs: N x 3 x H x W in [0, 1] -> x scale.

    Pads the input to the model's size rules (reflect, as spandrel's own call does) and crops
    the output back; runs in the dtype it was moved to with `to_dtype`.
    """

    def __init__(self, desc, spec: ForeignSpec):
        super().__init__()
        self.net = desc.model.eval()
        self._call = desc._call_fn  # some architectures are called through a function of spandrel's
        self._req = desc.size_requirements
        self.spec = spec
        self.dtype = torch.float32
        from model.generator import Descriptor

        self.descriptor = Descriptor(
            arch=spec.architecture, scale=spec.scale, input_channels=3, output_channels=3,
            supports_half=spec.supports_half, supports_bfloat16=spec.supports_bfloat16,
            receptive_radius=-1, tiling=spec.tiling,
        )

    def to_dtype(self, dtype: torch.dtype) -> "ForeignNet":
        # Reduced precision by autocast, weights kept in fp32: architectures build masks and
        # position tables in fp32 inside forward(), which a model cast to bf16 trips over.
        self.dtype = dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from spandrel.__helpers.size_req import pad_tensor  # the padding spandrel's own call applies

        h, w = x.shape[-2:]
        padded, x = pad_tensor(x.float(), self._req)
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            y = self._call(self.net, x)
        if padded:
            y = y[..., : h * self.spec.scale, : w * self.spec.scale]
        return y


def build(state: dict[str, torch.Tensor], spec: ForeignSpec, where: str) -> ForeignNet:
    """Rebuild an imported model from its stored tensors (which spandrel recognises again)."""
    desc = detect(state, where)
    if desc.architecture.id != spec.architecture or int(desc.scale) != spec.scale:
        raise CheckpointError(f"{where}: its tensors are a {desc.architecture.id} x{desc.scale} model, but its "
                              f"metadata says {spec.architecture} x{spec.scale}")
    servable(desc, where)
    return ForeignNet(desc, spec)


def finite_weights(state: dict[str, torch.Tensor], where: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{where}: tensor {k} contains NaN or infinite values")
