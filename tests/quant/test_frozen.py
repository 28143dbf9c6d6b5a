"""Weights fake-quantized once per pass inside frozen_weights(): the same outputs, recomputed whenever
anything they depend on changes."""

import torch
from torch import nn

import qframe
from qframe.quant.frozen import frozen_weights
from qframe.quant.modules import QuantConv2d, QuantLinear


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    return qframe.ptq(model, qframe.preset("w4a8"), [torch.randn(4, 3, 8, 8) for _ in range(2)], 2)


def _calls(qmodel):
    counts = {"n": 0}
    for m in qmodel.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.weight_quantizer.register_forward_hook(lambda *_: counts.__setitem__("n", counts["n"] + 1))
    return counts


def test_inside_the_scope_each_weight_is_quantized_once_and_outputs_are_unchanged():
    qmodel = _model()
    x = [torch.randn(4, 3, 8, 8) for _ in range(3)]  # fresh inputs
    with torch.no_grad():
        plain = [qmodel(t) for t in x]
        counts = _calls(qmodel)
        with frozen_weights():
            cached = [qmodel(t) for t in x]
    assert counts["n"] == 2  # two layers, once each, for three batches
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    with torch.no_grad():
        qmodel(x[0])
    assert counts["n"] == 4  # outside the scope every call quantizes again


def test_a_changed_weight_scale_or_switch_is_quantized_again():
    qmodel = _model()
    conv = qmodel[0]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), frozen_weights():
        first = qmodel(x)
        conv.weight.mul_(0.5)  # in place: the version counter moves
        halved = qmodel(x)
        conv.weight_quantizer.scale.mul_(0.5)  # the grid
        regrid = qmodel(x)
        conv.weight_quantizer.enabled = False  # the switch
        unquantized = qmodel(x)
    with torch.no_grad():  # the uncached references, recomputed from the same state
        assert torch.equal(unquantized, qmodel(x))
        conv.weight_quantizer.enabled = True
        assert torch.equal(regrid, qmodel(x))
        conv.weight_quantizer.scale.mul_(2.0)
        assert torch.equal(halved, qmodel(x))
        conv.weight.mul_(2.0)
        assert torch.equal(first, qmodel(x))
    assert not torch.equal(first, halved) and not torch.equal(halved, regrid) and not torch.equal(regrid, unquantized)


def test_with_autograd_or_after_an_optimizer_step_nothing_stale_is_used():
    qmodel = _model().train()
    counts = _calls(qmodel)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=0.5)
    with frozen_weights():
        loss = nn.functional.cross_entropy(qmodel(x), y)  # with autograd: not reused, the gradient flows
        loss.backward()
        assert qmodel[0].weight.grad is not None and qmodel[0].weight.grad.abs().sum() > 0
        with torch.no_grad():
            before = qmodel(x)
        optimizer.step()
        with torch.no_grad():
            after = qmodel(x)
    assert counts["n"] == 6 and not torch.equal(before, after)
    with torch.no_grad():
        assert torch.equal(after, qmodel(x))
