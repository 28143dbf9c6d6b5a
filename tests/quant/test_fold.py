"""BN folding keeps a model's outputs, on zoo models and on a hand-made one."""

import copy

import pytest
import torch
from torch import nn

from qframe.models import build_model
from qframe.quant.fold import find_conv_bn_pairs, fold_bn


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "compact_cnn"])
def test_fold_keeps_outputs(name, normalise_bn):
    """Folded in float64, a zoo model computes what it did to float64 rounding; folded in float32, it stays
    within float32's own rounding of the unfolded model (MobileNetV2 amplifies that: 1.5e-5-3.1e-5 of the
    output)."""
    x = torch.randn(4, 3, 32, 32)
    model = normalise_bn(build_model(name, num_classes=7, in_channels=3, image_size=32, width_mult=0.5), x).eval()
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = wide(x.double())
        unfolded = model(x).double()
        assert len(fold_bn(wide)) == bns, "every BN of a zoo model follows its conv and must fold"
        assert len(fold_bn(model)) == bns
        folded_wide, folded = wide(x.double()), model(x).double()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    def rel(out):
        return float((out - ref).norm() / ref.norm())

    assert rel(folded_wide) < 1e-12, rel(folded_wide)
    assert rel(folded) < 2 * rel(unfolded) + 1e-6, (rel(folded), rel(unfolded))


class _Branchy(nn.Module):
    """A conv whose output also feeds something else must not be folded."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.b(x)
        return self.bn_a(self.a(x)) + self.bn_b(y) + y


def test_only_exclusive_conv_bn_pairs_fold(randomise_bn):
    model = _Branchy().eval()
    randomise_bn(model)
    assert find_conv_bn_pairs(model) == [("a", "bn_a")]
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x)
        fold_bn(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(model.bn_a, nn.Identity) and isinstance(model.bn_b, nn.BatchNorm2d)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU())

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.body(x)


def test_untraceable_models_fold_sequential_pairs(randomise_bn):
    model = _Untraceable().eval()
    randomise_bn(model)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        assert fold_bn(model) == [("body.0", "body.1")]
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


class _UserModel(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it), Linear + BatchNorm1d over flattened tokens,
    a Conv1d + BatchNorm1d, a norm fused with its activation, and a conv whose output also feeds a skip."""

    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, n):
            super().__init__(n)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = self.BatchNormAct2d(8)
        self.skip_conv, self.skip_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.proj, self.bn_tokens = nn.Linear(8, 12), nn.BatchNorm1d(12)

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent branch: fx cannot trace this
            x = self.bn(self.conv(x))
        y = self.skip_conv(x)
        x = self.skip_bn(y) + y  # y feeds the add too: folding skip_bn would change the output
        t = self.bn1(self.c1(x.flatten(2)))  # [B, 8, HW]
        tokens = self.proj(t.transpose(1, 2))  # [B, HW, 12]
        return self.bn_tokens(tokens.flatten(0, 1)).reshape_as(tokens)


def test_fold_by_execution_on_an_untraceable_model(randomise_bn):
    torch.manual_seed(3)
    model = randomise_bn(_UserModel()).eval()
    for bn in (model.bn1, model.bn_tokens):  # BatchNorm1d: randomise_bn only touches BatchNorm2d
        bn.running_mean.normal_(0, 0.4), bn.running_var.uniform_(0.2, 3.0), bn.weight.data.normal_(1, 0.3)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        ref = model(x).double()
        pairs = fold_bn(model, example=x)
        out = model(x).double()
    assert sorted(pairs) == [("c1", "bn1"), ("conv", "bn"), ("proj", "bn_tokens")]
    assert isinstance(model.bn, nn.ReLU)  # the fused norm's activation stays
    assert "skip_bn" in model.qframe_unfolded_norms and isinstance(model.skip_bn, nn.BatchNorm2d)
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_without_an_example_an_untraceable_model_folds_only_what_is_safe(caplog):
    model = _UserModel().eval()
    with caplog.at_level("WARNING"):
        pairs = fold_bn(model)
    assert pairs == []  # no nn.Sequential to fall back on
    assert "does not trace with torch.fx" in caplog.text and "stay unfolded" in caplog.text
    assert set(model.qframe_unfolded_norms) == {"bn", "skip_bn", "bn1", "bn_tokens"}
    why = model.qframe_unfolded_norms["bn1"]  # neither way: into the layer before it nor into the one after
    assert "input is not the output of one Conv/Linear" in why and "nor its output the input of one Linear" in why


