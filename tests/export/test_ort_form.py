"""The onnxruntime form: the standard form's values, run by onnxruntime's x86 kernels in integer throughout."""

import numpy as np
import pytest
import torch

import qframe
from qframe.export.lint import lint_tensorrt
from qframe.export.onnx import export_onnx
from qframe.export.ort import ort_session
from qframe.models.resnet import ResNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qframe.export.ort_form import onnxruntime_form  # noqa: E402


def _standard(model, data, path):
    torch.manual_seed(0)
    qmodel = qframe.ptq(model.eval(), qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    return qmodel, onnx.load(str(export_onnx(qmodel, torch.randn(1, 1, 16, 16), path)))


def _ops(model, tmp_path) -> list[str]:
    ort_session(model, optimized_path=tmp_path / "opt.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


@pytest.mark.parametrize("uint8_weights", [False, True])
@pytest.mark.parametrize("builder", ["compact_cnn", "resnet", "mobilenet_v2"])
def test_onnxruntime_form_computes_exactly_what_the_standard_form_computes(data, builder, uint8_weights, normalise_bn,
                                                                           train_batch, tmp_path):
    """With onnxruntime's optimizations off both graphs run the same float layers; ReLU / ReLU6 / max pooling
    on uint8 codes instead of floats change no value, nor do weight codes shifted to uint8, so the logits are
    equal on fresh random inputs."""
    torch.manual_seed(torch.seed() % 2**31)
    model = (ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8) if builder == "resnet"
             else qframe.build_model(builder, data.num_classes, 1, 16, width_mult=0.25))
    qmodel, standard = _standard(normalise_bn(model, train_batch), data, tmp_path / "m.onnx")
    form = onnxruntime_form(standard, uint8_weights)
    inits = {t.name: t.data_type for t in form.graph.initializer}
    weights = [inits[n.input[0]] for n in form.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in qmodel.modules())
    assert weights.count(onnx.TensorProto.UINT8 if uint8_weights else onnx.TensorProto.INT8) == layers
    types = [n.op_type for n in form.graph.node]
    assert "Relu" not in types and types.count("Clip") == [n.op_type for n in standard.graph.node].count("Clip") + \
        [n.op_type for n in standard.graph.node].count("Relu")  # every clamp runs on the codes
    x = np.random.default_rng().standard_normal((128, 1, 16, 16), dtype=np.float32) * 2
    ref = ort_session(standard, level="disabled").run(None, {"input": x})[0]
    out = ort_session(form, level="disabled").run(None, {"input": x})[0]
    np.testing.assert_array_equal(out, ref)


def test_uint8_weights_run_exactly_where_uint8_by_int8_saturates(data, normalise_bn, train_batch, tmp_path):
    """onnxruntime's fused integer kernels (ORT_ENABLE_ALL) on the uint8-weight form give the standard form's
    logits on every CPU; the int8-weight form saturates on x86 without VNNI (91 % top-1 agreement measured on
    the compact CNN there) and matches only where the CPU has VNNI."""
    from qframe.export.ort import integer_kernels_saturate

    torch.manual_seed(torch.seed() % 2**31)
    model = qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.5)
    _, standard = _standard(normalise_bn(model, train_batch), data, tmp_path / "m.onnx")
    x = np.random.default_rng().standard_normal((256, 1, 16, 16), dtype=np.float32) * 2
    ref = ort_session(standard, level="basic").run(None, {"input": x})[0]
    forms = {"uint8": onnxruntime_form(standard, uint8_weights=True)}
    if not integer_kernels_saturate():
        forms["int8"] = onnxruntime_form(standard)
    for name, form in forms.items():
        out = ort_session(form, level="all").run(None, {"input": x})[0]
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99, name
        assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max(), name  # requantization rounding only
        assert "QLinearConv" in _ops(form, tmp_path), name


@pytest.mark.parametrize("uint8_weights", [False, True])
def test_onnxruntime_runs_every_layer_of_the_form_in_integer(data, uint8_weights, tmp_path):
    """MobileNetV2: a block's output is read by the next block and by its residual add. In the standard form
    onnxruntime leaves the Conv before such a tensor and the Adds in float (an int8 QuantizeLinear with two
    readers); in the onnxruntime form every Conv and Add is an integer kernel and no ReLU6 runs in float."""
    qmodel, standard = _standard(qframe.build_model("mobilenet_v2", data.num_classes, 1, 16, width_mult=0.25), data,
                                 tmp_path / "m.onnx")
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in qmodel.modules())
    plain, form = _ops(standard, tmp_path), _ops(onnxruntime_form(standard, uint8_weights), tmp_path)
    assert "Conv" in plain and "Add" in plain and plain.count("QLinearConv") < convs
    assert form.count("QLinearConv") == convs and "Conv" not in form and "FusedConv" not in form
    assert "Add" not in form and form.count("QLinearAdd") == plain.count("QLinearAdd") + plain.count("Add")
    assert form.count("DequantizeLinear") <= 2 and form.count("QuantizeLinear") == 1  # the input, the head


def test_the_onnxruntime_form_is_not_for_tensorrt(data, tmp_path):
    _, standard = _standard(qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25), data,
                            tmp_path / "m.onnx")
    assert lint_tensorrt(standard) == []
    assert "qdq-dtype" in {v.rule for v in lint_tensorrt(onnxruntime_form(standard))}  # uint8 zero points


def test_paired_ratio_cancels_load_shared_by_a_round_and_brackets_the_median():
    import numpy as np

    from qframe.export.ort import paired_ratio, paired_speedup

    rng = np.random.default_rng(np.random.SeedSequence().entropy % 2**32)
    load = rng.uniform(1, 5, 41)  # each round slowed alike for both
    speedup = rng.uniform(1.1, 3.0)
    base = 10 * load * rng.uniform(0.99, 1.01, 41)
    other = base / speedup
    median, low, high = paired_ratio(base, other)
    assert median == pytest.approx(speedup) and low == pytest.approx(speedup) and high == pytest.approx(speedup)
    noisy = other * rng.uniform(0.9, 1.1, 41)
    median, low, high = paired_ratio(base, noisy)
    assert low <= median <= high and low < high
    assert abs(median / speedup - 1) < 0.05  # the unpaired medians would carry the 1..5x load spread
    assert paired_speedup({"round_median_ms": list(base)}, {"round_median_ms": list(noisy)}) == median
