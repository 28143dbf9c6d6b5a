"""Coverage claims of placement: the ops it leaves float are named, under activation and weight-only recipes."""

import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qframe
from qframe.quant.placement import SiteQuantizers


class _OtherProducts(nn.Module):
    """Products written with the ops placement does not quantize: tensordot with a weight, mv and inner of
    activations; and one of parameters alone (constant maths, not an activation op)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.w = nn.Parameter(torch.randn(8, 6))
        self.v = nn.Parameter(torch.randn(6))

    def forward(self, x):  # x [B, 8]
        h = self.fc(x)
        u = self.w @ self.v  # parameters only: constant maths
        y = torch.tensordot(h, self.w, dims=1) + torch.mv(h, u).unsqueeze(1)
        return y + torch.inner(h[:, :6], y).sum(1, keepdim=True)


def test_products_placement_does_not_quantize_are_named_float_and_the_export_agrees(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _OtherProducts()).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(4, 8) for _ in range(2)], 2)
    floats = qmodel.qframe_float_layers
    assert set(floats) == {"1::MatMul"}, floats
    why = floats["1::MatMul"]
    assert "torch.tensordot, torch.mv, torch.inner (not placed" in why and "einsum" in why
    assert "reads a parameter itself" in why  # w @ v: named, but as what it is, and only once
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.onnx import export_onnx

    graph = onnx.load(str(export_onnx(qmodel, torch.randn(2, 8), tmp_path / "products.onnx")))
    report = tensorrt_coverage(graph, chosen_float_layers(qmodel))
    assert report.fallbacks(chosen=False) == [], [(r.name, r.op) for r in report.fallbacks(chosen=False)]
    assert {r.op for r in report.fallbacks(chosen=True)} == {"MatMul"}


class _OwnWeights(nn.Module):
    """Weights used outside Conv/Linear modules: F.linear, x @ W.t(), tensordot; and a product of activations."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(16, 16), nn.Linear(16, 4)
        self.w, self.v = nn.Parameter(torch.randn(16, 16)), nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        h = self.inp(x)
        h = F.linear(h, self.w) + h @ self.v.t() + torch.tensordot(h, self.v, dims=1)
        return self.out(h @ h.t() @ h)


def test_a_weight_only_recipe_names_the_weights_it_leaves_float_and_only_those(caplog):
    """Placement did not run without activation quantizers: "nothing left float" while 3 of 4 weights were."""
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="qframe.quant.recipe"):
        qmodel = qframe.ptq(_OwnWeights().eval(), qframe.preset("w4a16"), [torch.randn(4, 16)], 1)
    why = qmodel.qframe_float_layers.pop("::MatMul")
    assert qmodel.qframe_float_layers == {}
    assert "F.linear with a parameter of its module as weight" in why
    assert "matmul, torch.tensordot reads a parameter as an operand" in why and "its weight stays float" in why
    assert "nothing left float" not in caplog.text
    assert not any(isinstance(m, SiteQuantizers) for m in qmodel.modules())  # nothing placed: activations stay float
    with torch.no_grad():  # and the model computes what the float model does but with 4-bit Linear weights
        x = torch.randn(3, 16)
        assert torch.isfinite(qmodel(x)).all()


def test_quantize_without_an_example_says_that_it_read_modules_only(caplog):
    with caplog.at_level(logging.INFO, logger="qframe.quant.recipe"):
        qframe.quantize_(_OwnWeights().eval(), qframe.preset("w8a8"))
    assert "modules only: without an example batch" in caplog.text
