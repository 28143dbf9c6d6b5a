"""qframe's standard Q/DQ form: what it stores, that it computes what the exporter's graph computes, and
that onnxruntime runs it in its integer kernels."""

import numpy as np
import pytest
import torch
from torch import nn

import qframe
import qframe.export.qdq as Q
from qframe.export.lint import lint_tensorrt, outer_reads, subgraphs
from qframe.export.onnx import export_onnx
from qframe.export.ort import ort_parity, ort_session
from qframe.models.resnet import ResNet
from qframe.quant.modules import QUANT_LAYERS, quantizers

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def _ptq(model, data, preset="w8a8", **overrides):
    torch.manual_seed(0)
    return qframe.ptq(model.eval(), qframe.preset(preset, **overrides), data.loader("train", 64, shuffle=True), 2)


def _exported(qmodel, path, monkeypatch=None, **kw):
    """``(standard form, the exporter's own graph)`` of ``qmodel``: the second with the rewrite switched off."""
    x = torch.randn(1, 1, 16, 16)
    std = onnx.load(str(export_onnx(qmodel, x, path, **kw)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Q, "standard_form", lambda model, **_: {})
        raw = onnx.load(str(export_onnx(qmodel, x, path.with_name("raw.onnx"), **kw)))
    return std, raw


def _run(model, x, level="all"):
    return ort_session(model, level=level).run(None, {"input": x})[0]


def _inputs(n=64, size=16):
    return np.random.default_rng().standard_normal((n, 1, size, size), dtype=np.float32) * 2


def _optimized_ops(model, tmp_path) -> list[str]:
    ort_session(model, optimized_path=tmp_path / "opt.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def _inits(model) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.mark.parametrize("preset", ["w8a8", "w4a8"])
def test_weights_are_stored_as_the_codes_of_the_fake_quant_weights(data, preset, tmp_path):
    qmodel = _ptq(qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25), data, preset)
    model, _ = _exported(qmodel, tmp_path / "m.onnx")
    values = _inits(model)
    layers = {name: m for name, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values]
    assert len(dqs) == len(layers) == 5 and not any(t.endswith(".weight") for t in values)  # no float weight left
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in values for n in model.graph.node)
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


@pytest.mark.parametrize("builder", ["compact_cnn", "resnet", "mobilenet_v2"])
def test_standard_form_computes_exactly_what_the_exported_graph_computes(data, builder, normalise_bn,
                                                                         train_batch, tmp_path):
    """With onnxruntime's optimizations off both graphs run the same float layers: equal logits on fresh random
    inputs mean that stored codes, the quantized layer outputs and the renamed parameters change no value."""
    torch.manual_seed(torch.seed() % 2**31)
    model = (ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8) if builder == "resnet"
             else qframe.build_model(builder, data.num_classes, 1, 16, width_mult=0.25))
    std, raw = _exported(_ptq(normalise_bn(model, train_batch), data), tmp_path / "m.onnx")
    producers = {o: n.op_type for n in std.graph.node for o in n.output}
    assert any(n.op_type == "QuantizeLinear" and producers.get(n.input[0]) == "Conv" for n in std.graph.node)
    x = _inputs(128)
    ref, out = _run(raw, x, "disabled"), _run(std, x, "disabled")
    np.testing.assert_array_equal(out, ref)
    assert np.abs(ref).max() > 0


