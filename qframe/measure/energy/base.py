"""The meter interface, its reading, trapezoid integration and the background power sampler.

Every reading is a measured value (``estimate`` is False): when a meter cannot measure, it says so
through ``available()``/``unavailable_reason()`` and no reading is made up.
"""

from __future__ import annotations

import abc

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from qframe.errors import QFrameError

log = logging.getLogger(__name__)

Samples = list  # list[tuple[float, dict[str, float]]]: (seconds, {rail: watts})


@dataclass
class EnergyReading:
    """Energy over one start()/stop() window.

    ``joules`` is the total the meter's rule picks (see each meter's ``source``), ``rails`` the
    joules of each measured rail. A total rail and its parts can both be in ``rails``: never sum
    ``rails`` yourself; ``joules`` is the total.
    """

    joules: float | None
    seconds: float
    avg_watts: float | None
    rails: dict[str, float] = field(default_factory=dict)
    source: str = ""
    estimate: bool = False
    samples: int | None = None  # power samples integrated (sampled meters), None for energy counters

    def to_dict(self) -> dict:
        return asdict(self)


def make_reading(joules: float | None, seconds: float, rails: dict[str, float], source: str,
                 samples: int | None = None) -> EnergyReading:
    avg = joules / seconds if joules is not None and seconds > 0 else None
    return EnergyReading(joules=joules, seconds=seconds, avg_watts=avg, rails=dict(rails), source=source,
                         estimate=False, samples=samples)


def integrate(samples: Sequence[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Joules per rail from (seconds, {rail: watts}) samples by the trapezoid rule.

    Each interval between consecutive samples contributes ``(p0 + p1) / 2 * (t1 - t0)`` for every
    rail present in both samples. Fewer than two samples give no energy (an empty dict).
    """
    out: dict[str, float] = {}
    for (t0, p0), (t1, p1) in zip(samples, samples[1:]):
        dt = t1 - t0
        if dt < 0:
            raise QFrameError(f"power samples go back in time ({t0} then {t1}); timestamps must not decrease")
        for rail, w0 in p0.items():
            if rail in p1:
                out[rail] = out.get(rail, 0.0) + 0.5 * (w0 + p1[rail]) * dt
    return out


def pick_total(rail_joules: dict[str, float], total_rails: Iterable[str],
               total: str | Sequence[str] | None = None) -> tuple[float | None, str]:
    """The total of ``rail_joules`` and a description of how it was chosen.

    ``total`` overrides the rule: a rail name (that rail alone) or a sequence of names (their
    sum). Otherwise the first of ``total_rails`` (the meter's known input/total rails) present is
    the total, alone: it is never added to the rails it contains. Only when no known total rail
    exists are all rails summed, which the description says.
    """
    if not rail_joules:
        return None, "no rail measured"
    if total is not None:
        names = [total] if isinstance(total, str) else list(total)
        missing = [n for n in names if n not in rail_joules]
        if missing:
            raise QFrameError(f"total rail(s) {', '.join(missing)} not measured; valid: {', '.join(rail_joules)}")
        if len(names) == 1:
            return rail_joules[names[0]], f"total={names[0]} (chosen by caller)"
        return sum(rail_joules[n] for n in names), f"total=sum of {'+'.join(names)} (chosen by caller)"
    for name in total_rails:
        if name in rail_joules:
            return rail_joules[name], f"total={name}"
    return sum(rail_joules.values()), f"total=sum of {'+'.join(rail_joules)} (no total rail)"


class EnergyMeter(abc.ABC):
    """One source of energy readings: ``start()``, run the work, ``stop()`` -> ``EnergyReading``.

    Also a context manager: ``with meter: work()`` leaves the reading in ``meter.reading``.
    Subclasses implement ``probe`` (None when usable here, else the reason), ``start`` and ``stop``.
    """

    name = "meter"
    reading: EnergyReading | None = None

    @classmethod
    @abc.abstractmethod
    def probe(cls, **kwargs: Any) -> str | None:
        """None when the meter can measure here, else the reason it cannot."""

    @classmethod
    def available(cls, **kwargs: Any) -> bool:
        return cls.probe(**kwargs) is None

    @classmethod
    def unavailable_reason(cls, **kwargs: Any) -> str:
        """Why the meter cannot measure here; "" when it can."""
        return cls.probe(**kwargs) or ""

    @abc.abstractmethod
    def start(self) -> None:
        """Begin a measurement window."""

    @abc.abstractmethod
    def stop(self) -> EnergyReading:
        """End the window and return its reading."""

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, EnergyReading]:
        """Run ``fn()`` between start() and stop(); returns its result and the reading."""
        self.start()
        try:
            result = fn()
        except BaseException:
            self.stop()
            raise
        return result, self.stop()

    def __enter__(self) -> "EnergyMeter":
        self.reading = None
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.reading = self.stop()


class PowerSampler:
    """Calls ``read()`` -> {rail: watts} at start, every ``interval_s`` in a daemon thread, and at stop.

    With ``threaded=False`` no thread runs: the caller adds samples with ``sample()`` (tests use this
    with a fake ``clock`` for exact, repeatable integrals).
    """

    def __init__(self, read: Callable[[], dict[str, float]], interval_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, threaded: bool = True):
        if not interval_s > 0:
            raise QFrameError(f"sampling interval_s={interval_s!r} is invalid; valid: a number of seconds > 0")
        self.read, self.interval_s, self.clock, self.threaded = read, float(interval_s), clock, threaded
        self.samples: Samples = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def sample(self) -> None:
        t = self.clock()
        watts = self.read()
        with self._lock:
            self.samples.append((t, watts))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except BaseException as e:  # reported by stop(), in the caller's thread
                self._error = e
                return

    def start(self) -> None:
        self.samples, self._error = [], None
        self._stop.clear()
        self.sample()
        if self.threaded:
            self._thread = threading.Thread(target=self._loop, name="qframe-power-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> Samples:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise QFrameError(f"power sampling failed: {self._error}")
        self.sample()
        with self._lock:
            return list(self.samples)


class SampledMeter(EnergyMeter):
    """A meter that integrates sampled power: subclasses give ``read_watts`` and ``_reading``."""

    def __init__(self, interval_s: float = 0.05, clock: Callable[[], float] = time.monotonic, threaded: bool = True):
        self.interval_s, self.clock, self.threaded = interval_s, clock, threaded
        self._sampler: PowerSampler | None = None

    @abc.abstractmethod
    def read_watts(self) -> dict[str, float]:
        """Instantaneous power of each rail, in watts."""

    @abc.abstractmethod
    def _reading(self, rail_joules: dict[str, float], seconds: float, n: int) -> EnergyReading:
        """The reading for integrated rail energies (the meter's total rule)."""

    def start(self) -> None:
        self._sampler = PowerSampler(self.read_watts, self.interval_s, self.clock, self.threaded)
        self._sampler.start()

    def sample(self) -> None:
        """Take one sample now (in addition to the background thread's, or instead of it)."""
        if self._sampler is None:
            raise QFrameError(f"{self.name} meter: sample() called before start()")
        self._sampler.sample()

    def stop(self) -> EnergyReading:
        if self._sampler is None:
            raise QFrameError(f"{self.name} meter: stop() called before start()")
        samples, self._sampler = self._sampler.stop(), None
        seconds = samples[-1][0] - samples[0][0]
        return self._reading(integrate(samples), seconds, len(samples))
