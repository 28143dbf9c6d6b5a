"""Power rails from ``tegrastats`` lines: a parser and a meter that integrates them.

tegrastats prints each rail as ``NAME current/average`` in mW: with a unit on Orin
(``VDD_GPU_SOC 2387mW/2387mW``), without one on JetPack 4 (``POM_5V_IN 3224/3224``). Fields such
as ``RAM 2850/30536MB`` end in another unit and are not rails. The total follows the INA3221 rule
(``jetson.JETSON_TOTAL_RAILS``): ``VDD_IN``/``POM_5V_IN`` alone where present, else the sum of
all rails (AGX Orin, AGX Xavier), said in ``source``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from typing import Callable, Iterable, Sequence

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyMeter, EnergyReading, integrate, make_reading, pick_total
from qframe.measure.energy.jetson import JETSON_TOTAL_RAILS

log = logging.getLogger(__name__)

_RAIL = re.compile(r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")


def parse_tegrastats(line: str, which: str = "current") -> dict[str, float]:
    """{rail: watts} of one tegrastats line; ``which`` picks the ``"current"`` or ``"average"`` value."""
    if which not in ("current", "average"):
        raise QFrameError(f"unknown tegrastats value {which!r}; valid: current, average")
    group = 2 if which == "current" else 3
    return {m.group(1): int(m.group(group)) / 1e3 for m in _RAIL.finditer(line)}


class TegrastatsMeter(EnergyMeter):
    """Integrates (timestamp, tegrastats line) samples by the trapezoid rule.

    Live: ``start()`` runs ``tegrastats --interval interval_ms`` and stamps each line it prints with
    ``clock()``. Replay: ``TegrastatsMeter.replay(pairs)`` (or ``command=None`` and ``feed``) integrates a
    recorded log. The window is from the first to the last parsed line.
    """

    name = "tegrastats"

    def __init__(self, interval_ms: int = 100, command: str | None = "tegrastats",
                 clock: Callable[[], float] = time.monotonic, total: str | Sequence[str] | None = None):
        self.interval_ms, self.command, self.clock, self.total = int(interval_ms), command, clock, total
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = False

    @classmethod
    def probe(cls, command: str = "tegrastats", **_: object) -> str | None:
        return None if shutil.which(command) else f"{command} not found on PATH (not a Jetson)"

    def feed(self, timestamp: float, line: str) -> None:
        """Add one line taken at ``timestamp`` seconds; lines without power rails are ignored."""
        rails = parse_tegrastats(line)
        if rails:
            with self._lock:
                self.samples.append((float(timestamp), rails))

    def _read_lines(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self.feed(self.clock(), line)

    def start(self) -> None:
        self.samples, self._started = [], True
        if self.command is None:
            return
        path = shutil.which(self.command)
        if path is None:
            raise QFrameError(f"{self.command} not found on PATH; the tegrastats meter runs on a Jetson only")
        cmd = [path, "--interval", str(self.interval_ms)]
        stdbuf = shutil.which("stdbuf")  # line-buffer its stdout so each line is stamped when it is printed
        self._proc = subprocess.Popen([stdbuf, "-oL", *cmd] if stdbuf else cmd, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read_lines, name="qframe-tegrastats", daemon=True)
        self._thread.start()

    def stop(self) -> EnergyReading:
        if not self._started:
            raise QFrameError("tegrastats meter: stop() called before start()")
        self._started = False
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._thread is not None:
                self._thread.join(timeout=5)
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = self._thread = None
        with self._lock:
            samples = sorted(self.samples, key=lambda s: s[0])
        if len(samples) < 2:
            log.warning("tegrastats gave %d power line(s); at least 2 are needed for an energy", len(samples))
        rail_joules = integrate(samples)
        seconds = samples[-1][0] - samples[0][0] if samples else 0.0
        joules, rule = pick_total(rail_joules, JETSON_TOTAL_RAILS, self.total)
        return make_reading(joules, seconds, rail_joules, f"{self.name}: {rule}", samples=len(samples))

    @classmethod
    def replay(cls, pairs: Iterable[tuple[float, str]], total: str | Sequence[str] | None = None) -> EnergyReading:
        """The reading of a recorded log given as (timestamp seconds, line) pairs."""
        meter = cls(command=None, total=total)
        meter.start()
        for t, line in pairs:
            meter.feed(t, line)
        return meter.stop()
