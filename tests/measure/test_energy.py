"""Energy meters on recorded sysfs trees and tegrastats lines, with fake clocks for exact joules."""

import importlib.util
import os
import shutil
import time
from pathlib import Path

import pytest

from qframe.errors import QFrameError
from qframe.measure import energy
from qframe.measure.energy import (NO_METER, EnergyReading, Ina3221Meter, NvmlMeter, PowerSampler, RaplMeter,
                                   TegrastatsMeter, detect_meters, energy_per_inference, integrate,
                                   parse_tegrastats, unavailable_reason, wrap_delta)
from qframe.measure.energy import rapl as rapl_mod
from qframe.measure.energy.jetson import discover_rails

FIXTURES = Path(__file__).parent / "fixtures"


def tree(name: str, dest: Path) -> Path:
    """Copy a recorded sysfs tree to ``dest``, restoring the ':' stored as '%3A'."""
    root = dest / name
    for src in sorted((FIXTURES / name).rglob("*")):
        if src.is_file():
            target = root / str(src.relative_to(FIXTURES / name)).replace("%3A", ":")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, target)
    return root


def lines(name: str) -> list:
    return (FIXTURES / "tegrastats" / name).read_text().splitlines()


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def write(path: Path, value) -> None:
    path.write_text(f"{value}\n")


# ---------------------------------------------------------------- tegrastats


def test_parse_tegrastats_orin_agx_reads_only_power_rails():
    assert parse_tegrastats(lines("orin_agx_jp5.txt")[0]) == {
        "VDD_GPU_SOC": 2.387, "VDD_CPU_CV": 0.795, "VIN_SYS_5V0": 3.92, "VDDQ_VDD2_1V8AO": 0.503}


def test_parse_tegrastats_older_jetsons_without_unit():
    nano = parse_tegrastats(lines("nano_jp4.txt")[0])
    assert nano == {"POM_5V_IN": 3.224, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1.147}
    assert parse_tegrastats(lines("tx2_jp4.txt")[0]) == {
        "VDD_SYS_GPU": 0.152, "VDD_SYS_SOC": 0.686, "VDD_4V0_WIFI": 0.0, "VDD_IN": 2.591, "VDD_SYS_CPU": 0.152,
        "VDD_SYS_DDR": 0.518}
    assert parse_tegrastats(lines("xavier_agx_jp4.txt")[0]) == {
        "GPU": 0.0, "CPU": 1.234, "SOC": 1.5, "CV": 0.0, "VDDRQ": 0.3, "SYS5V": 2.0}
    orin_nx = parse_tegrastats(lines("orin_nx_jp6.txt")[1])
    assert orin_nx == {"VDD_IN": 11.528, "VDD_CPU_GPU_CV": 5.187, "VDD_SOC": 2.894}


def test_parse_tegrastats_average_and_lines_without_rails():
    assert parse_tegrastats(lines("nano_jp4.txt")[1], which="average")["POM_5V_IN"] == 4.878
    assert parse_tegrastats("RAM 2850/30536MB (lfb 6547x4MB) SWAP 0/15268MB IRAM 0/252kB(lfb 252kB)") == {}
    with pytest.raises(QFrameError, match="valid: current, average"):
        parse_tegrastats("", which="peak")


def test_tegrastats_replay_uses_module_input_rail_alone():
    # POM_5V_IN: 3.224 W, 6.532 W, 6.616 W at t = 0, 1, 3 s
    reading = TegrastatsMeter.replay(zip([0.0, 1.0, 3.0], lines("nano_jp4.txt")))
    expected = (3.224 + 6.532) / 2 * 1 + (6.532 + 6.616) / 2 * 2  # 18.026 J
    assert reading.joules == pytest.approx(expected, rel=1e-12)
    assert reading.rails["POM_5V_IN"] == pytest.approx(expected, rel=1e-12)
    assert reading.joules < sum(reading.rails.values())  # the parts are not added to the total
    assert reading.seconds == 3.0 and reading.avg_watts == pytest.approx(expected / 3)
    assert reading.source == "tegrastats: total=POM_5V_IN" and reading.estimate is False and reading.samples == 3


