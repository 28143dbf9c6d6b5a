"""trtexec: where it is, which TensorRT it is, how to call it, and what its timing run printed.

:func:`parse_performance` reads the ``=== Performance summary ===`` block that trtexec 8.5 to 11
prints (``Throughput: N qps``, ``Latency: min = .. ms, max = .., mean = .., median = ..,
percentile(90%) = ..``, the same for ``GPU Compute Time`` and the others, ``Total Host Walltime``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from qframe.errors import QFrameError

JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"

#: ``runner(args, cwd) -> (return code, printed text)``: trtexec with ``args`` (no program name) run
#: in ``cwd``. Tests substitute recorded outputs.
Runner = Callable[[list, Path], tuple]


def find_trtexec() -> str | None:
    """``$TRTEXEC``, ``trtexec`` on PATH, or JetPack's ``/usr/src/tensorrt/bin/trtexec``; None if none exists."""
    for candidate in (os.environ.get("TRTEXEC"), shutil.which("trtexec"), JETPACK_TRTEXEC):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def subprocess_runner(trtexec: str, timeout_s: float = 3600) -> Runner:
    """A runner that executes ``trtexec`` for real."""
    def run(args: list, cwd: Path) -> tuple:
        proc = subprocess.run([trtexec, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout_s)
        return proc.returncode, proc.stdout + proc.stderr
    return run


def banner_version(text: str) -> tuple[int, int, int] | None:
    """The TensorRT version in trtexec's ``[TensorRT v100300]`` banner, or None."""
    from qframe.export.trt_plan import parse_version

    m = re.search(r"\[TensorRT v(\d+)\]", text)
    return parse_version(m.group(1)) if m else None


_STAT = re.compile(r"(min|max|mean|median|percentile\((\d+)%\)) = ([0-9.eE+-]+) ms")


def parse_performance(text: str) -> dict:
    """Throughput and latency statistics from a trtexec timing run's output.

    Returns ``{"throughput_qps", "latency": {...}, "gpu_compute": {...}, "host_walltime_s",
    "queries", "version"}``; each statistics dict has ``min``, ``max``, ``mean``, ``median`` and
    ``p90``/``p95``/``p99`` where printed (ms). Raises when the summary is missing (a failed run).
    """
    if "=== Performance summary ===" not in text:
        lines = text.splitlines()  # the first error says why; the FAILED banner only that it failed
        last = next((x for x in lines if "[E]" in x), next((x for x in lines if "FAILED" in x), ""))
        raise QFrameError(f"trtexec printed no performance summary{': ' + last.strip()[:200] if last else ''}")
    summary = text.split("=== Performance summary ===", 1)[1]
    out: dict = {"version": banner_version(text)}
    if m := re.search(r"Throughput: ([0-9.eE+-]+) qps", summary):
        out["throughput_qps"] = float(m.group(1))
    for key, label in (("latency", "Latency"), ("gpu_compute", "GPU Compute Time"), ("enqueue", "Enqueue Time")):
        if m := re.search(rf"\] {re.escape(label)}: (min = .*)$", summary, re.M):
            stats = {}
            for name, pct, value in _STAT.findall(m.group(1)):
                stats[f"p{pct}" if pct else name] = float(value)
            out[key] = stats
    if m := re.search(r"Total Host Walltime: ([0-9.eE+-]+) s", summary):
        out["host_walltime_s"] = float(m.group(1))
    if m := re.search(r"Timing trace has (\d+) queries over ([0-9.eE+-]+) s", text):
        out["queries"] = int(m.group(1))
    if "throughput_qps" not in out or "median" not in out.get("latency", {}):
        raise QFrameError("trtexec's performance summary has no throughput or median latency; is this a timing run?")
    return out
