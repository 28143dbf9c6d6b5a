"""``:first`` / ``:last``: the first and last layers the forward runs on an example, as declared without one."""

import torch
from torch import nn

import qframe
from qframe.quant.modules import QuantConv2d, QuantLinear


class _HeadDeclaredFirst(nn.Module):
    """The classifier declared before the features, as many users write it; an auxiliary head the forward
    does not call declared last."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(16, 10)
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aux = nn.Linear(16, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_first_and_last_are_the_layers_the_input_meets_first_and_last():
    """They followed declaration order: the w4a8 preset kept the classifier (declared first) at 8 bits and
    quantized the input stem to 4."""
    from qframe.quant.recipe import rules_by_layer

    x = torch.randn(2, 3, 8, 8)
    qmodel = qframe.ptq(_HeadDeclaredFirst().eval(), qframe.preset("w4a8"), [x], 1)
    bits = {n: m.weight_quantizer.spec.bits for n, m in qmodel.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert {n: bits.get(n) for n in ("features.0", "features.2", "classifier")} == {"features.0": 8, "features.2": 4,
                                                                                  "classifier": 8}
    rules = rules_by_layer(_HeadDeclaredFirst(), qframe.preset("w4a8").rules, x)
    assert {n for n, r in rules.items() if r is not None} == {"features.0", "classifier"}


class _CallsForward(nn.Module):
    """A forward that calls its layers' .forward directly: no module call for the example run to see."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.c.forward(self.b.forward(self.a.forward(x)))


def test_last_matches_one_layer_when_the_example_runs_none_through_its_module():
    from qframe.quant.recipe import rules_by_layer

    rules = [qframe.LayerRule(":last", weight_bits=4)]
    by_layer = rules_by_layer(_CallsForward(), rules, torch.randn(2, 4))
    assert {n for n, r in by_layer.items() if r is not None} == {"c"}  # every layer matched :last