def test_tegrastats_replay_agx_orin_sums_rails_without_total():
    orin = lines("orin_agx_jp5.txt")
    loaded = parse_tegrastats(orin[1])
    assert loaded["VIN_SYS_5V0"] < loaded["VDD_GPU_SOC"]  # why VIN_SYS_5V0 is not the module total
    reading = TegrastatsMeter.replay(zip([0.0, 1.0, 2.0], orin))
    p = [2.387 + 0.795 + 3.920 + 0.503, 13.137 + 3.181 + 4.968 + 1.091, 13.531 + 2.784 + 5.046 + 1.188]
    assert reading.joules == pytest.approx((p[0] + p[1]) / 2 + (p[1] + p[2]) / 2, rel=1e-12)
    assert "no total rail" in reading.source
    chosen = TegrastatsMeter.replay(zip([0.0, 1.0, 2.0], orin), total="VIN_SYS_5V0")
    assert chosen.joules == pytest.approx((3.920 + 4.968) / 2 + (4.968 + 5.046) / 2, rel=1e-12)
    with pytest.raises(QFrameError, match="VDD_IN"):
        TegrastatsMeter.replay(zip([0.0, 1.0], orin), total="VDD_IN")


def test_tegrastats_orin_nx_total_is_vdd_in_and_one_line_gives_no_number():
    reading = TegrastatsMeter.replay(zip([0.0, 0.5], lines("orin_nx_jp6.txt")))
    assert reading.joules == pytest.approx((4.912 + 11.528) / 2 * 0.5, rel=1e-12)
    assert reading.source == "tegrastats: total=VDD_IN"
    single = TegrastatsMeter.replay([(0.0, lines("xavier_agx_jp4.txt")[0])])
    assert single.joules is None and single.avg_watts is None and single.seconds == 0.0


def test_tegrastats_live_reads_the_tool_output(tmp_path):
    script = tmp_path / "tegrastats"
    line = lines("nano_jp4.txt")[0]
    script.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.01; done\n")
    script.chmod(0o755)
    assert TegrastatsMeter.probe(command=str(script)) is None
    meter = TegrastatsMeter(interval_ms=10, command=str(script))
    with meter:
        time.sleep(0.2)
    reading = meter.reading
    assert reading.samples >= 2 and reading.source == "tegrastats: total=POM_5V_IN"
    assert reading.joules == pytest.approx(3.224 * reading.seconds, rel=1e-9)
    assert meter._proc is None  # the tool was stopped


# ---------------------------------------------------------------- INA3221 sysfs


def test_ina3221_discovers_connected_rails_only(tmp_path):
    assert sorted(discover_rails(tree("jetson_agx_orin", tmp_path))) == [
        "VDDQ_VDD2_1V8AO", "VDD_CPU_CV", "VDD_GPU_SOC", "VIN_SYS_5V0"]  # no NC, no "sum of shunt voltages"


def test_ina3221_agx_orin_total_is_the_sum_of_rails(tmp_path):
    clock = FakeClock()
    meter = Ina3221Meter(root=tree("jetson_agx_orin", tmp_path), clock=clock, threaded=False)
    watts = {"VDD_GPU_SOC": 4984 * 1216 / 1e6, "VDD_CPU_CV": 4984 * 608 / 1e6, "VIN_SYS_5V0": 4976 * 792 / 1e6,
             "VDDQ_VDD2_1V8AO": 4984 * 208 / 1e6}
    assert meter.read_watts() == pytest.approx(watts)
    meter.start()
    clock.t = 2.0
    reading = meter.stop()
    assert reading.rails == pytest.approx({k: 2.0 * w for k, w in watts.items()})
    assert reading.joules == pytest.approx(2.0 * sum(watts.values()), rel=1e-12)  # 28.13696 J
    assert "no total rail" in reading.source and reading.samples == 2 and reading.estimate is False


