"""Fixtures shared across the test files."""

import os
import sys
from pathlib import Path

# `make test` runs the suite in one pytest-xdist worker per core. Each worker then computes on one thread,
# and so do the runs it starts (OMP_NUM_THREADS is inherited): two workers of two threads each on two
# cores took longer than one process (20 min against 16 min), one thread each 9 min.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qframe.data import build_data  # noqa: E402
from qframe.models import build_model  # noqa: E402
from qframe.utils.modules import eval_mode  # noqa: E402

# what the third-party tests share (tests/third_party/vision_checks.py imports torch alone) is used here too
sys.path.insert(0, str(Path(__file__).resolve().parent / "third_party"))
import vision_checks  # noqa: E402


@pytest.fixture(scope="session")
def digits():
    """The bundled digits at 16x16, one channel: small enough for training in tests."""
    return build_data("digits", image_size=16, channels=1, seed=3)


@pytest.fixture
def small_model():
    """A factory for the same freshly initialised compact CNN for a data bundle."""

    def make(data):
        torch.manual_seed(7)
        return build_model("compact_cnn", data.num_classes, data.channels, data.image_size)

    return make


@pytest.fixture
def randomise_bn():
    """Give every BatchNorm2d statistics far from the identity, so a wrong fold cannot pass by accident."""

    def randomise(model: nn.Module) -> nn.Module:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.4)
                m.running_var.uniform_(0.2, 3.0)
                m.weight.data.normal_(1, 0.3)
                m.bias.data.normal_(0, 0.3)
        return model

    return randomise


@pytest.fixture
def normalise_bn():
    """Give every BatchNorm the statistics of the model's own activations on ``x``, moved off them so that a
    fold changes the weights (``vision_checks.normalise_bn``), and check that the model's output on ``x`` then
    depends on its input. Drawn statistics (``randomise_bn``) leave a deep zoo model computing a constant: on
    MobileNetV2 at 16 x 16, 1e-7 of the output varied, and a comparison of constants passes whatever the
    layers compute."""

    def normalise(model: nn.Module, x: torch.Tensor, min_share: float = 0.05) -> nn.Module:
        vision_checks.normalise_bn(model, x)
        with torch.no_grad(), eval_mode(model):
            out = model(x)
        share = float(vision_checks.varying(out).norm() / out.norm())
        assert share >= min_share, f"{share:.1e} of the output varies with the input"
        return model

    return normalise
