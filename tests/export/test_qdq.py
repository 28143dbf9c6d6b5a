"""Q/DQ graph rewrites: int8 weight initializers and the onnxruntime form keep the model's values."""

import numpy as np
import pytest
import torch

import qframe
from qframe.export.onnx import export_onnx, ort_session
from qframe.models.resnet import ResNet
from qframe.quant.modules import QUANT_LAYERS

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qframe.export.ort_form import float_tensors, onnxruntime_form  # noqa: E402
from qframe.export.qdq import quantize_weights  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return qframe.build_data("digits", image_size=16, channels=1, seed=1)


def _ptq(model, data, preset="w8a8"):
    torch.manual_seed(0)
    return qframe.ptq(model.eval(), qframe.preset(preset), data.loader("train", 64, shuffle=True), 2)


@pytest.fixture(scope="module")
def compact(data, tmp_path_factory):
    """A calibrated compact CNN (random weights: the rewrites keep values whatever they are) and its export."""
    torch.manual_seed(0)
    qmodel = _ptq(qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25), data)
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path_factory.mktemp("c") / "c.onnx", dynamic_batch=True)
    return qmodel, onnx.load(str(path))


@pytest.fixture(scope="module")
def residual(data, tmp_path_factory):
    """A two-stage ResNet (identity and downsample residual blocks, global pooling), calibrated and exported."""
    torch.manual_seed(0)
    qmodel = _ptq(ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8), data)
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path_factory.mktemp("r") / "r.onnx", dynamic_batch=True)
    return qmodel, onnx.load(str(path))


def _run(model, x, level="ORT_ENABLE_ALL"):
    if level == "ORT_ENABLE_ALL":
        return ort_session(model).run(None, {"input": x})[0]
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]


def _inputs(n=256, size=16):
    return np.random.default_rng().standard_normal((n, 1, size, size), dtype=np.float32)


