"""Fixtures the export tests share."""

import pytest

import qframe


@pytest.fixture(scope="module")
def data():
    """The bundled digits at 16x16, one channel."""
    return qframe.build_data("digits", image_size=16, channels=1, seed=1)


@pytest.fixture
def train_batch(data):
    """A batch of the training images, for BatchNorm statistics."""
    return next(iter(data.loader("train", 64, shuffle=False)))[0]
