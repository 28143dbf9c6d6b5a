"""Latency, throughput, peak memory and file size.

Conventions:

- ``benchmark`` times each call of ``fn(inputs)`` on its own. On a CUDA device (no ``clock`` or
  ``sync`` injected) it records a CUDA event before and after the call on the current stream and
  reads the time between them once the second has completed: the time the device spent from the
  first kernel's queueing to the last kernel's end, host launch gaps included. Elsewhere it uses
  a monotonic clock (``time.perf_counter`` unless a ``clock`` is injected), calling ``sync`` (on
  CUDA ``torch.cuda.synchronize``) before starting the clock and after ``fn`` returns; on a CPU
  CUDA is never touched (not even queried), so timing there leaves ``torch.cuda.is_initialized()``
  False.
- Warm-up calls run first and are not timed. ``median_ms`` is the reported latency; ``p90_ms`` is
  the 90th percentile with linear interpolation between order statistics (NumPy's default
  ``"linear"`` method); ``throughput`` is images per second, ``batch_size / median seconds``.
- ``peak_memory`` reports the process's peak resident set size during ``fn`` on the CPU (see its
  docstring for how) and, on a CUDA device, ``torch.cuda.max_memory_allocated`` during ``fn``.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from qframe.errors import QFrameError, require_device, require_module
from qframe.utils.modules import eval_mode

log = logging.getLogger(__name__)


@dataclass
class TimingResult:
    """Per-call latencies of one benchmark, in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    batch_size: int
    throughput: float | None  # images/s = batch_size / median seconds; None if the median is 0
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """Summary fields (not the per-call samples), ready for JSON."""
        d = asdict(self)
        d.pop("samples_ms")
        return d


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly between order statistics."""
    if not values:
        raise QFrameError("percentile of no values; give at least one")
    if not 0 <= q <= 100:
        raise QFrameError(f"percentile q={q!r} is out of range; valid: 0..100")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(samples_ms: Sequence[float], *, warmup: int = 0, batch_size: int = 1) -> TimingResult:
    """A ``TimingResult`` from per-call times in milliseconds."""
    if not samples_ms:
        raise QFrameError("no timed runs to summarize; runs must be >= 1")
    median = statistics.median(samples_ms)
    return TimingResult(
        median_ms=median, p90_ms=percentile(samples_ms, 90), mean_ms=statistics.fmean(samples_ms),
        min_ms=min(samples_ms), max_ms=max(samples_ms), runs=len(samples_ms), warmup=warmup,
        batch_size=batch_size, throughput=batch_size / (median / 1e3) if median > 0 else None,
        samples_ms=list(samples_ms))


def _first_tensor(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (list, tuple)):
        for item in inputs:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _sync_for(device: torch.device) -> Callable[[], None] | None:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return None


def benchmark(fn: Callable[[Any], Any], inputs: Any, *, warmup: int = 5, runs: int = 30,
              device: str | torch.device | None = None, sync: Callable[[], None] | None = None,
              batch_size: int | None = None, clock: Callable[[], float] = time.perf_counter) -> TimingResult:
    """Time ``fn(inputs)``: ``warmup`` untimed calls, then ``runs`` calls timed one by one.

    ``device`` defaults to the device of the first tensor in ``inputs`` (CPU if there is none);
    ``sync`` overrides the device synchronisation (``torch.cuda.synchronize`` on CUDA, nothing on
    CPU). ``batch_size`` defaults to the leading dimension of the first tensor in ``inputs``.
    ``clock`` returns seconds; inject a fake one to test.
    """
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise QFrameError(f"warmup={warmup!r} is invalid; valid: an integer >= 0")
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise QFrameError(f"runs={runs!r} is invalid; valid: an integer >= 1")
    tensor = _first_tensor(inputs)
    dev = torch.device(device) if device is not None else (tensor.device if tensor is not None else torch.device("cpu"))
    events = dev.type == "cuda" and sync is None and clock is time.perf_counter
    if sync is None:
        sync = _sync_for(dev)
    if batch_size is None:
        batch_size = int(tensor.shape[0]) if tensor is not None and tensor.dim() > 0 else 1
    if batch_size < 1:
        raise QFrameError(f"batch_size={batch_size!r} is invalid; valid: an integer >= 1")

    for _ in range(warmup):
        fn(inputs)
    if sync is not None:
        sync()
    if events:
        return summarize(_cuda_event_times(fn, inputs, runs, dev), warmup=warmup, batch_size=batch_size)
    samples = []
    for _ in range(runs):
        start = clock()
        fn(inputs)
        if sync is not None:
            sync()
        samples.append((clock() - start) * 1e3)
    return summarize(samples, warmup=warmup, batch_size=batch_size)


def _cuda_event_times(fn: Callable[[Any], Any], inputs: Any, runs: int, device: torch.device) -> list[float]:
    """Milliseconds between CUDA events recorded around each of ``runs`` calls (see the module docstring)."""
    samples = []
    with torch.cuda.device(device):
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    return samples


def time_model(model: torch.nn.Module, example_batch_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 8, 32),
               device: str | torch.device = "cpu", warmup: int = 5, runs: int = 30, dtype: torch.dtype = torch.float32,
               clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Inference latency of ``model`` at each batch size, one row (a dict) per batch size.

    ``example_batch_shape`` is the shape of one input batch, e.g. ``(1, 3, 224, 224)``; its leading
    (batch) dimension is replaced by each of ``batch_sizes``. Each batch size gets a fresh
    ``torch.randn`` input of ``dtype`` on ``device`` and runs under ``torch.inference_mode()``.
    The model is moved to ``device`` (as ``model.to`` does) and put in eval mode for the
    measurement; its train/eval mode is restored afterwards.
    """
    require_module(model, "time_model")
    try:
        shape = tuple(int(s) for s in example_batch_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) < 1 or any(s < 1 for s in shape):
        raise QFrameError(f"example_batch_shape={example_batch_shape!r} is invalid; valid: positive sizes, "
                          "batch first, e.g. (1, 3, 224, 224)")
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple, range)) else []
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise QFrameError(f"batch_sizes={batch_sizes!r} is invalid; valid: a list of positive integers, "
                          "e.g. (1, 8, 32)")
    dev = require_device(device if device is not None else "cpu", "time_model")
    if dev.type == "meta":  # meta tensors have shapes but no data: nothing would be computed, the times made up
        raise QFrameError(f"time_model: device={device!r} computes nothing to time; valid here: 'cpu'"
                          f"{', ' + repr('cuda') if torch.cuda.is_available() else ''}")
    rows = []
    with eval_mode(model.to(dev)):
        with torch.inference_mode():
            for bs in sizes:
                x = torch.randn((bs, *shape[1:]), dtype=dtype, device=dev)
                result = benchmark(model, x, warmup=warmup, runs=runs, device=dev, batch_size=bs, clock=clock)
                rows.append({"device": str(dev), "dtype": str(dtype).replace("torch.", ""),
                             "input_shape": list(x.shape), **result.to_dict()})
                log.debug("batch %d on %s: median %.3f ms", bs, dev, result.median_ms)
    return rows


