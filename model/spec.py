"""Torch-free descriptors: what a checkpoint's metadata names, readable without loading torch.

`upscaled models list`, `models show` and `models rollback` only read checkpoint headers and
the models folder's pointers; importing torch for them cost seconds. What they need lives here
and is re-exported from its old homes (model.generator, model.foreign), so every import keeps
working. Nothing in this module may import torch, safetensors.torch or spandrel
(tests/test_cli_imports.py checks the commands that rely on it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

ARCH = "srresnet"  # CheckpointInfo.arch of our generator, described by GeneratorConfig
FOREIGN_ARCH = "spandrel"  # CheckpointInfo.arch of an imported model; the network is in `foreign`
SCALES = (2, 4, 8)
UPSAMPLERS = ("stages", "lowres")
SKIPS = ("none", "bilinear", "bicubic")


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything needed to rebuild the generator; stored verbatim in checkpoint metadata."""

    scale: int = 4
    channels: int = 64
    blocks: int = 16
    batchnorm: bool = True  # the original design has it; fidelity models often train better without
    # stages: the SRGAN layout, a conv + PixelShuffle(2) per factor of 2, then a 9x9 conv at full
    #   resolution (about 70% of an 8x32 model's FLOPs run at 2x and 4x resolution).
    # lowres: one 3x3 conv to 3*scale^2 channels at low resolution, then PixelShuffle(scale); the
    #   freed FLOPs buy residual blocks (ESPCN / efficient-SR layout).
    upsampler: str = "stages"
    # An upscale of the input added to the output, so the network learns only the residual.
    skip: str = "none"

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {self.scale!r}")
        if not (isinstance(self.channels, int) and self.channels >= 4):
            raise ValueError(f"channels must be an integer >= 4, got {self.channels!r}")
        if not (isinstance(self.blocks, int) and self.blocks >= 1):
            raise ValueError(f"blocks must be an integer >= 1, got {self.blocks!r}")
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(f"upsampler must be one of {UPSAMPLERS}, got {self.upsampler!r}")
        if self.skip not in SKIPS:
            raise ValueError(f"skip must be one of {SKIPS}, got {self.skip!r}")

    def describe(self) -> str:
        """Short name for tables and logs, e.g. 24x32 lowres+bilinear."""
        name = f"{self.blocks}x{self.channels}" + ("" if self.upsampler == "stages" else f" {self.upsampler}")
        return name + ("" if self.skip == "none" else f"+{self.skip}") + (" BN" if self.batchnorm else "")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown generator hyperparameters {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)
