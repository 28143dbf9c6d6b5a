"""export_onnx's dynamo route (torch.export + onnxscript) against the TorchScript route, and ``exporter="auto"``."""

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
from qframe.export.lint import lint_tensorrt
from qframe.export.onnx import export_onnx
from qframe.export.qdq import module_path
from qframe.quant.branches import MergedBranch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from qframe.export.dynamo import supported  # noqa: E402
from test_onnx import _DynamicFoldNet  # noqa: E402  (overlapping F.fold to a size read from the input)
from qframe.export.ort import ort_session  # noqa: E402  (after the skips: it imports onnxruntime)

pytestmark = pytest.mark.skipif(supported() is not None, reason=str(supported()))


class _ConvNet(nn.Module):
    """Conv + BN + ReLU, a residual add, a transposed convolution, pooling and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.conv(y))
        return self.head(self.up(y).mean((2, 3)))


class _Tokens(nn.Module):
    """A patch embedding, an encoder layer (nn.MultiheadAttention) and Linear layers on 3-d tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        tokens = self.encoder(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.mlp(tokens).mean(1))


class _Rep(nn.Module):
    """A 3 x 3 and a 1 x 1 convolution summed (qframe.ptq merges them into one), then a padded pool and a split."""

    def __init__(self):
        super().__init__()
        self.main = nn.Conv2d(3, 8, 3, padding=1)
        self.small = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.relu(self.main(x) + self.small(x))
        y = nn.functional.avg_pool2d(nn.functional.pad(y, (1, 1, 1, 1)), 2)
        a, b = torch.chunk(y, 2, dim=1)
        return self.head((a * b).mean((2, 3)))


class _Blocks(nn.Module):
    """Linear layers only (per-group weights export as opset-21 blocks)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, x):
        return self.body(x)


CASES = {  # model, recipe, opset
    "conv_w8a8": (_ConvNet, "w8a8", 17),
    "conv_w4a8_int4": (_ConvNet, "w4a8", 21),
    "tokens_w8a8": (_Tokens, "w8a8", 17),
    "merged_branches_pad_split": (_Rep, "w8a8", 17),
    "blocks_w4a16": (_Blocks, "w4a16", 21),
}


def _quantizer_names(graph) -> set[str]:
    """The quantizers a graph's Q/DQ nodes stand for (``/conv.input/Q_2`` -> ``conv.input``); weights by name."""
    names = set()
    for n in graph.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            names.add(re.sub(r"/(Q|DQ)(_\d+)?$", "", n.name).lstrip("/") if n.name.startswith("/") else n.input[0])
    return names


@pytest.mark.parametrize("case", list(CASES))
def test_the_dynamo_route_writes_the_quantized_graph_the_torchscript_route_writes(case, tmp_path, randomise_bn):
    make, preset, opset = CASES[case]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = randomise_bn(make()).eval()
    qmodel = qframe.ptq(model, qframe.preset(preset), [torch.randn(8, 3, 16, 16) for _ in range(2)], 2)
    if case.startswith("merged_branches"):
        assert isinstance(qmodel.small, MergedBranch)
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        ref = qmodel(x).double().numpy()
    graphs, lint = {}, {}
    for route in ("torchscript", "dynamo"):
        path = export_onnx(qmodel, torch.randn(1, 3, 16, 16), tmp_path / f"{route}.onnx", opset=opset, exporter=route)
        graph = graphs[route] = onnx.load(str(path))
        assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [opset]
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch
        chosen = chosen_float_layers(qmodel)
        lint[route] = sorted(v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error")
        if preset != "w4a16":  # weight-only blocks are no INT8 layers for TensorRT
            coverage = tensorrt_coverage(graph, chosen)  # INT8, but for the layers of INT4 per-channel weights
            rejected = [r for r in coverage.rows if r.reason.startswith("TensorRT rejects its Q/DQ: ")]
            assert coverage.int8 + len(rejected) == len(coverage.rows) > 0
            assert bool(rejected) == (case == "conv_w4a8_int4")
        got = ort_session(str(path), level="basic").run(None, {"input": x.numpy()})[0]
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6, route
        # every node under a module scope names it (the standard form, the lint and bisect read the names)
        paths = {module_path(n.name) for n in graph.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")}
        assert paths and "" not in paths, (route, paths)
    ts, dyn = graphs["torchscript"], graphs["dynamo"]
    # TensorRT takes INT4 codes only as weight-only blocks: the w4a8 file at opset 21 breaks that rule on both routes
    assert lint["dynamo"] == lint["torchscript"] and (lint["dynamo"] == []) == (case != "conv_w4a8_int4")
    # the quantizers of modules (a root-level layer's output quantizer is named by its tensor, which differs);
    # the dynamo exporter's optimizer may merge equal Q/DQ pairs of one tensor
    children = {name for name, _ in qmodel.named_children()}
    # (the TorchScript exporter scopes a placed site's quantizer without the ModuleDict that holds it)
    ours = {r: {q for q in (re.sub(r"(^|\.)qframe_sites\.quantizers\.", r"\1", q) for q in _quantizer_names(g))
                if q.split(".")[0] in children} for r, g in graphs.items()}
    assert ours["dynamo"] <= ours["torchscript"] and len(ours["dynamo"]) >= 0.75 * len(ours["torchscript"])
    layers = ("Conv", "ConvTranspose", "Gemm", "MatMul")
    count = {r: sorted(n.op_type for n in g.graph.node if n.op_type in layers) for r, g in graphs.items()}
    assert count["dynamo"] == count["torchscript"]
    if preset == "w4a16":
        blocks = [n for n in dyn.graph.node if n.op_type == "DequantizeLinear" and any(
            a.name == "block_size" for a in n.attribute)]
        assert len(blocks) == 2
    if opset == 21 and preset == "w4a8":
        int4 = [t for t in dyn.graph.initializer if t.data_type == onnx.TensorProto.INT4]
        assert len(int4) == sum(1 for t in ts.graph.initializer if t.data_type == onnx.TensorProto.INT4) > 0


def _fold_model():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return qframe.ptq(_DynamicFoldNet().eval(), qframe.preset("w8a8"), [torch.randn(8, 3, 8, 8)], 1)


def test_auto_exports_a_quantized_model_the_torchscript_exporter_rejects_by_the_dynamo_route(tmp_path, caplog):
    qmodel = _fold_model()
    with caplog.at_level("WARNING", logger="qframe"):
        path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "fold.onnx")
    assert "exporting _DynamicFoldNet with the dynamo exporter" in caplog.text and "col2im" in caplog.text
    # Col2Im is an opset-18 op: the file stays at 18, and says so
    assert "which onnx cannot convert to opset 17" in caplog.text
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert [v.message for v in lint_tensorrt(graph) if v.severity == "error"] == []
    assert {n.op_type for n in graph.graph.node} >= {"QuantizeLinear", "DequantizeLinear", "Conv", "Col2Im", "Gemm"}
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = ort_session(str(path), level="basic").run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max() + 1e-6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold.onnx"]


def test_without_onnxscript_the_dynamo_route_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    qmodel = _fold_model()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    with pytest.raises(QFrameError) as err:
        export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "fold.onnx")
    message = str(err.value)
    assert "\n" not in message and "rejects _DynamicFoldNet" in message and "col2im" in message
    assert "needs the onnxscript package" in message
    assert list(tmp_path.iterdir()) == []


