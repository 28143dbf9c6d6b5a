"""Layers with torch.nn.utils.parametrizations (weight_norm, spectral_norm) before a BatchNorm: BN folding,
equalization, PTQ's remedies and QAT write their weights, which a parametrization recomputes at every forward."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import qframe
from qframe.quant.modules import QuantConv2d, QuantConvBn2d
from qframe.utils.modules import is_parametrized

NORMS = {"weight_norm": parametrizations.weight_norm, "spectral_norm": parametrizations.spectral_norm}


def _net(norm):
    """Two parametrized convs, each followed by a BatchNorm with statistics of its own, and a parametrized head."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (net[1], net[4]):
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_(0, 0.3)
    for i in (0, 3, 8):
        NORMS[norm](net[i])
    return net.eval()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("norm", NORMS)
def test_fold_bn_folds_into_a_parametrized_conv_and_keeps_the_function(norm, caplog):
    """The folded weight was written into the tensor the parametrization computes and lost, so the output check
    refused every pair: both BatchNorms stayed unfolded with a reason that blamed shared inputs."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _net(norm)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    with caplog.at_level("INFO", logger="qframe"):
        pairs = qframe.fold_bn(model, x)
    assert sorted(pairs) == [("0", "1"), ("3", "4")] and model.qframe_unfolded_norms == {}
    assert "parametrizations of 2 layers a BatchNorm folded into became plain weights" in caplog.text
    assert "computed): 0, 3" in caplog.text
    assert not is_parametrized(model[0]) and not is_parametrized(model[3]) and is_parametrized(model[8])
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-5


@pytest.mark.parametrize("norm", NORMS)
def test_equalize_keeps_the_function_of_a_parametrized_model(norm):
    """Equalization scaled the producer's computed weight (lost) and the consumer's too (kept): with weight_norm
    the output moved by 45 % of its norm, silently."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _net(norm)
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    report = qframe.equalize(model, absorb=False)
    assert len(report.chains) >= 1 and not any(is_parametrized(m) for m in model.modules())
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-5


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("options", [{}, {"equalize": True}, {"rounding": "gptq"}], ids=["plain", "cle", "gptq"])
def test_ptq_of_a_parametrized_model_folds_every_norm_and_quantizes_as_the_plain_model(norm, options):
    """ptq bakes the parametrizations into its copy (a PTQ model does not train): the BatchNorms fold, GPTQ rounds
    spectral_norm layers too, and the result is the one of the same model without parametrizations."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _net(norm)
    plain = _net(norm)
    plain.load_state_dict(model.state_dict())
    for i in (0, 3, 8):  # the same weights, as plain parameters
        plain[i] = qframe.utils.modules.unparametrized(plain[i]) if is_parametrized(plain[i]) else plain[i]
    calib = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    qmodel = qframe.ptq(model, qframe.preset("w4a8"), calib, 2, **options)
    reference = qframe.ptq(plain, qframe.preset("w4a8"), calib, 2, **options)
    assert qmodel.qframe_unfolded_norms == {} and isinstance(qmodel[0], QuantConv2d)
    assert not any(is_parametrized(m) for m in qmodel.modules()) and is_parametrized(model[0])
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        assert _rel(qmodel(x), reference(x)) < 1e-5
        assert _rel(qmodel(x), model(x)) < 0.5  # w4a8 of a random net: median 0.02-0.03, 0.23 seen with CLE


@pytest.mark.parametrize("norm", NORMS)
def test_qat_trains_a_parametrized_conv_beside_its_batchnorm_and_folds_for_deployment(norm):
    """The pair for training took the conv's computed weight as a parameter: a raw TypeError. It now keeps the
    conv's parametrization, whose originals train; fold_qat gives the plain folded layer the file holds."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _net(norm)
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))) for _ in range(4)]
    qmodel = qframe.qat(model, qframe.preset("w8a8"), data, qframe.QATConfig(epochs=1, lr=0.05))
    pair = qmodel[0]
    assert isinstance(pair, QuantConvBn2d) and is_parametrized(pair)
    trained = dict(pair.parametrizations.weight.named_parameters())
    start = dict(model[0].parametrizations.weight.named_parameters())
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained), "the originals trained"
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        before = qmodel(x)
        folded = qframe.fold_qat(qmodel)
        assert isinstance(folded[0], QuantConv2d) and not is_parametrized(folded[0])
        assert _rel(folded(x), before) < 1e-4


def test_equalize_keeps_the_function_of_a_model_with_old_style_weight_norm_hooks():
    """torch.nn.utils.weight_norm's hook recomputed the producer's weight from weight_g / weight_v at the next
    forward, so the scales written into it were lost as with a parametrization."""
    import warnings

    torch.manual_seed(torch.seed() % 2**31)
    model = _net("weight_norm")
    for i in (0, 3, 8):
        model[i] = qframe.utils.modules.unparametrized(model[i])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still common
        torch.nn.utils.weight_norm(model[0])
        torch.nn.utils.weight_norm(model[3])
    x = torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    qframe.equalize(model, absorb=False)
    assert not model[0]._forward_pre_hooks and isinstance(model[0].weight, nn.Parameter)
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-5


def test_a_baked_old_style_spectral_norm_leaves_no_state_dict_hooks():
    """remove() of spectral_norm's hook left its state_dict hooks: state dicts of the plain weight still carried
    spectral_norm's version, and loading one ran spectral_norm's conversion hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    torch.nn.utils.spectral_norm(model[0])
    assert model[0]._state_dict_hooks and model[0]._load_state_dict_pre_hooks
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want = model(x)
    qframe.equalize(model, absorb=False)
    assert not model[0]._state_dict_hooks and not model[0]._load_state_dict_pre_hooks
    state = model.state_dict()
    assert "spectral_norm" not in state._metadata.get("0", {}) and set(state) == {"0.weight", "0.bias", "2.weight",
                                                                                   "2.bias"}
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-5
