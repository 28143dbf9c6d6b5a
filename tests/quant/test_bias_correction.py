"""Empirical bias correction zeroes each layer's mean output error on its calibration data."""

import copy

import torch
from torch import nn

from qframe.methods.ptq import calibrate, calibrate_weights, ptq
from qframe.models import build_model
from qframe.quant.bias_correction import correct_biases
from qframe.quant.fold import fold_bn
from qframe.quant.modules import QuantConv2d, QuantLinear
from qframe.quant.recipe import QuantizerConfig, QuantRecipe, preset, quantize_


def _seed():
    torch.manual_seed(torch.seed() % 2**31)  # fresh inputs every run, reproducible from the printed seed


def _layer_means(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean output of each named layer, float64, by plain hooks on one pass."""
    means = {}

    def hook(name):
        def fn(mod, args, out):
            means[name] = out.double().transpose(0, 1).reshape(out.shape[1], -1).mean(1) if out.dim() == 4 \
                else out.double().mean(0)
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return means


def test_bias_correction_zeroes_the_mean_output_error_of_every_layer(normalise_bn):
    _seed()
    x = torch.randn(96, 1, 16, 16)
    model = normalise_bn(build_model("mobilenet_v2", num_classes=6, in_channels=1, image_size=16, width_mult=0.35),
                         x).eval()
    qmodel = ptq(model, preset("w4a8"), [x[:48], x[48:]], num_batches=2)
    reference = copy.deepcopy(model)
    fold_bn(reference)
    names = [n for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    target = _layer_means(reference, names, x)
    before = _layer_means(qmodel, names, x)
    err_before = max(float((before[n] - target[n]).abs().max()) for n in names)
    shifts = correct_biases(qmodel, reference, x)
    after = _layer_means(qmodel, names, x)
    assert set(shifts) == set(names)
    for n in names:
        scale = float(target[n].abs().max()) + 1e-3
        # what remains is the int32 rounding of the bias (half a step of input scale x weight scale)
        layer = qmodel.get_submodule(n)
        step = layer.bias_step(layer.weight) if layer.int32_bias else None
        tol = 1e-5 * scale + (0.0 if step is None else float(step.max()) / 2)
        assert float((after[n] - target[n]).abs().max()) <= tol, n
    assert err_before > 1e-3  # 4-bit weights did shift the means


def test_single_layer_correction_equals_the_closed_form():
    """One QuantLinear: the new bias is b + E[x W^T] - E[q(x) q(W)^T], computed here in float64."""
    _seed()
    layer = nn.Linear(24, 10)
    recipe = QuantRecipe(name="w3a4", weight=QuantizerConfig(bits=3, granularity="per_channel"),
                         input=QuantizerConfig(bits=4, observer="minmax"), int32_bias=False)
    x = torch.randn(500, 24) + 0.5  # a non-zero input mean, so weight errors shift the output mean
    model = nn.Sequential(copy.deepcopy(layer))
    qmodel = quantize_(copy.deepcopy(model), recipe)
    calibrate_weights(qmodel)
    calibrate(qmodel, [x], 1)
    q = qmodel[0]
    with torch.no_grad():
        wq = q.weight_quantizer(q.weight).double()
        xq = q.input_quantizer(x).double()
    expected = layer.bias.double() + (x.double() @ layer.weight.double().t()).mean(0) - (xq @ wq.t()).mean(0)
    correct_biases(qmodel, model, x)
    assert torch.allclose(q.bias.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(q.bias.double(), layer.bias.double(), atol=1e-3)


class _ChannelsLastNet(nn.Module):
    """A Linear over a channels-last [B, H, W, C] map (ConvNeXt's blocks; H != C) and a Conv1d over tokens."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Linear(8, 12)
        self.mix = nn.Conv1d(12, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        y = self.pw(self.conv(x).permute(0, 2, 3, 1))  # [B, H, W, 12]
        y = self.mix(y.flatten(1, 2).transpose(1, 2))  # [B, 12, H * W] -> [B, 6, H * W]
        return self.head(y.mean(2))


def test_linears_over_channels_last_maps_and_conv1d_are_corrected_per_channel():
    _seed()
    model = _ChannelsLastNet().eval()
    x = torch.randn(64, 3, 5, 7) + 0.3
    qmodel = ptq(model, preset("w4a8"), [x], num_batches=1)
    shifts = correct_biases(qmodel, model, x)
    assert set(shifts) == {"conv", "pw", "mix", "head"}
    means = {}

    def keep(name, channel_dim):
        def hook(mod, args, out):
            means[name] = out.double().movedim(channel_dim, 0).reshape(out.shape[channel_dim], -1).mean(1)
        return hook

    for net, tag in ((qmodel, "q"), (model, "f")):
        handles = [net.get_submodule(n).register_forward_hook(keep((tag, n), d))
                   for n, d in (("pw", -1), ("mix", 1), ("head", -1))]
        with torch.no_grad():
            net(x)
        for h in handles:
            h.remove()
    for n in ("pw", "mix", "head"):
        layer = qmodel.get_submodule(n)
        step = layer.bias_step(layer.weight) if layer.int32_bias else None
        tol = 1e-5 * float(means[("f", n)].abs().max()) + (0.0 if step is None else float(step.max()) / 2)
        assert float((means[("q", n)] - means[("f", n)]).abs().max()) <= tol, n


def test_a_layer_a_forward_calls_twice_keeps_its_bias_by_name(caplog):
    _seed()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.shared = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU()), nn.Conv2d(6, 6, 1)

        def forward(self, x):
            return self.shared(self.shared(self.body(x)))

    net = Net().eval()
    x = torch.randn(32, 3, 8, 8) + 0.3
    qmodel = ptq(net, preset("w4a8"), [x], num_batches=1)
    bias = qmodel.shared.bias.detach().clone()
    with caplog.at_level("WARNING", logger="qframe"):
        shifts = correct_biases(qmodel, net, x)
    assert set(shifts) == {"body.0"} and "shared (2 calls)" in caplog.text
    assert torch.equal(qmodel.shared.bias, bias)