def test_the_torchscript_route_alone_and_a_bad_exporter_are_one_line_each(tmp_path):
    qmodel = _fold_model()
    with pytest.raises(QFrameError) as err:
        export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "fold.onnx", exporter="torchscript")
    message = str(err.value)
    assert "\n" not in message and "rejects _DynamicFoldNet" in message and "exporter='dynamo'" in message
    with pytest.raises(QFrameError, match=r"exporter='jit' is invalid; valid: auto, torchscript, dynamo"):
        export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "fold.onnx", exporter="jit")
    assert list(tmp_path.iterdir()) == []


class _FixedBatchOfOne(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).reshape(4, 8, 8)  # the batch is 1, written into the model


def test_a_model_whose_batch_torch_export_cannot_make_symbolic_exports_at_the_example_batch(tmp_path, caplog):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    qmodel = qframe.ptq(_FixedBatchOfOne().eval(), qframe.preset("w8a8"), [torch.randn(1, 3, 8, 8)], 1)
    x = torch.randn(1, 3, 8, 8)
    with caplog.at_level("WARNING", logger="qframe"):
        path = export_onnx(qmodel, x, tmp_path / "fixed.onnx", exporter="dynamo")
    assert "cannot make the batch of _FixedBatchOfOne symbolic" in caplog.text
    graph = onnx.load(str(path))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = ort_session(str(path), level="basic").run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max() + 1e-6


class _GuardedResidual(nn.Module):
    """A residual add (a placed site) and a branch on a value: torch.export fails midway through the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        y = y + self.b(y)
        return y * 2 if y.amax() > 0 else y


def test_a_failed_dynamo_export_leaves_the_placed_model_computing_as_before(tmp_path):
    """torch.export abandons the forward on a data-dependent branch without running the modules' forward hooks;
    placement's running-module stack and a function mode stayed behind, and every placed model run afterwards in
    the process lost its placed quantizers (the residual adds')."""
    from torch.overrides import _get_current_function_mode_stack

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    qmodel = qframe.ptq(_GuardedResidual().eval(), qframe.preset("w8a8"), [torch.randn(4, 3, 8, 8)], 1)
    assert qmodel.qframe_sites is not None
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        before = qmodel(x)
    with pytest.raises(QFrameError, match="rejects _GuardedResidual"):
        export_onnx(qmodel, x[:1], tmp_path / "guarded.onnx", exporter="dynamo")
    assert _get_current_function_mode_stack() == []
    with torch.no_grad():
        after = qmodel(x)
    assert torch.equal(after, before)
    assert list(tmp_path.iterdir()) == []


def test_below_opset_17_the_file_goes_as_far_down_as_onnx_converts_and_says_where_it_stopped(tmp_path, caplog):
    """onnx 1.23's converter has no 14 -> 13 adapter for Relu (opset 14 only added types): asked for 13, the
    dynamo route's file is at 14, with a warning; Pad and Split (no 18 -> 17 adapter) come down with the rest."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    qmodel = qframe.ptq(_Rep().eval(), qframe.preset("w8a8"), [torch.randn(8, 3, 16, 16)], 1)
    with caplog.at_level("WARNING", logger="qframe"):
        path = export_onnx(qmodel, torch.randn(1, 3, 16, 16), tmp_path / "rep.onnx", opset=13, exporter="dynamo")
    graph = onnx.load(str(path))
    declared = [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")]
    assert 13 <= declared[0] <= 17  # 14 with onnx 1.23; a converter that gains the adapter reaches 13
    assert declared == [13] or f"the file is at opset {declared[0]}" in caplog.text
    assert {"Pad", "Split"} <= {n.op_type for n in graph.graph.node}
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = ort_session(str(path), level="basic").run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
