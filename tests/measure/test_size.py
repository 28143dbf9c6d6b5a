"""Model size: quantized weights packed at their bit width, tied weights counted once, and at float size
where a float module reads them too."""

import dataclasses

import pytest
import torch
from torch import nn

import qframe
from qframe.measure.size import model_size_bytes
from qframe.quant.modules import TensorQuantizer


class Tied(nn.Module):
    """An embedding and an output layer sharing one weight (as language models tie them)."""

    def __init__(self, tie=True):
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.head = nn.Linear(64, 1000, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _scale_bytes(model):
    """float32 scales of every quantizer (all symmetric here: no zero points stored)."""
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)]
    assert quantizers and all(q.spec.symmetric for q in quantizers)
    return sum(4 * q.scale.numel() for q in quantizers)


def _ptq(model, calib):
    torch.manual_seed(0)
    return qframe.ptq(model, qframe.preset("w8a8"), [calib])


def test_a_weight_a_float_module_also_reads_counts_at_its_float_size():
    tokens = torch.randint(0, 1000, (4, 7))
    qmodel = _ptq(Tied(), tokens)
    assert type(qmodel.emb) is nn.Embedding and qmodel.head.weight is qmodel.emb.weight  # float embedding, tied
    assert model_size_bytes(qmodel) == 1000 * 64 * 4 + (1000 + 1) * 4  # float weight once, the head's scales
    untied = _ptq(Tied(tie=False), tokens)  # the head's own weight is packed at 8 bits
    assert model_size_bytes(untied) == 1000 * 64 * 4 + 1000 * 64 * 1 + _scale_bytes(untied)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_weight_tied_between_two_quantized_layers_counts_once_packed(bits):
    torch.manual_seed(0)
    recipe = dataclasses.replace(qframe.preset(f"w{bits}a8"), rules=[])  # no 8-bit first / last layer rule
    qmodel = qframe.ptq(TwoLinears(), recipe, [torch.randn(4, 32)])
    assert qmodel.a.weight_quantizer.spec.bits == qmodel.b.weight_quantizer.spec.bits == bits
    assert qmodel.a.weight is qmodel.b.weight
    assert model_size_bytes(qmodel) == 32 * 32 * bits // 8 + 2 * 32 * 4 + _scale_bytes(qmodel)
    qmodel.b.weight_quantizer.enabled = False  # b now reads the float weight
    assert model_size_bytes(qmodel) == 32 * 32 * 4 + 2 * 32 * 4 + _scale_bytes(qmodel)
