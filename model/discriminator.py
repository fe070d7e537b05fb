"""The SRGAN discriminator: is this HR patch real or generated? One score per image."""

from __future__ import annotations

import torch
from torch import nn


class Discriminator(nn.Module):
    """conv3x3(w) + LeakyReLU, then 7 conv/BN/LeakyReLU blocks (stride 2 every other block,
    channels w -> 2w -> 4w -> 8w), global average pooling, dense 1024, LeakyReLU, dense 1.

    `width` 64 is the original design; tests use a few channels. Any input size >= 16 works
    (the pooling makes the score size-independent). The output is a raw score (least-squares
    GAN: trained towards 1 for real, 0 for fake).
    """

    def __init__(self, width: int = 64, dense: int = 1024):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        ch = width
        # (out channels, stride) of the blocks after the first conv, as in the SRGAN paper.
        plan = [(width, 2), (2 * width, 1), (2 * width, 2), (4 * width, 1), (4 * width, 2), (8 * width, 1), (8 * width, 2)]
        for out, stride in plan:
            layers += [nn.Conv2d(ch, out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2, inplace=True)]
            ch = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, dense), nn.LeakyReLU(0.2, inplace=True), nn.Linear(dense, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Centred like the generator's input, so the first conv sees zero-mean data.
        return self.head(self.features(x - 0.5)).squeeze(1)
