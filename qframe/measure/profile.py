"""Speed, memory and energy of one runnable form of a model, measured the same way for every form."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.measure.energy import detect_meters, energy_per_inference, unavailable_reason
from qframe.measure.timing import peak_memory, time_model

log = logging.getLogger(__name__)


@dataclass
class MeasureConfig:
    """What the measure stage times: batch sizes, warm-up and timed runs, and energy when a meter exists."""

    enabled: bool = True
    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 5
    runs: int = 20
    energy: bool = True

    def __post_init__(self):
        if not self.batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in self.batch_sizes):
            raise QFrameError(f"measure.batch_sizes={list(self.batch_sizes)!r} is invalid; valid: positive integers")
        for name in ("warmup", "runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "warmup" else 1):
                raise QFrameError(f"measure.{name}={value!r} is invalid; valid: an integer >= {0 if name == 'warmup' else 1}")


class Profiler:
    """Times models on one device and, where a meter exists, measures the energy of the largest batch."""

    def __init__(self, cfg: MeasureConfig, device: torch.device | str, input_shape: tuple[int, ...]):
        self.cfg, self.device, self.input_shape = cfg, torch.device(device), tuple(input_shape)
        meters = detect_meters() if cfg.energy else []
        self.meter = meters[0] if meters else None
        self.energy_note = (f"measured with {type(self.meter).__name__}" if self.meter is not None
                            else (unavailable_reason() or "unavailable") if cfg.energy else "not measured (measure.energy=false)")
        log.info("energy: %s", self.energy_note)

    def __call__(self, model: nn.Module) -> dict:
        """Latency, throughput, peak memory and energy of ``model`` as a flat dict of report columns."""
        # measuring draws random inputs; it must not shift the RNG stream that training continues with
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return self._measure(model)

    def _measure(self, model: nn.Module) -> dict:
        cfg = self.cfg
        rows = time_model(model, (1, *self.input_shape), cfg.batch_sizes, self.device, cfg.warmup, cfg.runs)
        first, last = rows[0], rows[-1]
        x = torch.randn((last["batch_size"], *self.input_shape), device=self.device)

        def window():
            with torch.inference_mode():
                for _ in range(cfg.runs):
                    model(x)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        memory = peak_memory(window, self.device)
        out = {
            "latency_ms": first["median_ms"], "latency_p90_ms": first["p90_ms"], "latency_batch": first["batch_size"],
            "throughput": last["throughput"], "throughput_batch": last["batch_size"],
            "peak_memory_bytes": memory.get("cuda_peak_allocated_bytes", memory["cpu_peak_rss_bytes"]),
            "timings": rows, "watts": None, "images_per_joule": None, "energy": self.energy_note,
        }
        if self.meter is not None:
            _, reading = self.meter.measure(window)
            joules = energy_per_inference(reading, cfg.runs * last["batch_size"])
            out.update(watts=reading.avg_watts, images_per_joule=(1.0 / joules) if joules else None,
                       energy=f"{reading.source}; {reading.joules:.3f} J over {reading.seconds:.2f} s")
        return out
