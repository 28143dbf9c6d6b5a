"""CUDA backend of the low-bit GEMM ops: the kernels of the ``qframe._C_cuda`` extension (``csrc/cuda``).

* ``int8_mm_i32`` / ``int8_mm``: a streaming ``__dp4a`` kernel for a few rows, int8 tensor-core
  (WMMA) tiles from 9 rows on (sm_72+);
* ``w4a8_mm``: packed int4 x int8 with ``__dp4a``, per-channel or per-group scales;
* ``w4a16_mm``: packed int4 x fp32 / fp16 / bf16, fp32 accumulation.

The extension is built by ``pip install --no-build-isolation -e .`` where torch has CUDA and the
toolkit is found (docs/building.md); it is imported on first use, never at ``import qframe``, and
importing it initialises no CUDA context. The binding (``bindings.cpp``) checks every tensor and
raises one-line errors, which reach the caller as :class:`QFrameError`.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from qframe.errors import QFrameError

log = logging.getLogger(__name__)

NOT_BUILT = "CUDA extension not built: build qframe with a CUDA torch and `pip install --no-build-isolation -e .`"

_lock = threading.Lock()
_state: dict = {}


def _load() -> Tuple[Optional[object], str]:
    """``(torch.ops.qframe_cuda, "")`` once the extension is loaded, else ``(None, reason)``."""
    if "ops" not in _state:
        with _lock:
            if "ops" not in _state:
                try:
                    import qframe._C_cuda  # noqa: F401  (registers torch.ops.qframe_cuda)
                except ImportError as exc:
                    log.debug("qframe: CUDA extension not importable: %s", exc)
                    _state["ops"], _state["reason"] = None, f"{NOT_BUILT} ({type(exc).__name__}: {exc})"
                else:
                    _state["ops"], _state["reason"] = torch.ops.qframe_cuda, ""
    return _state["ops"], _state["reason"]


def available() -> Tuple[bool, str]:
    """Whether the extension is built and a CUDA device is present, with a one-line reason."""
    ops, reason = _load()
    if ops is None:
        return False, reason
    if not torch.cuda.is_available():
        return False, "qframe CUDA extension built, but no CUDA device"
    return True, "qframe CUDA extension"


def _call(name: str, *args):
    ops, reason = _load()
    if ops is None:
        raise QFrameError(f"CUDA backend unavailable: {reason}")
    try:
        return getattr(ops, name)(*args)
    except ValueError as exc:  # the binding's input checks (TORCH_CHECK_VALUE), one line
        raise QFrameError(str(exc).splitlines()[0]) from None


def int8_mm_i32(a: Tensor, w: Tensor) -> Tensor:
    """``a`` int8 [M, K] @ ``w`` int8 [N, K].T -> int32 [M, N], exact."""
    return _call("int8_mm_i32", a, w)


def int8_mm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """int32 ``a @ w.T`` scaled by ``a_scale[:, None] * w_scale[None, :]``, plus ``bias`` -> float32 [M, N]."""
    return _call("int8_mm", a, a_scale, w, w_scale, bias)


def w4a8_mm(a: Tensor, a_scale: Tensor, w_packed: Tensor, w_scale: Tensor, group_size,
            bias: Optional[Tensor] = None) -> Tensor:
    """Packed int4 weights x int8 activations -> float32 [M, N] (see qframe.kernels.ops)."""
    return _call("w4a8_mm", a, a_scale, w_packed, w_scale, int(group_size or 0), bias)


def w4a16_mm(a: Tensor, w_packed: Tensor, w_scale: Tensor, group_size, bias: Optional[Tensor] = None) -> Tensor:
    """Packed int4 weights x fp32/fp16/bf16 activations, fp32 accumulation -> [M, N] in ``a.dtype``."""
    return _call("w4a16_mm", a, w_packed, w_scale, int(group_size or 0), bias)
