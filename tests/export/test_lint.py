"""TensorRT Q/DQ lint: each rule caught on a tiny hand-built graph, clean graphs pass."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qframe.errors import QFrameError  # noqa: E402
from qframe.export.lint import check_tensorrt, lint_tensorrt  # noqa: E402


def _graph(*, zp_dtype=np.int8, zp_val=0, act_scale=(0.1,), w_axis=0, w_scale=4, weight_dq=True,
           data_dq=True, op="Conv", opset=17, extra=()):
    """x -> Q -> DQ -> Conv(weight from DQ of an int8 initializer) -> y; knobs break one rule each."""
    inits = [numpy_helper.from_array(np.array(act_scale if len(act_scale) > 1 else act_scale[0],
                                              np.float32), "s_x"),
             numpy_helper.from_array(np.array(zp_val, zp_dtype), "zp_x"),
             numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "w_q"),
             numpy_helper.from_array(np.full((w_scale,), 0.02, np.float32), "s_w"),
             numpy_helper.from_array(np.zeros((w_scale,), np.int8), "zp_w"),
             numpy_helper.from_array(np.ones((4, 4, 3, 3), np.float32), "w_f")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["xq"], name="q_x", axis=1),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "zp_x"], ["xd"], name="dq_x", axis=1),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["wd"], name="dq_w", axis=w_axis)]
    nodes.append(helper.make_node(op, ["xd" if data_dq else "x", "wd" if weight_dq else "w_f"], ["y"],
                                  name="conv", pads=[1, 1, 1, 1]))
    nodes += list(extra)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _rules(model):
    return [v.rule for v in lint_tensorrt(model)]


def test_clean_graph_passes():
    model = _graph()
    onnx.checker.check_model(model)
    assert lint_tensorrt(model) == []
    check_tensorrt(model)  # no raise


@pytest.mark.parametrize("kwargs, rule, text", [
    (dict(zp_val=3), "qdq-zero-point", "non-zero zero point"),
    (dict(zp_dtype=np.uint8), "qdq-dtype", "UINT8"),
    (dict(act_scale=(0.1, 0.2, 0.3, 0.4)), "qdq-per-channel-activation", "per-channel activation scales"),
    (dict(w_axis=1), "qdq-weight-axis", "axis 1"),
    (dict(data_dq=False), "qdq-missing", "missing Q/DQ on input of Conv"),
    (dict(weight_dq=False), "qdq-missing", "weight input"),
    (dict(opset=11), "opset", "unsupported opset 11"),
    (dict(opset=22), "opset", "unsupported opset 22"),
])
def test_each_rule_caught(kwargs, rule, text):
    found = lint_tensorrt(_graph(**kwargs))
    hits = [v for v in found if v.rule == rule]
    assert hits, found
    assert any(text in v.message for v in hits), hits


@pytest.mark.parametrize("op", ["QLinearConv", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear",
                                "QLinearMatMul"])
def test_rejected_ops(op):
    extra = [helper.make_node(op, ["y"], ["z"], name="bad")]
    found = lint_tensorrt(_graph(extra=extra))
    assert [v.rule for v in found] == ["rejected-op"] and op in found[0].message


def test_gemm_weight_axis_follows_transB():
    def gemm(trans_b, axis):
        w = np.ones((6, 4), np.int8) if trans_b else np.ones((4, 6), np.int8)
        inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                 numpy_helper.from_array(np.array(0, np.int8), "z"),
                 numpy_helper.from_array(w, "w"),
                 numpy_helper.from_array(np.full(6, 0.1, np.float32), "sw"),
                 numpy_helper.from_array(np.zeros(6, np.int8), "zw")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                 helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=axis),
                 helper.make_node("Gemm", ["d", "wd"], ["y"], name="fc", transB=trans_b)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    assert lint_tensorrt(gemm(1, 0)) == [] and lint_tensorrt(gemm(0, 1)) == []
    assert _rules(gemm(1, 1)) == ["qdq-weight-axis"] and _rules(gemm(0, 0)) == ["qdq-weight-axis"]


def test_int4_block_weight_allowed_only_on_weights():
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             helper.make_tensor("w", TensorProto.INT4, [4, 6], [1] * 24),
             numpy_helper.from_array(np.full((2, 6), 0.1, np.float32), "sw"),
             helper.make_tensor("zw", TensorProto.INT4, [2, 6], [0] * 12)]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0, block_size=2),
             helper.make_node("MatMul", ["d", "wd"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    assert lint_tensorrt(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])) == []


def test_weight_only_block_quantized_gemm_needs_no_input_qdq():
    def gemm(block):
        inits = [helper.make_tensor("w", TensorProto.INT4, [6, 4], [1] * 24),
                 numpy_helper.from_array(np.full((6, 2) if block else (6,), 0.1, np.float32), "sw")]
        attrs = {"axis": 1, "block_size": 2} if block else {"axis": 0}
        nodes = [helper.make_node("DequantizeLinear", ["w", "sw"], ["wd"], **attrs),
                 helper.make_node("Gemm", ["x", "wd"], ["y"], name="fc", transB=1)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    assert lint_tensorrt(gemm(block=True)) == []  # INT4 weight-only (TensorRT 10): float input is fine
    found = lint_tensorrt(gemm(block=False))  # a per-channel INT4 weight is neither INT8 nor a block
    assert {v.rule for v in found} == {"qdq-dtype", "qdq-missing"}
    assert any("data input" in v.message for v in found)


def test_check_raises_one_line():
    with pytest.raises(QFrameError, match=r"^ONNX graph breaks TensorRT rules: 3 violations: unsupported opset 11.*non-zero"):
        check_tensorrt(_graph(zp_val=3, opset=11))


def test_torch_fake_quant_export_passes(tmp_path):
    torch = pytest.importorskip("torch")
    from torch import nn

    class FQConv(nn.Conv2d):
        """Conv whose input and weight pass through torch's fake-quantize ops (exports as Q/DQ)."""

        def forward(self, x):
            x = torch.fake_quantize_per_tensor_affine(x, 0.05, 0, -128, 127)
            amax = self.weight.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-8)
            w = torch.fake_quantize_per_channel_affine(
                self.weight, amax / 127, torch.zeros(self.out_channels, dtype=torch.int32), 0, -128, 127)
            return self._conv_forward(x, w, self.bias)

    model = nn.Sequential(FQConv(3, 8, 3, padding=1), nn.ReLU(), FQConv(8, 4, 3, padding=1)).eval()
    path = tmp_path / "fq.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), opset_version=17, dynamo=False)
    exported = onnx.load(str(path))
    ops = {n.op_type for n in exported.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert lint_tensorrt(exported) == []


def _matmul_graph(perm_axis: int, *, reshape: bool = False, chosen_float=None):
    """x -> Q/DQ -> MatMul(x, Transpose(DQ(W[N, K], axis))) : a Linear exported as Transpose -> MatMul."""
    n, k = 6, 4
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s_x"),
             numpy_helper.from_array(np.array(0, np.int8), "zp_x"),
             numpy_helper.from_array(np.ones((n, k), np.int8), "w_q"),
             numpy_helper.from_array(np.full((n if perm_axis == 0 else k,), 0.02, np.float32), "s_w"),
             numpy_helper.from_array(np.zeros((n if perm_axis == 0 else k,), np.int8), "zp_w")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["xq"], name="q_x"),
             helper.make_node("DequantizeLinear", ["xq", "s_x", "zp_x"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w_q", "s_w", "zp_w"], ["wd"], name="dq_w", axis=perm_axis)]
    if reshape:  # (N, K) -> (N, 2, 2) -> Transpose -> ... keep it simple: reshape to (N, K) via a constant shape
        inits.append(numpy_helper.from_array(np.array([n, k], np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["wd", "shape"], ["wr"], name="reshape"))
        nodes.append(helper.make_node("Transpose", ["wr"], ["wt"], name="t", perm=[1, 0]))
    else:
        nodes.append(helper.make_node("Transpose", ["wd"], ["wt"], name="t", perm=[1, 0]))
    nodes.append(helper.make_node("MatMul", ["xd", "wt"], ["y"], name="/fc/MatMul"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("reshape", [False, True])
def test_weight_axis_followed_through_transpose_and_reshape(reshape):
    # axis 0 of W[N, K] is the output channel; after Transpose it is axis 1 of the MatMul's (K, N) weight: fine
    assert lint_tensorrt(_matmul_graph(0, reshape=reshape)) == []
    # axis 1 of W[N, K] is the input channel: after the Transpose it lands on axis 0 of (K, N), a real finding
    found = lint_tensorrt(_matmul_graph(1, reshape=reshape))
    assert [v.rule for v in found] == ["qdq-weight-axis"] and "after" in found[0].message and "Transpose" in found[0].message


def test_float_layers_the_recipe_chose_are_warnings_not_errors():
    model = _graph(data_dq=False)
    model.graph.node[-1].name = "/head/Conv"
    assert [v.severity for v in lint_tensorrt(model)] == ["error"]  # nothing chosen: the missing Q/DQ is an error
    found = lint_tensorrt(model, {"head": "kept float by rule 'head'"})
    assert [(v.rule, v.severity) for v in found] == [("qdq-missing", "warning")]
    assert "kept float by rule 'head'" in found[0].message
    warnings = check_tensorrt(model, chosen_float={"head": "kept float by rule 'head'"})  # no raise
    assert len(warnings) == 1
    assert [v.severity for v in lint_tensorrt(model, {"other": "x"})] == ["error"]  # another layer's choice does not cover it


def test_a_matmul_of_tensors_made_from_shapes_and_constants_is_no_fault_one_reading_an_activation_is():
    """RT-DETR's and D-FINE's sine position table: positions from ``arange`` over a feature map's size times
    frequencies, computed where placement did not watch (under a cache); beside it a MatMul of the conv's output."""
    from qframe.export.coverage import tensorrt_coverage

    extra = [
        helper.make_node("Shape", ["y"], ["shape"], name="/pos/Shape"),
        helper.make_node("Gather", ["shape", "two"], ["width"], name="/pos/Gather", axis=0),
        helper.make_node("Cast", ["width"], ["width_f"], name="/pos/Cast", to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "width_f", "one"], ["positions"], name="/pos/Range"),
        helper.make_node("Unsqueeze", ["positions", "last"], ["column"], name="/pos/Unsqueeze"),
        helper.make_node("MatMul", ["column", "frequencies"], ["table"], name="/pos/MatMul"),
        helper.make_node("MatMul", ["y", "frequencies_8"], ["mixed"], name="/head/MatMul"),
    ]
    model = _graph(extra=extra)
    model.graph.initializer.extend([
        numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"), numpy_helper.from_array(np.array([1], np.int64), "last"),
        numpy_helper.from_array(np.random.rand(1, 3).astype(np.float32), "frequencies"),
        numpy_helper.from_array(np.random.rand(8, 3).astype(np.float32), "frequencies_8")])
    model.graph.output.extend([helper.make_tensor_value_info("table", TensorProto.FLOAT, [8, 3]),
                               helper.make_tensor_value_info("mixed", TensorProto.FLOAT, [1, 4, 8, 3])])
    onnx.checker.check_model(model, full_check=True)
    found = {(v.node, v.severity) for v in lint_tensorrt(model) if v.rule == "qdq-missing"}
    assert found == {("/pos/MatMul", "warning"), ("/head/MatMul", "error")}
    rows = {r.name: r for r in tensorrt_coverage(model).rows}
    assert rows["/pos/MatMul"].chosen and "reads no activation" in rows["/pos/MatMul"].reason
    assert not rows["/head/MatMul"].chosen and "comes from Conv conv" in rows["/head/MatMul"].reason


def _graph_with_control_flow():
    """x -> Q/DQ -> If(flag): a MatMul with Q/DQ on both inputs (DQ of the weight inside the branch) or one of a
    float weight; then a Loop whose body multiplies by a float weight: the layers TensorRT sees in subgraphs."""
    def branch(name, nodes, out):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])

    then = branch("then", [helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w_dq"], name="/then/w/DQ"),
                           helper.make_node("MatMul", ["x_dq", "w_dq"], ["then_y"], name="/then/MatMul")], "then_y")
    other = branch("else", [helper.make_node("MatMul", ["x_dq", "w_f"], ["else_y"], name="/else/MatMul")], "else_y")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["v_in", "w_f"], ["v_out"], name="/body/MatMul")], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [2, 4])])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["x_q"], name="/x/Q"),
             helper.make_node("DequantizeLinear", ["x_q", "s", "zp"], ["x_dq"], name="/x/DQ"),
             helper.make_node("If", ["flag"], ["picked"], name="/branch/If", then_branch=then, else_branch=other),
             helper.make_node("Loop", ["trips", "", "picked"], ["y"], name="/repeat/Loop", body=body)]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q"),
             numpy_helper.from_array(np.ones((4, 4), np.float32), "w_f"),
             numpy_helper.from_array(np.array(2, np.int64), "trips")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layers_inside_if_and_loop_subgraphs_are_checked():
    """The lint read only the graph's own nodes: a float MatMul in an If's branch or a Loop's body passed."""
    model = _graph_with_control_flow()
    onnx.checker.check_model(model, full_check=True)
    found = [(v.rule, v.node, v.severity) for v in lint_tensorrt(model)]
    assert sorted(found) == [("qdq-missing", "/body/MatMul", "error"), ("qdq-missing", "/body/MatMul", "error"),
                             ("qdq-missing", "/else/MatMul", "error")]
    assert any("weight input 'w_f'" in v.message for v in lint_tensorrt(model) if v.node == "/else/MatMul")
    then = next(a.g for a in model.graph.node[2].attribute if a.name == "then_branch")
    then.node[0].input[2] = "zp_3"  # a Q/DQ inside a branch is held to the rules too
    model.graph.initializer.append(numpy_helper.from_array(np.array(3, np.int8), "zp_3"))
    assert ("qdq-zero-point", "/then/w/DQ") in {(v.rule, v.node) for v in lint_tensorrt(model)}