def test_standard_form_is_symmetric_int8_without_identity_and_passes_the_tensorrt_lint(data, tmp_path):
    qmodel = _ptq(ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8), data)
    model, raw = _exported(qmodel, tmp_path / "m.onnx")
    assert "Identity" in [n.op_type for n in raw.graph.node]  # the exporter's shared constants
    assert "Identity" not in [n.op_type for n in model.graph.node] and lint_tensorrt(model) == []
    values = _inits(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    weights = [n for n in qdq if n.input[0] in values]
    assert weights and all(values[n.input[0]].dtype == np.int8 and len(n.input) == 2 for n in weights)  # zero point 0
    activations = [n for n in qdq if n.input[0] not in values]
    assert all(values[n.input[2]].dtype == np.int8 and not values[n.input[2]].any() for n in activations)
    # each quantizer has parameters of its own (two QuantizeLinear of one tensor never share them; a layer's
    # output quantizer takes those of the quantizer it stands for); tensors are named after their modules
    quantize = [n for n in qdq if n.op_type == "QuantizeLinear"]
    by_tensor = {}
    for n in quantize:
        by_tensor.setdefault(n.input[0], []).append(n)
    assert any(len(qs) > 1 for qs in by_tensor.values())  # the residual blocks' fan-out
    assert all(len({q.input[1] for q in qs}) == len({q.input[2] for q in qs}) == len(qs) for qs in by_tensor.values())
    activation = {name.removesuffix("_quantizer") for name, _ in quantizers(qmodel)
                  if name.endswith(("input_quantizer", "skip_quantizer"))}
    assert {n.input[1].removesuffix(".scale") for n in quantize} == activation
    assert {"layer1.0.conv1.input.scale", "layer1.0.conv1.weight_quantized", "layer1.0.conv1.weight_scale"} <= set(values)
    assert {"layer1.0.conv1.input", "layer1.0.conv1.input.codes", "layer1.0.conv1.Conv"} <= {
        o for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    assert all(len(readers[q.output[0]]) == 1 for q in quantize)
    # every Conv output is quantized: straight into a QuantizeLinear
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all([r.op_type for r in readers[c.output[0]]] == ["QuantizeLinear"] for c in convs)


def test_onnxruntime_runs_every_layer_of_the_standard_form_in_integer(data, tmp_path):
    """Residual blocks and pooling included: each Conv with its own quantized input and output (fan-out
    tensors keep one Q -> DQ pair per reader) fuses into QLinearConv, each residual Add into QLinearAdd."""
    qmodel = _ptq(ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=8), data)
    model, _ = _exported(qmodel, tmp_path / "m.onnx")
    ops = _optimized_ops(model, tmp_path)
    convs = sum(isinstance(m, nn.Conv2d) for m in qmodel.modules())
    assert ops.count("QLinearConv") == convs and "Conv" not in ops and "FusedConv" not in ops
    assert ops.count("QLinearAdd") == 2 and "Add" not in ops and "QLinearGlobalAveragePool" in ops


def test_the_int8_file_takes_under_30_percent_of_the_fp32_bytes(data, tmp_path):
    model = ResNet((1, 1), data.num_classes, in_channels=1, image_size=16, width=48).eval()
    qmodel = _ptq(model, data)
    fp32 = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path / "fp32.onnx")
    int8 = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "int8.onnx")
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert int8.stat().st_size <= 0.30 * fp32.stat().st_size


class _Tokens(nn.Module):
    """Linear layers on a [batch, tokens, features] input: torch.onnx.export writes them as MatMul."""

    def __init__(self, classes: int):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 48), nn.Linear(48, 32), nn.Linear(32, classes)

    def forward(self, x):
        tokens = x.reshape(x.shape[0], 16, 16)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(tokens)))).mean(1))


