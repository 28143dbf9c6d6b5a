"""BN folding keeps a model's outputs, on zoo models and on a hand-made one."""

import pytest
import torch
from torch import nn

from qframe.models import build_model
from qframe.quant.fold import find_conv_bn_pairs, fold_bn


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "compact_cnn"])
def test_fold_keeps_outputs(name, randomise_bn):
    model = build_model(name, num_classes=7, in_channels=3, image_size=32, width_mult=0.5).eval()
    randomise_bn(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        pairs = fold_bn(model)
        out = model(x)
    assert len(pairs) == bns, "every BN of a zoo model follows its conv and must fold"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


class _Branchy(nn.Module):
    """A conv whose output also feeds something else must not be folded."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.b(x)
        return self.bn_a(self.a(x)) + self.bn_b(y) + y


def test_only_exclusive_conv_bn_pairs_fold(randomise_bn):
    model = _Branchy().eval()
    randomise_bn(model)
    assert find_conv_bn_pairs(model) == [("a", "bn_a")]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
        fold_bn(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_b, nn.BatchNorm2d)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.body(x)


def test_untraceable_models_fold_sequential_pairs(randomise_bn):
    model = _Untraceable().eval()
    randomise_bn(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert fold_bn(model) == [("body.0", "body.1")]
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
