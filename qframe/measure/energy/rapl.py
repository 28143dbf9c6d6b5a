"""Intel/AMD RAPL energy counters from the Linux powercap tree.

Zones are ``<root>/sys/class/powercap/intel-rapl:N`` (top level: ``package-N``, sometimes
``psys``) and ``intel-rapl:N:M`` (sub-zones of zone N: ``core``, ``uncore``, ``dram``). Each has
``name``, ``energy_uj`` (a counter in microjoules) and ``max_energy_range_uj`` (where it wraps).
AMD Zen CPUs appear under the same names. The ``intel-rapl-mmio:*`` zones repeat the package
counters through another interface and are used only when no ``intel-rapl:*`` zone exists.

Rails are keyed by name, sub-zones as ``parent/name`` (``package-0/core``). Total rule:
``total = sum of package-* zones + sum of dram zones``. ``core``/``uncore`` are parts of their
package and never added; ``dram`` is listed under the package in the tree but the package counter
does not include DRAM (Intel SDM: PKG and DRAM are separate RAPL domains), so it is added, whether
it appears as a sub-zone or as a top-level zone. ``psys`` (platform, contains the package) is
reported as a rail but is the total, alone, only when there is no package zone. With none of
these, the top-level zones are summed. ``source`` names the zones added.

Wrap-around: when a counter reads lower than before, delta = end + max_energy_range_uj - start.
A counter can wrap only once between two reads to be counted right; ``poll_s`` (60 s by default)
reads the counters in a thread during long windows (a package counter wraps after about
``max_energy_range_uj`` / power, roughly an hour at 70 W).

Since Linux 5.10 ``energy_uj`` is readable by root only on most distributions; the meter then
reports itself unavailable with that reason.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyMeter, EnergyReading, make_reading
from qframe.measure.energy.jetson import check_root

log = logging.getLogger(__name__)

POWERCAP = "sys/class/powercap"


@dataclass(frozen=True)
class RaplZone:
    key: str  # "package-0", "package-0/dram", "psys"
    name: str  # the zone's own name file
    path: str
    top_level: bool
    max_uj: int


def wrap_delta(start: int, end: int, max_uj: int) -> int:
    """Counter increase from ``start`` to ``end``, allowing one wrap at ``max_uj``."""
    return end - start if end >= start else end + max_uj - start


def _zones_of(base: str, prefix: str) -> list[RaplZone]:
    dirs = sorted(glob.glob(os.path.join(base, prefix + ":*")))
    names = {}
    for d in dirs:
        try:
            with open(os.path.join(d, "name")) as f:
                names[os.path.basename(d)] = f.read().strip()
        except OSError:
            continue
    zones = []
    for d in dirs:
        ident = os.path.basename(d)
        parts = ident.split(":")
        if ident not in names or not all(re.fullmatch(r"\d+", p) for p in parts[1:]):
            continue
        try:
            with open(os.path.join(d, "max_energy_range_uj")) as f:
                max_uj = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            log.debug("skipping RAPL zone %s without max_energy_range_uj", d)
            continue
        if not os.path.isfile(os.path.join(d, "energy_uj")):
            continue
        top = len(parts) == 2
        parent = names.get(":".join(parts[:2]), parts[1]) if not top else ""
        key = names[ident] if top else f"{parent}/{names[ident]}"
        zones.append(RaplZone(key=key, name=names[ident], path=os.path.join(d, "energy_uj"), top_level=top,
                              max_uj=max_uj))
    return zones


def discover_zones(root: str | os.PathLike = "/") -> list[RaplZone]:
    base = os.path.join(check_root(root), POWERCAP)
    if not os.path.isdir(base):
        return []
    return _zones_of(base, "intel-rapl") or _zones_of(base, "intel-rapl-mmio")


def total_zones(zones: list[RaplZone]) -> list[RaplZone]:
    """The zones whose sum is the total (see the module docstring)."""
    packages = [z for z in zones if z.top_level and z.name.startswith("package")]
    if packages:
        return packages + [z for z in zones if z.name == "dram"]
    psys = [z for z in zones if z.top_level and z.name == "psys"]
    return psys or [z for z in zones if z.top_level]


def _read_uj(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


class RaplMeter(EnergyMeter):
    """RAPL package (+ DRAM) energy between start() and stop()."""

    name = "rapl"

    def __init__(self, root: str | os.PathLike = "/", clock: Callable[[], float] = time.monotonic,
                 poll_s: float | None = 60.0):
        self.root, self.clock, self.poll_s = check_root(root), clock, poll_s
        self.zones = discover_zones(self.root)
        if not self.zones:
            raise QFrameError(f"no RAPL powercap zones under {os.path.join(self.root, POWERCAP)!r}")
        self._last: dict[str, int] = {}
        self._acc: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0: float | None = None

    @classmethod
    def probe(cls, root: str | os.PathLike = "/", **_: object) -> str | None:
        zones = discover_zones(root)
        if not zones:
            return "no RAPL powercap zones"
        try:
            for z in zones:
                _read_uj(z.path)
        except PermissionError:
            return "RAPL energy_uj is readable by root only here"
        except (OSError, ValueError) as e:
            return f"RAPL energy_uj not readable: {e}"
        return None

    def _read_all(self) -> dict[str, int]:
        return {z.key: _read_uj(z.path) for z in self.zones}

    def poll(self) -> None:
        """Read every counter now and add its increase since the last read (wraps included)."""
        now = self._read_all()
        with self._lock:
            for z in self.zones:
                self._acc[z.key] += wrap_delta(self._last[z.key], now[z.key], z.max_uj)
            self._last = now

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except (OSError, ValueError) as e:
                log.warning("RAPL poll failed: %s", e)

    def start(self) -> None:
        self._last = self._read_all()
        self._acc = {z.key: 0 for z in self.zones}
        self._t0 = self.clock()
        if self.poll_s:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="qframe-rapl-poll", daemon=True)
            self._thread.start()

    def stop(self) -> EnergyReading:
        if self._t0 is None:
            raise QFrameError("rapl meter: stop() called before start()")
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.poll()
        seconds, self._t0 = self.clock() - self._t0, None
        rails = {k: v / 1e6 for k, v in self._acc.items()}
        chosen = total_zones(self.zones)
        joules = sum(rails[z.key] for z in chosen) if chosen else None
        rule = f"total={'+'.join(z.key for z in chosen)}" if chosen else "no total zone"
        return make_reading(joules, seconds, rails, f"{self.name}: {rule}")
