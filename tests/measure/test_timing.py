"""Latency statistics from a fake clock, a real tiny model, memory peaks and file sizes."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.measure import timing
from qframe.measure.memory import step_peak_memory
from qframe.measure.timing import TimingResult, benchmark, file_size_bytes, peak_memory, percentile, time_model


class FakeTime:
    """A clock that only moves when the benchmarked function says how long it took."""

    def __init__(self, durations_ms):
        self.now, self.durations, self.calls = 0.0, list(durations_ms), 0

    def clock(self):
        return self.now

    def fn(self, _inputs):
        self.calls += 1
        self.now += self.durations.pop(0) / 1e3


def test_fake_clock_statistics_and_untimed_warmup():
    runs = [7.0, 3.0, 10.0, 1.0, 5.0, 9.0, 2.0, 8.0, 4.0, 6.0]
    fake = FakeTime([1000.0, 2000.0, 3000.0] + runs)  # warm-up calls are slow and must not count
    result = benchmark(fake.fn, torch.zeros(8, 3), warmup=3, runs=10, clock=fake.clock)
    assert fake.calls == 13
    assert result.median_ms == pytest.approx(5.5)
    assert result.p90_ms == pytest.approx(9.1)  # (n-1)*0.9 = 8.1 -> 9 + 0.1 * (10 - 9)
    assert result.mean_ms == pytest.approx(5.5) and result.min_ms == pytest.approx(1.0)
    assert result.max_ms == pytest.approx(10.0)
    assert (result.runs, result.warmup, result.batch_size) == (10, 3, 8)
    assert result.throughput == pytest.approx(8 / 0.0055)  # images/s from the median
    assert sorted(result.samples_ms) == pytest.approx(sorted(runs))


def test_percentile_matches_numpy_linear():
    rng = random.Random(0)
    values = [rng.uniform(0, 100) for _ in range(37)]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([4.0], 90) == 4.0
    with pytest.raises(QFrameError):
        percentile([], 50)


def test_batch_size_and_to_dict():
    fake = FakeTime([2.0] * 4)
    result = benchmark(fake.fn, (torch.zeros(16, 3), "meta"), warmup=0, runs=4, clock=fake.clock)
    assert result.batch_size == 16 and result.throughput == pytest.approx(16 / 0.002)
    d = result.to_dict()
    assert "samples_ms" not in d and d["median_ms"] == pytest.approx(2.0) and d["p90_ms"] == pytest.approx(2.0)
    assert benchmark(FakeTime([1.0]).fn, None, warmup=0, runs=1, clock=FakeTime([]).clock).throughput is None


@pytest.mark.parametrize("kwargs", [{"runs": 0}, {"warmup": -1}, {"batch_size": 0}, {"runs": True}, {"warmup": False}])
def test_bad_arguments(kwargs):
    with pytest.raises(QFrameError):
        benchmark(lambda x: x, torch.zeros(1), **kwargs)


def test_injected_sync_runs_after_every_timed_call():
    syncs = []
    fake = FakeTime([1.0] * 5)
    benchmark(fake.fn, torch.zeros(2), warmup=2, runs=3, device="cuda", sync=lambda: syncs.append(fake.calls),
              clock=fake.clock)
    assert syncs == [2, 3, 4, 5]  # once after warm-up, then after each timed call


def test_real_tiny_model_on_cpu_never_touches_cuda(monkeypatch):
    def boom(*_args, **_kwargs):
        raise AssertionError("CUDA was touched")

    for name in ("synchronize", "is_available", "_lazy_init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, boom)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    model.train()
    rows = time_model(model, (1, 3, 8, 8), batch_sizes=(1, 4), warmup=1, runs=3)
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert rows[1]["input_shape"] == [4, 3, 8, 8] and rows[0]["device"] == "cpu" and rows[0]["dtype"] == "float32"
    for row in rows:
        for key in ("median_ms", "p90_ms", "mean_ms", "min_ms", "throughput"):
            assert math.isfinite(row[key]) and row[key] > 0
        assert row["p90_ms"] >= row["median_ms"] >= row["min_ms"]
    assert model.training  # mode restored
    monkeypatch.undo()
    assert not torch.cuda.is_initialized()


def test_time_model_bad_shape():
    with pytest.raises(QFrameError, match="example_batch_shape"):
        time_model(nn.Identity(), (), batch_sizes=(1,))
    with pytest.raises(QFrameError, match="batch_sizes"):
        time_model(nn.Identity(), (1, 3), batch_sizes=(0,))


def test_peak_memory_sees_a_64_mib_allocation():
    def allocate():
        block = b"\x01" * (64 << 20)  # written, so resident
        return len(block)

    result = peak_memory(allocate)
    assert result["device"] == "cpu" and "cuda_peak_allocated_bytes" not in result
    if result["cpu_method"] == "VmHWM":  # Linux: the peak is reset before fn runs
        assert result["cpu_peak_delta_bytes"] >= 48 << 20
    assert result["cpu_peak_rss_bytes"] > 0
    assert not torch.cuda.is_initialized()


def test_ru_maxrss_fallback(monkeypatch):
    monkeypatch.setattr(timing, "_reset_peak_rss", lambda: False)
    result = peak_memory(lambda: None)
    assert result["cpu_method"] == "ru_maxrss" and result["cpu_peak_delta_bytes"] >= 0


def test_file_size_bytes(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x" * 1234)
    sub = tmp_path / "engine"
    sub.mkdir()
    (sub / "a.bin").write_bytes(b"x" * 100)
    (sub / "b.bin").write_bytes(b"x" * 23)
    assert file_size_bytes(tmp_path / "model.pt") == 1234
    assert file_size_bytes(sub) == 123
    with pytest.raises(QFrameError, match="no file"):
        file_size_bytes(tmp_path / "missing.pt")


def test_timing_result_is_a_dataclass_with_the_documented_fields():
    fields = set(TimingResult.__dataclass_fields__)
    assert {"median_ms", "p90_ms", "mean_ms", "min_ms", "runs", "warmup", "batch_size", "throughput"} <= fields


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_events_time_the_kernels_a_call_queued():
    a = torch.randn(2048, 2048, device="cuda")

    def work(x):
        for _ in range(8):
            x = x @ a
        return x

    x = torch.randn(2048, 2048, device="cuda") / 2048**0.5
    events = benchmark(work, x, warmup=2, runs=10)
    host = benchmark(work, x, warmup=2, runs=10, sync=lambda: torch.cuda.synchronize())
    # the same kernels: the event time is the device's share of the synchronised host time
    assert 0 < events.median_ms <= host.median_ms * 1.1
    assert events.median_ms >= 0.5 * host.median_ms


NO_SUCH_CUDA = f"cuda:{torch.cuda.device_count()}"  # "cuda:0" on a torch without CUDA, one past the last GPU else


@pytest.mark.parametrize("device", ["gpu", "mps", NO_SUCH_CUDA])
def test_a_device_that_cannot_be_used_is_one_line(device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    valid = r"; valid here: 'cpu'" + (", 'cuda'" if torch.cuda.is_available() else "$")
    with pytest.raises(QFrameError, match=rf"^time_model: device='{device}' cannot be used \(.+\){valid}"):
        time_model(nn.Linear(4, 2), (1, 4), batch_sizes=(1,), device=device, warmup=0, runs=1)
    with pytest.raises(QFrameError, match=rf"^peak_memory: device='{device}' cannot be used \(.+\){valid}"):
        peak_memory(lambda: None, device=device)
    with pytest.raises(QFrameError, match=rf"^step_peak_memory: device='{device}' cannot be used"):
        step_peak_memory(lambda: None, device=device)


def test_the_meta_device_is_refused_not_timed():
    model = nn.Linear(16, 4)
    with pytest.raises(QFrameError, match=r"^time_model: device='meta' computes nothing to time; valid here: 'cpu'"):
        time_model(model, (1, 16), batch_sizes=(1,), device="meta", warmup=0, runs=1)
    assert model.weight.device.type == "cpu"  # refused before the model was moved


@pytest.mark.parametrize("batch_sizes", [(True,), [1, False], 4, "8", ()])
def test_batch_sizes_must_be_a_list_of_positive_integers(batch_sizes):
    with pytest.raises(QFrameError, match=r"^batch_sizes=.* is invalid; valid: a list of positive integers"):
        time_model(nn.Linear(4, 2), (1, 4), batch_sizes=batch_sizes, warmup=0, runs=1)


def test_time_model_and_model_size_need_a_module():
    from qframe.measure.size import model_size_bytes

    with pytest.raises(QFrameError, match=r"^model_size_bytes needs a model \(a torch.nn.Module\), got str 'm'"):
        model_size_bytes("m")
    with pytest.raises(QFrameError, match=r"^time_model needs a model \(a torch.nn.Module\), got str 'm'"):
        time_model("m", (1, 4), batch_sizes=(1,))
