"""The OpenVINO form: the standard form's codes, with one quantizing step per layer output for OpenVINO."""

import numpy as np
import pytest
import torch

import qframe
from qframe.export.onnx import export_onnx
from qframe.export.ort import ort_session
from qframe.models.resnet import ResNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qframe.export.ov_form import openvino_form  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return qframe.build_data("digits", image_size=16, channels=1, seed=1)


def _model(builder, data):
    if builder == "resnet":
        return ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8)
    return qframe.build_model(builder, data.num_classes, 1, 16, width_mult=0.25)


def _standard(model, data, path):
    qmodel = qframe.ptq(model.eval(), qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    return qmodel, onnx.load(str(export_onnx(qmodel, torch.randn(1, 1, 16, 16), path)))


def _count(model, op):
    return [n.op_type for n in model.graph.node].count(op)


@pytest.mark.parametrize("builder", ["compact_cnn", "resnet", "mobilenet_v2"])
def test_openvino_form_computes_exactly_what_the_standard_form_computes(data, builder, randomise_bn, tmp_path):
    """With onnxruntime's optimizations off both graphs run the same float layers; dropping a layer-output
    Q -> DQ that only clamps separate from an equal quantizer, and the codes after a ReLU / ReLU6 as uint8,
    change no value, so the logits are equal on fresh random inputs. A layer before a max pooling keeps its
    quantized output (OpenVINO would pool floats, in bf16 on CPUs that have it)."""
    torch.manual_seed(torch.seed() % 2**31)
    _, standard = _standard(randomise_bn(_model(builder, data)), data, tmp_path / "m.onnx")
    form = openvino_form(standard)
    assert _count(form, "QuantizeLinear") < _count(standard, "QuantizeLinear")
    uint8 = {t.name for t in form.graph.initializer if t.data_type == onnx.TensorProto.UINT8}
    producer = {o: n for n in form.graph.node for o in n.output}
    clamped = [n for n in form.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer
               and producer[n.input[0]].op_type in ("Relu", "Clip")]
    assert clamped and all(q.input[2] in uint8 and producer[q.input[0]].op_type == "Clip" for q in clamped)
    zero_points = {t.name: onnx.numpy_helper.to_array(t) for t in form.graph.initializer}
    assert {int(zero_points[q.input[2]]) for q in clamped} == {0}
    for pool in [n for n in form.graph.node if n.op_type == "MaxPool"]:  # a pooled layer keeps its integer output
        assert producer[pool.input[0]].op_type in ("Relu", "Clip")
        assert producer[producer[pool.input[0]].input[0]].op_type == "DequantizeLinear"
    x = np.random.default_rng().standard_normal((128, 1, 16, 16), dtype=np.float32) * 2
    ref = ort_session(standard, level="disabled").run(None, {"input": x})[0]
    out = ort_session(form, level="disabled").run(None, {"input": x})[0]
    np.testing.assert_array_equal(out, ref)


def test_openvino_fuses_one_quantizer_per_convolution_of_the_form(data, tmp_path):
    """ResNet: OpenVINO fuses every FakeQuantize after a convolution into it. From the standard form the
    second convolution of a block quantizes three times (add input, add output, next input); from the
    OpenVINO form no convolution quantizes its output more than twice (the residual add's input and the
    next layer's input), and each ReLU'd output once. Logits stay close to onnxruntime's of the same codes."""
    ov = pytest.importorskip("openvino")
    _, standard = _standard(_model("resnet", data), data, tmp_path / "m.onnx")
    form = openvino_form(standard)
    onnx.save(form, str(tmp_path / "ov.onnx"))

    def fused(path):
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": 1})
        counts = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info["layerType"].astype(str) == "Convolution":
                names = info["originalLayersNames"].astype(str).split(",")
                counts.append(sum(n.endswith("/Q") for n in names))
        return counts, compiled

    plain, _ = fused(tmp_path / "m.onnx")
    counts, compiled = fused(tmp_path / "ov.onnx")
    assert len(counts) == len(plain) > 0 and max(plain) == 3 and max(counts) <= 2 and sum(counts) < sum(plain)
    x = np.random.default_rng().standard_normal((32, 1, 16, 16), dtype=np.float32)
    ref = ort_session(standard, level="disabled").run(None, {"input": x})[0]
    out = compiled.create_infer_request().infer([x])[compiled.output(0)]
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
    assert np.abs(out - ref).max() <= 0.1 * np.abs(ref).max()
