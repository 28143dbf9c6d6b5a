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
def test_openvino_form_computes_exactly_what_the_standard_form_computes(data, builder, normalise_bn,
                                                                        train_batch, tmp_path):
    """With onnxruntime's optimizations off both graphs run the same float layers; dropping a layer-output
    Q -> DQ that only clamps separate from an equal quantizer, and the codes after a ReLU / ReLU6 as uint8,
    change no value, so the logits are equal on fresh random inputs. A layer before a max pooling keeps its
    quantized output (OpenVINO would pool floats, in bf16 on CPUs that have it)."""
    torch.manual_seed(torch.seed() % 2**31)
    _, standard = _standard(normalise_bn(_model(builder, data), train_batch), data, tmp_path / "m.onnx")
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


@pytest.mark.parametrize("builder", ["resnet", "mobilenet_v2"])
def test_full_unsigned_range_halves_the_step_after_relu_and_keeps_the_clipping_point(data, builder, normalise_bn,
                                                                                     train_batch, tmp_path):
    """``full_unsigned_range``: each uint8 quantizer after a ReLU / ReLU6 spreads 256 codes over the clamp's
    range (scale = bound / 255) and the clamp becomes a Relu (the quantizer saturates at the bound). Checked
    in numpy on fresh values against the exact form's clamp-then-quantize, and end to end: the logits stay
    about as close to the float model's as the exact form's."""
    torch.manual_seed(torch.seed() % 2**31)
    model = normalise_bn(_model(builder, data), train_batch).eval()
    _, standard = _standard(model, data, tmp_path / "m.onnx")
    exact, full = openvino_form(standard), openvino_form(standard, full_unsigned_range=True)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in exact.graph.initializer}
    full_inits = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    producer = {o: n for n in exact.graph.node for o in n.output}
    full_nodes = {n.name: n for n in full.graph.node}
    full_producer = {o: n for n in full.graph.node for o in n.output}
    clamped = [n for n in exact.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer
               and producer[n.input[0]].op_type == "Clip"]
    assert clamped
    rng = np.random.default_rng()
    for q in clamped:
        clip = producer[q.input[0]]
        high, scale = float(inits[clip.input[2]]), float(inits[q.input[1]])
        fq = full_nodes[q.name]
        assert full_producer[fq.input[0]].op_type == "Relu"
        full_scale = float(full_inits[fq.input[1]])
        assert full_scale == pytest.approx(high / 255, rel=1e-6) and full_scale <= scale / 2 + 1e-12
        y = rng.standard_normal(4096).astype(np.float32) * high
        exact_values = np.clip(np.round(np.clip(y, 0, high) / scale), 0, 255) * scale
        full_values = np.clip(np.round(np.maximum(y, 0) / full_scale), 0, 255) * full_scale
        assert np.abs(full_values - np.clip(y, 0, high)).max() <= full_scale / 2 * (1 + 1e-4)
        assert np.abs(full_values - exact_values).max() <= (scale / 2 + full_scale / 2) * (1 + 1e-4)
        assert np.abs(full_values - np.clip(y, 0, high)).mean() < np.abs(exact_values - np.clip(y, 0, high)).mean()
    x = torch.randn(256, 1, 16, 16) * 2
    with torch.no_grad():
        reference = model(x).numpy()
    logits = {name: ort_session(m, level="disabled").run(None, {"input": x.numpy()})[0]
              for name, m in (("exact", exact), ("full", full))}
    error = {name: np.linalg.norm(out - reference) for name, out in logits.items()}
    # end to end the other quantizers' noise dominates: the full form stays within the exact form's distance
    # from the float model (40 random models: 0.6-2.6x it for MobileNetV2, 1.0-1.03x for the ResNet); a
    # wrong scale or a lost clamp would be far outside. (Top-1 agreement is no measure here: these untrained
    # models' logits differ between classes by less than the quantization noise.)
    assert error["full"] <= 4 * error["exact"], error


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
