"""Low-bit GEMM kernels: int8 x int8, int4 x int8 and int4 x float, as ``torch.ops.qframe`` ops.

Importing this package registers the ops and nothing else: no triton import, no CUDA
initialisation, no compilation. Backends (triton, the CUDA and CPU extensions, the pure-torch
reference) load on first use; :mod:`qframe.kernels.dispatch` decides which one runs.
"""

from qframe.kernels.dispatch import BACKENDS, OPS, auto_backend, available, get_backend, set_backend, use_backend
from qframe.kernels.ops import (
    int8_mm,
    int8_mm_i32,
    quantize_rows,
    quantize_weight_int4,
    quantize_weight_int8,
    w4a8_mm,
    w4a16_mm,
)
from qframe.kernels.packing import pack_int4, unpack_int4

__all__ = [
    "BACKENDS",
    "OPS",
    "auto_backend",
    "available",
    "get_backend",
    "set_backend",
    "use_backend",
    "int8_mm",
    "int8_mm_i32",
    "w4a8_mm",
    "w4a16_mm",
    "quantize_rows",
    "quantize_weight_int8",
    "quantize_weight_int4",
    "pack_int4",
    "unpack_int4",
]
