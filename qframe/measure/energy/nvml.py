"""NVIDIA GPU board energy through NVML (``pynvml``, from the ``nvidia-ml-py`` package).

``pynvml`` is imported only when this meter is probed or started, and only if installed. The
meter reads ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded; Volta and later)
at start and stop. Where that call is not supported, it samples ``nvmlDeviceGetPowerUsage`` (mW)
every ``interval_s`` in a thread and integrates by the trapezoid rule; on recent GPUs that power
is itself averaged over about a second by the driver, so prefer windows of several seconds.
The reading covers the whole board of GPU ``index`` (one rail, ``gpu<index>``).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from qframe.errors import QFrameError
from qframe.measure.energy.base import EnergyReading, SampledMeter, make_reading

log = logging.getLogger(__name__)


def _import_pynvml() -> Any:
    import pynvml  # noqa: PLC0415 - optional dependency, imported lazily

    return pynvml


class NvmlMeter(SampledMeter):
    """Energy of one NVIDIA GPU: the NVML energy counter, else integrated power samples."""

    name = "nvml"

    def __init__(self, index: int = 0, interval_s: float = 0.05, clock: Callable[[], float] = time.monotonic,
                 threaded: bool = True, nvml: Any = None):
        super().__init__(interval_s=interval_s, clock=clock, threaded=threaded)
        self.index = int(index)
        self._nvml = nvml
        self._handle = None
        self._counter_mj: int | None = None
        self._t0: float | None = None
        self.mode: str | None = None  # "energy counter" or "power samples" once started

    @classmethod
    def probe(cls, index: int = 0, nvml: Any = None, **_: object) -> str | None:
        try:
            nv = nvml if nvml is not None else _import_pynvml()
        except ImportError:
            return "pynvml not installed (pip install nvidia-ml-py)"
        try:
            nv.nvmlInit()
        except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
            return f"NVML not usable (no NVIDIA driver/GPU): {e}"
        try:
            count = nv.nvmlDeviceGetCount()
            return None if 0 <= index < count else f"no NVIDIA GPU {index} (NVML sees {count})"
        except Exception as e:
            return f"NVML not usable: {e}"
        finally:
            nv.nvmlShutdown()

    def _lib(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = _import_pynvml()
            except ImportError as e:
                raise QFrameError("the NVML meter needs pynvml; pip install nvidia-ml-py") from e
        return self._nvml

    def read_watts(self) -> dict[str, float]:
        return {f"gpu{self.index}": self._lib().nvmlDeviceGetPowerUsage(self._handle) / 1e3}

    def start(self) -> None:
        nv = self._lib()
        nv.nvmlInit()
        self._handle = nv.nvmlDeviceGetHandleByIndex(self.index)
        try:
            self._counter_mj = int(nv.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self._t0, self.mode = self.clock(), "energy counter"
        except Exception as e:  # NVMLError_NotSupported before Volta
            log.info("NVML energy counter not supported on GPU %d (%s); sampling power instead", self.index, e)
            self._counter_mj, self.mode = None, "power samples"
            super().start()

    def stop(self) -> EnergyReading:
        if self.mode is None:
            raise QFrameError("nvml meter: stop() called before start()")
        nv = self._lib()
        try:
            if self.mode == "energy counter":
                end = int(nv.nvmlDeviceGetTotalEnergyConsumption(self._handle))
                seconds = self.clock() - self._t0
                joules = (end - self._counter_mj) / 1e3
                return make_reading(joules, seconds, {f"gpu{self.index}": joules},
                                    f"{self.name}: GPU {self.index} energy counter")
            return super().stop()
        finally:
            self.mode = None
            nv.nvmlShutdown()

    def _reading(self, rail_joules: dict[str, float], seconds: float, n: int) -> EnergyReading:
        joules = rail_joules.get(f"gpu{self.index}")
        return make_reading(joules, seconds, rail_joules, f"{self.name}: GPU {self.index} power samples (trapezoid)",
                            samples=n)
