"""The SRResNet/SRGAN generator and the small descriptor every caller asks questions of."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# The descriptor and its constants are torch-free (model/spec.py); re-exported from here, as before.
from model.spec import ARCH, SCALES, SKIPS, UPSAMPLERS, GeneratorConfig  # noqa: F401


@dataclass(frozen=True)
class Descriptor:
    """What a caller needs to know to run a generator (spandrel-style)."""

    arch: str
    scale: int
    input_channels: int
    output_channels: int
    supports_half: bool
    supports_bfloat16: bool
    receptive_radius: int  # input pixels of context that influence one output pixel, per side; -1: unknown
    tiling: str = "supported"  # spandrel's advice: supported | discouraged | internal (whole image)

    @classmethod
    def of(cls, cfg: GeneratorConfig) -> "Descriptor":
        return cls(
            arch=ARCH,
            scale=cfg.scale,
            input_channels=3,
            output_channels=3,
            supports_half=True,
            supports_bfloat16=True,
            receptive_radius=receptive_radius(cfg),
        )


def receptive_radius(cfg: GeneratorConfig) -> int:
    """Radius, in low-resolution pixels, of the region that can influence one output pixel.

    Tiles cropped with this much context reproduce untiled inference exactly (up to float
    rounding), which is what the engine's seamless tiling relies on.
    """
    r = 4.0 + 2 * cfg.blocks + 1  # 9x9 head, two 3x3 per block, 3x3 trunk tail
    if cfg.upsampler == "lowres":
        return int(r) + 1  # one 3x3 conv before the shuffle; the skip's 2-px bicubic is within it
    up = 1
    for _ in range(int(math.log2(cfg.scale))):
        r += 1 / up  # 3x3 conv before each PixelShuffle runs at the current resolution
        up *= 2
    r += 4 / up  # 9x9 tail at full resolution
    return math.ceil(r)


def skip(x: torch.Tensor, cfg: GeneratorConfig) -> torch.Tensor | float:
    """What the network's output is added to: 0.5 (mid-grey), or an upscale of the input."""
    if cfg.skip == "none":
        return 0.5
    return torch.nn.functional.interpolate(x, scale_factor=cfg.scale, mode=cfg.skip, align_corners=False)


class ResidualBlock(nn.Module):
    def __init__(self, ch: int, batchnorm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch) if batchnorm else nn.Identity()
        self.act = nn.PReLU(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ch) if batchnorm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class UpsampleBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch * 4, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.act = nn.PReLU(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.shuffle(self.conv(x)))


class Generator(nn.Module):
    """Maps an RGB image in [0, 1] to an RGB image `scale` times larger (not clamped)."""

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        self.head = nn.Sequential(nn.Conv2d(3, ch, 9, padding=4), nn.PReLU(ch))
        self.body = nn.Sequential(*[ResidualBlock(ch, cfg.batchnorm) for _ in range(cfg.blocks)])
        self.body_tail = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1), nn.BatchNorm2d(ch) if cfg.batchnorm else nn.Identity()
        )
        if cfg.upsampler == "lowres":
            self.upsample = nn.Sequential(nn.Conv2d(ch, 3 * cfg.scale**2, 3, padding=1), nn.PixelShuffle(cfg.scale))
            self.tail = nn.Identity()
        else:
            self.upsample = nn.Sequential(*[UpsampleBlock(ch) for _ in range(int(math.log2(cfg.scale)))])
            self.tail = nn.Conv2d(ch, 3, 9, padding=4)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor.of(self.cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centre the input so a zero-initialised network is not biased towards black.
        h = self.head(x - 0.5)
        h = h + self.body_tail(self.body(h))
        return self.tail(self.upsample(h)) + skip(x, self.cfg)

    def flops_per_output_pixel(self) -> float:
        """Multiply-adds x 2 per output pixel, for throughput reports."""
        s = self.cfg.scale
        macs_lr = 0.0
        for m in [*self.head, *self.body.modules(), *self.body_tail]:
            if isinstance(m, nn.Conv2d):
                macs_lr += m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        if self.cfg.upsampler == "lowres":
            c = self.upsample[0]
            return 2 * (macs_lr + c.in_channels * c.out_channels * 9) / (s * s)
        macs = macs_lr / (s * s)
        res = 1
        for blk in self.upsample:
            c = blk.conv
            macs += c.in_channels * c.out_channels * 9 / (s * s) * res * res
            res *= 2
        macs += self.tail.in_channels * 3 * 81
        return 2 * macs
