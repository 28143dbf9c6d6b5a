"""quantize_ on the layer types users bring: subclasses, Conv1d/3d, ConvTranspose, registered twins, and what stays
float."""

import logging

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.quant.modules import QuantConv1d, QuantConv3d, QuantConvTranspose2d, QuantLinear, QuantMultiheadAttention
from qframe.quant.registry import quant_class_for, register_module, unregister_module


class Classifier(nn.Linear):
    """A head that subclasses nn.Linear and adds an attribute and a method, forward untouched."""

    def __init__(self, *args, labels=("a", "b", "c"), **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = list(labels)

    def label_of(self, logits):
        return [self.labels[i] for i in logits.argmax(-1).tolist()]


class ScaledLinear(nn.Linear):
    """Changes forward: a plain QuantLinear twin would silently drop the scaling."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c3 = nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.scaled = ScaledLinear(8, 8)
        self.pair = nn.Bilinear(8, 8, 8)
        self.head = Classifier(8, 3)

    def forward(self, x):  # x: [B, 3, L]
        y = torch.relu(self.c1(x))  # [B, 8, L]
        v = self.c3(y[:, :, None, :, None].expand(-1, -1, 1, -1, 3))  # [B, 8, 1, L, 3]
        v = self.up(v.mean(-1))  # [B, 8, 2, 2L]
        t = v.flatten(2).transpose(1, 2)  # [B, 4L, 8]
        t, _ = self.attn(t, t, t)
        t = self.scaled(t.mean(1))
        return self.head(self.pair(t, t))


def test_every_layer_is_quantized_or_listed_float_with_a_reason(caplog):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(4, 3, 6)
    with caplog.at_level(logging.INFO, logger="qframe.quant.recipe"):
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    assert isinstance(qmodel.c1, QuantConv1d) and isinstance(qmodel.c3, QuantConv3d)
    # the subclass keeps what it added and still is the user's type
    assert isinstance(qmodel.head, QuantLinear) and isinstance(qmodel.head, Classifier)
    assert qmodel.head.labels == ["a", "b", "c"] and qmodel.head.label_of(torch.eye(3)) == ["a", "b", "c"]
    assert model.head.labels is not None and type(model.head) is Classifier  # the original is untouched
    floats = qmodel.qframe_float_layers
    assert "overrides Linear.forward" in floats["scaled"]
    assert isinstance(qmodel.up, QuantConvTranspose2d) and "up" not in floats
    assert "no quantized Bilinear" in floats["pair"]
    assert isinstance(qmodel.attn, QuantMultiheadAttention) and not any(n.startswith("attn") for n in floats)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("quantize_ w8a8"))
    assert "Classifier x1" in line and "Conv1d x1" in line and "Conv3d x1" in line and "ScaledLinear x1" in line
    assert "ConvTranspose2d x1" in line.split("; float")[0] and "Bilinear x1" in line.split("; float")[1]
    # the quantized model computes what the float one does, up to 8-bit rounding
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).norm() / ref.norm() < 0.05


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.gru, self.cell = nn.LSTM(8, 8, batch_first=True), nn.GRU(8, 8), nn.GRUCell(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 8]
        y = self.gru(self.lstm(x)[0])[0]
        return self.head(self.cell(y[:, -1]))


def test_recurrent_layers_are_listed_float_not_claimed_quantized(caplog):
    """LSTM / GRU layers stayed float while quantize_ said "nothing left float"."""
    torch.manual_seed(torch.seed() % 2**31)
    with caplog.at_level(logging.INFO, logger="qframe.quant.recipe"):
        qmodel = qframe.ptq(_Recurrent().eval(), qframe.preset("w8a8"), [torch.randn(2, 5, 8)], 1)
    assert {n: why.split(";")[0] for n, why in qmodel.qframe_float_layers.items()} == {
        "lstm": "no quantized LSTM in qframe", "gru": "no quantized GRU in qframe", "cell": "no quantized GRUCell in qframe"}
    assert isinstance(qmodel.head, QuantLinear) and "nothing left float" not in caplog.text


def test_a_registered_twin_quantizes_a_forward_overriding_subclass():
    class QuantScaledLinear(QuantLinear):
        def forward(self, x):
            return 2.0 * super().forward(x)

    assert quant_class_for(ScaledLinear(4, 4))[0] is None
    qframe.register_module(ScaledLinear, QuantScaledLinear)   # the name the README uses
    try:
        assert quant_class_for(ScaledLinear(4, 4))[0] is QuantScaledLinear
        model = nn.Sequential(ScaledLinear(8, 4)).eval()
        x = torch.randn(16, 8)
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
        assert isinstance(qmodel[0], QuantScaledLinear) and not qmodel.qframe_float_layers
        with torch.no_grad():
            assert (qmodel(x) - model(x)).norm() / model(x).norm() < 0.05
    finally:
        qframe.unregister_module(ScaledLinear)
    assert quant_class_for(ScaledLinear(4, 4))[0] is None


@pytest.mark.parametrize("bad", [int, nn.Linear(2, 2)])
def test_register_module_rejects_what_is_not_a_module_class(bad):
    with pytest.raises(QFrameError, match="register_module: float_type="):
        register_module(bad, QuantLinear)


def test_conv1d_and_conv3d_twins_match_float_layers_at_high_precision():
    torch.manual_seed(1)
    for layer, x in ((nn.Conv1d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 17)),
                     (nn.Conv3d(4, 6, 3, padding=1, groups=2), torch.randn(2, 4, 5, 6, 7))):
        model = nn.Sequential(layer).eval()
        q = qframe.quantize_(nn.Sequential(layer), qframe.preset("w8a8"))  # uncalibrated: pass-through
        with torch.no_grad():
            torch.testing.assert_close(q(x).double(), model(x).double(), rtol=1e-6, atol=1e-6)


class ScriptableLinear(nn.Linear):
    """timm's Linear: overrides forward for TorchScript's sake alone; in eager mode it is nn.Linear's."""

    def forward(self, x):
        if torch.jit.is_scripting():
            return nn.functional.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return nn.functional.linear(x, self.weight, self.bias)


class PadEvenConv(nn.Conv2d):
    """Pads odd inputs by one row and column first (TF 'SAME' at kernel 2, stride 2): the base's output on even
    sizes, not on odd ones."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, [0, x.shape[-1] % 2, 0, x.shape[-2] % 2]))


def test_a_subclass_whose_forward_computes_the_base_forward_is_quantized_as_the_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PadEvenConv(4, 4, 2, stride=2), nn.Flatten(), ScriptableLinear(16, 5))
    model.eval()
    x = torch.randn(8, 3, 6, 6)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    assert isinstance(qmodel[3], QuantLinear) and isinstance(qmodel[3], ScriptableLinear)
    assert "overrides Conv2d.forward" in qmodel.qframe_float_layers["1"]  # equal at 4x4, not at 5x5: stays float
    assert quant_class_for(ScaledLinear(4, 4))[0] is None
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).norm() / ref.norm() < 0.05
