"""CPU backend of the low-bit GEMM ops: native kernels from the ``qframe._C`` extension.

* ``w4a8_mm`` and ``w4a16_mm`` run C++ kernels (``csrc/cpu/``): AVX-512 VNNI (int4 x int8) and
  AVX-512 BF16 (int4 x bf16/fp16/fp32) where the CPU has them, chosen at run time, else portable
  C++ that compilers auto-vectorise (Arm, older x86). They need the extension; ``w4a16_mm`` with
  float32 activations and many rows dequantizes the weight once and calls ``torch.mm`` instead.
* ``int8_mm_i32`` and ``int8_mm`` run the extension's VNNI kernels where the CPU has AVX-512
  VNNI: a dot-product kernel that streams the weights for a few activation rows, and from 8 rows
  on a GEMM that repacks weight panels per call (``csrc/cpu/int8_gemm_avx512.cpp``); on the
  4096 x 4096 benchmark shape it matches ``torch._int_mm`` at M = 2048 and is faster at a few
  hundred rows and below (benchmarks/gemm.py). Without VNNI (or
  without the extension) they use ``torch._int_mm`` from a few dozen rows on, and the portable C++
  kernel below that; ``int8_mm`` then scales the int32 product in place in one pass. These two
  ops therefore run without the extension.

The extension is imported on first use, never at ``import qframe``. Where the prebuilt one is
missing (pip's default isolated build compiles nothing; a wheel built elsewhere), the first use
builds it from the C++ sources shipped with qframe into a cache and later uses load it from there
(see ``build.py``; ``QFRAME_JIT_BUILD=0`` turns that off). ``QFRAME_CPU_KERNEL=portable`` forces
the portable C++ kernels (for tests and comparisons).

``available()`` answers for the backend as a whole (the extension); ``available(op)`` answers per
op, which is where the int8 ops differ.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from qframe.errors import QFrameError

log = logging.getLogger(__name__)

# Without the VNNI kernels, below this many activation rows the portable C++ kernel beats
# torch._int_mm (it streams the int8 weights at memory speed, where oneDNN's small-M path does
# not); at and above it, torch._int_mm wins. Measured with benchmarks/gemm.py (K, N = 4096;
# 2 threads, Zen 4). With VNNI the extension runs every size.
INT8_OWN_KERNEL_MAX_M = 64

# float32 activations make the AVX-512 BF16 kernel split every value into three bf16 terms, three
# dot products per weight. From this many rows on it is faster to dequantize the weight once (to
# float32: int4 times a float32 scale is exact) and call torch.mm, which computes the same sums.
# Measured on Zen 4, 1 thread: (K, N) = (576, 64) and (4608, 512) at M = 256: kernel 1.2 / 27 ms,
# dequantize + mm 0.3 / 16 ms; at M = 64 the kernel wins for large weights (6.8 vs 6.8-14 ms).
W4A16_FP32_DEQUANT_MIN_M = 256

_lock = threading.Lock()
_state: dict = {}


def _load() -> Tuple[Optional[object], str]:
    """``(torch.ops.qframe_cpu, "")`` once the extension is loaded, else ``(None, reason)``.

    The prebuilt ``qframe._C`` when it imports, else the library built on first use (``build.py``).
    """
    if "ops" in _state:
        return _state["ops"], _state["reason"]
    with _lock:
        if "ops" not in _state:
            try:
                import qframe._C  # noqa: F401  (registers torch.ops.qframe_cpu)
            except ImportError as exc:
                log.debug("qframe: prebuilt CPU extension not importable (%s)", exc)
                from qframe.kernels.cpu import build

                reason = build.load_or_build()
            else:
                reason = ""
            _state["reason"] = reason
            _state["ops"] = None if reason else torch.ops.qframe_cpu
    return _state["ops"], _state["reason"]


def available(op: Optional[str] = None) -> Tuple[bool, str]:
    """Whether this backend can run (``op=None``: all four ops), with a one-line reason."""
    if op in ("int8_mm_i32", "int8_mm"):
        ops, _ = _load()
        return True, "torch._int_mm" + (" and the qframe CPU extension" if ops is not None else "")
    ops, reason = _load()
    if ops is None:
        return False, reason
    f = _features(ops)
    vnni = "AVX-512 VNNI" if f & 1 else "portable C++ (no AVX-512 VNNI)"
    bf16 = "AVX-512 BF16" if f & 2 else "portable C++ (no AVX-512 BF16)"
    return True, f"qframe CPU extension: int4 x int8 on {vnni}, int4 x float on {bf16}"


def _ops():
    ops, reason = _load()
    if ops is None:
        raise QFrameError(f"CPU backend unavailable: {reason}")
    return ops


def _portable() -> bool:
    return os.environ.get("QFRAME_CPU_KERNEL", "").strip().lower() == "portable"


def _call(fn, *args):
    """Runs an extension op; its input errors (ValueError, one line) become QFrameError."""
    try:
        return fn(*args)
    except ValueError as exc:
        raise QFrameError(str(exc).splitlines()[0]) from None


def _check_int8(op: str, a: Tensor, w: Tensor) -> None:
    # The torch._int_mm path has no C++ binding of ours to check its inputs.
    for name, t, shape in (("a", a, "[M, K]"), ("w", w, "[N, K]")):
        if not isinstance(t, Tensor) or t.dtype != torch.int8 or t.dim() != 2 or t.device.type != "cpu":
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, Tensor) else type(t).__name__
            raise QFrameError(f"{op}: {name} must be an int8 CPU tensor {shape}, got {got}")
    if w.shape[1] != a.shape[1]:
        raise QFrameError(f"{op}: w must be int8 [N, K] with K = {a.shape[1]} (a's columns), got {tuple(w.shape)}")


def _use_int_mm(m: int, k: int) -> bool:
    # torch._int_mm on the CPU returns garbage for K == 1 with N > 1 (torch 2.13, oneDNN path).
    return hasattr(torch, "_int_mm") and k >= 2


def _own_int8_kernel(m: int, k: int) -> Optional[object]:
    """The extension when it should run this int8 product, else None (torch._int_mm)."""
    ops, _ = _load()
    if ops is None:
        return None
    vnni = not _portable() and _features(ops) & 1
    if not vnni and m >= INT8_OWN_KERNEL_MAX_M and _use_int_mm(m, k):
        return None
    return ops


def _features(ops) -> int:
    if "features" not in _state:
        _state["features"] = int(ops.features())
    return _state["features"]


def _int_mm(a: Tensor, w: Tensor) -> Tensor:
    if _use_int_mm(a.shape[0], a.shape[1]):
        return torch._int_mm(a, w.t())
    return (a.to(torch.int64) @ w.to(torch.int64).t()).to(torch.int32)  # exact, for what _int_mm cannot do


def int8_mm_i32(a: Tensor, w: Tensor) -> Tensor:
    """``a`` int8 [M, K] @ ``w`` int8 [N, K].T -> int32 [M, N], exact."""
    _check_int8("int8_mm_i32", a, w)
    ops = _own_int8_kernel(*a.shape)
    if ops is not None:
        return _call(ops.int8_mm_i32, a, w, _portable())
    return _int_mm(a, w)


def int8_mm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """int32 ``a @ w.T`` scaled by ``a_scale[:, None] * w_scale[None, :]``, plus ``bias`` -> float32 [M, N]."""
    _check_int8("int8_mm", a, w)
    ops = _own_int8_kernel(*a.shape)
    if ops is not None:
        return _call(ops.int8_mm, a, a_scale, w, w_scale, bias, _portable())
    acc = _int_mm(a, w)
    ops, _ = _load()
    if ops is not None:
        _call(ops.int8_epilogue_, acc, a_scale, w_scale, bias)  # in place, one pass
        return acc.view(torch.float32)
    out = acc.to(torch.float32).mul_(a_scale[:, None]).mul_(w_scale[None, :])
    return out.add_(bias) if bias is not None else out


def w4a8_mm(a: Tensor, a_scale: Tensor, w_packed: Tensor, w_scale: Tensor, group_size, bias: Optional[Tensor] = None) -> Tensor:
    """Packed int4 weights x int8 activations -> float32 [M, N] (see qframe.kernels.ops)."""
    return _call(_ops().w4a8_mm, a, a_scale, w_packed, w_scale, int(group_size or 0), bias, _portable())


def w4a16_mm(a: Tensor, w_packed: Tensor, w_scale: Tensor, group_size, bias: Optional[Tensor] = None) -> Tensor:
    """Packed int4 weights x bf16/fp16/fp32 activations, fp32 accumulation -> [M, N] in ``a.dtype``.

    float32 activations from ``W4A16_FP32_DEQUANT_MIN_M`` rows on take the dequantize path (see there).
    """
    if a.dtype == torch.float32 and a.shape[0] >= W4A16_FP32_DEQUANT_MIN_M:
        return _dequantized_mm(a, w_packed, w_scale, int(group_size or 0), bias)
    return _call(_ops().w4a16_mm, a, w_packed, w_scale, int(group_size or 0), bias, _portable())


def _dequantized_mm(a: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: int, bias: Optional[Tensor]) -> Tensor:
    from qframe.kernels.packing import unpack_int4
    from qframe.kernels.reference import expand_group_scale

    k = a.shape[1]
    w = unpack_int4(w_packed, k).float().mul_(expand_group_scale(w_scale, group_size, k))  # exact: int4 x fp32
    return torch.addmm(bias.float(), a, w.t()) if bias is not None else torch.mm(a, w.t())