def _optimized_ops(model, tmp_path) -> list[str]:
    ort_session(model, optimized_path=tmp_path / "opt.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_quantize_weights_codes_round_trip_to_the_fake_quant_weights(data, preset, tmp_path):
    torch.manual_seed(0)
    qmodel = _ptq(qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25), data, preset)
    model = onnx.load(str(export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx")))
    assert quantize_weights(model) == 5
    onnx.checker.check_model(model)
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]
    assert len(dqs) == 5 and not any(t.endswith(".weight") for t in values)  # no float weight left in the file
    for dq in dqs:
        codes, scale = values[dq.input[0]], values[dq.input[1]]
        layer = layers[dq.input[0].removesuffix(".weight_quantized")]
        assert codes.dtype == np.int8
        bits = layer.weight_quantizer.spec.bits
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1  # a 4-bit layer holds [-8, 7]
        with torch.no_grad():
            expected = layer.weight_quantizer(layer.weight).numpy()
        got = codes.astype(np.float32) * scale.reshape(-1, *[1] * (codes.ndim - 1))
        np.testing.assert_array_equal(got, expected)  # bit-exact: the same float32 product


def _hand_graph():
    """x -> Q/DQ -> Conv -> Relu -> MaxPool -> Q/DQ -> Conv -> Clip(0, 6) -> Q/DQ -> y, no biases, int8 symmetric."""
    rng = np.random.default_rng()

    def init(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [init("s0", 0.03), init("s1", 0.05), init("s2", 0.06), init("z", 0, np.int8),
             init("w1", rng.standard_normal((8, 4, 3, 3)) * 0.3), init("w2", rng.standard_normal((6, 8, 3, 3)) * 0.2),
             init("sw1", np.full(8, 0.01)), init("sw2", np.full(6, 0.008)), init("zw1", np.zeros(8), np.int8),
             init("zw2", np.zeros(6), np.int8), init("lo", 0.0), init("hi", 6.0)]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["input", "s0", "z"], ["xq"]), n("DequantizeLinear", ["xq", "s0", "z"], ["xd"]),
             n("QuantizeLinear", ["w1", "sw1", "zw1"], ["w1q"], axis=0),
             n("DequantizeLinear", ["w1q", "sw1", "zw1"], ["w1d"], axis=0),
             n("Conv", ["xd", "w1d"], ["c1"], pads=[1, 1, 1, 1]), n("Relu", ["c1"], ["r1"]),
             n("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             n("QuantizeLinear", ["p1", "s1", "z"], ["p1q"]), n("DequantizeLinear", ["p1q", "s1", "z"], ["p1d"]),
             n("QuantizeLinear", ["w2", "sw2", "zw2"], ["w2q"], axis=0),
             n("DequantizeLinear", ["w2q", "sw2", "zw2"], ["w2d"], axis=0),
             n("Conv", ["p1d", "w2d"], ["c2"], pads=[1, 1, 1, 1]), n("Clip", ["c2", "lo", "hi"], ["r2"]),
             n("QuantizeLinear", ["r2", "s2", "z"], ["r2q"]), n("DequantizeLinear", ["r2q", "s2", "z"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 6, 6, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_hoisting_quantize_over_relu_clip_and_maxpool_is_exact(tmp_path):
    model = _hand_graph()
    form = onnxruntime_form(model)
    ops = [n.op_type for n in form.graph.node]
    # Q now sits right after each Conv; Relu / Clip run on the codes; nothing left to round differently
    assert "Relu" not in ops and ops.count("Clip") == 2 and ops.count("QuantizeLinear") == 3
    x = np.random.default_rng().standard_normal((64, 4, 12, 12), dtype=np.float32) * 3  # clamps and pooling active
    # without graph optimizations both run the very same float Convs: equal outputs mean the moves are exact
    ref, out = _run(model, x, "ORT_DISABLE_ALL"), _run(form, x, "ORT_DISABLE_ALL")
    np.testing.assert_array_equal(out, ref)
    assert (ref == 0).mean() > 0.05 and (ref == np.float32(100 * 0.06)).mean() > 0.001  # both clamps were exercised
    assert "QLinearConv" in _optimized_ops(form, tmp_path) and "QLinearConv" not in _optimized_ops(model, tmp_path)


def _agreement(a, b):
    return 100.0 * (a.argmax(1) == b.argmax(1)).mean()


def _exact_rows(out, ref):
    """Share of inputs whose logits match to float precision. Not all: where a value lands on a rounding
    tie of the next quantizer, float32 and integer sums can round it to neighbouring codes."""
    return float(np.mean(np.abs(out - ref).max(1) <= 1e-5 * np.abs(ref).max()))


def test_onnxruntime_form_agrees_with_the_tensorrt_form(compact, tmp_path):
    """Fresh random inputs, both files in onnxruntime with its full optimizations.

    Tolerance: the form changes arithmetic only through the int32 biases (each moves by at most half
    of input scale x weight scale) and integer accumulation; a code changes by one step only where a
    value sits that close to a rounding boundary, so the logits agree to well under 1 % of their size
    and the top-1 predictions to >= 99 %; never bit-exactly, so no bit-exact assertion here.
    """
    _, model = compact
    form = onnxruntime_form(model)
    ops = _optimized_ops(form, tmp_path)
    # without calibration the last Conv (it feeds the global pooling, not a quantizer) stays float
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops and "QuantizeLinear" in ops
    x = _inputs()
    ref, out = _run(model, x), _run(form, x)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.01
    assert _agreement(out, ref) >= 99.0


def test_calibrated_form_runs_residual_blocks_and_pooling_in_integer(residual, data, tmp_path):
    qmodel, model = residual
    # the branch Conv of each residual block, the last block's Add (feeds the pooling) is after its ReLU
    found = float_tensors(model)
    assert len(found) == 3 and found[-1].endswith("Relu_output_0"), found
    plain = onnxruntime_form(model)
    calib = [x for x, _ in data.loader("train", 64, shuffle=True)][:4]
    form = onnxruntime_form(model, calibration=calib)
    ops = _optimized_ops(form, tmp_path)
    assert "Conv" not in ops and "FusedConv" not in ops and "Add" not in ops
    assert ops.count("QLinearAdd") == 2 and "QLinearGlobalAveragePool" in ops
    assert "QLinearAdd" not in _optimized_ops(plain, tmp_path)
    # the calibrated form rounds the residual branches to 256 levels over their observed range: an
    # extra quantization step, so it sits further from the TensorRT form than the plain rewrite
    x = np.concatenate([b.numpy() for b, _ in data.loader("test", 256)])
    ref = _run(model, x)
    err = {name: np.linalg.norm(_run(m, x) - ref) / np.linalg.norm(ref) for name, m in (("plain", plain), ("calib", form))}
    assert err["plain"] < 0.01 and err["calib"] < 0.05, err
    with torch.no_grad():
        torch_logits = qmodel(torch.from_numpy(x)).numpy()
    assert _agreement(_run(form, x), torch_logits) >= 97.0


def test_onnxruntime_form_computes_what_the_fake_quant_model_computes(data, randomise_bn, tmp_path):
    """Non-zero folded biases: the model rounds them to int32 as onnxruntime's integer layers do.

    The form's int32 biases are the model's own (bit-equal codes), so what remains is float32
    accumulation order in PyTorch against exact integer sums: logits agree to float precision unless
    a value sits on a rounding tie of a later quantizer.
    """
    torch.manual_seed(0)  # a model whose float biases are off the grid (measured: no input matches without int32_bias)
    model = randomise_bn(qframe.build_model("mobilenet_v2", data.num_classes, 1, 16, width_mult=0.25))
    qmodel = _ptq(model, data)
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    form = onnxruntime_form(onnx.load(str(path)))
    inits = {t.name: numpy_helper.to_array(t) for t in form.graph.initializer}
    int32 = [v for k, v in inits.items() if k.endswith("_int32")]
    assert sum(np.abs(v).max() > 0 for v in int32) >= 10
    x = _inputs(128)
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
    out = _run(form, x)
    assert _exact_rows(out, ref) >= 0.95
    assert _agreement(out, ref) >= 99.0


def test_onnxruntime_layout_recipe_needs_no_extra_rounding_and_no_clamp_ops(data, randomise_bn, tmp_path):
    """w8a8_ort quantizes what onnxruntime's integer kernels re-quantize, in uint8 with zero points: the form
    adds no calibrated Q/DQ, runs every Conv, residual Add and the pooling in integer with no Clip (the
    uint8 range saturates where ReLU6 clamps), and matches the model; float_convs=1 runs the stem in float."""
    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(qframe.build_model("mobilenet_v2", data.num_classes, 1, 16, width_mult=0.25))
    qmodel = _ptq(model, data, "w8a8_ort")
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    graph = onnx.load(str(path))
    assert float_tensors(graph) == []
    forms = {k: onnxruntime_form(graph, float_convs=k) for k in (0, 1)}
    ops = {k: _optimized_ops(f, tmp_path) for k, f in forms.items()}
    convs = sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) - 1  # all but the classifier
    assert ops[0].count("QLinearConv") == convs and "QLinearAdd" in ops[0] and "QLinearGlobalAveragePool" in ops[0]
    assert "Clip" not in ops[0] and "Add" not in ops[0]
    assert ops[1].count("QLinearConv") == convs - 1  # float_convs=1: the stem runs in float
    x = np.concatenate([b.numpy() for b, _ in data.loader("test", 256)])
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
    for k, form in forms.items():
        out = _run(form, x)
        assert _exact_rows(out, ref) >= 0.95, k
        assert _agreement(out, ref) >= 99.0, k


def test_portable_recipe_is_a_tensorrt_graph_that_onnxruntime_runs_exactly(data, randomise_bn, tmp_path):
    """w8a8_portable: symmetric int8 with both residual-add inputs and the pooled features quantized. The
    export passes the TensorRT lint, the form needs no calibrated Q/DQ and runs every Conv and residual
    Add in integer; ReLU6 stays a Clip on the codes (a symmetric int8 range cannot saturate at both of
    its bounds), and before the pooling the form averages those codes with ReduceMean (onnxruntime would
    run QLinearGlobalAveragePool in slow NCHW there). It matches the model."""
    from qframe.export.lint import lint_tensorrt

    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(qframe.build_model("mobilenet_v2", data.num_classes, 1, 16, width_mult=0.25))
    qmodel = _ptq(model, data, "w8a8_portable")
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    graph = onnx.load(str(path))
    assert lint_tensorrt(graph) == [] and float_tensors(graph) == []
    form = onnxruntime_form(graph)
    types = [n.op_type for n in form.graph.node]
    assert "GlobalAveragePool" not in types and types.count("ReduceMean") == 1
    assert _pool_axes(form) == [1, 2]  # channels-last: only a Flatten follows the pooling
    ops = _optimized_ops(form, tmp_path)
    convs = sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) - 1  # all but the classifier
    assert ops.count("QLinearConv") == convs and "QLinearAdd" in ops and "Add" not in ops and "Clip" in ops
    assert "QLinearGlobalAveragePool" not in ops
    assert ops.count("Transpose") == 1  # the input's to channels-last; none left before the pooling
    x = np.concatenate([b.numpy() for b, _ in data.loader("test", 256)])
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
    out = _run(form, x)
    assert _exact_rows(out, ref) >= 0.95
    assert _agreement(out, ref) >= 99.0


def _pool_axes(form) -> list[int]:
    pool = next(n for n in form.graph.node if n.op_type == "ReduceMean")
    return list(next(a.ints for a in pool.attribute if a.name == "axes"))


class _ConvHead(torch.nn.Module):
    """Pooled features read by a 1x1 Conv (no Flatten right after the pooling)."""

    def __init__(self, classes: int):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU6(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                            torch.nn.BatchNorm2d(16), torch.nn.ReLU6())
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.head = torch.nn.Conv2d(16, classes, 1)

    def forward(self, x):
        return self.head(self.pool(self.features(x))).flatten(1)


def test_pooling_stays_channels_first_when_its_output_layout_matters(data, randomise_bn, tmp_path):
    """The pooling of clamped codes runs channels-last only where a Flatten alone follows it; a 1x1 Conv
    head reads the [N, C, 1, 1] layout, so that pooling keeps axes 2, 3 and the form still matches the model."""
    torch.manual_seed(torch.seed() % 2**31)
    qmodel = _ptq(randomise_bn(_ConvHead(data.num_classes)), data, "w8a8_portable")
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    form = onnxruntime_form(onnx.load(str(path)))
    assert _pool_axes(form) == [2, 3]
    assert "Transpose" not in [n.op_type for n in form.graph.node]
    x = np.concatenate([b.numpy() for b, _ in data.loader("test", 256)])
    with torch.no_grad():
        ref = qmodel(torch.from_numpy(x)).numpy()
    out = _run(form, x)
    assert _exact_rows(out, ref) >= 0.95
    assert _agreement(out, ref) >= 99.0


@pytest.mark.parametrize("channels", [1, 3])
def test_narrow_stem_input_is_padded_to_four_channels_with_the_same_codes(channels, monkeypatch, tmp_path):
    """A 1- or 3-channel integer stem gets 4 input channels: the extra ones hold the input's zero-point
    code (value 0) and meet zero weights (either alone keeps the sums; both are checked), so the
    logits equal those of the unpadded form bit for bit."""
    import qframe.export.ort_form as ort_form

    torch.manual_seed(torch.seed() % 2**31)
    data = qframe.build_data("digits", image_size=16, channels=channels, seed=1)
    qmodel = _ptq(qframe.build_model("compact_cnn", data.num_classes, channels, 16, width_mult=0.25), data)
    path = export_onnx(qmodel, torch.randn(1, channels, 16, 16), tmp_path / "m.onnx", dynamic_batch=True)
    form = onnxruntime_form(onnx.load(str(path)))
    pads = [n for n in form.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in form.graph.initializer}
    stem = next(n for n in form.graph.node if n.op_type == "Conv")
    weight_dq = next(n for n in form.graph.node if n.output[0] == stem.input[1])
    codes = inits[weight_dq.input[0]]
    assert codes.shape[1] == 4 and not codes[:, channels:].any()
    assert inits[pads[0].input[2]] == 128  # the uint8 code of 0
    assert "QLinearConv" in _optimized_ops(form, tmp_path)
    monkeypatch.setattr(ort_form, "_pad_narrow_conv_inputs", lambda g: 0)
    plain = onnxruntime_form(onnx.load(str(path)))
    assert not any(n.op_type == "Pad" for n in plain.graph.node)
    x = np.random.default_rng().standard_normal((64, channels, 16, 16), dtype=np.float32)
    np.testing.assert_array_equal(_run(form, x), _run(plain, x))
