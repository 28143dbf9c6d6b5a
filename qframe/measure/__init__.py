"""Measurement: model size now; timing, memory and energy meters as they arrive."""

from qframe.measure.size import model_size_bytes

__all__ = ["model_size_bytes"]
