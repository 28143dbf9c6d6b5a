"""Fixtures shared across the test files."""

import os

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
