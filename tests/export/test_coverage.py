"""TensorRT INT8 coverage report: per compute layer, INT8 or FP16/FP32 and why, from hand-built graphs."""

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qframe.export.coverage import FLOAT, INT8, tensorrt_coverage  # noqa: E402
from qframe.export.lint import lint_tensorrt  # noqa: E402


def _model(nodes, inits, k=4, n=4):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq(name, src):
    return [helper.make_node("QuantizeLinear", [src, "s", "zp"], [f"{name}_q"], name=f"/{name}/Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "zp"], [f"{name}_dq"], name=f"/{name}/DQ")]


def _inits():
    return [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp"),
            numpy_helper.from_array(np.ones((4, 4), np.int8), "w_q"),
            numpy_helper.from_array(np.ones((4, 4), np.float32), "w_f"),
            numpy_helper.from_array(np.array(2.0, np.float32), "two")]


def test_each_compute_layer_gets_int8_or_a_reason():
    w = helper.make_node("DequantizeLinear", ["w_q", "s", "zp"], ["w"], name="/w/DQ")
    nodes = [*_qdq("x", "x"), w,
             helper.make_node("MatMul", ["x_dq", "w"], ["a"], name="/good/MatMul"),  # both inputs from DQ: INT8
             helper.make_node("Mul", ["x_dq", "two"], ["m"], name="/scale/Mul"),  # Q/DQ placed before a Mul
             helper.make_node("MatMul", ["m", "w"], ["b"], name="/misplaced/MatMul"),
             helper.make_node("MatMul", ["a", "w_f"], ["c"], name="/float/MatMul"),  # float weight, float data
             helper.make_node("Einsum", ["b", "c"], ["e"], name="/mix/Einsum", equation="ij,ij->ij"),
             helper.make_node("Add", ["e", "a"], ["y"], name="/out/Add")]
    report = tensorrt_coverage(_model(nodes, _inits()), {"float": "kept float by rule 'float'"})
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["/good/MatMul", "/misplaced/MatMul", "/float/MatMul", "/mix/Einsum"]  # every compute layer, no Add
    assert rows["/good/MatMul"].precision == INT8 and rows["/good/MatMul"].reason == ""
    misplaced = rows["/misplaced/MatMul"]
    assert misplaced.precision == FLOAT and not misplaced.chosen
    assert "data input" in misplaced.reason and "Mul /scale/Mul" in misplaced.reason and "before the Mul" in misplaced.reason
    chosen = rows["/float/MatMul"]
    assert chosen.chosen and chosen.reason.startswith("kept float by rule") and "float initializer" in chosen.reason
    assert rows["/mix/Einsum"].precision == FLOAT and "no INT8 Einsum" in rows["/mix/Einsum"].reason
    assert report.int8 == 1 and len(report.fallbacks(chosen=False)) == 2
    table = report.to_markdown()
    assert table.count("\n| /") == 4 and "1/4 compute layers in INT8" in table


def test_a_float_layer_called_twice_is_chosen_in_every_call_and_a_real_suffix_is_not_stripped():
    """The exporter scopes a module's later calls "deconv_1", "deconv_2": they keep the reason the recipe gave
    "deconv"; a module really named "proj_1" is looked up as itself first."""
    nodes = [helper.make_node("MatMul", ["x", "w_f"], ["a"], name="/deconv/MatMul"),
             helper.make_node("MatMul", ["a", "w_f"], ["b"], name="/deconv_1/MatMul"),
             helper.make_node("MatMul", ["b", "w_f"], ["c"], name="/block/deconv_2/MatMul"),
             helper.make_node("MatMul", ["c", "w_f"], ["y"], name="/proj_1/MatMul")]
    chosen = {"deconv": "kept float: deconv", "block.deconv": "kept float: block.deconv", "proj_1": "its own",
              "proj": "not this one"}
    rows = {r.name: r for r in tensorrt_coverage(_model(nodes, _inits()), chosen).rows}
    assert [rows[n].reason.split(";")[0] for n in rows] == [
        "kept float: deconv", "kept float: deconv", "kept float: block.deconv", "its own"]
    assert all(r.chosen for r in rows.values())


def test_layers_inside_if_and_loop_subgraphs_are_reported():
    """Coverage read only the graph's own nodes: a float MatMul in a branch or a loop body was not a row."""
    from test_lint import _graph_with_control_flow

    rows = {r.name: r for r in tensorrt_coverage(_graph_with_control_flow()).rows}
    assert sorted(rows) == ["/body/MatMul", "/else/MatMul", "/then/MatMul"]
    assert rows["/then/MatMul"].precision == INT8  # its weight's DQ sits inside the branch, its data's outside
    assert rows["/else/MatMul"].precision == FLOAT and "float initializer" in rows["/else/MatMul"].reason
    assert "inside If /branch/If's subgraph" in rows["/else/MatMul"].reason
    assert rows["/body/MatMul"].precision == FLOAT and "inside Loop /repeat/Loop's subgraph" in rows["/body/MatMul"].reason


def test_a_script_if_tracing_branch_of_an_exported_model_is_checked(tmp_path):
    """A MatMul in a torch.jit.script_if_tracing function exports inside an If: coverage said every layer was
    INT8 and the lint found nothing."""
    import qframe
    from qframe.export.coverage import chosen_float_layers
    from qframe.export.lint import subgraphs
    from qframe.export.onnx import export_onnx

    torch.manual_seed(0)
    qmodel = qframe.ptq(_Branchy().eval(), qframe.preset("w8a8"), [torch.randn(4, 6, 8)], 1)
    graph = onnx.load(str(export_onnx(qmodel, torch.randn(1, 6, 8), tmp_path / "m.onnx")))

    def compute(nodes):  # every compute node, in branches too, walked here on its own
        return [m for n in nodes for m in ([n] if n.op_type in ("MatMul", "Gemm") else [])
                + [k for g in subgraphs(n) for k in compute(g.node)]]
    nested = [n for n in compute(graph.graph.node) if n not in graph.graph.node]
    assert len(nested) == 1 and nested[0].op_type == "MatMul"
    chosen = chosen_float_layers(qmodel)
    report = tensorrt_coverage(graph, chosen)
    assert len(report.rows) == len(compute(graph.graph.node)) == 3
    (row,) = report.fallbacks(chosen=False)
    assert row.name == (nested[0].name or nested[0].output[0]) and row.precision == FLOAT and "inside If" in row.reason
    assert report.int8 == 2
    errors = {v.node for v in lint_tensorrt(graph, chosen) if v.severity == "error"}
    assert errors == {nested[0].name}



@torch.jit.script_if_tracing
def _branch(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.shape[1] > 4:
        return torch.matmul(x, w)
    return x


class _Branchy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.w = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3), torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return self.b(_branch(self.a(x), self.w).mean(1))


@pytest.mark.parametrize("kwargs, rule", [
    (dict(zp_val=3), "qdq-zero-point"), (dict(zp_dtype=np.uint8), "qdq-dtype"),
    (dict(act_scale=(0.1, 0.2, 0.3, 0.4)), "qdq-per-channel-activation"), (dict(w_axis=1), "qdq-weight-axis"),
], ids=["zero_point", "uint8", "per_channel_activation", "weight_axis"])
def test_a_layer_whose_qdq_the_lint_rejects_is_not_int8(kwargs, rule):
    """Coverage counted a layer INT8 as soon as DequantizeLinear fed both inputs, whatever their dtype, zero
    point or axis: TensorRT refuses such Q/DQ."""
    from test_lint import _graph

    (clean,) = tensorrt_coverage(_graph()).rows
    assert clean.precision == INT8
    found = [v for v in lint_tensorrt(_graph(**kwargs)) if v.severity == "error"]
    assert rule in {v.rule for v in found}
    (row,) = tensorrt_coverage(_graph(**kwargs)).rows
    assert row.precision == FLOAT and not row.chosen and row.reason.startswith("TensorRT rejects its Q/DQ: ")
    assert all(v.message in row.reason for v in found), (row.reason, found)


def test_an_int4_per_channel_conv_weight_and_an_asymmetric_uint8_recipe_are_not_int8(tmp_path):
    """w4a8 at opset 21 (INT4 conv weights, per channel) and an onnxruntime recipe (uint8, asymmetric) reported
    every layer INT8 while the lint rejected their Q/DQ."""
    import qframe
    from qframe.export.onnx import export_onnx

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    torch.manual_seed(0)
    calib = [torch.randn(4, 3, 8, 8)]
    asym = qframe.preset("w8a8", input={"bits": 8, "granularity": "per_tensor", "observer": "minmax",
                                        "symmetric": False, "signed": False})
    for qmodel, opset in ((qframe.ptq(model, qframe.preset("w4a8"), calib, 1), 21),
                          (qframe.ptq(model, asym, calib, 1, target="onnxruntime"), 17)):
        graph = onnx.load(str(export_onnx(qmodel, calib[0][:1], tmp_path / f"m{opset}.onnx", opset=opset)))
        layers = {r.name: r for r in tensorrt_coverage(graph).rows}
        # the layers the lint finds fault with: an error on the layer, or on a Q/DQ feeding one of its two inputs
        producers = {o: n for n in graph.graph.node for o in n.output}
        faulted = set()
        for n in graph.graph.node:
            if n.name in layers:
                feeding = {producers[i].name for i in n.input[:2] if i in producers}
                feeding |= {producers[p.input[0]].name for p in map(producers.get, n.input[:2])
                            if p is not None and p.input[0] in producers}
                if feeding & {v.node for v in lint_tensorrt(graph) if v.severity == "error"}:
                    faulted.add(n.name)
        assert faulted, opset
        assert {name for name, r in layers.items() if r.precision == FLOAT} == faulted, opset
        assert all("TensorRT rejects its Q/DQ" in layers[name].reason for name in faulted)