class _NormThenLinear(nn.Module):
    """A classifier head that normalises its features before the Linear (LeViT's), square and not."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.fc_a = nn.BatchNorm1d(8), nn.Linear(8, 8)
        self.bn_b, self.fc_b = nn.BatchNorm1d(8), nn.Linear(8, 3, bias=False)

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: found by running it
            x = torch.relu(self.fc_a(self.bn_a(x)))
        return self.fc_b(self.bn_b(x))


class _NormThenLinearTraceable(_NormThenLinear):
    def forward(self, x):
        return self.fc_b(self.bn_b(torch.relu(self.fc_a(self.bn_a(x)))))


@pytest.mark.parametrize("kind", [_NormThenLinearTraceable, _NormThenLinear])
def test_a_batchnorm_before_a_linear_folds_into_it(kind):
    torch.manual_seed(5)
    model = kind().double().eval()
    if kind is _NormThenLinearTraceable:
        assert sorted(find_conv_bn_pairs(model)) == [("bn_a", "fc_a"), ("bn_b", "fc_b")]  # by torch.fx, no example
    for bn in (model.bn_a, model.bn_b):
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_(1, 0.3), bn.bias.data.normal_(0, 0.3)
    x = torch.randn(32, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_bn(model, example=x)
        out = model(x)
    assert sorted(pairs) == [("bn_a", "fc_a"), ("bn_b", "fc_b")]  # data-flow order: the norm first
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: tokens through a Linear, normalised as one batch, and shaped back by reading the
    Linear's output shape (``reshape_as``): traceable, and the Linear's output has a second, shape-only user."""

    def __init__(self):
        super().__init__()
        self.linear, self.bn = nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.linear(x)
        x = self.bn(x.flatten(0, 1)).reshape_as(x)
        return self.head(x.mean(1) * x.size(1) / x.shape[1])