@pytest.mark.parametrize("preset, opset, int4", [("w8a8", 17, 0), ("w4a8", 21, 1)])
def test_linear_exported_as_matmul_gets_its_codes_transposed_with_scales_on_the_output_axis(data, preset, opset, int4,
                                                                                           tmp_path):
    qmodel = _ptq(_Tokens(data.num_classes), data, preset)
    model, raw = _exported(qmodel, tmp_path / "m.onnx", opset=opset)
    assert "Transpose" in [n.op_type for n in raw.graph.node]
    values, types = _inits(model), {t.name: t.data_type for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and "Transpose" not in [n.op_type for n in model.graph.node]
    for mm in matmuls:
        dq = producers[mm.input[1]]
        assert dq.op_type == "DequantizeLinear" and dq.input[0] in values
        k, n = values[dq.input[0]].shape
        assert values[dq.input[1]].shape == (n,) and Q.attr(dq, "axis") == 1 and k != n
    codes = [types[producers[mm.input[1]].input[0]] for mm in matmuls]
    assert codes.count(TensorProto.INT4) == int4 and codes.count(TensorProto.INT8) == 2 - int4
    assert {v.rule for v in lint_tensorrt(model)} == ({"qdq-dtype"} if int4 else set())
    x = _inputs(64)
    np.testing.assert_array_equal(_run(model, x, "disabled"), _run(raw, x, "disabled"))
    parity = ort_parity(tmp_path / "m.onnx", qmodel, data.loader("test", 64))
    assert all(p["agreement"] >= 99.0 for p in parity.values()), parity


def test_4bit_weights_are_int4_initializers_at_opset_21(data, tmp_path):
    qmodel = _ptq(qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.5), data, "w4a8")
    int8 = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "o17.onnx")
    int4 = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "o21.onnx", opset=21)
    model = onnx.load(str(int4))
    types = {t.name: t.data_type for t in model.graph.initializer}
    codes = [types[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in types]
    assert codes.count(TensorProto.INT4) == 3 and codes.count(TensorProto.INT8) == 2  # first and last layer at 8 bits
    assert int4.stat().st_size < 0.8 * int8.stat().st_size
    x = _inputs(64)
    np.testing.assert_array_equal(_run(model, x, "disabled"), _run(onnx.load(str(int8)), x, "disabled"))
    # TensorRT takes INT4 for weight-only layers; these have int8 inputs, and the lint says so
    assert {v.rule for v in lint_tensorrt(model)} == {"qdq-dtype"}


def _hand_graph(second_scale: float, float_reader: bool = False):
    """x -> Q/DQ -> Conv -> Relu -> MaxPool -> {Q/DQ(0.05) -> y1, Q/DQ(second_scale) -> y2} (+ Conv -> Sigmoid)."""
    rng = np.random.default_rng()

    def init(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    inits = [init("s0", 0.03), init("s1", 0.05), init("s2", second_scale), init("z", 0, np.int8),
             init("w", rng.standard_normal((8, 4, 3, 3)) * 0.3), init("sw", np.full(8, 0.01)),
             init("zw", np.zeros(8), np.int8)]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["input", "s0", "z"], ["xq"]), n("DequantizeLinear", ["xq", "s0", "z"], ["xd"]),
             n("QuantizeLinear", ["w", "sw", "zw"], ["wq"], axis=0),
             n("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
             n("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1], name="/layer/Conv"), n("Relu", ["c"], ["r"]),
             n("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             n("QuantizeLinear", ["p", "s1", "z"], ["q1"]), n("DequantizeLinear", ["q1", "s1", "z"], ["y1"]),
             n("QuantizeLinear", ["p", "s2", "z"], ["q2"]), n("DequantizeLinear", ["q2", "s2", "z"], ["y2"])]
    outputs = ["y1", "y2"]
    if float_reader:
        nodes.append(n("Sigmoid", ["c"], ["y3"]))
        outputs.append("y3")
    shapes = {"y1": ["n", 8, 6, 6], "y2": ["n", 8, 6, 6], "y3": ["n", 8, 12, 12]}
    value_infos = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes[o]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 4, 12, 12])],
                              value_infos, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("second_scale, float_reader, quantized", [(0.05, False, True), (0.07, False, False),
                                                                    (0.05, True, False)])
def test_a_layer_output_is_quantized_only_where_that_changes_no_value(second_scale, float_reader, quantized):
    """Quantizing the Conv output in front of Relu and MaxPool is exact when every quantizer after them has
    its scale; with a second scale, or a reader that takes the Conv output in float, the output stays float."""
    model = _hand_graph(second_scale, float_reader)
    before = onnx.ModelProto.FromString(model.SerializeToString())
    counts = Q.standard_form(model)
    assert counts["outputs"] == int(quantized)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    readers = [n.op_type for n in model.graph.node if conv.output[0] in n.input]
    assert ("QuantizeLinear" in readers) == quantized
    x = np.random.default_rng().standard_normal((32, 4, 12, 12), dtype=np.float32) * 3  # clamp and pooling active
    for ref, out in zip(ort_session(before, level="disabled").run(None, {"input": x}),
                        ort_session(model, level="disabled").run(None, {"input": x})):
        np.testing.assert_array_equal(out, ref)


