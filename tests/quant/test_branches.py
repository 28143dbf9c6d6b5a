"""Summed convolution branches (RepVGG-style blocks: TextNet, PP-LCNetV3) merge into one convolution."""

import pytest
import torch
from torch import nn

import qframe
from qframe.quant.branches import MergedBranch
from qframe.quant.fold import fold_bn
from qframe.quant.modules import QUANT_LAYERS, quantizers


def _conv_bn(c, kernel, padding, groups=1, dilation=1):
    return nn.Sequential(nn.Conv2d(c, c, kernel, padding=padding, groups=groups, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c))


class _RepBlock(nn.Module):
    """A learnable rep layer: a BatchNorm of the input (the identity branch), a 1 x 1, a 3 x 3, a 3 x 1 and a
    1 x 3 convolution with their BatchNorms, summed; ``reads_again``: the 1 x 3 branch's output is read
    again; ``dilated``: the 3 x 3 is dilated (its kernel is not centred the others' way)."""

    def __init__(self, c=8, groups=1, reads_again=False, dilated=False, snap=False):
        super().__init__()
        self.snap = snap  # a head that amplifies rounding, as a detector's top-k among near-ties does
        self.identity = nn.BatchNorm2d(c)
        self.small = _conv_bn(c, 1, 0, groups)
        self.main = _conv_bn(c, 3, 2 if dilated else 1, groups, dilation=2 if dilated else 1)
        self.vertical, self.horizontal = _conv_bn(c, (3, 1), (1, 0), groups), _conv_bn(c, (1, 3), (0, 1), groups)
        self.head, self.reads_again = nn.Conv2d(c, 4, 1), reads_again

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: found by running it
            out = self.identity(x)
        for branch in (self.small, self.main, self.vertical):
            out = out + branch(x)
        last = self.horizontal(x)
        y = self.head(torch.relu(out + last))
        y = y + last.mean() if self.reads_again else y
        return torch.sin(y * 1e7) if self.snap else y


def _randomised(model, randomise_bn):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    return randomise_bn(model).double().eval()


@pytest.mark.parametrize("groups, snap", [(1, False), (4, False), (1, True)])
def test_summed_branches_and_the_identity_batchnorm_merge_into_the_largest_convolution(groups, snap, randomise_bn):
    """``snap``: in float32 behind a head that amplifies rounding, the exact merge changes the output and
    still stands (the merged model given the branches' own sum computes the output from before)."""
    model = _randomised(_RepBlock(groups=groups, snap=snap), randomise_bn)
    model = model.float() if snap else model
    x = torch.randn(2, 8, 9, 9, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        model.snap = False
        smooth_ref = model(x)
        model.snap = snap
        ref = model(x)
        fold_bn(model, example=x)
        out = model(x)
        model.snap = False
        smooth = model(x)
    assert model.qframe_merged_branches == {"main.0": ["identity", "small.0", "vertical.0", "horizontal.0"]}
    assert all(isinstance(m, MergedBranch) for m in (model.identity, model.small[0], model.vertical[0]))
    assert model.qframe_unfolded_norms == {}
    assert ((smooth - smooth_ref).norm() / smooth_ref.norm()) < (1e-5 if snap else 1e-12)
    if snap:
        assert ((out - ref).norm() / ref.norm()) > 1e-2  # the head turned the merge's rounding into another output


@pytest.mark.parametrize("kind", ["reads_again", "dilated"])
def test_branches_that_cannot_merge_stay_apart_and_the_model_computes_the_same(kind, randomise_bn, caplog):
    model = _randomised(_RepBlock(**{kind: True}), randomise_bn)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad(), caplog.at_level("INFO", logger="qframe"):
        ref = model(x)
        fold_bn(model, example=x)
        out = model(x)
    if kind == "reads_again":  # the last branch is read twice: the sum before it merges
        assert model.qframe_merged_branches == {"main.0": ["identity", "small.0", "vertical.0"]}
    else:
        assert model.qframe_merged_branches == {} and "main.0 differs from" not in caplog.text
        assert "differs from main.0 in stride, dilation" in caplog.text
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _NormAct(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d(apply_act=False)``: a BatchNorm2d whose own forward applies an activation that is none."""

    def __init__(self, c):
        super().__init__(c)
        self.drop, self.act = nn.Identity(), nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class _InPlaceRepBlock(nn.Module):
    """timm's RepVGG / MobileOne forward: the identity BatchNorm's output first, then a sum started at 0 and grown
    in place (``out += branch(x)``), the identity (a norm fused with no activation) added last, in place too.
    ``explicit``: branches added with ``a.add_(b)`` and ``a.add_(b, alpha=1.0)`` as statements, which no
    sum-finding run can follow (the result is not rebound)."""

    def __init__(self, c=8, explicit=False):
        super().__init__()
        self.explicit = explicit
        self.identity, self.scale = _NormAct(c), _conv_bn(c, 1, 0)
        self.kxk = nn.ModuleList([_conv_bn(c, 3, 1) for _ in range(2)])
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: found by running it
            identity = self.identity(x)
        out = 0
        out += self.scale(x)
        for i, branch in enumerate(self.kxk):
            if self.explicit:
                out.add_(branch(x), **({"alpha": 1.0} if i else {}))
            else:
                out += branch(x)
        out += identity
        return self.head(torch.relu(out))


@pytest.mark.parametrize("explicit", [False, True])
def test_branches_summed_in_place_from_zero_merge_and_an_explicit_add_stays_apart(explicit, randomise_bn):
    model = _randomised(_InPlaceRepBlock(explicit=explicit), randomise_bn)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        fold_bn(model, example=x)
        out = model(x)
    if explicit:
        assert model.qframe_merged_branches == {} and list(model.qframe_unfolded_norms) == ["identity"]
    else:
        assert model.qframe_merged_branches == {"kxk.0.0": ["scale.0", "kxk.1.0", "identity"]}
        assert model.qframe_unfolded_norms == {}
    assert ((out - ref).norm() / ref.norm()) < 1e-12


@pytest.mark.parametrize("block, layers_apart", [("plain", 5), ("in_place", 4)])
def test_the_merged_block_exports_one_convolution_and_no_adds(block, layers_apart, tmp_path, randomise_bn):
    onnx = pytest.importorskip("onnx")
    from qframe.export.onnx import export_onnx

    model = _randomised({"plain": _RepBlock, "in_place": _InPlaceRepBlock}[block](), randomise_bn).float()
    x = torch.randn(2, 8, 9, 9)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(x, None)], 1)
    assert sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) == 2  # the merged 3 x 3 and the head
    graph = onnx.load(str(export_onnx(qmodel, x[:1], tmp_path / "rep.onnx"))).graph
    assert sorted(n.op_type for n in graph.node if n.op_type in ("Conv", "Add", "BatchNormalization")) == ["Conv", "Conv"]
    apart = qframe.ptq(model, qframe.preset("w8a8", merge_branches=False), [(x, None)], 1)
    assert sum(isinstance(m, QUANT_LAYERS) for m in apart.modules()) == layers_apart
    assert list(apart.qframe_unfolded_norms) == ["identity"]
    for _, q in quantizers(qmodel):  # with its quantizers off, the merged model computes the float one
        q.enabled = False
    with torch.no_grad():
        assert float((qmodel(x) - model(x)).norm() / model(x).norm()) < 1e-5
