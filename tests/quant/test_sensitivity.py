"""qframe.sensitivity: per-module output SQNR, checked against the model configured by hand."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.quant.modules import quantizers


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), None) for _ in range(n)]


def _reference_db(qmodel, keep, batches):
    """SQNR in float64 (numpy) of a copy with only the quantizers ``keep(name)`` says on."""
    model = copy.deepcopy(qmodel)
    outs = {}
    for label, on in (("float", lambda name: False), ("quant", keep)):
        for name, q in quantizers(model):
            q.enabled = on(name)
        with torch.no_grad():
            outs[label] = np.concatenate([model(x).numpy().astype(np.float64) for x, _ in batches])
    noise = np.sum((outs["quant"] - outs["float"]) ** 2)
    return 10 * np.log10(np.sum(outs["float"] ** 2) / noise)


@pytest.fixture
def planted(randomise_bn):
    """w8a8 with one layer at 2-bit weights: the module the report must put first."""
    recipe = qframe.preset("w8a8")
    recipe.rules.append(qframe.LayerRule("3", weight_bits=2))
    calib = _batches(3, seed=1)
    return qframe.ptq(randomise_bn(_net()), recipe, calib, num_batches=3), _batches(2, seed=2)


def test_each_modules_sqnr_alone_and_without_it_match_the_model_configured_by_hand(planted):
    qmodel, batches = planted
    report = qframe.sensitivity(qmodel, batches, num_batches=2)
    owners = {name.rpartition(".")[0] for name, _ in quantizers(qmodel)}
    assert {row.name for row in report.layers} == owners and len(report.layers) == len(owners)
    assert report.layers[0].name == "3"  # the 2-bit layer
    assert report.layers[0].quantizers == ("weight_quantizer", "input_quantizer")
    assert report.batches == 2
    assert report.model_db == pytest.approx(_reference_db(qmodel, lambda name: True, batches), abs=1e-6)
    for row in report.layers:
        mine = lambda name, owner=row.name: name.rpartition(".")[0] == owner  # noqa: E731
        assert row.alone_db == pytest.approx(_reference_db(qmodel, mine, batches), abs=1e-6), row
        assert row.without_db == pytest.approx(_reference_db(qmodel, lambda n: not mine(n), batches), abs=1e-6), row
    # keeping the 2-bit layer float wins back most of the error
    assert report.layers[0].without_db > report.model_db + 6
    assert [r.alone_db for r in report.layers] == sorted(r.alone_db for r in report.layers)
    table = report.table(top=3)
    assert table.count("\n| ") == 4 and "| 3 | weight_quantizer, input_quantizer |" in table


def test_the_model_is_left_as_it_was_and_quantizers_turned_off_stay_off(planted):
    qmodel, batches = planted
    off = "6.input_quantizer"
    dict(quantizers(qmodel))[off].enabled = False
    qmodel.train()
    x = batches[0][0]
    qmodel.eval()
    with torch.no_grad():
        before = qmodel(x)
    qmodel.train()
    report = qframe.sensitivity(qmodel, batches, num_batches=1)
    assert qmodel.training
    assert {name: q.enabled for name, q in quantizers(qmodel)} == {name: name != off for name, _ in quantizers(qmodel)}
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)
    # the switched-off quantizer counts as float: layer 6 reports its weight only
    row = next(r for r in report.layers if r.name == "6")
    assert row.quantizers == ("weight_quantizer",)
    assert report.batches == 1


def test_a_layer_quantized_exactly_has_infinite_sqnr_alone():
    qmodel = qframe.ptq(_net(), qframe.preset("w8a8"), _batches(1, seed=1), num_batches=1)
    final = qmodel.get_submodule("10")
    final.input_quantizer.enabled = False
    with torch.no_grad():  # weights already on the grid: quantizing them again changes nothing
        final.weight.copy_(final.weight_quantizer(final.weight))
    report = qframe.sensitivity(qmodel, _batches(1, seed=2), num_batches=1)
    row = next(r for r in report.layers if r.name == "10")
    assert math.isinf(row.alone_db) and report.layers[-1].name == "10"
    assert "| 10 | weight_quantizer | inf |" in report.table()


@pytest.mark.parametrize("kwargs,named", [({"num_batches": 0}, "num_batches=0 is invalid; valid: an integer >= 1"),
                                          ({"num_batches": 1.5}, "num_batches=1.5 is invalid")])
def test_bad_num_batches_is_one_line(planted, kwargs, named):
    qmodel, batches = planted
    with pytest.raises(qframe.QFrameError) as err:
        qframe.sensitivity(qmodel, batches, **kwargs)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_float_model_or_no_batches_is_one_line(planted):
    with pytest.raises(qframe.QFrameError, match="no quantizer turned on; valid: a model quantized by qframe.ptq"):
        qframe.sensitivity(_net(), _batches(1, seed=0))
    with pytest.raises(qframe.QFrameError, match="gave no batch"):
        qframe.sensitivity(planted[0], [])


class _TwoHeads(nn.Module):
    """A detector-like output: a tuple whose second item is fed by a layer the first never sees."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.cls, self.box = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        return self.cls(y), self.box(y)


def test_every_tensor_of_a_tuple_output_is_compared():
    """Only the first item was compared: the layer feeding the second alone had SQNR alone = inf."""
    torch.manual_seed(torch.seed() % 2**31)
    batches = [(torch.randn(8, 3, 8, 8), None) for _ in range(2)]
    qmodel = qframe.ptq(_TwoHeads().eval(), qframe.preset("w4a8"), batches, 2)
    rows = {r.name: r for r in qframe.sensitivity(qmodel, batches, num_batches=2).layers}
    assert math.isfinite(rows["box"].alone_db) and math.isfinite(rows["cls"].alone_db)
    # the reference, by hand: both outputs joined, only box's quantizers on
    model = copy.deepcopy(qmodel)
    outs = {}
    for label, on in (("float", lambda name: False), ("quant", lambda name: name.startswith("box."))):
        for name, q in quantizers(model):
            q.enabled = on(name)
        with torch.no_grad():
            outs[label] = np.concatenate([np.concatenate([t.numpy().ravel() for t in model(x)]).astype(np.float64)
                                          for x, _ in batches])
    want = 10 * np.log10(np.sum(outs["float"] ** 2) / np.sum((outs["quant"] - outs["float"]) ** 2))
    assert rows["box"].alone_db == pytest.approx(want, abs=1e-3)
