"""Fold inference-time BatchNorm into the preceding convolution.

In eval mode BatchNorm is a per-channel affine map, so conv -> BN is one conv with rescaled
weights and a shifted bias: the same function with one pass over memory fewer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.generator import Generator


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
