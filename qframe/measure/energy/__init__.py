"""Energy meters behind one interface, each used only where it measures something real.

- ``Ina3221Meter``: Jetson on-module INA3221 rails from sysfs (``jetson.py``).
- ``TegrastatsMeter`` / ``parse_tegrastats``: Jetson rails from tegrastats lines, live or replayed.
- ``RaplMeter``: Intel/AMD CPU package and DRAM counters from powercap (``rapl.py``).
- ``NvmlMeter``: NVIDIA GPU board energy through NVML (``nvml.py``), when pynvml is installed.

``detect_meters()`` returns the meters usable here; where there is none, ``unavailable_reason()``
is ``NO_METER`` and results say so instead of showing a number. Readings are measured, never
estimated. Meters cover different domains (RAPL: the CPU package; NVML: the GPU board; INA3221:
the Jetson module): adding readings of different meters is the caller's decision.

Nothing here imports torch or pynvml at import time.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from typing import Callable

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyMeter, EnergyReading, PowerSampler, SampledMeter, integrate, pick_total
from qframe.measure.energy.jetson import JETSON_TOTAL_RAILS, Ina3221Meter, check_root
from qframe.measure.energy.nvml import NvmlMeter
from qframe.measure.energy.rapl import RaplMeter, wrap_delta
from qframe.measure.energy.tegrastats import TegrastatsMeter, parse_tegrastats

log = logging.getLogger(__name__)

NO_METER = "unavailable (no RAPL/NVML/INA3221 on this machine)"


def probe_meters(root: str | os.PathLike = "/", nvml: bool = True, gpu_index: int = 0) -> dict[str, str | None]:
    """{meter name: None if usable here, else why not}, for the sysfs tree at ``root``."""
    root = check_root(root)
    out: dict[str, str | None] = {
        Ina3221Meter.name: Ina3221Meter.probe(root=root),
        RaplMeter.name: RaplMeter.probe(root=root),
    }
    if out[Ina3221Meter.name] is not None and root == os.sep:
        out[TegrastatsMeter.name] = TegrastatsMeter.probe()  # only when sysfs rails cannot be read
    if nvml:
        out[NvmlMeter.name] = NvmlMeter.probe(index=gpu_index)
    for name, reason in out.items():
        log.debug("energy meter %s: %s", name, reason or "available")
    return out


def detect_meters(root: str | os.PathLike = "/", nvml: bool = True, gpu_index: int = 0,
                  interval_s: float = 0.05) -> list[EnergyMeter]:
    """Ready-to-start meters for what this machine (or the sysfs tree at ``root``) can measure.

    Order: INA3221 (Jetson; tegrastats only when the sysfs rails are unreadable and ``root`` is
    '/'), RAPL, NVML (GPU ``gpu_index``; skipped when ``nvml`` is False).
    """
    probes = probe_meters(root, nvml=nvml, gpu_index=gpu_index)
    meters: list[EnergyMeter] = []
    if probes.get(Ina3221Meter.name) is None:
        meters.append(Ina3221Meter(root=root, interval_s=interval_s))
    elif probes.get(TegrastatsMeter.name, "absent") is None:
        meters.append(TegrastatsMeter(interval_ms=max(1, int(interval_s * 1e3))))
    if probes.get(RaplMeter.name) is None:
        meters.append(RaplMeter(root=root))
    if nvml and probes.get(NvmlMeter.name) is None:
        meters.append(NvmlMeter(index=gpu_index, interval_s=interval_s))
    return meters


def unavailable_reason(root: str | os.PathLike = "/", nvml: bool = True, gpu_index: int = 0) -> str:
    """``NO_METER`` when no meter can measure here, "" when one can (details in the debug log)."""
    probes = probe_meters(root, nvml=nvml, gpu_index=gpu_index)
    return "" if any(reason is None for reason in probes.values()) else NO_METER


def energy_per_inference(reading: EnergyReading | None, images: int, idle_watts: float | None = None) -> float | None:
    """Joules per image of ``reading`` over ``images`` images, idle power subtracted when given.

    ``(joules - idle_watts * seconds) / images``; None when there is no reading or it has no total.
    """
    try:
        n = operator.index(images)
    except TypeError:
        n = 0
    if n < 1:
        raise QFrameError(f"images={images!r} is invalid; valid: a positive whole number of images")
    if reading is None or reading.joules is None:
        return None
    joules = reading.joules
    if idle_watts is not None:
        if idle_watts < 0:
            raise QFrameError(f"idle_watts={idle_watts!r} is invalid; valid: watts >= 0")
        joules -= idle_watts * reading.seconds
        if joules < 0:
            log.warning("idle power %.3f W exceeds the measured %.3f W; the energy per image is negative",
                        idle_watts, reading.avg_watts or 0.0)
    return joules / n


def idle_watts(meter: EnergyMeter, seconds: float = 2.0, sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Average power of ``meter`` over ``seconds`` of doing nothing (to pass to energy_per_inference)."""
    if not seconds > 0:
        raise QFrameError(f"idle seconds={seconds!r} is invalid; valid: > 0")
    meter.start()
    sleep(seconds)
    return meter.stop().avg_watts


__all__ = [
    "EnergyMeter", "EnergyReading", "Ina3221Meter", "JETSON_TOTAL_RAILS", "NO_METER", "NvmlMeter", "PowerSampler",
    "RaplMeter", "SampledMeter", "TegrastatsMeter", "detect_meters", "energy_per_inference", "idle_watts",
    "integrate", "parse_tegrastats", "pick_total", "probe_meters", "unavailable_reason", "wrap_delta",
]