def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # bytes on macOS, KiB on Linux


def peak_memory(fn: Callable[[], Any], device: str | torch.device | None = None) -> dict:
    """Peak memory while ``fn()`` runs.

    CPU (always): on Linux the kernel's high-water mark ``VmHWM`` of ``/proc/self/status`` is reset
    to the current RSS by writing ``5`` to ``/proc/self/clear_refs`` before ``fn`` runs, so
    ``cpu_peak_delta_bytes`` = VmHWM after - VmRSS before is the growth of the resident set during
    ``fn`` (``cpu_method`` = ``"VmHWM"``). Where that reset is impossible, ``getrusage`` ``ru_maxrss``
    is used (``cpu_method`` = ``"ru_maxrss"``): it is a lifetime peak, so its delta only counts
    growth above any earlier peak of the process and may be 0.

    CUDA (only when ``device`` is a CUDA device): the peak statistics are reset, and
    ``cuda_peak_allocated_bytes`` is ``torch.cuda.max_memory_allocated`` during ``fn``,
    ``cuda_peak_delta_bytes`` its excess over what was allocated before.
    """
    dev = require_device(device, "peak_memory") or torch.device("cpu")
    out: dict[str, Any] = {"device": str(dev)}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        cuda_before = torch.cuda.memory_allocated(dev)
    if _reset_peak_rss():
        method, before = "VmHWM", _proc_status_kib("VmRSS") * 1024
    else:
        method, before = "ru_maxrss", _ru_maxrss_bytes()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(cuda_peak_allocated_bytes=int(peak), cuda_peak_delta_bytes=int(peak - cuda_before))
    peak_rss = _proc_status_kib("VmHWM") * 1024 if method == "VmHWM" else _ru_maxrss_bytes()
    out.update(cpu_peak_rss_bytes=int(peak_rss), cpu_peak_delta_bytes=max(0, int(peak_rss - before)), cpu_method=method)
    return out


def file_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a file, or of all regular files under a directory (symlinks not followed)."""
    p = os.fspath(path)
    if os.path.isfile(p):
        return os.path.getsize(p)
    if os.path.isdir(p):
        total = 0
        for dirpath, _, files in os.walk(p):
            for name in files:
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    total += os.path.getsize(full)
        return total
    raise QFrameError(f"no file or directory at {p!r}; give the path of a saved model or engine")