def test_ina3221_integrates_a_changing_profile_and_never_adds_parts_to_vdd_in(tmp_path):
    root = tree("jetson_orin_nx", tmp_path)
    hwmon = next(root.rglob("hwmon1"))
    clock = FakeClock()
    meter = Ina3221Meter(root=root, clock=clock, threaded=False)
    meter.start()  # t=0: VDD_IN 5 V * 1 A = 5 W
    clock.t = 1.0
    write(hwmon / "curr1_input", 2000)  # 10 W
    meter.sample()
    clock.t = 3.0
    reading = meter.stop()  # 10 W
    assert reading.rails["VDD_IN"] == pytest.approx((5 + 10) / 2 * 1 + 10 * 2)  # 27.5 J
    assert reading.rails["VDD_CPU_GPU_CV"] == pytest.approx(1.5 * 3)
    assert reading.rails["VDD_SOC"] == pytest.approx(1.4 * 3)
    assert reading.joules == pytest.approx(27.5)  # not 27.5 + 4.5 + 4.2
    assert reading.avg_watts == pytest.approx(27.5 / 3) and reading.seconds == 3.0
    assert reading.source == "ina3221: total=VDD_IN" and reading.samples == 3


def test_ina3221_reads_jetpack4_iio_layout(tmp_path):
    meter = Ina3221Meter(root=tree("jetson_nano_jp4", tmp_path), threaded=False, clock=FakeClock())
    assert meter.read_watts() == {"POM_5V_IN": 3.224, "POM_5V_GPU": 0.0, "POM_5V_CPU": 1.147}


def test_ina3221_background_thread_integrates_constant_power(tmp_path):
    meter = Ina3221Meter(root=tree("jetson_orin_nx", tmp_path), interval_s=0.005)
    with meter:
        time.sleep(0.05)
    reading = meter.reading
    assert reading.samples >= 3 and reading.seconds > 0.04
    assert reading.joules == pytest.approx(5.0 * reading.seconds, rel=1e-9)


# ---------------------------------------------------------------- RAPL


def test_wrap_delta():
    assert wrap_delta(5, 10, 100) == 5
    assert wrap_delta(90, 5, 100) == 15
    assert wrap_delta(7, 7, 100) == 0


def test_rapl_counter_wraps_and_total_is_package_plus_dram(tmp_path):
    root = tree("rapl_desktop", tmp_path)
    zones = root / "sys/class/powercap"
    clock = FakeClock(100.0)
    meter = RaplMeter(root=root, clock=clock, poll_s=None)
    meter.start()
    clock.t = 102.0
    write(zones / "intel-rapl:0/energy_uj", 500000)  # wrapped: 262143328850 - 262142900000 + 500000
    write(zones / "intel-rapl:0:0/energy_uj", 118231840000)  # core +0.4 J (part of the package)
    write(zones / "intel-rapl:0:1/energy_uj", 2108900000)  # uncore +0.05 J (part of the package)
    write(zones / "intel-rapl:0:2/energy_uj", 30112940000)  # dram +0.2 J (not in the package counter)
    write(zones / "intel-rapl:1/energy_uj", 190090330000)  # psys +3 J (contains the package)
    write(zones / "intel-rapl-mmio:0/energy_uj", 98771200000)  # the package again, through MMIO: ignored
    reading = meter.stop()
    assert reading.rails == pytest.approx({"package-0": 0.92885, "package-0/core": 0.4, "package-0/uncore": 0.05,
                                           "package-0/dram": 0.2, "psys": 3.0})
    assert reading.joules == pytest.approx(0.92885 + 0.2, rel=1e-12)
    assert reading.seconds == 2.0 and reading.avg_watts == pytest.approx(1.12885 / 2)
    assert reading.source == "rapl: total=package-0+package-0/dram" and reading.estimate is False


