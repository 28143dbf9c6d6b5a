"""Jetson on-module power monitors (TI INA3221) read from sysfs.

Rails are found by globbing
``<root>/sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in{1,2,3}_label`` (JetPack 5/6); the power of
rail N is ``in{N}_input`` (mV) * ``curr{N}_input`` (mA) / 1e6 W. Unconnected channels (label
``NC``) and the "sum of shunt voltages" channel (``in7``) are skipped. JetPack 4's iio layout
(``<root>/sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_N`` with ``in_power{N}_input`` in
mW) is read too.

Total rule (shared with tegrastats, see ``JETSON_TOTAL_RAILS``): where the module has a rail that
measures its input, that rail alone is the total and is never added to the rails it feeds:
``VDD_IN`` (Orin NX, Orin Nano, Xavier NX, TX2) and ``POM_5V_IN`` (Nano, TX1). Jetson AGX Orin
and AGX Xavier have no such rail: their monitors sit on parallel branches (AGX Orin:
``VDD_GPU_SOC``, ``VDD_CPU_CV`` (it includes the DLA), ``VIN_SYS_5V0``, ``VDDQ_VDD2_1V8AO``; AGX
Xavier: ``GPU``, ``CPU``, ``SOC``, ``CV``, ``VDDRQ``, ``SYS5V``), so the total is the sum of all
rails and ``source`` says so. ``VIN_SYS_5V0``/``SYS5V`` is the 5 V system branch, not the module
input: readings on AGX Orin show it below ``VDD_GPU_SOC`` alone under load. A rail sum leaves out
regulator losses and the carrier board, so it reads below a meter at the wall. Pass
``total="RAIL"`` (or a tuple of rails to sum) to choose another total.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import time
from typing import Callable, Sequence

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyReading, SampledMeter, make_reading, pick_total

log = logging.getLogger(__name__)

#: Rails that measure the whole module's input, in order of preference.
JETSON_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")

HWMON_GLOB = "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"
IIO_GLOB = "sys/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*"


def check_root(root: str | os.PathLike) -> str:
    """``root`` as a string; a one-line QFrameError when it is not a directory."""
    r = os.fspath(root)
    if not os.path.isdir(r):
        raise QFrameError(f"sysfs root {r!r} does not exist or is not a directory; give '/' or a recorded sysfs tree")
    return r


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _read_number(path: str) -> float:
    return float(_read_text(path).split()[0])


def discover_rails(root: str | os.PathLike = "/") -> dict[str, tuple]:
    """{label: ("hwmon", volt_path, curr_path) | ("iio", power_path)} for every connected rail."""
    base = check_root(root)
    rails: dict[str, tuple] = {}
    for label_path in sorted(glob.glob(os.path.join(base, HWMON_GLOB))):
        m = re.fullmatch(r"in(\d+)_label", os.path.basename(label_path))
        if m is None or m.group(1) not in ("1", "2", "3"):
            continue  # in7 is the sum of shunt voltages, not a rail
        d, n = os.path.dirname(label_path), m.group(1)
        try:
            label = _read_text(label_path)
        except OSError as e:
            log.debug("skipping %s: %s", label_path, e)
            continue
        volt, curr = os.path.join(d, f"in{n}_input"), os.path.join(d, f"curr{n}_input")
        if not label or label == "NC" or not (os.path.isfile(volt) and os.path.isfile(curr)):
            continue
        if label in rails:
            log.warning("INA3221 rail %s appears twice; keeping %s", label, rails[label][1])
            continue
        rails[label] = ("hwmon", volt, curr)
    for name_path in sorted(glob.glob(os.path.join(base, IIO_GLOB))):
        n = name_path.rsplit("_", 1)[-1]
        power = os.path.join(os.path.dirname(name_path), f"in_power{n}_input")
        try:
            label = _read_text(name_path)
        except OSError:
            continue
        if label and label not in rails and os.path.isfile(power):
            rails[label] = ("iio", power)
    return rails


def read_rail_watts(rails: dict[str, tuple]) -> dict[str, float]:
    """Instantaneous watts of each rail from ``discover_rails``."""
    out = {}
    for label, spec in rails.items():
        if spec[0] == "hwmon":
            out[label] = _read_number(spec[1]) * _read_number(spec[2]) / 1e6  # mV * mA -> W
        else:
            out[label] = _read_number(spec[1]) / 1e3  # mW -> W
    return out


class Ina3221Meter(SampledMeter):
    """Jetson INA3221 rails sampled every ``interval_s`` in a thread and integrated (trapezoid)."""

    name = "ina3221"

    def __init__(self, root: str | os.PathLike = "/", interval_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, threaded: bool = True,
                 total: str | Sequence[str] | None = None):
        super().__init__(interval_s=interval_s, clock=clock, threaded=threaded)
        self.root = check_root(root)
        self.total = total
        self.rails = discover_rails(self.root)
        if not self.rails:
            raise QFrameError(f"no INA3221 power rails under {self.root!r}; this is not a Jetson (or sysfs is hidden)")

    @classmethod
    def probe(cls, root: str | os.PathLike = "/", **_: object) -> str | None:
        rails = discover_rails(root)
        if not rails:
            return "no INA3221 power monitor (not a Jetson)"
        try:
            read_rail_watts(rails)
        except (OSError, ValueError) as e:
            return f"INA3221 rails not readable: {e}"
        return None

    def read_watts(self) -> dict[str, float]:
        return read_rail_watts(self.rails)

    def _reading(self, rail_joules: dict[str, float], seconds: float, n: int) -> EnergyReading:
        joules, rule = pick_total(rail_joules, JETSON_TOTAL_RAILS, self.total)
        return make_reading(joules, seconds, rail_joules, f"{self.name}: {rule}", samples=n)
