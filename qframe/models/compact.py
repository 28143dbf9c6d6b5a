"""A small, fast CNN for tests, tiny data sets and quick end-to-end runs.

Four conv3x3-BN-ReLU blocks with ``width, 2w, 4w, 4w`` channels; the first three end with a 2x2
max-pool, so the network down-samples 8x and works from 16x16 inputs up. Names: ``features.0.0``
is the first conv, ``classifier.1`` the Linear layer (as in MobileNetV2).
"""

from __future__ import annotations

import torch
from torch import nn


def _block(in_ch: int, out_ch: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CompactCNN(nn.Module):
    """4 conv blocks -> global average pool -> dropout -> Linear."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 32, dropout: float = 0.2):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 4 * width]
        blocks, prev = [], in_channels
        for i, ch in enumerate(chans):
            blocks.append(_block(prev, ch, pool=i < 3))
            prev = ch
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(prev, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def compact_cnn(num_classes: int, in_channels: int = 3, image_size: int = 32, *, width_mult: float = 1.0,
                width: int = 32) -> CompactCNN:
    """Build the compact CNN; its base width is ``width * width_mult`` (at least 8).

    ``image_size`` is accepted for a uniform builder signature; global pooling makes it irrelevant.
    """
    return CompactCNN(num_classes, in_channels, width=max(8, int(round(width * width_mult))))
