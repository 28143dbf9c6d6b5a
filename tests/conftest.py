"""Fixtures shared across the test files."""

import pytest
import torch
from torch import nn

from qframe.data import build_data
from qframe.models import build_model


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
