"""Biases on the int32 accumulator grid: the fake-quant layer computes what an integer kernel computes."""

import pytest
import torch
from torch import nn

import qframe
from qframe.quant import functional as QF
from qframe.quant.modules import QuantConv2d, QuantLinear, bake_int32_biases


def _calibrated(layer: nn.Module, x: torch.Tensor, **recipe):
    model = nn.Sequential(layer)
    return qframe.ptq(model.eval(), qframe.preset("w8a8", **recipe), [(x, torch.zeros(len(x)))], 1)[0]


def _integer_reference(layer, x):
    """float64 from the codes: sum(x_q * w_q) + round(bias / (s_x * s_w)), times s_x * s_w."""
    iq, wq = layer.input_quantizer, layer.weight_quantizer
    xq = QF.quantize(x, iq.scale, iq.zero_point, iq.spec).double()
    wcodes = QF.quantize(layer.weight, wq.scale, wq.zero_point, wq.spec).double()
    step = (iq.scale.double() * wq.scale.double())
    bias = torch.round(layer.bias.detach().double() / step)
    if isinstance(layer, QuantConv2d):
        def op(a, w, b):
            return nn.functional.conv2d(a, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        shape = (1, -1, 1, 1)
    else:
        op, shape = nn.functional.linear, (-1,)
    # and the sum of |products| (in accumulator units), which bounds float32 summation error
    return op(xq, wcodes, bias) * step.view(shape), op(xq.abs(), wcodes.abs(), bias.abs())


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 16, 3, padding=1), (8, 3, 10, 10)),
    (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 8, 10, 10)),
    (lambda: nn.Linear(24, 10), (32, 24)),
], ids=["conv", "depthwise", "linear"])
def test_fake_quant_layer_matches_integer_accumulation_with_int32_bias(make, shape):
    torch.manual_seed(torch.seed() % 2**31)
    float_layer = make()
    layer = _calibrated(float_layer, torch.randn(*shape))
    step = layer.bias_step(layer.weight)
    with torch.no_grad():  # half of the biases half-way between two accumulator units: rounding shows
        layer.bias.copy_((torch.randint(-50, 50, step.shape) + 0.45) * step)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref, magnitude = _integer_reference(layer, x)
        step64 = step.double().view(-1, *([1] * (ref.dim() - 2))) if ref.dim() > 2 else step.double()
        units = (layer(x).double() - ref) / step64
        # float32 accumulation of the same products: off by a few float32 epsilons of their sum
        assert (units.abs() <= 1e-6 * magnitude + 1e-3).all(), units.abs().max()
        assert (1e-6 * magnitude).max() < 0.2  # so the check below can tell 0.45 units
        layer.int32_bias = False  # the float bias is 0.45 units off the integer result
        assert ((layer(x).double() - ref) / step64).abs().max().item() > 0.4


def test_baked_bias_is_the_rounded_one_and_is_not_rounded_twice():
    layer = _calibrated(nn.Conv2d(4, 6, 3), torch.randn(4, 4, 8, 8))
    x = torch.randn(4, 4, 8, 8)
    with torch.no_grad():
        layer.bias.add_(torch.rand(6) * 1e-4)
        step = layer.bias_step(layer.weight).double()
        expected = torch.round(layer.bias.double() / step)
        before = layer(x)
        bake_int32_biases(layer)
        assert not layer.int32_bias
        torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
        codes = layer.bias.double() / step  # float32 holds the multiple to its own precision
        assert torch.equal(codes.round(), expected) and (codes - expected).abs().max() < 1e-3


def test_recipe_switch_and_unquantized_inputs_keep_the_float_bias():
    x = torch.randn(16, 12)
    plain = _calibrated(nn.Linear(12, 5), x, int32_bias=False)
    assert not plain.int32_bias
    weight_only = qframe.ptq(nn.Sequential(nn.Linear(12, 5)).eval(), qframe.preset("w4a16"),
                             [(x, torch.zeros(16))], 1)[0]
    assert isinstance(weight_only, QuantLinear) and weight_only.bias_step(weight_only.weight) is None
    with torch.no_grad():
        ref = nn.functional.linear(x, weight_only.weight_quantizer(weight_only.weight), weight_only.bias)
        torch.testing.assert_close(weight_only(x), ref)
