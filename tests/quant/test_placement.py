"""Placement from the graph: activation quantizers where TensorRT needs them, in any form the model writes."""

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qframe
from qframe.quant.modules import QuantConv2d, quantizers
from qframe.quant.placement import TARGET_RULES, SiteQuantizers, _sdpa_math


class Block(nn.Module):
    """Residual adds written three ways, a concat, an attention and functional pooling."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 1)
        self.mix = nn.Conv2d(2 * c, c, 1)
        self.qkv = nn.Linear(c, 3 * c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        out = self.c1(x)
        out += x  # in place
        y = self.c2(out) + out  # operator
        z = torch.add(self.c3(y), y)  # functional
        z = self.mix(torch.cat([z, y], dim=1))  # concat: one shared scale
        t = z.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, dim=-1)  # activation x activation matmul
        t = torch.matmul(att, v) + F.scaled_dot_product_attention(q, k, v)
        pooled = F.adaptive_avg_pool2d(t.transpose(1, 2).reshape_as(z), 1).flatten(1)
        return self.head(pooled)


def _ptq(model, target="tensorrt", seed=0):
    g = torch.Generator().manual_seed(seed)
    calib = [(torch.randn(4, 8, 6, 6, generator=g), None) for _ in range(2)]
    return qframe.ptq(model, qframe.preset("w8a8"), calib, 2, target=target)


def _sites(qmodel):
    return {n[:-len("qframe_sites")].rstrip("."): m.sites for n, m in qmodel.named_modules() if isinstance(m, SiteQuantizers)}


def test_each_form_gets_its_quantizers_and_the_model_stays_close():
    torch.manual_seed(0)
    model = Block().eval()
    qmodel = _ptq(model)
    assert qmodel.qframe_placed == {"add": 3, "cat": 1, "matmul": 2, "sdpa": 1, "pool": 1}
    sites = _sites(qmodel)[""]  # all ops run in Block.forward itself
    assert sites["add"] == {0: ("b",), 1: ("b",), 2: ("b",)}  # the skip of each; the attention sum has no conv input
    assert sites["matmul"] == {0: ("a", "b"), 1: ("a", "b")} and sites["sdpa"] == {0: ("q", "k", "p", "v")}
    assert sites["cat"] == {0: ("inputs",)} and sites["pool"] == {0: ("input",)}
    # every placed quantizer was calibrated and acts: the quantized model differs from the float one, a little
    placed = [q for n, q in quantizers(qmodel) if "qframe_sites" in n]
    assert len(placed) == 3 + 1 + 4 + 4 + 1 and all(q.calibrated for q in placed)
    x = torch.randn(8, 8, 6, 6)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
        for q in placed:
            q.enabled = False
        without = qmodel(x).double()
    assert 0 < (out - ref).norm() / ref.norm() < 0.1
    assert (out - without).abs().max() > 0  # the placed quantizers change what the model computes


def test_the_target_decides_the_residual_inputs():
    assert TARGET_RULES["tensorrt"].residual == "skip" and TARGET_RULES["onnxruntime"].residual == "both"
    torch.manual_seed(0)
    sites = _sites(_ptq(Block().eval(), target="onnxruntime"))[""]
    assert sites["add"][1] == ("a", "b") and sites["add"][2] == ("a", "b")
    assert sites["add"][0] == ("b",)  # in place: only the operand that is not the target
    with pytest.raises(qframe.QFrameError, match="placement target"):
        _ptq(Block().eval(), target="gpu")


def test_sdpa_math_path_matches_torch():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.randn(5, 5, generator=g, dtype=torch.float64)
    keep = (mask > 0) | torch.eye(5, dtype=torch.bool)  # no row fully masked (the fused kernel gives 0 there, math NaN)
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask}, {"attn_mask": keep, "scale": 0.3}):
        ref = F.scaled_dot_product_attention(q, k, v, **kwargs)
        out = _sdpa_math(q, k, v, **kwargs, quantize=lambda role, t: t, training=False)
        assert (out - ref).abs().max() < 1e-12, kwargs


def test_the_quantized_attention_exports_with_qdq_on_every_matmul(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qframe.export.coverage import tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    torch.manual_seed(0)
    qmodel = _ptq(Block().eval())
    path = export_onnx(qmodel, torch.randn(1, 8, 6, 6), tmp_path / "block.onnx")
    graph = onnx.load(str(path))
    assert lint_tensorrt(graph) == []
    report = tensorrt_coverage(graph)
    assert report.int8 == len(report.rows) >= 9  # 5 convs, 2 linears, 4 attention matmuls
    concat = next(n for n in graph.graph.node if n.op_type == "Concat")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer}
    dqs = [next(p for p in graph.graph.node if i in p.output) for i in concat.input]
    assert [d.op_type for d in dqs] == ["DequantizeLinear"] * 2
    assert inits[dqs[0].input[1]] == inits[dqs[1].input[1]]  # both inputs of the concat on one scale
    x = torch.randn(8, 8, 6, 6)
    session = ort_session(str(path), level="basic")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert abs(out - ref).max() < 1e-3 * abs(ref).max() + 1e-4


def test_a_model_that_does_not_run_on_the_example_keeps_module_quantizers_with_a_warning(caplog):
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 1)
            self.calls = 0

        def forward(self, x):  # quantize_ runs the example once to check it fits; placement's run is the second
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("second call always fails")
            return self.conv(x) + x

    model = Picky()
    with caplog.at_level(logging.WARNING, logger="qframe.quant.placement"):
        qframe.quantize_(model, qframe.preset("w8a8"), example=torch.randn(1, 8, 4, 4))
    assert "did not run on the example input" in caplog.text and "second call always fails" in caplog.text
    assert not _sites(model) and isinstance(model.conv, QuantConv2d)


class EinsumAttention(nn.Module):
    """Attention written with torch.einsum (CvT does): both einsums are activation x activation matmuls."""

    def __init__(self, c=8, heads=2):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(c, 3 * c), nn.Linear(c, 5)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhlk,bhtk->bhlt", [q, k]) / (c // self.heads) ** 0.5  # list form
        out = torch.einsum("bhlt,bhtv->bhlv", scores.softmax(-1), v)
        return self.proj(out.permute(0, 2, 1, 3).reshape(b, n, c).mean(1))


@pytest.mark.parametrize("equation, shapes", [
    ("bhlk,bhtk->bhlt", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("bhlt,bhtv->bhlv", [(2, 3, 5, 6), (2, 3, 6, 4)]),
    ("ij,jk->ki", [(3, 4), (4, 5)]),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("bnc,bmc->bmn", [(2, 3, 4), (2, 5, 4)]),
    ("ab,cd->abcd", [(2, 3), (4, 5)]),  # outer product: no contracted label
])
def test_a_two_operand_einsum_runs_as_one_matmul_and_equals_torch(equation, shapes):
    from qframe.quant.placement import _einsum_matmul, _einsum_plan

    g = torch.Generator().manual_seed(4)
    a, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes)
    assert _einsum_plan(equation, [a.shape, b.shape]) is not None
    out = _einsum_matmul(equation, a, b, lambda t: t, lambda t: t)
    assert (out - torch.einsum(equation, a, b)).abs().max() < 1e-12


@pytest.mark.parametrize("equation, shapes", [
    ("ii,ij->j", [(3, 3), (3, 4)]),  # a repeated label (a trace)
    ("ij,jk->k", [(3, 4), (4, 5)]),  # i summed inside a
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)]),  # an ellipsis
    ("bij,bjk->bik", [(1, 3, 4), (2, 4, 5)]),  # broadcast batch
])
def test_einsums_that_are_not_one_matmul_are_left_to_torch(equation, shapes):
    from qframe.quant.placement import _einsum_plan

    assert _einsum_plan(equation, shapes) is None


def test_einsum_attention_gets_quantized_matmuls_that_export_as_int8_matmul(tmp_path):
    torch.manual_seed(0)
    model = EinsumAttention().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 6, 8, generator=g), None) for _ in range(2)]
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, 2)
    assert qmodel.qframe_placed == {"einsum": 2}
    assert _sites(qmodel)[""]["einsum"] == {0: ("a", "b"), 1: ("a", "b")}
    placed = [q for n, q in quantizers(qmodel) if "qframe_sites" in n]
    x = torch.randn(8, 6, 8, generator=g)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
        for q in placed:
            q.enabled = False
        without = qmodel(x).double()
        for q in placed:
            q.enabled = True
    assert 0 < (out - ref).norm() / ref.norm() < 0.1 and (out - without).abs().max() > 0
    assert (without - ref).abs().max() < 0.1 * ref.abs().max()
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx

    graph = onnx.load(str(export_onnx(qmodel, x[:1], tmp_path / "einsum.onnx")))
    assert not [n for n in graph.graph.node if n.op_type == "Einsum"]
    assert lint_tensorrt(graph) == []
    report = tensorrt_coverage(graph)
    assert report.int8 == len(report.rows) == 4  # qkv, proj and both attention matmuls


class _EllipsisAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qk, self.head = nn.Linear(8, 16), nn.Linear(5, 5)
        self.w = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        q, k = self.qk(x).chunk(2, dim=-1)
        a = torch.einsum("...ic,...jc->...ij", q, k).mean(-1)  # an ellipsis: not planned as a matmul
        # functional linears in the same module, left float and named: a parameter as weight, and (D-FINE's
        # distribution integral) a weight computed in forward
        return self.head(F.linear(a, self.w)) + F.linear(a.softmax(-1), torch.linspace(-2, 2, 6).expand(5, 6))


def test_an_einsum_of_activations_that_stays_float_is_named_with_the_reason(tmp_path, caplog):
    torch.manual_seed(0)
    calib = [(torch.randn(4, 6, 8), None) for _ in range(2)]
    with caplog.at_level("WARNING", logger="qframe"):
        qmodel = qframe.ptq(_EllipsisAttention().eval(), qframe.preset("w8a8"), calib, 2)
    assert qmodel.qframe_placed == {}
    reason = qmodel.qframe_float_layers["::Einsum"]  # the op, not the module that calls it
    assert "einsum '...ic,...jc->...ij'" in reason and "runs float" in reason and "runs float" in caplog.text
    linear = qmodel.qframe_float_layers["::MatMul"]
    assert "F.linear with a parameter of its module as weight, not an nn.Linear" in linear
    assert "F.linear with a tensor computed in forward as weight" in linear and "register_module" in linear
    assert "" not in qmodel.qframe_float_layers
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx

    graph = onnx.load(str(export_onnx(qmodel, torch.randn(1, 6, 8), tmp_path / "ellipsis.onnx")))
    chosen = chosen_float_layers(qmodel)
    assert [v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error"] == []
    report = tensorrt_coverage(graph, chosen)
    assert sorted(r.op for r in report.fallbacks(chosen=True)) == ["Einsum", "MatMul", "MatMul"]
    assert report.fallbacks(chosen=False) == []


class _RelativePositions(nn.Module):
    """ViTDet's decomposed relative positions: an einsum of the queries and a table made from a parameter;
    RT-DETR's sine position embedding: an einsum of positions and frequencies, constants alone; a 2-d weight as
    the right operand of a matmul (SwiftFormer's ``x @ w_g``), and one as the left operand."""

    def __init__(self):
        super().__init__()
        self.q, self.head = nn.Linear(8, 8), nn.Linear(20, 3)
        self.table = nn.Parameter(torch.randn(7, 8))  # 2 * 4 - 1 relative offsets
        self.mix = nn.Parameter(torch.randn(3, 3) * torch.logspace(-2, 0, 3))  # columns 100x apart
        self.left = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):  # x [B, 4, 5, 8]
        rel = self.table[torch.arange(4)[:, None] - torch.arange(4)[None, :] + 3]  # [4, 4, 8], from the parameter
        sine = torch.einsum("w,c->wc", torch.arange(x.shape[2], dtype=x.dtype), 1e-2 ** torch.arange(8) / 8).sin()
        y = self.head(torch.einsum("bhwc,hkc->bhwk", self.q(x) + sine, rel).flatten(2))
        return y @ self.mix + self.left @ y


