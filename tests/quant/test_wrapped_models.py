"""Models as users hand them over: old-style weight_norm / spectral_norm layers, a torch.compile wrapper, a
TorchScript module."""

import copy
import warnings

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.quant.modules import QuantConv2d, QuantLinear
from qframe.utils.modules import copy_model


def _net():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net[1].running_mean.normal_(0, 0.3)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def _old_style_norms(net):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still common
        torch.nn.utils.weight_norm(net[0])
        torch.nn.utils.spectral_norm(net[7])
    return net.eval()


def _sqnr(a, b):
    return float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum()))


def test_old_style_weight_and_spectral_norm_layers_are_baked_into_the_quantized_copy(caplog):
    torch.manual_seed(torch.seed() % 2**31)
    model = _old_style_norms(_net())
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with caplog.at_level("INFO", logger="qframe"):
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    assert "parametrizations of 2 layers baked into their weights: 0 (WeightNorm), 7 (SpectralNorm)" in caplog.text
    assert isinstance(qmodel[0], QuantConv2d) and isinstance(qmodel[7], QuantLinear)
    assert isinstance(qmodel[0].weight, nn.Parameter) and not qmodel[0]._forward_pre_hooks
    assert isinstance(qmodel[1], nn.Identity), "the BatchNorm after the weight-normed conv folds"
    with torch.no_grad():
        assert _sqnr(want, qmodel(x)) > 30
        # the user's model keeps its hooks and parameters, and computes what it did
        assert torch.equal(model(x), want)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_copy_model_copies_old_style_norm_layers_which_still_recompute_their_weight():
    torch.manual_seed(torch.seed() % 2**31)
    model = _old_style_norms(_net())
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)  # what qframe.ptq met before
    twin = copy_model(model)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        twin[0].weight_g.mul_(2)  # the copy's own parameters: its hook recomputes its weight from them
        assert torch.allclose(twin[0](x) - twin[0].bias.view(1, -1, 1, 1),
                              2 * (model[0](x) - model[0].bias.view(1, -1, 1, 1)), atol=1e-5)


def test_a_compiled_model_is_quantized_through_the_module_it_wraps(caplog):
    torch.manual_seed(torch.seed() % 2**31)
    model = _net()
    x = torch.randn(16, 3, 12, 12)
    with caplog.at_level("INFO", logger="qframe"):
        from_compiled = qframe.ptq(torch.compile(model), qframe.preset("w8a8"), [x], 1)
    assert "quantizing the module torch.compile wraps" in caplog.text
    plain = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    assert type(from_compiled) is nn.Sequential and from_compiled.qframe_unfolded_norms == {}
    with torch.no_grad():
        assert torch.equal(from_compiled(x), plain(x))
    compiled = torch.compile(_net())
    assert qframe.quantize_(compiled, qframe.preset("w8a8")) is compiled  # in place, through the module it wraps
    assert isinstance(compiled._orig_mod[0], QuantConv2d)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script: still how users get such modules
def test_a_torchscript_module_is_one_line_naming_what_to_pass():
    scripted = torch.jit.script(_net())
    with pytest.raises(QFrameError, match="TorchScript module .* valid: the model before torch.jit.script"):
        qframe.ptq(scripted, qframe.preset("w8a8"), [torch.randn(2, 3, 12, 12)], 1)


def test_parametrized_layers_export_their_weights_on_the_grid_and_stay_parametrized(tmp_path, caplog):
    """torch.nn.utils.parametrizations' spectral_norm and weight_norm at w4a8, kept as QAT keeps them: the file
    holds each weight as the constant it computes, put on its 4-bit grid, and runs as the PyTorch model does
    (before, the sub-8-bit weights were written off their grid, 3e-3 of the logits off, and spectral_norm fell
    back to the dynamo exporter); the model exported keeps its parametrizations."""
    pytest.importorskip("onnxruntime")
    from torch.nn.utils import parametrizations

    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_parity

    torch.manual_seed(torch.seed() % 2**31)
    model = _net()
    parametrizations.spectral_norm(model[3])
    parametrizations.weight_norm(model[7])
    calib = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    qmodel = qframe.ptq(model.eval(), qframe.preset("w4a8"), calib, 2, keep_parametrizations=True)
    with torch.no_grad():
        before = qmodel(calib[0])
    with caplog.at_level("WARNING", logger="qframe"):
        path = export_onnx(qmodel, calib[0], tmp_path / "m.onnx")
    assert "dynamo exporter" not in caplog.text
    parity = ort_parity(path, qmodel, [(x, torch.zeros(8, dtype=torch.long)) for x in calib], levels=("basic",))
    assert parity["basic"]["max_logit_diff"] <= 1e-5 * float(before.abs().max()) + 1e-6
    assert hasattr(qmodel[3], "parametrizations") and hasattr(qmodel[7], "parametrizations")
    with torch.no_grad():
        assert torch.equal(qmodel(calib[0]), before)


