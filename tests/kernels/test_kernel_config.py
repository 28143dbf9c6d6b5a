"""The kernel backend as data in the Hydra config: ``device.kernels``."""

from importlib import resources

import pytest
from hydra import compose, initialize_config_module

from qframe.config import DeviceConfig, register, to_config
from qframe.errors import QFrameError
from qframe.kernels import dispatch

DEVICES = sorted(p.name[:-5] for p in (resources.files("qframe.conf") / "device").iterdir()
                 if p.name.endswith(".yaml"))


def _compose(*overrides):
    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_is_auto():
    assert to_config(_compose()).device.kernels == "auto"


@pytest.mark.parametrize("device", DEVICES)
def test_every_device_names_its_kernel_backend(device):
    text = (resources.files("qframe.conf") / "device" / f"{device}.yaml").read_text()
    assert "kernels:" in text
    assert to_config(_compose(f"device={device}")).device.kernels in dispatch.BACKENDS


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_every_backend_is_a_valid_choice(backend):
    assert to_config(_compose(f"device.kernels={backend}")).device.kernels == backend


def test_a_bad_backend_is_one_line_naming_the_valid_ones():
    with pytest.raises(QFrameError) as err:
        to_config(_compose("device.kernels=tpu"))
    message = str(err.value)
    assert "device.kernels='tpu' is invalid" in message and "\n" not in message
    assert all(b in message for b in dispatch.BACKENDS)
    with pytest.raises(QFrameError, match="device.kernels='gpu'"):
        DeviceConfig(kernels="gpu")


def test_the_app_applies_the_choice(monkeypatch, tmp_path):
    """``run`` hands ``device.kernels`` to the dispatcher before any stage runs."""
    import qframe.app as app

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(app, "build_data", stop)  # the first stage after the backend is set
    cfg = to_config(_compose("device.kernels=reference", "device.torch_device=cpu"))
    previous = dispatch.get_backend()
    try:
        with pytest.raises(Stop):
            app.run(cfg, tmp_path)
        assert dispatch.get_backend() == "reference"
    finally:
        dispatch.set_backend(previous)