def test_matmul_operands_made_from_parameters_are_quantized_constants_and_left_weights_are_float_with_reasons(
        tmp_path):
    torch.manual_seed(0)
    calib = [(torch.randn(4, 4, 5, 8), None) for _ in range(2)]
    model = _RelativePositions().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, 2)
    assert qmodel.qframe_placed == {"einsum": 1, "matmul": 1}  # the queries with the position table; x @ mix
    assert _sites(qmodel)[""] == {"einsum": {1: ("a", "b")}, "matmul": {0: ("a", "weight_b")}}
    weight = qmodel.qframe_sites.quantizers["matmul0_weight_b"]
    # the recipe's per-channel weight grid on the weight's columns (a [K, N] weight's output channels)
    expected = model.mix.detach().abs().amax(0) / 127
    torch.testing.assert_close(weight.scale, expected, rtol=1e-6, atol=0)
    einsum, matmul = qmodel.qframe_float_layers["::Einsum"], qmodel.qframe_float_layers["::MatMul"]
    assert "einsum 'w,c->wc' reads no activation" in einsum and "runs float" in einsum
    assert "matmul reads a parameter itself" in matmul and "runs float" in matmul
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    path = export_onnx(qmodel, torch.randn(1, 4, 5, 8), tmp_path / "relative.onnx")
    graph = onnx.load(str(path))
    chosen = chosen_float_layers(qmodel)
    assert [v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error"] == []
    report = tensorrt_coverage(graph, chosen)
    assert sorted(r.op for r in report.fallbacks(chosen=True)) == ["Einsum", "MatMul"]  # the left weight's
    assert report.fallbacks(chosen=False) == []
    own = [r for r in report.rows if r.op == "MatMul" and r.module not in ("q", "head")]  # not the Linears'
    assert sorted(r.precision for r in own) == ["FP16/FP32", "INT8", "INT8"], [(r.name, r.precision) for r in own]
    x = torch.randn(3, 4, 5, 8)
    session = ort_session(str(path), level="basic")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert np.abs(got - ref).max() < 1e-5 * (1 + np.abs(ref).max())


class _FunctionalConvs(nn.Module):
    """A custom layer holding its own kernels and calling F.conv2d and F.conv_transpose2d, the second with a
    kernel scaled by the input (a dynamic convolution)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)
        self.up = nn.Parameter(torch.randn(8, 4, 2, 2) * 0.1)

    def forward(self, x):
        y = torch.relu(F.conv2d(x, self.weight, padding=1))
        return F.conv_transpose2d(y, self.up * torch.sigmoid(y.mean()), stride=2)


def test_a_convolution_called_as_a_function_outside_a_conv_module_is_named_float_with_the_reason(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), _FunctionalConvs(), nn.Conv2d(4, 2, 1)).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(4, 3, 16, 16)], 1)
    floats = qmodel.qframe_float_layers
    assert set(floats) == {"2::Conv", "2::ConvTranspose"}
    assert "F.conv2d with a parameter of its module as weight, not an nn.Conv2d" in floats["2::Conv"]
    assert "F.conv_transpose2d with a tensor computed in forward as weight" in floats["2::ConvTranspose"]
    assert all("register_module" in why for why in floats.values())
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx

    graph = onnx.load(str(export_onnx(qmodel, torch.randn(1, 3, 16, 16), tmp_path / "functional.onnx")))
    chosen = chosen_float_layers(qmodel)
    found = lint_tensorrt(graph, chosen)
    assert [v.message for v in found if v.severity == "error"] == [] and len(found) == 2
    report = tensorrt_coverage(graph, chosen)
    assert report.fallbacks(chosen=False) == []
    assert sorted(r.op for r in report.fallbacks(chosen=True)) == ["Conv", "ConvTranspose"]


class _MatrixProducts(nn.Module):
    """The other ways to write a matmul: torch.mm of activations, addmm with a weight (transformers' Conv1D,
    once positional, once by keyword), baddbmm and addbmm of activations."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.w = nn.Parameter(torch.randn(8, 5) * torch.logspace(-1, 0, 5))  # columns 10x apart
        self.v = nn.Parameter(torch.randn(8, 5))
        self.b = nn.Parameter(torch.randn(5))

    def forward(self, x):  # x [10, 6]
        h = self.a(x)
        y = torch.mm(h, h.t()) @ h[:, :5]
        y = y + torch.addmm(self.b, h, self.w) + self.b.addmm(mat1=h, mat2=self.v)
        hb = h.reshape(2, 5, 8)
        z = torch.baddbmm(hb[..., :5], hb, hb.transpose(1, 2)).reshape_as(y)
        return y + z + torch.addbmm(self.b, hb[..., :5].transpose(1, 2), hb[..., :5])[:1]


def test_mm_addmm_baddbmm_and_addbmm_quantize_their_operands_and_equal_the_quantized_reference(tmp_path):
    torch.manual_seed(0)
    model = _MatrixProducts().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(10, 6) for _ in range(2)], 2)
    assert qmodel.qframe_float_layers == {}
    assert _sites(qmodel)[""] == {"matmul": {0: ("a", "b"), 1: ("a", "b")},
                                  "addmm": {0: ("a", "weight_b"), 1: ("a", "weight_b"), 2: ("a", "b"), 3: ("a", "b")}}
    sites = qmodel.qframe_sites.quantizers
    # the weights of addmm: per output channel (the columns of [K, N]) on the recipe's grid
    torch.testing.assert_close(sites["addmm0_weight_b"].scale, model.w.detach().abs().amax(0) / 127, rtol=1e-6, atol=0)
    x = torch.randn(10, 6)  # fresh: the reference applies the same quantizers, in float64
    with torch.no_grad():
        q = {name: (lambda t, m=m: m(t.float()).double()) for name, m in sites.items()}
        h = qmodel.a(x).double()
        b, w, v = model.b.double(), model.w.detach().double(), model.v.detach().double()
        y = q["matmul1_a"](q["matmul0_a"](h) @ q["matmul0_b"](h.t())) @ q["matmul1_b"](h[:, :5])
        y = y + b + q["addmm0_a"](h) @ q["addmm0_weight_b"](w) + b + q["addmm1_a"](h) @ q["addmm1_weight_b"](v)
        hb = h.reshape(2, 5, 8)
        z = (hb[..., :5] + q["addmm2_a"](hb) @ q["addmm2_b"](hb.transpose(1, 2))).reshape_as(y)
        last = (q["addmm3_a"](hb[..., :5].transpose(1, 2)) @ q["addmm3_b"](hb[..., :5])).sum(0) + b
        expected = y + z + last[:1]
        got = qmodel(x).double()
    assert (got - expected).abs().max() < 1e-4 * (1 + expected.abs().max())
    assert (got - model(x).double()).abs().max() > 0  # quantized, not the float model
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    path = export_onnx(qmodel, torch.randn(10, 6), tmp_path / "products.onnx")
    report = tensorrt_coverage(onnx.load(str(path)), chosen_float_layers(qmodel))
    assert report.fallbacks() == [], [(r.name, r.reason) for r in report.fallbacks()]
    session = ort_session(str(path), level="basic")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - got.float().numpy()).max() < 1e-4 * (1 + np.abs(out).max())