def _pruned(net):
    from torch.nn.utils import prune

    prune.l1_unstructured(net[0], "weight", amount=0.5)
    prune.ln_structured(net[3], "weight", amount=0.25, n=2, dim=0)
    prune.random_unstructured(net[7], "weight", amount=0.3)
    return net


def test_a_pruned_model_quantizes_with_its_zeros_and_stays_pruned_itself(caplog):
    """torch.nn.utils.prune's layers (a weight recomputed as weight_orig * weight_mask by a hook) crashed
    qframe.ptq in deepcopy; now every layer quantizes, each pruned weight is zero in the quantized model and
    after convert, and the user's model keeps its pruning."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _pruned(_net())
    masks = {n: model.get_submodule(n).weight_mask.clone() for n in ("0", "3", "7")}
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level("INFO", logger="qframe"):
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    assert "0 (L1Unstructured), 3 (LnStructured), 7 (RandomUnstructured)" in caplog.text
    assert isinstance(qmodel[1], nn.Identity), "the BatchNorm after the pruned conv folds"
    assert qmodel.qframe_float_layers == {}
    converted = qframe.convert(qmodel)
    with torch.no_grad():
        for name, mask in masks.items():
            layer = qmodel.get_submodule(name)
            assert torch.equal(layer.weight_quantizer(layer.weight)[mask == 0], torch.zeros(int((mask == 0).sum())))
        assert _sqnr(want, qmodel(x)) > 30
        assert _sqnr(qmodel(x), converted(x)) > 40
        assert torch.equal(model(x), want)
    assert all(torch.equal(model.get_submodule(n).weight_mask, m) for n, m in masks.items())


@pytest.mark.parametrize("train_bn", [True, False])
def test_qat_keeps_the_pruning_masks_while_it_trains_and_quantize_puts_them_back(train_bn):
    torch.manual_seed(torch.seed() % 2**31)
    model = _pruned(_net())
    masks = {n: model.get_submodule(n).weight_mask.clone() for n in ("0", "3", "7")}
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(4)]
    qmodel = qframe.qat(model, qframe.preset("w8a8"), data, qframe.QATConfig(epochs=2, lr=0.05),
                        calib_batches=[x for x, _ in data], num_batches=2, train_bn=train_bn)
    assert not any(m._forward_pre_hooks for m in qmodel.modules()), "the masks end as plain weights"
    for name, mask in masks.items():
        weight = qmodel.get_submodule(name).weight.detach()
        assert torch.equal(weight[mask == 0], torch.zeros(int((mask == 0).sum()))), name
    trained = qmodel[7].weight.detach()
    assert not torch.allclose(trained[masks["7"] == 1], model[7].weight.detach()[masks["7"] == 1])
    # by hand, in place: the twins carry the masks on
    again = _pruned(_net())
    qframe.quantize_(again, qframe.preset("w8a8"))
    assert isinstance(again[0], QuantConv2d) and torch.equal(again[0].weight_mask, again[0].weight_mask.bool().float())
    assert again[3].weight_orig.shape == again[3].weight_mask.shape


class _Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.LazyConv2d(8, 3), nn.LazyLinear(4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_lazy_parameters_not_initialized_are_one_line_and_initialized_ones_quantize():
    """A copy of a model whose lazy layers have not run would draw weights of its own at its first batch,
    not those the model will draw: the quantized model came out unrelated to the model (-5 dB)."""
    torch.manual_seed(torch.seed() % 2**31)
    x = torch.randn(8, 3, 12, 12)
    with pytest.raises(QFrameError, match="4 parameters of _Lazy are not initialized yet .* valid: a model that "
                                          "has run"):
        qframe.ptq(_Lazy().eval(), qframe.preset("w8a8"), [x], 1)
    with pytest.raises(QFrameError, match="qframe.quantize_: 4 parameters of _Lazy are not initialized yet"):
        qframe.quantize_(_Lazy().eval(), qframe.preset("w8a8"))  # in place with an example, the example runs first
    model = _Lazy().eval()
    with torch.no_grad():
        want = model(x)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    with torch.no_grad():
        assert _sqnr(want, qmodel(x)) > 30


@pytest.mark.parametrize("rounding", ["gptq", "adaround"])
def test_the_rounding_remedies_keep_pruned_weights_at_zero(rounding):
    """GPTQ spread the rounding errors of other columns into pruned weights: 97 of 1152 came back at 4 bits."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _pruned(_net())
    x = torch.randn(32, 3, 12, 12)
    qmodel = qframe.ptq(model, qframe.preset("w4a8"), [x], 1, rounding=rounding,
                        adaround=qframe.AdaRoundConfig(iterations=50))
    for name in ("0", "3", "7"):
        mask, layer = model.get_submodule(name).weight_mask, qmodel.get_submodule(name)
        with torch.no_grad():
            assert torch.equal(layer.weight_quantizer(layer.weight)[mask == 0], torch.zeros(int((mask == 0).sum())))