def test_rapl_poll_counts_more_than_one_wrap(tmp_path):
    root = tree("rapl_desktop", tmp_path)
    pkg = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    meter = RaplMeter(root=root, clock=FakeClock(), poll_s=None)
    meter.start()  # 262142900000
    write(pkg, 262143000000)  # +0.1 J
    meter.poll()
    write(pkg, 100000)  # wraps: +0.42885 J
    meter.poll()
    write(pkg, 262142900000)  # +262142.8 J, a second lap
    assert meter.stop().rails["package-0"] == pytest.approx(0.1 + 0.42885 + 262142.8)


def _zone(base: Path, ident: str, name: str, uj: int = 0, max_uj: int = 1000) -> None:
    d = base / "sys/class/powercap" / ident
    d.mkdir(parents=True)
    write(d / "name", name)
    write(d / "energy_uj", uj)
    write(d / "max_energy_range_uj", max_uj)


def test_rapl_psys_only_and_mmio_only_trees(tmp_path):
    _zone(tmp_path / "a", "intel-rapl:0", "psys")
    assert [z.key for z in rapl_mod.total_zones(rapl_mod.discover_zones(tmp_path / "a"))] == ["psys"]
    _zone(tmp_path / "b", "intel-rapl-mmio:0", "package-0")
    assert [z.key for z in rapl_mod.discover_zones(tmp_path / "b")] == ["package-0"]


