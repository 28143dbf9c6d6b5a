"""Measurement: model size, timing and memory, and energy meters (RAPL, NVML, Jetson INA3221).

Exports are resolved lazily (as in ``qframe/__init__.py``): importing this package, or
``qframe.measure.energy``, imports neither torch nor pynvml.
"""

from importlib import import_module

_EXPORTS = {
    "model_size_bytes": "qframe.measure.size",
    "TimingResult": "qframe.measure.timing",
    "benchmark": "qframe.measure.timing",
    "time_model": "qframe.measure.timing",
    "peak_memory": "qframe.measure.timing",
    "file_size_bytes": "qframe.measure.timing",
    "NO_METER": "qframe.measure.energy",
    "EnergyMeter": "qframe.measure.energy",
    "EnergyReading": "qframe.measure.energy",
    "detect_meters": "qframe.measure.energy",
    "unavailable_reason": "qframe.measure.energy",
    "energy_per_inference": "qframe.measure.energy",
    "parse_tegrastats": "qframe.measure.energy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
