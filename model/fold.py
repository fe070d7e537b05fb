"""The generator in the form inference runs it: the same function, rearranged to be fast and exact.

- Inference-time BatchNorm is a per-channel affine map, so conv -> BN is one conv with rescaled
  weights and a shifted bias: one pass over memory fewer.
- The last PixelShuffle moves after the 9x9 tail. A 9x9 conv with 3 outputs on the full-resolution
  map is the worst shape a GEMM-based convolution gets (N = 3); on the map before the shuffle it is
  a 5x5 conv from 4*ch to 12 channels at half the resolution: the same taps (plus zeros), 2.5-3x
  less time on this CPU, and the ch-channel full-resolution map is never made.
- Reduced precision (bf16 on CPU, fp16 on CUDA) runs everywhere but at the two ends that touch
  pixels. bf16 carries 8 significant bits: the image rounded to it on the way in cost 0.08 dB on
  the val photos (0.7 dB on the flattest), so the 9x9 head (2% of the FLOPs) runs in fp32. On the
  way out the tail's result is rounded once, to a step of up to 1/512 of full scale, which cost
  0.04 dB (0.3 dB on flat photos, where PSNR is highest); instead of running the tail in fp32
  (+50% time) its bias is shifted by the input's mean colour, so the value rounded is the small
  distance from that, and the shift is added back in fp32. Measured: bench/benchmark.py's guard.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.generator import Generator, skip


def _fuse(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=True)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fold_batchnorm(g: Generator) -> Generator:
    """A copy of `g` (eval mode) with every BatchNorm merged into its conv."""
    g = copy.deepcopy(g).eval()
    if not g.cfg.batchnorm:
        return g
    for block in g.body:
        block.conv1, block.bn1 = _fuse(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = _fuse(block.conv2, block.bn2), nn.Identity()
    g.body_tail = nn.Sequential(_fuse(g.body_tail[0], g.body_tail[1]), nn.Identity())
    return g


def tail_before_shuffle(tail: nn.Conv2d, r: int = 2) -> nn.Conv2d:
    """The conv that, applied before PixelShuffle(r), equals `tail` applied after it.

    Output pixel (r*i + a, r*j + b) of `tail` reads input pixels r*i + a + dy, dy in [-k, k]; input
    row r*p + c is channel (ch*r*r + c*r + d) of the pre-shuffle map at row p. So the tap (dy, dx)
    of output phase (a, b) lands at pre-shuffle offset p - i = floor((a + dy) / r), phase c.
    """
    k = tail.kernel_size[0] // 2
    assert tail.kernel_size == (2 * k + 1, 2 * k + 1) and tail.padding == (k, k) and tail.stride == (1, 1)
    out_ch, in_ch = tail.out_channels, tail.in_channels
    k2 = (k + r - 1) // r  # reach in pre-shuffle pixels
    w = tail.weight.detach()
    w2 = torch.zeros(out_ch * r * r, in_ch * r * r, 2 * k2 + 1, 2 * k2 + 1, dtype=w.dtype)
    for a in range(r):
        for b in range(r):
            for c in range(r):
                for d in range(r):
                    for dy in range(-k, k + 1):
                        p, rem = divmod(a + dy, r)
                        if rem != c:
                            continue
                        for dx in range(-k, k + 1):
                            q, rem2 = divmod(b + dx, r)
                            if rem2 != d:
                                continue
                            w2[a * r + b :: r * r, c * r + d :: r * r, p + k2, q + k2] = w[:, :, dy + k, dx + k]
    conv = nn.Conv2d(in_ch * r * r, out_ch * r * r, 2 * k2 + 1, padding=k2)
    with torch.no_grad():
        conv.weight.copy_(w2)
        conv.bias.copy_(tail.bias.detach().repeat_interleave(r * r))
    return conv


class FoldedGenerator(nn.Module):
    """Generator's function for inference (see the module docstring); `dtype` is the body's."""

    def __init__(self, g: Generator, dtype: torch.dtype = torch.float32):
        super().__init__()
        g = fold_batchnorm(g)
        self.cfg, self.dtype = g.cfg, dtype
        self.head = g.head.float()
        self.body, self.body_tail = g.body.to(dtype), g.body_tail.to(dtype)
        if g.cfg.upsampler == "lowres":  # already one conv at low resolution, then the shuffle
            self.upsample, last_conv, self.shuffle = nn.Sequential(), g.upsample[0], g.cfg.scale
            self.last_conv, self.last_slope = nn.Identity(), None
            self.tail_padding = last_conv.padding
            self.tail_weight = nn.Parameter(last_conv.weight.detach().to(dtype), requires_grad=False)
            self.tail_bias = nn.Parameter(last_conv.bias.detach().float(), requires_grad=False)
            self.eval()
            return
        self.shuffle = 2
        *ups, last = g.upsample
        self.upsample = nn.Sequential(*ups).to(dtype)
        self.last_conv = last.conv.to(dtype)
        # PReLU after the shuffle is per channel; before it, each channel is repeated r*r times.
        self.last_slope = nn.Parameter(last.act.weight.detach().repeat_interleave(4).to(dtype), requires_grad=False)
        tail = tail_before_shuffle(g.tail)
        self.tail_weight = nn.Parameter(tail.weight.detach().to(dtype), requires_grad=False)
        self.tail_bias = nn.Parameter(tail.bias.detach().float(), requires_grad=False)  # fp32: see forward
        self.tail_padding = tail.padding
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        h = self.head(x - 0.5).to(self.dtype)
        h = h + self.body_tail(self.body(h))
        z = self.last_conv(self.upsample(h))
        if self.last_slope is not None:
            z = F.prelu(z, self.last_slope)
        # shift ~ the output's mean; the bias handed to the conv is exactly representable in
        # self.dtype, so conv + (bias - that) is the unshifted sum with only the small part rounded.
        # With a skip the network's output is already the small residual.
        r2 = self.shuffle**2
        shift = (x.mean(dim=(0, 2, 3)) - 0.5).repeat_interleave(r2) if self.cfg.skip == "none" else 0.0
        low = (self.tail_bias - shift).to(self.dtype)
        y = F.conv2d(z, self.tail_weight, low, padding=self.tail_padding).float()
        return F.pixel_shuffle(y + (self.tail_bias - low.float())[:, None, None], self.shuffle) + skip(x, self.cfg)