def test_rapl_unreadable_counter_is_reported(tmp_path, monkeypatch):
    root = tree("rapl_desktop", tmp_path)

    def denied(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(rapl_mod, "_read_uj", denied)
    assert RaplMeter.unavailable_reason(root=root) == "RAPL energy_uj is readable by root only here"
    assert detect_meters(root, nvml=False) == [] and unavailable_reason(root, nvml=False) == NO_METER


# ---------------------------------------------------------------- NVML


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_nvml_unavailable_without_pynvml():
    assert not NvmlMeter.available()
    assert NvmlMeter.unavailable_reason() == "pynvml not installed (pip install nvidia-ml-py)"


class FakeNvml:
    """Stands in for pynvml: an energy counter (mJ) or, with ``counter=None``, power samples (mW)."""

    def __init__(self, counter=None, power=(), count=1, init_error=None):
        self.counter, self.power, self.count, self.init_error = list(counter or []), list(power), count, init_error
        self.calls = []

    def nvmlInit(self):
        self.calls.append("init")
        if self.init_error:
            raise RuntimeError(self.init_error)

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise RuntimeError("Not Supported")
        return self.counter.pop(0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power.pop(0)


def test_nvml_energy_counter():
    clock, nv = FakeClock(), FakeNvml(counter=[1_000_000, 1_012_500])
    meter = NvmlMeter(clock=clock, nvml=nv)
    meter.start()
    clock.t = 2.5
    reading = meter.stop()
    assert reading.joules == pytest.approx(12.5) and reading.avg_watts == pytest.approx(5.0)
    assert reading.rails == {"gpu0": pytest.approx(12.5)} and reading.source == "nvml: GPU 0 energy counter"
    assert nv.calls == ["init", "shutdown"]


def test_nvml_power_sampling_fallback_integrates_trapezoid():
    clock, nv = FakeClock(), FakeNvml(power=[100_000, 200_000, 200_000])  # mW
    meter = NvmlMeter(clock=clock, nvml=nv, threaded=False)
    meter.start()
    clock.t = 1.0
    meter.sample()
    clock.t = 3.0
    reading = meter.stop()
    assert reading.joules == pytest.approx((100 + 200) / 2 * 1 + (200 + 200) / 2 * 2)  # 550 J
    assert reading.samples == 3 and "power samples" in reading.source and nv.calls == ["init", "shutdown"]


def test_nvml_probe_reasons():
    assert NvmlMeter.probe(nvml=FakeNvml(count=1)) is None
    assert NvmlMeter.probe(nvml=FakeNvml(count=0)) == "no NVIDIA GPU 0 (NVML sees 0)"
    assert "NVML not usable" in NvmlMeter.probe(nvml=FakeNvml(init_error="Driver Not Loaded"))


# ---------------------------------------------------------------- sampler, detection, per-image energy


def test_power_sampler_thread_with_injected_sampler():
    sampler = PowerSampler(lambda: {"gpu": 40.0}, interval_s=0.005)
    sampler.start()
    time.sleep(0.04)
    samples = sampler.stop()
    assert len(samples) >= 3
    seconds = samples[-1][0] - samples[0][0]
    assert integrate(samples)["gpu"] == pytest.approx(40.0 * seconds, rel=1e-9)


def test_integrate_rules():
    samples = [(0.0, {"a": 1.0}), (2.0, {"a": 3.0, "b": 5.0}), (3.0, {"a": 3.0, "b": 1.0})]
    assert integrate(samples) == {"a": 4.0 + 3.0, "b": 3.0}  # b only over the interval where both ends have it
    assert integrate(samples[:1]) == {}
    with pytest.raises(QFrameError, match="back in time"):
        integrate([(1.0, {"a": 1.0}), (0.5, {"a": 1.0})])


def test_no_meter_on_this_machine():
    if any(reason is None for reason in energy.probe_meters().values()):
        pytest.skip("this machine has an energy meter")
    assert detect_meters() == []
    assert unavailable_reason() == "unavailable (no RAPL/NVML/INA3221 on this machine)"


def test_detect_meters_on_recorded_trees(tmp_path):
    assert [type(m) for m in detect_meters(tree("jetson_agx_orin", tmp_path), nvml=False)] == [Ina3221Meter]
    assert [type(m) for m in detect_meters(tree("rapl_desktop", tmp_path), nvml=False)] == [RaplMeter]
    (tmp_path / "empty").mkdir()
    assert detect_meters(tmp_path / "empty", nvml=False) == []
    assert unavailable_reason(tmp_path / "empty", nvml=False) == NO_METER
    assert unavailable_reason(tmp_path / "rapl_desktop", nvml=False) == ""


def test_bad_sysfs_root_is_one_line_error(tmp_path):
    missing = tmp_path / "nope"
    for call in (lambda: detect_meters(missing), lambda: Ina3221Meter(root=missing), lambda: RaplMeter(root=missing)):
        with pytest.raises(QFrameError, match="does not exist") as err:
            call()
        assert "\n" not in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(QFrameError, match="no INA3221 power rails"):
        Ina3221Meter(root=tmp_path)


def test_stop_before_start_is_an_error(tmp_path):
    with pytest.raises(QFrameError, match="before start"):
        Ina3221Meter(root=tree("jetson_orin_nx", tmp_path), threaded=False).stop()
    with pytest.raises(QFrameError, match="before start"):
        RaplMeter(root=tree("rapl_desktop", tmp_path), poll_s=None).stop()


def test_energy_per_inference():
    reading = EnergyReading(joules=10.0, seconds=2.0, avg_watts=5.0, rails={}, source="test")
    assert energy_per_inference(reading, 100) == pytest.approx(0.1)
    assert energy_per_inference(reading, 100, idle_watts=1.5) == pytest.approx((10.0 - 3.0) / 100)
    assert energy_per_inference(None, 100) is None
    assert energy_per_inference(EnergyReading(None, 1.0, None, {}, "x"), 10) is None
    with pytest.raises(QFrameError, match="images"):
        energy_per_inference(reading, 0)


def test_idle_watts_uses_the_meter(tmp_path):
    clock = FakeClock()
    meter = Ina3221Meter(root=tree("jetson_orin_nx", tmp_path), clock=clock, threaded=False)

    def fake_sleep(seconds):
        clock.t += seconds

    assert energy.idle_watts(meter, 4.0, sleep=fake_sleep) == pytest.approx(5.0)


def test_importing_energy_loads_neither_torch_nor_pynvml():
    import subprocess
    import sys

    code = "import sys, qframe.measure.energy; print('torch' in sys.modules, 'pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.stdout.split() == ["False", "False"]
