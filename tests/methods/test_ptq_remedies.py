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


@pytest.mark.parametrize("override, message", [
    ("method.rounding=stochastic", "unknown method.rounding 'stochastic'; valid: nearest, adaround, adaround_block"),
    ("method.adaround.iterations=0", "adaround iterations=0 is invalid"),
    ("method.adaround.warmup=1.5", "adaround warmup=1.5 is invalid"),
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


def test_composed_steps_equal_the_orchestrator(randomise_bn):
    """ptq(..., equalize, rounding, bias_correction) is the same as calling the steps by hand in that order."""
    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(build_model("mobilenet_v2", num_classes=4, in_channels=1, image_size=16,
                                     width_mult=0.35)).eval()
    x = _smooth_images(64)
    cfg = AdaRoundConfig(iterations=60)
    auto = ptq(model, preset("w4a8"), [x[:32], x[32:]], 2, equalize=True, bias_correction=True, rounding="adaround",
               adaround=cfg)
    reference = copy.deepcopy(model)
    equalize(reference)
    fold_bn(reference)
    manual = ptq(reference, preset("w4a8"), [x[:32], x[32:]], 2)
    adaround(manual, reference, x, cfg)
    correct_biases(manual, reference, x)
    assert any(isinstance(m, ChannelClip) for m in auto.modules())
    with torch.no_grad():
        a, b = auto(x), manual(x)
    # the orchestrator corrects each layer's bias right after rounding it (one pass); by hand, rounding
    # finishes first: the two differ only by what a layer learns from a not-yet-corrected input
    assert float((a - b).norm() / b.norm()) < 0.05


def test_remedies_bring_w3a8_closer_to_float(randomise_bn):
    torch.manual_seed(torch.seed() % 2**31)
    model = randomise_bn(build_model("mobilenet_v2", num_classes=4, in_channels=1, image_size=16,
                                     width_mult=0.35)).eval()
    x, held_out = _smooth_images(64), _smooth_images(64)
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
    assert corrected < nearest and remedied < nearest, (nearest, corrected, remedied)
