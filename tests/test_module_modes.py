"""Every pass that runs a model in eval mode leaves each of its modules in the mode it was in: a model in
training with a frozen BatchNorm (fine-tuning) keeps that norm frozen, and its other modules training."""

import types

import pytest
import torch
from torch import nn

import qframe
from qframe.export.testset import save_test_set
from qframe.measure.timing import time_model
from qframe.methods.rct.energy import layer_macs
from qframe.utils.modules import eval_mode


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _fine_tuning(model: nn.Module) -> nn.Module:
    """Training, with the first block (conv, BN) frozen as fine-tuning leaves a backbone."""
    model.train()
    model[0].eval()
    model[1].eval()
    return model


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def _x(n=4):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _sensitivity(model, tmp_path):
    qmodel = qframe.ptq(model.eval(), qframe.preset("w8a8"), [(_x(), None)], num_batches=1)
    _fine_tuning(qmodel)
    before = _modes(qmodel)
    qframe.sensitivity(qmodel, [(_x(), None)], num_batches=1)
    return before, _modes(qmodel)


def _placement(model, tmp_path):
    _fine_tuning(model)
    before = _modes(model)
    qframe.quantize_(model, qframe.preset("w8a8"), example=_x(1))
    # the quantized twins are new modules: compare the names that were there before
    return before, {name: mode for name, mode in _modes(model).items() if name in before}


def _timing(model, tmp_path):
    before = _modes(model)
    time_model(model, (1, 3, 8, 8), batch_sizes=(1,), warmup=0, runs=1)
    return before, _modes(model)


def _macs(model, tmp_path):
    before = _modes(model)
    layer_macs(model, _x(1))
    return before, _modes(model)


def _test_set(model, tmp_path):
    x = _x(6)
    data = types.SimpleNamespace(test=types.SimpleNamespace(tensors=(x, torch.arange(6) % 4)), mean=(0.5,) * 3,
                                 std=(0.25,) * 3, class_names=["a", "b", "c", "d"])
    before = _modes(model)
    save_test_set(tmp_path / "test_set.npz", data, {"fp32": model})
    return before, _modes(model)


@pytest.mark.parametrize("run", [_sensitivity, _placement, _timing, _macs, _test_set],
                         ids=["sensitivity", "placement", "timing", "layer_macs", "save_test_set"])
def test_each_module_is_back_in_its_own_mode(run, tmp_path):
    model = _fine_tuning(_net())
    before, after = run(model, tmp_path)
    assert not before["1"] and before["5"]  # the premise: a frozen norm beside a training one
    assert after == before


def test_eval_mode_runs_everything_in_eval_and_restores_after_an_error():
    model = _fine_tuning(_net())
    before = _modes(model)
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(model):
            assert not any(_modes(model).values())
            raise RuntimeError("inside")
    assert _modes(model) == before


def _attention_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(2),
                         _Attend(), nn.Flatten(), nn.Linear(8 * 64, 4))


class _Attend(nn.Module):  # an activation x activation matmul: placement gives it its own quantizers
    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), -1) @ x


def _training_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if m.training]


@pytest.mark.parametrize("build", [_net, _attention_net], ids=["cnn", "matmul"])
def test_what_quantization_puts_in_a_model_takes_the_mode_of_what_it_replaces(build):
    from qframe.quant.conv_bn import fuse_conv_bn

    model = build().eval()
    qframe.quantize_(model, qframe.preset("w8a8"), example=_x(1))
    assert _training_modules(model) == []  # twins, their quantizers, the matmul's site quantizers
    assert any(name.endswith("qframe_sites") for name, _ in model.named_modules()) == (build is _attention_net)
    model = build().train()
    qframe.quantize_(model, qframe.preset("w8a8"), example=_x(1))
    assert all(m.training for m in model.modules())
    # QAT's conv + BN pairs: the norm's place in an eval model is in eval, so folding it later does not warn
    model = _fine_tuning(_net())
    fuse_conv_bn(model)
    assert isinstance(model[1], nn.Identity) and not model[1].training and model[5].training