@pytest.mark.parametrize("with_example", [True, False])
def test_a_linear_whose_output_shape_is_read_again_still_folds_its_batchnorm(with_example):
    torch.manual_seed(6)
    model = _LinearNorm().double().eval()
    bn = model.bn
    bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0), bn.weight.data.normal_(1, 0.3)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_bn(model, example=x if with_example else None)
        out = model(x)
    assert pairs == [("linear", "bn")] and model.qframe_unfolded_norms == {}
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _PadSameConv(nn.Conv2d):
    """timm's Conv2dSame: TensorFlow 'SAME' padding computed from the input size in forward, then its own
    weight and bias: forward is overridden, yet the BN after it folds into that weight."""

    def forward(self, x):
        h, w = x.shape[-2:]
        ph = max((-(-h // self.stride[0]) - 1) * self.stride[0] + self.kernel_size[0] - h, 0)
        pw = max((-(-w // self.stride[1]) - 1) * self.stride[1] + self.kernel_size[1] - w, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _StandardizedConv(nn.Conv2d):
    """Weight standardization (BiT, timm's StdConv2d): a BN folded into the weight would be standardized away."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class _OverriddenProducers(nn.Module):
    def __init__(self):
        super().__init__()
        self.same, self.bn_same = _PadSameConv(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.std, self.bn_std = _StandardizedConv(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn_std(self.std(torch.relu(self.bn_same(self.same(x)))))


def test_a_batchnorm_after_a_conv_that_overrides_forward_folds_where_the_outputs_check(randomise_bn):
    torch.manual_seed(7)
    model = randomise_bn(_OverriddenProducers()).eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model(x).double()
        pairs = fold_bn(model, example=x)
        out = model(x).double()
    assert pairs == [("same", "bn_same")]
    assert isinstance(model.bn_std, nn.BatchNorm2d)
    assert "_StandardizedConv overrides its base's forward" in model.qframe_unfolded_norms["bn_std"]
    assert ((out - ref).norm() / ref.norm()) < 1e-5


def test_without_an_example_a_conv_that_overrides_forward_keeps_its_batchnorm_and_says_why(randomise_bn):
    model = randomise_bn(_OverriddenProducers()).eval()
    assert fold_bn(model) == []
    assert set(model.qframe_unfolded_norms) == {"bn_same", "bn_std"}
    assert "same (_PadSameConv) overrides its base's forward" in model.qframe_unfolded_norms["bn_same"]


class _NormDropLinear(nn.Module):
    """timm LeViT's NormLinear head: BatchNorm1d, Dropout, Linear (the dropout passes its input on in eval)."""

    def __init__(self):
        super().__init__()
        self.bn, self.drop, self.fc = nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(self.bn(x)))


def test_a_batchnorm_folds_into_the_linear_after_a_dropout():
    torch.manual_seed(8)
    model = _NormDropLinear().double().eval()
    bn = model.bn
    bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0), bn.weight.data.normal_(1, 0.3)
    x = torch.randn(16, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert fold_bn(model) == [("bn", "fc")] and model.qframe_unfolded_norms == {}
        out = model(x)
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _NormThenConv(nn.Module):
    """SwiftFormer's pre-norm MLP: a BatchNorm2d before a 1x1 conv; one before a grouped strided conv that pads
    nothing; and one between that conv and a 3x3 conv that pads, which folds backwards into the first."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.fc = nn.BatchNorm2d(8), nn.Conv2d(8, 12, 1)
        self.bn_b, self.grouped = nn.BatchNorm2d(12), nn.Conv2d(12, 6, 2, stride=2, groups=3, bias=False)
        self.bn_c, self.padded = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: found by running it
            x = torch.relu(self.fc(self.bn_a(x)))
        return self.padded(self.bn_c(self.grouped(self.bn_b(x))))


class _NormThenConvTraceable(_NormThenConv):
    def forward(self, x):
        return self.padded(self.bn_c(self.grouped(self.bn_b(torch.relu(self.fc(self.bn_a(x)))))))


@pytest.mark.parametrize("kind", [_NormThenConvTraceable, _NormThenConv])
def test_a_batchnorm_before_a_conv_that_pads_nothing_folds_into_it(kind):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = kind().double().eval()
    for bn in (model.bn_a, model.bn_b, model.bn_c):
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.normal_(1, 0.3), bn.bias.data.normal_(0, 0.3)
    if kind is _NormThenConvTraceable:  # by torch.fx, no example; bn_c folds backwards into the grouped conv
        assert sorted(find_conv_bn_pairs(model)) == [("bn_a", "fc"), ("bn_b", "grouped"), ("grouped", "bn_c")]
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_bn(model, example=x)
        out = model(x)
    assert sorted(pairs) == [("bn_a", "fc"), ("bn_b", "grouped"), ("grouped", "bn_c")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _NormThenPaddedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_batchnorm_before_a_conv_that_pads_stays_with_its_reason():
    model = _NormThenPaddedConv().eval()
    model.bn.running_mean.normal_(0, 0.5)
    assert find_conv_bn_pairs(model) == []
    fold_bn(model, example=torch.randn(2, 6, 5, 5))
    assert isinstance(model.bn, nn.BatchNorm2d) and "bn" in model.qframe_unfolded_norms


class _ConvNormConv(nn.Module):
    """MobileViT's conv -> BN -> 1x1 conv (no activation between): the BN folds once, into the conv before it;
    a BN read by two unpadded convs folds into the first only where the outputs check, here into neither."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 6, 1)
        self.bn2, self.fc_a, self.fc_b = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: found by running it
            x = self.fc(self.bn(self.conv(x)))
        y = self.bn2(x.relu())
        return self.fc_a(y) + self.fc_b(y)


def test_a_batchnorm_between_two_convs_folds_once_into_the_first():
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _ConvNormConv().double().eval()
    for bn in (model.bn, model.bn2):
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.3, 3.0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        pairs = fold_bn(model, example=x)
        out = model(x)
    assert pairs == [("conv", "bn")] and type(model.bn2) is nn.BatchNorm2d and "bn2" in model.qframe_unfolded_norms
    assert ((out - ref).norm() / ref.norm()) < 1e-12


class _SnappingHead(nn.Module):
    """A head that amplifies rounding, as a detection head's top-k among near-ties or a value snapped to a bin
    does (here ``sin`` of a huge gain): an exact fold's float rounding changes the output. ``conv_b``'s output
    is read by its BN and again by a skip, so folding that BN changes what the skip reads."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv_b, self.bn_b = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.snap = True

    def forward(self, x):
        if x.abs().sum() > -1:  # untraceable: pairs found by running it
            z = self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))
        out = self.bn_b(z) + z
        return torch.sin(out * 1e7) if self.snap else out


def test_a_fold_whose_rounding_a_snapping_head_amplifies_still_folds_and_one_that_changes_a_skip_does_not(randomise_bn):
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = randomise_bn(_SnappingHead()).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref, model.snap = model(x), False
        ref_smooth, model.snap = model(x), True
        pairs = fold_bn(model, example=x)
        out, model.snap = model(x), False
        out_smooth = model(x)
    assert pairs == [("conv_a", "bn_a")] and isinstance(model.bn_a, nn.Identity)
    assert "folding it into conv_b changes the model's output" in model.qframe_unfolded_norms["bn_b"]
    assert ((out_smooth - ref_smooth).norm() / ref_smooth.norm()) < 1e-5  # the fold is exact but for rounding
    assert ((out - ref).norm() / ref.norm()) > 1e-2  # which the head turns into a different output


class TorchvisionFrozenBatchNorm2d(nn.Module):
    """A frozen BatchNorm as torchvision writes it: statistics and affine parameters as buffers, ``eps`` kept."""

    def __init__(self, n, eps=1e-3):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.rand(n) + 0.5), ("bias", torch.randn(n)),
                            ("running_mean", torch.randn(n)), ("running_var", torch.rand(n) * 2 + 0.1)):
            self.register_buffer(name, value)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


def _frozen_backbone(frozen):
    """Conv -> frozen norm -> ReLU twice, then a conv whose output also feeds the residual: its norm cannot fold."""

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), frozen(8)
            self.c2, self.n2 = nn.Conv2d(8, 8, 3, padding=1), frozen(8)
            self.c3, self.n3 = nn.Conv2d(8, 8, 1), frozen(8)

        def forward(self, x):
            x = torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x))))))
            y = self.c3(x)
            return self.n3(y) + y

    return Backbone().eval()


def _frozen_norm(kind):
    """A frozen-norm class: torchvision's form above, or transformers' DETR one (eps 1e-5 written into forward)."""
    if kind == "torchvision":
        return TorchvisionFrozenBatchNorm2d
    pytest.importorskip("transformers")
    from transformers.models.detr.modeling_detr import DetrFrozenBatchNorm2d

    def detr(n):
        norm = DetrFrozenBatchNorm2d(n)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.1, 2.0)
        return norm

    return detr


@pytest.mark.parametrize("kind", ["torchvision", "detr"])
@pytest.mark.parametrize("with_example", [False, True])
def test_frozen_batchnorms_fold_into_their_convs_and_one_that_cannot_is_named(kind, with_example):
    """Detector backbones (transformers' DETR family, torchvision's) hold frozen BatchNorms: buffers, not a torch.nn
    BatchNorm. They fold like one, with or without an example input; the one whose conv output feeds a residual too
    stays, named with its reason, and the folded model computes what the float64 original does."""
    from qframe.quant.fold import is_frozen_norm

    torch.manual_seed(0)
    model = _frozen_backbone(_frozen_norm(kind))
    assert [n for n, m in model.named_modules() if is_frozen_norm(m)] == ["n1", "n2", "n3"]
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        pairs = fold_bn(model, x if with_example else None)
        out = model(x)
    assert sorted(pairs) == [("c1", "n1"), ("c2", "n2")]
    assert isinstance(model.n1, nn.Identity) and isinstance(model.n2, nn.Identity) and is_frozen_norm(model.n3)
    assert list(model.qframe_unfolded_norms) == ["n3"]
    assert (out.double() - ref).norm() / ref.norm() < 1e-6


def test_ptq_folds_frozen_batchnorms_before_quantizing():
    """qframe.ptq on a frozen-norm backbone: the folded convs are quantized, the unfoldable norm is reported."""
    import qframe
    from qframe.quant.fold import is_frozen_norm

    torch.manual_seed(0)
    model = _frozen_backbone(TorchvisionFrozenBatchNorm2d)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(torch.randn(8, 3, 12, 12), None)], num_batches=1)
    assert [n for n, m in qmodel.named_modules() if is_frozen_norm(m)] == ["n3"]
    assert list(qmodel.qframe_unfolded_norms) == ["n3"]
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
    assert (out - ref).norm() / ref.norm() < 0.05


class FrozenBatchNormAct2d(TorchvisionFrozenBatchNorm2d):
    """A frozen norm that also applies its activation, as timm's FrozenBatchNormAct2d does."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


@pytest.mark.parametrize("with_example", [False, True])
def test_a_frozen_norm_with_its_activation_folds_where_the_outputs_check_and_keeps_the_activation(with_example):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNormAct2d(8), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        pairs = fold_bn(model, x if with_example else None)
        out = model(x)
    if with_example:
        assert pairs == [("0", "1")] and isinstance(model[1], nn.ReLU) and model.qframe_unfolded_norms == {}
    else:
        assert pairs == [] and isinstance(model[1], FrozenBatchNormAct2d)
        assert "fused norm" in model.qframe_unfolded_norms["1"]
    assert (out.double() - ref).norm() / ref.norm() < 1e-6


def test_qat_folds_frozen_batchnorms_as_constants_and_trains_the_folded_convs():
    """A frozen norm's statistics never train, so QAT folds it once into its conv (BatchNorm2d pairs train
    beside theirs instead); a training step then moves the folded convs' weights."""
    import qframe
    from qframe.methods.qat import QATConfig, prepare_qat
    from qframe.quant.fold import is_frozen_norm

    torch.manual_seed(0)
    model = _frozen_backbone(TorchvisionFrozenBatchNorm2d)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
    qmodel = prepare_qat(model, qframe.preset("w8a8"), [(x, None)], 1, QATConfig())
    assert [n for n, m in qmodel.named_modules() if is_frozen_norm(m)] == ["n3"]
    assert list(qmodel.qframe_unfolded_norms) == ["n3"]
    qmodel.eval()
    with torch.no_grad():
        assert (qmodel(x) - ref).norm() / ref.norm() < 0.05
    qmodel.train()
    before = qmodel.c1.weight.detach().clone()
    loss = qmodel(x).square().mean()
    loss.backward()
    torch.optim.SGD(qmodel.parameters(), lr=0.1).step()
    assert not torch.equal(before, qmodel.c1.weight.detach())


def test_a_model_in_training_mode_folds_its_running_statistics_and_keeps_them_and_its_modes(randomise_bn, caplog):
    """In training mode a BatchNorm normalises by the batch, so checking a fold on the example in that mode kept
    every norm unfolded (each "changes the model's output") and each run moved the running statistics being
    folded (0.35 of the eval output off afterwards). The example now runs in eval mode: every norm folds, the
    folded model computes what the model did in eval, and each module is left in the mode it was in."""
    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                                       nn.BatchNorm2d(4), nn.Dropout(0.5)))
    model[2].eval()  # a module already in eval mode stays there
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        ref = copy.deepcopy(model).eval()(x)
    with caplog.at_level("WARNING", logger="qframe.quant.fold"):
        pairs = fold_bn(model, x)
    assert pairs == [("0", "1"), ("3", "4")] and model.qframe_unfolded_norms == {}
    assert "in training mode" in caplog.text
    assert model.training and model[0].training and not model[2].training and model[5].training
    with torch.no_grad():
        out = model.eval()(x)
    assert float((out - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_folds_its_batchnorms_by_running(dtype, randomise_bn):
    """The folded model's outputs were checked at 1e-4, below float16 / bfloat16 rounding: no BatchNorm of a
    half-precision model that torch.fx cannot trace folded (all named 'changes the model's output')."""
    import qframe

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace it
                return x
            return self.body(x)

    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(Untraceable()).eval().to(dtype)
    x = torch.randn(4, 3, 10, 10, dtype=dtype)
    with torch.no_grad():
        want = model(x).double()
    pairs = qframe.fold_bn(model, x)
    assert sorted(pairs) == [("body.0", "body.1"), ("body.3", "body.4")]
    with torch.no_grad():
        got = model(x).double()
    assert (got - want).norm() <= 4 * torch.finfo(dtype).eps * want.norm()
