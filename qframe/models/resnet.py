"""ResNet-18 (He et al., 2016) with BasicBlocks, named like torchvision (``conv1``, ``layerN``, ``fc``).

For ``image_size <= 64`` the stem is a 3x3 stride-1 conv without max-pool (the usual CIFAR
variant); the ImageNet stem (7x7 stride 2 + max-pool) would shrink a 32x32 image to 1x1 by layer4.

Each ReLU is its own module (the block has ``relu`` after ``bn1`` and ``relu_out`` after the
residual add) instead of torchvision's one shared ``relu``, so hook-based observers see each
activation once. The state-dict keys are the same as torchvision's.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe.models.ops import ResidualAdd


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU -> conv3x3-BN, plus identity (or 1x1 conv+BN downsample), then ReLU."""

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
        self.add = ResidualAdd()
        self.relu_out = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(self.add(out, identity))


class ResNet(nn.Module):
    """ResNet with BasicBlocks; ``layers`` gives the number of blocks per stage."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000,
                 in_channels: int = 3, image_size: int = 224, width: int = 64):
        super().__init__()
        small = image_size <= 64
        if small:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small else nn.MaxPool2d(3, 2, 1)
        ch = width
        for i, blocks in enumerate(layers):
            out = width * 2 ** i
            stage = [BasicBlock(ch, out, 1 if i == 0 else 2)] + [BasicBlock(out, out) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            ch = out
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int, in_channels: int = 3, image_size: int = 224, *, width_mult: float = 1.0) -> ResNet:
    """Build ResNet-18; ``width_mult`` scales the base width of 64 (rounded to a multiple of 8)."""
    width = max(8, int(round(64 * width_mult / 8)) * 8)
    return ResNet((2, 2, 2, 2), num_classes, in_channels, image_size, width=width)
