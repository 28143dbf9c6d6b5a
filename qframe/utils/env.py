"""What a result was measured on: machine, versions, date."""

from __future__ import annotations

import datetime
import os
import platform
from importlib import metadata


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvidia_driver() -> str | None:
    """The NVIDIA driver version through NVML, or None where NVML is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no driver
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def gpu() -> dict | None:
    """Name, compute capability, CUDA and driver version of GPU 0, only if this process already uses CUDA."""
    import torch

    if not torch.cuda.is_initialized():
        return None
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, "cuda": torch.version.cuda, "driver": nvidia_driver()}


def environment() -> dict:
    """Machine, library versions and UTC date for a results file (never initialises CUDA)."""
    import torch

    from qframe.kernels.cpu.isa import ENV, detected

    machine = {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "system": platform.system(), "int8_isa": detected()}
    if os.environ.get(ENV, "").strip():  # a forced ISA (qframe's CPU kernels and tables take it)
        machine["int8_isa_forced"] = os.environ[ENV].strip().lower()
    device = gpu()
    if device is not None:
        machine["gpu"] = device
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{d: _version(d) for d in ("qframe", "numpy", "hydra-core", "omegaconf", "scikit-learn", "triton",
                                                 "onnxruntime")}},
    }


def machine_text(machine: dict, *details: str) -> str:
    """``CPU (N cores, details..., int8 ISA X[, forced to Y])``: the machine a results file was measured on,
    from :func:`environment`'s ``machine`` (results from before the ISA was recorded lack it)."""
    parts = [f"{machine.get('cores')} cores", *details]
    if machine.get("int8_isa"):
        parts.append(f"int8 ISA {machine['int8_isa']}")
    if machine.get("int8_isa_forced"):
        parts.append(f"forced to {machine['int8_isa_forced']}")
    return f"{machine.get('cpu')} ({', '.join(parts)})"


def results_header(title: str, env: dict, command: str, **versions) -> str:
    """The head of a benchmark's results file: title, machine, torch / ``versions`` / qframe, date, command."""
    libs = ", ".join([f"torch {env['versions']['torch']}", *(f"{k} {v}" for k, v in versions.items()),
                      f"qframe {env['versions']['qframe']}"])
    return (f"# {title}\n\nMachine: {machine_text(env['machine'])}; {libs}; "
            f"{env['date']}.\nCommand: `{command}`\n\n")
