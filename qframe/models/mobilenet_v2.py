"""MobileNetV2 (Sandler et al., 2018) written to match torchvision's module names.

Module names follow ``torchvision.models.mobilenet_v2`` (``features.0.0`` is the first conv,
``features.N.conv...`` the inverted residual blocks, ``classifier.1`` the Linear layer), so name
filters and state dicts written for one work for the other.

Small inputs: for ``image_size <= 64`` the stem conv uses stride 1 instead of 2 (all other strides
are kept). The network then down-samples 16x instead of 32x, so a 32x32 image ends as a 2x2 map
rather than collapsing to 1x1 before the last blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe.models.ops import ResidualAdd

# t (expansion), c (channels), n (repeats), s (stride of the first block) from the paper
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor`` without going more than 10% below it.

    Channel counts that are multiples of 8 map well onto tensor cores and int8 kernels.
    """
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU6, as ``Conv2dNormActivation`` in torchvision."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> project (1x1, linear); residual when shapes match."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(in_ch, hidden, kernel_size=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_ch
        self.add = ResidualAdd() if self.use_res_connect else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add is not None:
            return self.add(self.conv(x), x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 with width multiplier, ReLU6, dropout 0.2 and a Linear classifier."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, image_size: int = 224,
                 width_mult: float = 1.0, dropout: float = 0.2, round_nearest: int = 8):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        # the last layer never shrinks below 1280 so the classifier keeps enough features
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        stem_stride = 1 if image_size <= 64 else 2  # see module docstring
        features: list[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=stem_stride)]
        for t, c, n, s in _SETTINGS:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _init_weights(model: nn.Module) -> None:
    # same initialisation as torchvision so training from scratch behaves the same
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def mobilenet_v2(num_classes: int, in_channels: int = 3, image_size: int = 224, *,
                 width_mult: float = 1.0) -> MobileNetV2:
    """Build a MobileNetV2; ``image_size <= 64`` selects a stride-1 stem."""
    return MobileNetV2(num_classes, in_channels, image_size, width_mult=width_mult)
