"""Which implementation runs a CPU int8 GEMM: chosen per ISA and shape class from a measured table.

The ``cpu`` backend has three ways to compute ``int8_mm`` / ``int8_mm_i32``:

* ``qframe``: the extension's kernel for the ISA in force (:mod:`qframe.kernels.cpu.isa`):
  AVX-512 VNNI, AVX2 (u8 x s8 pairs), Arm dot product, or portable C++;
* ``torch_int_mm``: ``torch._int_mm`` (oneDNN; VNNI or AVX2 code where oneDNN has it, a slow
  scalar path elsewhere), plus qframe's one-pass epilogue;
* ``float``: the float GEMM the int8 one replaces, on the codes (``torch.mm`` in float32; exact
  in int32 by summing K in chunks of 1024, see :func:`float_int8_mm_i32`).

:data:`qframe.kernels.cpu.int8_table.TABLE` holds median times of all three, per ISA row and per
shape class (largest M, and largest K * N: small weights are call-overhead bound), and of ``fp32_mm`` (``torch.mm`` on float32 operands: the float GEMM
the int8 one replaces), measured by ``benchmarks/cpu_int8_table.py`` together with the machine
it ran on. :func:`choose` takes the fastest available int8 implementation of the row for the ISA
in force, and never one the table measured slower than ``fp32_mm`` on any shape of the class, nor
one whose int32 product the table found inexact (``torch._int_mm`` with oneDNN capped at AVX2 was
wrong on every shape measured): where none qualifies, ``float`` runs. An ISA without a row (not measured yet) runs ``float``, and
says so once in the log. ``QFRAME_INT8_TABLE=path.json`` loads a table measured on the
deployment machine instead (``benchmarks/cpu_int8_table.py --json path.json`` writes one).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from typing import Dict, Optional

import torch

from qframe.errors import QFrameError
from qframe.kernels.cpu import isa as isa_mod

log = logging.getLogger(__name__)

IMPLS = ("qframe", "torch_int_mm", "float")
TABLE_ENV = "QFRAME_INT8_TABLE"
# int8 products are at most 2**14 in magnitude: float32 adds 1024 of them exactly (2**24).
FLOAT_EXACT_K = 1024
_warned = set()


@functools.lru_cache(maxsize=4)
def _load_table(path: Optional[str]) -> dict:
    if path:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise QFrameError(f"{TABLE_ENV}={path}: cannot read the int8 table ({type(exc).__name__}: {exc})") from None
    from qframe.kernels.cpu.int8_table import TABLE

    return TABLE


def clear_cache() -> None:
    """Forget loaded tables and past choices (after editing a table file in place)."""
    _load_table.cache_clear()
    _choose.cache_clear()


def table() -> dict:
    """The measured table in force (``QFRAME_INT8_TABLE``'s file, else the one shipped with qframe)."""
    return _load_table(os.environ.get(TABLE_ENV) or None)


def _class(row: dict, m: int, kn: int = 0) -> Optional[dict]:
    """The first class whose largest M (and largest K * N, where the row has weight-size classes) fits."""
    for cls in row["classes"]:
        if (cls["m_max"] is None or m <= cls["m_max"]) and (cls.get("kn_max") is None or kn <= cls["kn_max"]):
            return cls
    return None


def shape_ratios(row: dict, m: int, kn: int = 0) -> Dict[str, list]:
    """``{impl: [time / fp32 GEMM time per measured shape]}`` for the class of ``m`` rows.

    The baseline, ``fp32_mm``, is ``torch.mm`` on float32 operands already in memory: the float GEMM
    an int8 one replaces, without the conversions the ``float`` implementation pays."""
    cls = _class(row, m, kn)
    if cls is None:
        return {}
    out: Dict[str, list] = {}
    for impl in IMPLS:
        vals = [s["ms"][impl] / s["ms"]["fp32_mm"] for s in cls["shapes"] if s["ms"].get(impl) is not None]
        if vals:
            out[impl] = vals
    return out


def ratios(row: dict, m: int, kn: int = 0) -> Dict[str, float]:
    """``{impl: geometric mean of time / fp32 GEMM time}`` over the measured shapes of the class."""
    return {i: math.exp(sum(math.log(v) for v in vals) / len(vals)) for i, vals in shape_ratios(row, m, kn).items()}


def ranked(row: Optional[dict], m: int, kn: int = 0) -> tuple:
    """Implementations for ``m`` rows in the order ``auto`` tries them: the int8 ones the table measured
    exact and at least as fast as the fp32 GEMM on every shape of the class, fastest (geometric mean)
    first, then ``float`` (always last, always allowed)."""
    if row is None:
        return ("float",)
    per_shape, mean = shape_ratios(row, m, kn), ratios(row, m, kn)
    cls = _class(row, m, kn) or {"shapes": []}
    inexact = {i for s in cls["shapes"] for i, ok in s.get("exact", {}).items() if not ok}
    fast = [i for i, vals in per_shape.items() if i != "float" and i not in inexact and max(vals) <= 1.0]
    return tuple(sorted(fast, key=lambda i: (mean[i], IMPLS.index(i)))) + ("float",)


def choose(op: str, m: int, n: int, k: int, have_extension: bool) -> str:
    """The implementation ``auto`` runs for an ``[m, k] x [k, n]`` int8 product on this CPU now."""
    isa = isa_mod.current()
    return _choose(isa, os.environ.get(TABLE_ENV) or None, m, n * k, k >= 2, have_extension)


@functools.lru_cache(maxsize=4096)
def _choose(isa: str, table_path: Optional[str], m: int, kn: int, k_ok: bool, have_extension: bool) -> str:
    row = _load_table(table_path)["rows"].get(isa)
    if row is None and isa not in _warned:
        _warned.add(isa)
        log.info("qframe: no measured int8 row for ISA %s; int8 GEMMs run as float GEMMs "
                 "(measure one with benchmarks/cpu_int8_table.py)", isa)
    for impl in ranked(row, m, kn):
        if impl == "qframe" and not have_extension:
            continue
        if impl == "torch_int_mm" and not (hasattr(torch, "_int_mm") and k_ok):
            continue  # torch._int_mm on the CPU returns garbage for K == 1 with N > 1 (torch 2.13)
        return impl
    return "float"


def float_int8_mm_i32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` in int32 through float32 GEMMs over K chunks of at most 1024 (each exact)."""
    k = a.shape[1]
    if k <= FLOAT_EXACT_K:
        return torch.mm(a.float(), w.float().t()).to(torch.int32)
    out = None
    for k0 in range(0, k, FLOAT_EXACT_K):
        part = torch.mm(a[:, k0:k0 + FLOAT_EXACT_K].float(), w[:, k0:k0 + FLOAT_EXACT_K].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


def float_int8_mm(a, a_scale, w, w_scale, bias) -> torch.Tensor:
    """``int8_mm`` as the float GEMM it replaces: the codes in float32, scaled after."""
    out = torch.mm(a.float(), w.float().t()).mul_(a_scale[:, None]).mul_(w_scale[None, :])
    return out.add_(bias) if bias is not None else out
