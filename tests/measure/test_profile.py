"""The measure stage's profiler: energy windows of a minimum length, idle power subtracted once."""

import time

import pytest
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyMeter, make_reading
from qframe.measure.profile import Autocast, MeasureConfig, Profiler


class FakeMeter(EnergyMeter):
    """A board that draws ``idle`` watts while nothing runs and ``busy`` watts otherwise (real wall time)."""

    name = "fake"

    def __init__(self, idle=40.0, busy=100.0):
        self.idle, self.busy, self.windows = idle, busy, []

    @classmethod
    def probe(cls, **kwargs):
        return None

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        seconds = time.perf_counter() - self.t0
        watts = self.idle if not self.windows else self.busy  # the profiler measures idle first
        self.windows.append(seconds)
        return make_reading(watts * seconds, seconds, {"board": watts * seconds}, "fake meter")


def _calls(out):
    """The number of batches the energy window ran, from the row's energy note."""
    return int(out["energy"].split(" batches of ")[0].rsplit(", ", 1)[1])


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()


def test_energy_is_net_of_idle_power_over_a_window_of_at_least_energy_seconds():
    meter = FakeMeter(idle=40.0, busy=100.0)
    cfg = MeasureConfig(batch_sizes=[1, 8], warmup=1, runs=3, energy_seconds=0.2, idle_seconds=0.1)
    profiler = Profiler(cfg, "cpu", (1, 4, 4), meters=[meter])
    out = profiler(tiny())
    idle_s, window_s = meter.windows
    assert idle_s >= 0.1 and window_s >= 0.2 * 0.5  # the window is sized from the median batch time
    assert profiler.idle_watts == pytest.approx(40.0)
    images = _calls(out) * 8
    assert out["joules_per_image"] == pytest.approx((100.0 - 40.0) * window_s / images, rel=1e-6)
    assert out["images_per_joule"] == pytest.approx(1 / out["joules_per_image"])
    assert out["watts"] == pytest.approx(100.0) and out["idle_watts"] == pytest.approx(40.0)
    assert "idle power 40.0 W" in profiler.idle_note() and "0.1 s" in profiler.idle_note()
    profiler(tiny())
    assert len(meter.windows) == 3  # idle is measured once, not per model


def test_idle_seconds_zero_reports_gross_energy():
    meter = FakeMeter(idle=40.0, busy=100.0)
    profiler = Profiler(MeasureConfig(batch_sizes=[2], warmup=0, runs=2, energy_seconds=0.05, idle_seconds=0),
                        "cpu", (1, 4, 4), meters=[meter])
    out = profiler(tiny())
    (window_s,) = meter.windows  # no idle window: the first window is the model's, drawn at the idle rate here
    assert out["idle_watts"] is None and "gross" in profiler.idle_note()
    images = _calls(out) * 2
    assert out["joules_per_image"] == pytest.approx(40.0 * window_s / images, rel=1e-6)


def test_no_meter_leaves_the_energy_columns_empty_with_the_reason():
    profiler = Profiler(MeasureConfig(batch_sizes=[1], warmup=0, runs=1, energy=False), "cpu", (1, 4, 4))
    out = profiler(tiny())
    assert out["joules_per_image"] is None and out["watts"] is None and "measure.energy=false" in out["energy"]


@pytest.mark.parametrize("field, value", [("energy_seconds", 0), ("energy_seconds", -1.0), ("idle_seconds", -0.5),
                                          ("idle_seconds", "3")])
def test_bad_energy_windows_are_rejected_with_one_line(field, value):
    with pytest.raises(QFrameError, match=f"measure.{field}=.* valid: a number of seconds"):
        MeasureConfig(**{field: value})


def test_autocast_wrapper_runs_the_model_in_bfloat16():
    model = Autocast(tiny(), torch.bfloat16)
    x = torch.randn(3, 1, 4, 4)
    y = model(x)
    assert y.dtype == torch.bfloat16
    expected = tiny()(x)
    assert (y.float() - expected).abs().max() < 0.05 * expected.abs().max() + 1e-2


class Recorder(nn.Module):
    """The tiny model, recording the batch size of every call."""

    def __init__(self):
        super().__init__()
        self.net, self.batches = tiny(), []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.net(x)


def test_throughput_memory_and_energy_are_measured_at_the_largest_batch_whatever_the_order():
    meter = FakeMeter()
    cfg = MeasureConfig(batch_sizes=[4, 1], warmup=0, runs=2, energy_seconds=0.05, idle_seconds=0)
    model = Recorder()
    out = Profiler(cfg, "cpu", (1, 4, 4), meters=[meter])(model)
    timings = {row["batch_size"]: row for row in out["timings"]}
    assert model.batches[:4] == [4, 4, 1, 1]  # time_model: two timed runs at each batch size, in the order given
    assert len(model.batches) > 6 and set(model.batches[4:]) == {4}  # the memory window (2 runs), then energy
    assert out["throughput_batch"] == 4 and out["throughput"] == timings[4]["throughput"]
    assert out["latency_batch"] == 4 and out["latency_ms"] == timings[4]["median_ms"]
    assert f"{len(model.batches) - 6} batches of 4" in out["energy"]
    assert out["joules_per_image"] == pytest.approx(40.0 * meter.windows[0] / ((len(model.batches) - 6) * 4), rel=1e-6)


def test_a_device_the_profiler_cannot_use_is_one_line():
    device = f"cuda:{torch.cuda.device_count()}"  # "cuda:0" on a torch without CUDA, one past the last GPU else
    with pytest.raises(QFrameError, match=rf"^Profiler: device='{device}' cannot be used \(.+\); valid here: 'cpu'"):
        Profiler(MeasureConfig(energy=False), device, (1, 4, 4))(tiny())