def test_gptq_rounds_a_parametrized_layer_and_one_without_an_inverse_keeps_nearest_rounding(caplog):
    """With the parametrizations kept: the rounded weight was written into the tensor a parametrization
    computes, and lost: weight_norm layers kept nearest rounding while GPTQ reported a gain. It now goes
    through the parametrization's inverse."""
    from torch.nn.utils import parametrizations

    torch.manual_seed(torch.seed() % 2**31)
    model = _net()
    parametrizations.weight_norm(model[3])
    parametrizations.spectral_norm(model[7])
    x = torch.randn(32, 3, 12, 12)
    nearest = qframe.ptq(model.eval(), qframe.preset("w4a8"), [x], 1, keep_parametrizations=True)
    with caplog.at_level("WARNING", logger="qframe"):
        rounded = qframe.ptq(model.eval(), qframe.preset("w4a8"), [x], 1, rounding="gptq", keep_parametrizations=True)
    with torch.no_grad():
        a, b = nearest[3], rounded[3]
        wa, wb = a.weight_quantizer(a.weight), b.weight_quantizer(b.weight)
        assert not torch.equal(wa, wb), "GPTQ's rounding reached the weight_norm layer"
        assert torch.allclose(b.weight, wb, atol=1e-5), "and it is on the grid"
        assert torch.equal(nearest[7].weight_quantizer(nearest[7].weight), rounded[7].weight_quantizer(rounded[7].weight))
    assert "cannot take a rounded weight back" in caplog.text


def test_remedy_settings_of_the_wrong_type_are_one_line():
    with pytest.raises(QFrameError, match="GPTQ config dict"):
        qframe.ptq(_net(), qframe.preset("w4a8"), [torch.randn(4, 3, 12, 12)], 1, rounding="gptq", gptq={"damp": 0.5})


@pytest.mark.parametrize("affine", [True, False])
def test_a_batchnorm_without_running_statistics_stays_unfolded_with_its_reason(affine):
    """track_running_stats=False: ptq, fold_bn and equalize raised a raw AttributeError reading running_mean."""
    torch.manual_seed(torch.seed() % 2**31)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=affine, track_running_stats=False),
                          nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)).eval()
    x = torch.randn(4, 3, 8, 8)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1, equalize=True)
    assert list(qmodel.qframe_unfolded_norms) == ["1"] and "track_running_stats=False" in qmodel.qframe_unfolded_norms["1"]
    assert isinstance(qmodel[1], nn.BatchNorm2d) and isinstance(qmodel[4], nn.Identity)
    with torch.no_grad():
        assert _sqnr(model(x), qmodel(x)) > 25
    assert qframe.fold_bn(copy.deepcopy(model), x) == [("3", "4")] == qframe.fold_bn(copy.deepcopy(model))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

    def forward(self, x):
        return self.block(self.block(self.stem(x)))


def test_a_norm_in_a_block_called_twice_says_so():
    """It stayed unfolded with a reason about shared inputs and outputs that did not fit the model."""
    model = _Twice().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(2, 3, 8, 8)], 1)
    assert qmodel.qframe_unfolded_norms == {
        "block.1": "a forward pass calls it 2 times (a block used more than once); qframe folds a norm where it and "
                   "its layer are each called once"}
