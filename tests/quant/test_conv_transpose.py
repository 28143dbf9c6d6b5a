"""Transposed convolutions (the upsampling of segmentation, depth and text-detection heads): quantized per
output channel, BatchNorm folded into them, exported as Q/DQ that TensorRT's rules and onnxruntime accept,
and counted right by the mixed-precision and energy estimates."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qframe
from qframe.quant.fold import fold_bn
from qframe.quant.modules import QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d

TWINS = {1: QuantConvTranspose1d, 2: QuantConvTranspose2d, 3: QuantConvTranspose3d}
LAYERS = {1: (nn.ConvTranspose1d, nn.BatchNorm1d), 2: (nn.ConvTranspose2d, nn.BatchNorm2d),
          3: (nn.ConvTranspose3d, nn.BatchNorm3d)}
SIZES = {1: (11,), 2: (7, 9), 3: (3, 4, 5)}


def _randomise(bn: nn.Module, g: torch.Generator) -> None:
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.5)
    bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2.5 + 0.2)
    bn.weight.data.copy_(torch.randn(bn.num_features, generator=g) * 0.4 + 1)
    bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.3)


def _fake_quant(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(t / scale).clamp(-128, 127) * scale


@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 1), (2, 3), (3, 1)])
def test_a_quantized_conv_transpose_has_one_weight_scale_per_output_channel_and_computes_the_reference(dims, groups):
    g = torch.Generator().manual_seed(100 + 10 * dims + groups)
    conv_t = LAYERS[dims][0](6, 9, 3, stride=2, padding=1, output_padding=1, groups=groups)
    with torch.no_grad():  # output channels of very different magnitudes: one shared scale would lose the small ones
        conv_t.weight.copy_(torch.randn(conv_t.weight.shape, generator=g)
                            * torch.logspace(-2, 0, 9 // groups).view(1, -1, *[1] * dims))
    x = torch.randn(4, 6, *SIZES[dims], generator=g)
    qmodel = qframe.ptq(nn.Sequential(conv_t).eval(), qframe.preset("w8a8"), [x], num_batches=1)
    layer = qmodel[0]
    assert isinstance(layer, TWINS[dims]) and not qmodel.qframe_float_layers
    assert layer.weight_quantizer.spec.axis == 1 and layer.weight_quantizer.scale.shape == (9 // groups,)

    # float64 reference: symmetric int8 weights per output channel (axis 1 of [in, out / groups, *k]), the
    # calibrated input scale, the bias on the int32 grid of input scale x weight scale of its channel
    w, b = conv_t.weight.double(), conv_t.bias.double()
    sw = w.abs().transpose(0, 1).flatten(1).amax(1) / 127  # minmax, symmetric: amax / qmax
    torch.testing.assert_close(layer.weight_quantizer.scale.double(), sw, rtol=1e-6, atol=0)
    sw = layer.weight_quantizer.scale.double()  # its float32 rounding, so that the codes match exactly
    si = layer.input_quantizer.scale.double()
    wq = _fake_quant(w, sw.view(1, -1, *[1] * dims))
    step = (si * sw).repeat(groups)
    ref = getattr(F, f"conv_transpose{dims}d")(_fake_quant(x.double(), si), wq, torch.round(b / step) * step,
                                                stride=2, padding=1, output_padding=1, groups=groups)
    with torch.no_grad():
        out = qmodel(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the smallest channel keeps its precision (a per-tensor or per-input-channel scale would round it away)
    small = [c for c in range(9) if c % (9 // groups) == 0]
    float_out = conv_t(x).detach().double()
    err = (out.double() - float_out)[:, small].norm() / float_out[:, small].norm()
    assert err < 0.05, err


@pytest.mark.parametrize("dims,groups", [(1, 1), (2, 1), (2, 2), (2, 8), (3, 1)])
def test_a_batchnorm_after_a_conv_transpose_folds_into_it_exactly(dims, groups):
    g = torch.Generator().manual_seed(7 * dims + groups)
    kind, norm = LAYERS[dims]
    model = nn.Sequential(kind(8, 8, 4, stride=2, padding=1, groups=groups, bias=groups != 2), norm(8), nn.ReLU())
    _randomise(model[1], g)
    model.eval()
    x = torch.randn(3, 8, *SIZES[dims], generator=g)
    with torch.no_grad():
        ref = model.double()(x.double())
        model.float()
        pairs = fold_bn(model, x)
        out = model(x)
    assert pairs == [("0", "1")] and isinstance(model[1], nn.Identity) and not model.qframe_unfolded_norms
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_batchnorm_before_a_conv_transpose_stays_unfolded_with_its_reason():
    """A transposed convolution adds an input channel's shift to its outputs a varying number of times (by the
    taps that reach each output), so the shift of a BatchNorm before it has no bias to go into."""
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.ConvTranspose2d(4, 4, 3, stride=2)).eval()
    _randomise(model[2], g)
    x = torch.randn(2, 3, 6, 6, generator=g)
    with torch.no_grad():
        ref = model(x)
        fold_bn(model, x)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(model[2], nn.BatchNorm2d) and "2" in model.qframe_unfolded_norms


class _Decoder(nn.Module):
    """An encoder-decoder with a skip, as segmentation and text-detection heads have."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.up(self.down(x))))
        return self.head(y + x.mean(1, keepdim=True))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_conv_transpose_exports_per_output_channel_qdq_that_lints_clean_and_onnxruntime_runs(tmp_path, groups):
    import onnx

    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    g = torch.Generator().manual_seed(11 + groups)
    model = _Decoder(groups)
    for bn in (model.down[1], model.bn):
        _randomise(bn, g)
    model.eval()
    x = torch.randn(6, 3, 16, 16, generator=g)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    assert isinstance(qmodel.up, QuantConvTranspose2d) and isinstance(qmodel.bn, nn.Identity)
    assert not qmodel.qframe_float_layers and not qmodel.qframe_unfolded_norms
    graph = onnx.load(str(export_onnx(qmodel, x[:1], tmp_path / "decoder.onnx")))
    chosen = chosen_float_layers(qmodel)
    assert [v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error"] == []
    assert tensorrt_coverage(graph, chosen).fallbacks(chosen=False) == []
    assert not any(n.op_type == "BatchNormalization" for n in graph.graph.node)
    (deconv,) = [n for n in graph.graph.node if n.op_type == "ConvTranspose"]
    producers = {o: n for n in graph.graph.node for o in n.output}
    dq_w = producers[deconv.input[1]]
    assert dq_w.op_type == "DequantizeLinear" and producers[deconv.input[0]].op_type == "DequantizeLinear"
    assert next(a.i for a in dq_w.attribute if a.name == "axis") == 1
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    assert inits[dq_w.input[1]].shape == (8 // groups,)
    session = ort_session(str(tmp_path / "decoder.onnx"), level="basic")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_macs_of_a_conv_transpose_count_every_tap_in_mixed_precision_and_energy():
    from qframe.methods.mixed import _macs
    from qframe.methods.rct.energy import layer_macs

    conv_t = nn.ConvTranspose2d(6, 4, 3, stride=2, groups=2)
    model = nn.Sequential(conv_t).eval()
    x = torch.randn(1, 6, 5, 7)
    with torch.no_grad():  # an all-ones layer on an all-ones input: each output sums the taps that reach it
        taps = F.conv_transpose2d(torch.ones_like(x), torch.ones_like(conv_t.weight), stride=2, groups=2).sum()
    assert _macs(model, ["0"], x)["0"] == int(taps) == 6 * 5 * 7 * (4 // 2) * 9
    assert [r["macs"] for r in layer_macs(model, x)] == [int(taps)]


def test_bias_correction_removes_a_conv_transposes_mean_output_shift():
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.add_(0.05)  # a positive mean, so coarse weights shift the output's mean
    x = torch.rand(16, 8, 6, 6, generator=g)
    recipe = qframe.preset("w4a8")
    plain = qframe.ptq(model, recipe, [x], num_batches=1)
    corrected = qframe.ptq(model, recipe, [x], num_batches=1, bias_correction=True)
    with torch.no_grad():
        ref = model(x).double()
        shift = [(m(x).double() - ref).mean((0, 2, 3)).abs().max().item() for m in (plain, corrected)]
    assert shift[1] < 0.25 * shift[0], shift
    assert math.isfinite(shift[0]) and shift[0] > 0


def test_mixed_precision_searches_a_conv_transposes_widths_on_its_output_channel_scales():
    """The search quantizes each layer at every width itself: a ConvTranspose's weight on axis 1 there too, so
    what it measures for a configuration is what the PTQ model of that configuration gives. The deconvolution's
    output channels differ in magnitude by 100x and the depthwise layer after it evens them out: quantized per
    input channel instead, the small channels would round away and the two SQNRs part by many dB."""
    from qframe.bisect import sqnr_db
    from qframe.methods.mixed import search

    torch.manual_seed(21)
    g = torch.Generator().manual_seed(21)
    spread = torch.logspace(-2, 0, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2, bias=False),
                          nn.Conv2d(8, 8, 1, groups=8, bias=False))
    with torch.no_grad():
        model[2].weight.mul_(spread.view(1, -1, 1, 1))
        model[3].weight.copy_(1 / spread.view(-1, 1, 1, 1))
    model.eval()
    x = torch.randn(32, 3, 8, 8, generator=g)
    recipe = qframe.preset("w4a8", rules=[], budget=qframe.Budget(size_ratio=0.5, widths=[4, 8], images=32, probes=1))
    result = search(model, recipe, [x], 1)
    up = result.layers.index("2")
    point = next(p for p in result.front if p.sqnr_measured is not None and p.widths[up] == 4)
    rules = [qframe.LayerRule(n, weight_bits=b) for n, b in zip(result.layers, point.widths)]
    qmodel = qframe.ptq(model, qframe.preset("w4a8", rules=rules), [x], num_batches=1)
    with torch.no_grad():
        measured = sqnr_db(model(x).numpy(), qmodel(x).numpy())
    assert abs(measured - point.sqnr_measured) < 0.5, (measured, point.sqnr_measured)


def test_the_twin_takes_output_size_dilation_and_a_subclass_as_nn_conv_transpose_does():
    """A U-Net passes ``output_size=skip.shape`` to pick among the sizes a strided ConvTranspose can give; a user's
    subclass keeps its extras; before calibration the twin is the float layer exactly."""

    class Up(nn.ConvTranspose2d):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.note = "decoder"

    g = torch.Generator().manual_seed(17)
    model = nn.Sequential(Up(4, 6, 3, stride=2, padding=1, dilation=2)).double().eval()
    twin = qframe.quantize_(copy.deepcopy(model), qframe.preset("w8a8"))[0]
    assert isinstance(twin, QuantConvTranspose2d) and isinstance(twin, Up) and twin.note == "decoder"
    assert twin.weight_quantizer.spec.axis == 1
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for size in (None, (11, 13), (12, 14)):
            torch.testing.assert_close(twin(x, output_size=size), model[0](x, output_size=size), rtol=0, atol=0)
    assert twin(x, output_size=(12, 14)).shape[-2:] == (12, 14)