class _TwoAddsOneScope(nn.Module):
    """Two residual adds in one module's own scope, each through the same ReLU into a conv (HRNet's fuse
    layers): the exporter names both adds' output quantizers after that one scope."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.act = nn.ReLU()
        self.heads = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(2))

    def forward(self, x):
        a = self.act(self.convs[0](x) + self.convs[1](x))
        b = self.act(self.convs[2](x) + self.convs[3](x))
        return self.heads[0](a) + self.heads[1](b)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fuse = _TwoAddsOneScope()

    def forward(self, x):
        return self.fuse(self.stem(x)).mean((2, 3))


def test_every_node_name_is_unique_where_one_scope_holds_several_quantized_outputs(tmp_path):
    """onnxruntime refuses a graph with two nodes of one name ("two nodes with same node name")."""
    torch.manual_seed(0)
    model = _Outer().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(torch.randn(8, 3, 16, 16), None) for _ in range(2)], 2)
    x = torch.randn(1, 3, 16, 16)
    path = export_onnx(qmodel, x, tmp_path / "fuse.onnx")
    names = [n.name for n in onnx.load(str(path)).graph.node]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    session = ort_session(str(path), level="basic")
    batch = torch.randn(4, 3, 16, 16)
    out = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(batch).numpy()
    assert np.abs(out - ref).max() <= 1e-3 * np.abs(ref).max() + 1e-5


@pytest.mark.parametrize("op", ["MatMul", "Conv"])
def test_int8_qdq_runs_exactly_in_onnxruntime_integer_kernels_at_the_codes_extremes(op, tmp_path):
    """Codes of +-127 on both operands: on an x86 CPU without VNNI, onnxruntime's default uint8 x int8
    kernels saturate such product pairs (the activation becomes 255 after its +128 shift); qframe's
    sessions keep int8 x int8 there (``integer_kernels_saturate``), so every CPU gets the exact sum."""
    rng = np.random.default_rng()
    k = 64
    if op == "MatMul":
        x_shape, w = (8, k), rng.choice([-127, 127], size=(k, 16)).astype(np.int8)
        node = helper.make_node("MatMul", ["xd", "wd"], ["y"])
    else:
        x_shape, w = (2, k, 6, 6), rng.choice([-127, 127], size=(16, k, 3, 3)).astype(np.int8)
        node = helper.make_node("Conv", ["xd", "wd"], ["y"])
    codes = rng.choice([-127, 127], size=x_shape).astype(np.int8)
    ws = np.full(w.shape[0] if op == "Conv" else w.shape[1], 0.01, np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0 if op == "Conv" else 1), node,
             helper.make_node("QuantizeLinear", ["y", "ys", "z"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "z"], ["out"])]
    inits = [numpy_helper.from_array(np.float32(0.5), "s"), numpy_helper.from_array(np.int8(0), "z"),
             numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.zeros_like(ws, dtype=np.int8), "wz"),
             numpy_helper.from_array(np.float32(1.0), "ys")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = codes.astype(np.float32) * 0.5
    acc = (codes.astype(np.float64) @ w.astype(np.float64) if op == "MatMul" else
           torch.nn.functional.conv2d(torch.from_numpy(codes).double(), torch.from_numpy(w).double()).numpy())
    want = np.clip(np.round(acc * 0.5 * 0.01), -128, 127)  # the int32 sums, requantized at scale 1
    assert np.abs(acc).max() > 32767  # sums far past int16: pairs of 127 x 127 products reach it
    for level in ("basic", "all"):
        np.testing.assert_array_equal(ort_session(model, level=level).run(None, {"x": x})[0],
                                      want, err_msg=level)
    fused = [op_ for op_ in _optimized_ops(model, tmp_path) if op_.startswith("QLinear")]
    assert fused, "onnxruntime did not fuse the Q/DQ pattern into an integer kernel"



def _graph_with_an_if():
    """y = x * 2 + (x * 3 where sum(x) > 0 else x * 2): the If's branches read the outer graph's constants by name,
    as the exporter writes a ``torch.jit.script_if_tracing`` function (ViTDet's relative positions): one constant
    only a branch reads, one both read, under the exporter's scoped names that the standard form renames."""
    two, three = "/scale/Constant_output_0", "/branch/Constant_output_0"
    const = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.float32(v)))
    branch = lambda name, c: helper.make_graph([helper.make_node("Mul", ["x", c], [f"{name}_y"])], name, [],
                                               [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)])
    nodes = [
        const(two, 2.0), const(three, 3.0), const("/scale/Constant_1_output_0", 2.0),  # a duplicate: inlined as one
        helper.make_node("Mul", ["x", "/scale/Constant_1_output_0"], ["/scale/Mul_output_0"], name="/scale/Mul"),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", two], ["positive"]),
        helper.make_node("If", ["positive"], ["picked"], name="/branch/If",
                         then_branch=branch("then", three), else_branch=branch("else", two)),
        helper.make_node("Add", ["/scale/Mul_output_0", "picked"], ["y"], name="/Add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_standard_form_keeps_and_renames_what_an_ifs_branches_read_from_the_outer_graph():
    model = _graph_with_an_if()
    onnx.checker.check_model(model)
    before = onnx.ModelProto.FromString(model.SerializeToString())
    Q.standard_form(model)  # runs the ONNX checker: every name a branch reads exists and comes first
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    outer = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output} | {"x"}
    reads = set().union(*map(outer_reads, subgraphs(if_node)))
    assert reads and reads <= outer and not any(r.startswith("/") for r in reads), reads
    for x in (np.random.default_rng().standard_normal((2, 4), dtype=np.float32) + shift for shift in (-3, 3)):
        want = ort_session(before, level="disabled").run(None, {"x": x})[0]
        np.testing.assert_allclose(ort_session(model, level="disabled").run(None, {"x": x})[0], want, rtol=1e-6)
        np.testing.assert_allclose(want, 2 * x + (3 if x.sum() > 0 else 2) * x, rtol=1e-6)