class _TokenAttention(nn.Module):
    """Integer token ids in, an embedding, an attention: its matmuls read activations made from the ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(11, 8), nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, ids):
        q, k, v = self.qkv(self.embed(ids)).chunk(3, dim=-1)
        return self.head((torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v).mean(1))


def test_token_ids_make_activations_so_attention_on_their_embedding_is_quantized():
    torch.manual_seed(0)
    qmodel = qframe.ptq(_TokenAttention().eval(), qframe.preset("w8a8"), [torch.randint(0, 11, (4, 6))], 1)
    assert qmodel.qframe_float_layers == {}
    assert _sites(qmodel)[""] == {"matmul": {0: ("a", "b"), 1: ("a", "b")}}


def test_the_coverage_line_counts_the_ops_placement_leaves_float(caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="qframe"):
        qframe.ptq(_RelativePositions().eval(), qframe.preset("w8a8"), [torch.randn(4, 4, 5, 8)], 1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("quantize_ w8a8: quantized"))
    assert "nothing left float" not in line
    assert "Einsum x1 (einsum 'w,c->wc' reads no activation" in line and "MatMul x1 (matmul reads a parameter" in line


class _Rotary(nn.Module):
    """Token ids and integer positions in; the positions become rotary angles (a matmul of frequencies and
    positions, a concat), which must stay float: quantized, the angles of far positions are ruined."""

    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))

    def forward(self, ids, positions):
        h = self.fc(self.embed(ids))
        freqs = (self.inv_freq[None, :, None].expand(positions.shape[0], -1, 1) @ positions[:, None, :].float())
        angles = torch.cat([freqs, freqs], 1).transpose(1, 2)
        return h * angles.cos() + h * angles.sin()


def test_angles_made_from_integer_positions_stay_float_while_token_embeddings_are_activations():
    torch.manual_seed(0)
    model = _Rotary().eval()
    ids, positions = torch.randint(0, 50, (2, 256)), torch.arange(256).expand(2, 256).clone()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(ids, positions)], 1, input_fn=lambda b: b)
    assert getattr(qmodel, "qframe_placed", {}) == {}  # neither the frequency matmul nor the concat
    with torch.no_grad():
        ref, out = model(ids, positions), qmodel(ids, positions)
    assert (out - ref).norm() / ref.norm() < 0.03


class _Switch(nn.Module):
    """A concat whose form changes after the graph was read (a cache that starts empty, a branch taken once)."""

    def __init__(self):
        super().__init__()
        self.fc, self.read = nn.Linear(8, 8), True

    def forward(self, x):
        h = self.fc(x)
        if self.read:
            return torch.cat([h, h], -1)
        return torch.cat([torch.zeros(0), h.flatten()], 0).reshape(h.shape).repeat(1, 2)


def test_a_placed_call_that_comes_in_another_form_is_left_alone_and_its_site_named_float():
    torch.manual_seed(0)
    model = _Switch().eval()
    x = torch.randn(4, 8)
    qframe.quantize_(model, qframe.preset("w8a8"), example=x)
    assert _sites(model)[""] == {"cat": {0: ("inputs",)}}
    model.read = False  # the calls of kind cat now come otherwise: the empty tensor must not reach the quantizer
    qframe.calibrate(model, [x], 1)
    assert model.qframe_float_layers == {"::cat0_inputs": "did not run on the calibration batches (no range to "
                                                           "quantize with)"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.cat([model.fc(x), model.fc(x)], -1), rtol=0.05, atol=0.05)


class _KeywordOperands(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.w, self.b = nn.Linear(8, 8), nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.zeros(8))

    def forward(self, x):
        h = self.fc(x)
        return torch.mm(h, mat2=self.w) + torch.matmul(h, other=h.t()) @ h + torch.addmm(self.b, mat1=h, mat2=self.w)


def test_matmul_operands_given_by_keyword_are_found_and_quantized():
    torch.manual_seed(0)
    model = _KeywordOperands().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(4, 8) for _ in range(2)], 2)
    assert _sites(qmodel)[""] == {"matmul": {0: ("a", "weight_b"), 1: ("a", "b"), 2: ("a", "b")},
                                  "addmm": {0: ("a", "weight_b")}}
    x = torch.randn(4, 8)
    q = qmodel.qframe_sites.quantizers
    with torch.no_grad():
        h = qmodel.fc(x)
        expected = (q["matmul0_a"](h) @ q["matmul0_weight_b"](model.w)
                    + q["matmul2_a"](q["matmul1_a"](h) @ q["matmul1_b"](h.t())) @ q["matmul2_b"](h)
                    + model.b + q["addmm0_a"](h) @ q["addmm0_weight_b"](model.w))
        torch.testing.assert_close(qmodel(x), expected, rtol=1e-5, atol=1e-5)


class _MergedThenAdded(nn.Module):
    """RepVGG-style branches (merged into one convolution by PTQ) and a residual add after them."""

    def __init__(self):
        super().__init__()
        self.k3, self.k1, self.after = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.k3(x) + self.k1(x))
        return self.after(y) + y


def test_placement_reads_a_model_whose_branches_merged():
    """A merged-away branch returns a marker that refuses every use but an add; reading the graph must not touch
    it (it did, and placement gave up on the whole model: RT-DETR's backbone)."""
    torch.manual_seed(0)
    qmodel = qframe.ptq(_MergedThenAdded().eval(), qframe.preset("w8a8"), [torch.randn(4, 8, 6, 6)], 1)
    assert qmodel.qframe_merged_branches == {"k3": ["k1"]}
    assert qmodel.qframe_placed == {"add": 1}


class _MaskedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.masked = nn.Linear(8, 24), False

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril() if self.masked else None
        return F.scaled_dot_product_attention(q, k, v, mask)


def test_an_attention_keeps_its_quantizers_when_a_mask_comes_with_it_later():
    torch.manual_seed(0)
    model = _MaskedAttention().eval()
    x = torch.randn(2, 5, 8)
    qframe.quantize_(model, qframe.preset("w8a8"), example=x)
    model.masked = True  # the graph was read without the optional mask
    qframe.calibrate(model, [x], 1)
    assert model.qframe_float_layers == {} and all(q.calibrated for _, q in quantizers(model))


def test_a_whole_placed_model_saved_and_loaded_in_a_new_process_applies_its_sites(tmp_path):
    """torch.save of the model itself: in a new process nothing had installed the hooks that apply the placed
    quantizers (matmul, add, concat, pool), so the loaded model ran them float without a word."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    qmodel = _ptq(Block().eval())
    x = torch.randn(2, 8, 6, 6)
    path = tmp_path / "model.pt"
    torch.save({"model": qmodel, "x": x}, path)
    with torch.no_grad():
        want = qmodel(x)
    code = (f"import sys, torch; torch.set_num_threads({torch.get_num_threads()}); "  # the same sums
            "d = torch.load(sys.argv[1], weights_only=False); "
            "torch.save(d['model'](d['x']).detach(), sys.argv[2])")
    out = tmp_path / "out.pt"
    here = str(Path(__file__).parent)  # where the pickled Block's module is found
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code, str(path), str(out)], check=True, cwd=tmp_path, env=env)
    assert torch.equal(torch.load(out), want)
