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


def environment() -> dict:
    """Machine, library versions and UTC date for a results file (never initialises CUDA)."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "system": platform.system()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{d: _version(d) for d in ("qframe", "numpy", "hydra-core", "omegaconf", "scikit-learn")}},
    }
