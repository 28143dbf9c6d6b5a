"""Speed, memory and energy of one runnable form of a model, measured the same way for every form."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from qframe.errors import QFrameError, check_field_types, require_device
from qframe.measure.energy import detect_meters, energy_per_inference, idle_watts, unavailable_reason
from qframe.measure.timing import peak_memory, time_model

log = logging.getLogger(__name__)


@dataclass
class MeasureConfig:
    """What the measure stage times: batch sizes, warm-up and timed runs, and energy when a meter exists.

    Energy is read over windows of at least ``energy_seconds`` of back-to-back batches of the largest
    size (meters such as NVML average power over about a second, so short windows misread), and the
    idle power, measured once by the same meter over ``idle_seconds`` of doing nothing before the
    first model is measured, is subtracted: joules per image are the model's own. ``idle_seconds=0``
    reports the gross energy instead.
    """

    enabled: bool = True
    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    runs: int = 20
    energy: bool = True
    energy_seconds: float = 3.0
    idle_seconds: float = 3.0
    convert: bool = True  # a row for qframe.convert's integer model of the main recipe
    bf16: bool = True  # on a GPU, a row for the FP32 model under bf16 autocast

    def __post_init__(self):
        check_field_types(self, 'measure', kinds=('bool',))  # the numbers have checks of their own below
        if not self.batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch_sizes):
            raise QFrameError(f"measure.batch_sizes={list(self.batch_sizes)!r} is invalid; valid: positive integers")
        for name in ("warmup", "runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise QFrameError(f"measure.{name}={value!r} is invalid; valid: an integer >= {0 if name == 'warmup' else 1}")
        for name, least in (("energy_seconds", "> 0"), ("idle_seconds", ">= 0")):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > 0 if least == "> 0" else value >= 0)
            if not ok:
                raise QFrameError(f"measure.{name}={value!r} is invalid; valid: a number of seconds {least}")


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast`` with ``dtype`` (e.g. bf16 mixed precision on a GPU)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.model(x)


class Profiler:
    """Times models on one device and, where a meter exists, measures the energy of the largest batch."""

    def __init__(self, cfg: MeasureConfig, device: torch.device | str, input_shape: tuple[int, ...], meters=None):
        device = require_device(device, "Profiler")
        if device is None:
            raise QFrameError("Profiler: device=None is invalid; valid: the device to measure on, e.g. 'cpu'")
        self.cfg, self.device, self.input_shape = cfg, device, tuple(input_shape)
        if meters is None:
            meters = detect_meters() if cfg.energy else []
        self.meter = meters[0] if meters else None
        self.idle_watts: float | None = None
        self._idle_measured = False
        self.energy_note = (f"measured with {type(self.meter).__name__}" if self.meter is not None
                            else (unavailable_reason() or "unavailable") if cfg.energy else "not measured (measure.energy=false)")
        log.info("energy: %s", self.energy_note)

    def idle_note(self) -> str:
        """How the idle power was measured (for the report), or why it was not."""
        if self.meter is None:
            return self.energy_note
        if self.cfg.idle_seconds <= 0:
            return "idle power not subtracted (measure.idle_seconds=0): gross energy"
        if self.idle_watts is None:
            return "idle power not measured yet"
        return (f"idle power {self.idle_watts:.1f} W: the same meter over {self.cfg.idle_seconds:g} s with nothing "
                f"running on the {self.device.type}, before the first model was measured; subtracted from every window")

    def __call__(self, model: nn.Module) -> dict:
        """Latency, throughput, peak memory and energy of ``model`` as a flat dict of report columns."""
        # measuring draws random inputs; it must not shift the RNG stream that training continues with
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._measure(model)

    def _measure_idle(self) -> None:
        if self._idle_measured or self.meter is None or self.cfg.idle_seconds <= 0:
            return
        self._idle_measured = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.idle_watts = idle_watts(self.meter, self.cfg.idle_seconds)
        log.info("energy: %s", self.idle_note())

    def _measure(self, model: nn.Module) -> dict:
        cfg = self.cfg
        rows = time_model(model, (1, *self.input_shape), cfg.batch_sizes, self.device, cfg.warmup, cfg.runs)
        # latency at the first batch size listed; throughput, peak memory and energy at the largest (the order
        # of batch_sizes is the user's: [32, 1] must not time the throughput at batch 1)
        first, last = rows[0], max(rows, key=lambda row: row["batch_size"])
        x = torch.randn((last["batch_size"], *self.input_shape), device=self.device)

        def window(calls: int):
            with torch.inference_mode():
                for _ in range(calls):
                    model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        def energy_window(calls: int) -> int:
            """Batches sized from the timed median, then more until energy_seconds have passed (on a busy
            machine the median overstates the batch time); returns how many ran."""
            start, done = time.perf_counter(), 0
            while True:
                window(calls)
                done += calls
                if time.perf_counter() - start >= cfg.energy_seconds:
                    return done
                calls = max(1, calls // 4)

        memory = peak_memory(lambda: window(cfg.runs), self.device)
        out = {
            "latency_ms": first["median_ms"], "latency_p90_ms": first["p90_ms"], "latency_batch": first["batch_size"],
            "throughput": last["throughput"], "throughput_batch": last["batch_size"],
            "peak_memory_bytes": memory.get("cuda_peak_allocated_bytes", memory["cpu_peak_rss_bytes"]),
            "timings": rows, "watts": None, "idle_watts": None, "joules_per_image": None, "images_per_joule": None,
            "energy": self.energy_note,
        }
        if self.meter is not None:
            self._measure_idle()
            calls, reading = self.meter.measure(lambda: energy_window(
                max(1, math.ceil(cfg.energy_seconds * 1e3 / max(last["median_ms"], 1e-3)))))
            joules = energy_per_inference(reading, calls * last["batch_size"], self.idle_watts)
            idle = "" if self.idle_watts is None else f", idle {self.idle_watts:.1f} W subtracted"
            out.update(watts=reading.avg_watts, idle_watts=self.idle_watts, joules_per_image=joules,
                       images_per_joule=(1.0 / joules) if joules and joules > 0 else None,
                       energy=f"{reading.source}; {_joules(reading.joules)} over {reading.seconds:.2f} s, "
                              f"{calls} batches of {last['batch_size']}{idle}")
        return out


def _joules(value: float | None) -> str:
    return "no total" if value is None else f"{value:.3f} J"
