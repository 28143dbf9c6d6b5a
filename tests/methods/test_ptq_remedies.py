"""PTQ with its remedies: configuration, the composed pipeline, and what it gains over nearest rounding."""

import copy

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.nn import functional as F

from qframe.config import register, to_config
from qframe.errors import QFrameError
from qframe.methods.ptq import PTQOptions, ptq
from qframe.models import build_model
from qframe.quant.adaround import AdaRoundConfig, adaround
from qframe.quant.bias_correction import correct_biases
from qframe.quant.equalize import ChannelClip, equalize
from qframe.quant.fold import fold_bn
from qframe.quant.gptq import GPTQConfig, gptq
from qframe.quant.recipe import preset


def _compose(*overrides):
    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_remedies_compose_from_the_command_line():
    cfg = to_config(_compose("quant=w4a8", "method.equalize=true", "method.bias_correction=true",
                             "method.rounding=adaround", "method.adaround.iterations=300"))
    options = cfg.method.ptq_options()
    assert options == PTQOptions(True, True, "adaround", AdaRoundConfig(iterations=300))
    assert to_config(_compose()).method.ptq_options() == PTQOptions()  # all off by default
    assert to_config(_compose("method.rounding=adaround_block")).method.rounding == "adaround_block"
    gptq_options = to_config(_compose("method.rounding=gptq", "method.gptq.damp=0.05",
                                      "method.gptq.act_order=false")).method.ptq_options()
    assert gptq_options == PTQOptions(rounding="gptq", gptq=GPTQConfig(damp=0.05, act_order=False))


@pytest.mark.parametrize("override, message", [
    ("method.rounding=stochastic", "unknown method.rounding 'stochastic'; valid: nearest, adaround, adaround_block"),
    ("method.adaround.iterations=0", "adaround iterations=0 is invalid"),
    ("method.adaround.warmup=1.5", "adaround warmup=1.5 is invalid"),
    ("method.gptq.damp=0", "gptq damp=0.0 is invalid"),
])
def test_bad_remedy_settings_are_one_line_errors(override, message):
    with pytest.raises(QFrameError, match=message):
        to_config(_compose(override))


def test_qat_start_refuses_remedies():
    model = build_model("compact_cnn", num_classes=3, in_channels=1, image_size=16, width_mult=0.25).eval()
    with pytest.raises(QFrameError, match="PTQ steps"):
        ptq(model, preset("w8a8"), [torch.randn(4, 1, 16, 16)], 1, train_bn=True, equalize=True)


def _smooth_images(n: int) -> torch.Tensor:
    return F.avg_pool2d(torch.randn(n, 1, 18, 18), 3, 1)


@pytest.mark.parametrize("steps", [
    {"equalize": True}, {"bias_correction": True}, {"rounding": "adaround"},
    {"equalize": True, "rounding": "adaround"}, {"equalize": True, "rounding": "adaround", "bias_correction": True},
    {"equalize": True, "rounding": "gptq"},
])
def test_composed_steps_equal_the_orchestrator(normalise_bn, steps):
    """ptq(..., equalize, rounding, bias_correction) computes what the steps called by hand in that order do.
    With both rounding and bias correction the orchestrator corrects each layer's bias right after rounding it,
    in one pass, so each later layer learns from the inputs it will get; by hand, rounding finishes first. The
    two orders then differ by about the quantization error itself (measured: 0.06-0.10 of the output on the
    compact CNN, 1.0 on this MobileNetV2, whose output w4a8 moves by as much), so there the check is that
    every bias is corrected for the layers before it: a second correction moves the biases little against
    the correction that nearest rounding needs."""
    torch.manual_seed(torch.seed() % 2**31)
    x = _smooth_images(64)
    model = normalise_bn(build_model("mobilenet_v2", num_classes=4, in_channels=1, image_size=16,
                                     width_mult=0.35), x).eval()
    cfg = AdaRoundConfig(iterations=60)
    auto = ptq(model, preset("w4a8"), [x[:32], x[32:]], 2, adaround=cfg, **steps)
    reference = copy.deepcopy(model)
    if steps.get("equalize"):
        equalize(reference)
    fold_bn(reference)
    manual = ptq(reference, preset("w4a8"), [x[:32], x[32:]], 2)
    assert any(isinstance(m, ChannelClip) for m in auto.modules()) == bool(steps.get("equalize"))
    if steps.get("rounding") and steps.get("bias_correction"):
        nearest = max(correct_biases(copy.deepcopy(manual), reference, x).values())
        again = max(correct_biases(copy.deepcopy(auto), reference, x).values())
        assert again < 0.2 * nearest, (again, nearest)  # measured 0.015-0.03 on 24 seeds, 0.095 on one draw
        return
    if steps.get("rounding") == "gptq":
        gptq(manual, reference, x)
    elif steps.get("rounding"):
        adaround(manual, reference, x, cfg)
    if steps.get("bias_correction"):
        correct_biases(manual, reference, x)
    with torch.no_grad():
        a, b = auto(x), manual(x)
    assert float((a - b).norm() / b.norm()) < 1e-6


def test_remedies_bring_w3a8_closer_to_float(normalise_bn):
    """On the compact CNN, over 10 seeds, bias correction left 0.21-0.54 of nearest rounding's output error
    power and all the remedies together 0.12-0.36. (The random-init MobileNetV2 is chaotic at w3a8: its error
    exceeds its output's variation, and 2 of 16 seeds ordered the three the other way.)"""
    torch.manual_seed(torch.seed() % 2**31)
    x, held_out = _smooth_images(64), _smooth_images(64)
    model = normalise_bn(build_model("compact_cnn", num_classes=4, in_channels=1, image_size=16, width_mult=0.5),
                         x).eval()
    recipe = preset("w4a8", weight={"bits": 3})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        target = reference(held_out)

    def error(q):
        with torch.no_grad():
            return float((q(held_out) - target).pow(2).mean())

    nearest = error(ptq(model, recipe, [x], 1))
    corrected = error(ptq(model, recipe, [x], 1, bias_correction=True))
    remedied = error(ptq(model, recipe, [x], 1, equalize=True, bias_correction=True, rounding="adaround",
                         adaround=AdaRoundConfig(iterations=150)))
    assert corrected < 0.75 * nearest and remedied < 0.75 * nearest, (nearest, corrected, remedied)
