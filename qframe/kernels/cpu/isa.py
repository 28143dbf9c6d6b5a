"""Which int8 instruction set this CPU offers, detected at run time (no extension needed).

``detect()`` reads the CPU's feature flags (``/proc/cpuinfo`` on Linux; elsewhere only the
architecture is known) and names the best int8 ISA qframe has kernels or a table row for:

==============  ====================================================  ===========================
ISA             instructions                                          qframe kernel
==============  ====================================================  ===========================
avx512_vnni     AVX-512 VNNI ``vpdpbusd`` (Ice Lake+, Zen 4+)         VNNI dot / panel GEMM
avx_vnni        AVX-VNNI, the 256-bit VEX form (Alder Lake+, Zen 5)   the AVX2 kernel
avx2            AVX2 ``vpmaddubsw`` u8 x s8 pairs (Haswell+, Zen 1+)  AVX2 panel GEMM
arm_dotprod     Armv8.2 ``sdot`` (Cortex-A76/A78AE, Neoverse)         NEON dot-product tiles
portable        anything else                                         portable C++
==============  ====================================================  ===========================

``QFRAME_CPU_ISA`` forces one of these names (to measure or test how an older CPU is served on a
newer one: ``QFRAME_CPU_ISA=avx2`` on an AVX-512 machine runs the AVX2 kernel and takes the
table's AVX2 row). A forced ISA the CPU lacks is an error, as is an unknown name.
``QFRAME_CPU_KERNEL=portable`` (older setting) means ``portable``.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import FrozenSet

from qframe.errors import QFrameError, one_of

ISAS = ("avx512_vnni", "avx_vnni", "avx2", "arm_dotprod", "portable")
X86_MACHINES = ("x86_64", "amd64", "i686", "x86")  # platform.machine(), lower case
ENV = "QFRAME_CPU_ISA"

# The extension's isa argument per ISA (csrc/cpu/ops.cpp: 0 portable, 1 AVX2, 2 VNNI, 3 Arm);
# AVX-VNNI runs the AVX2 kernel (no VEX-VNNI kernel of its own yet).
KERNEL_CODE = {"portable": 0, "avx2": 1, "avx_vnni": 1, "avx512_vnni": 2, "arm_dotprod": 3}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags as the kernel reports them (x86 ``flags``, Arm ``Features``), lower case."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return frozenset(value.lower().split())
    except OSError:
        pass
    return frozenset()


def supported(flags: FrozenSet[str] = None, machine: str = None) -> tuple:
    """Every ISA of ``ISAS`` these flags allow, best first (``portable`` always last)."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    have = []
    if machine in X86_MACHINES:
        if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags:
            have.append("avx512_vnni")
        if {"avx2", "avx_vnni"} <= flags:
            have.append("avx_vnni")
        if "avx2" in flags:
            have.append("avx2")
    elif machine in ("aarch64", "arm64"):
        if "asimddp" in flags or machine == "arm64":  # every Apple arm64 core has dot product
            have.append("arm_dotprod")
    have.append("portable")
    return tuple(have)


def detected() -> str:
    """The best int8 ISA of this CPU, ignoring ``QFRAME_CPU_ISA``."""
    return supported()[0]


def current() -> str:
    """The ISA in force: ``QFRAME_CPU_ISA`` when set (checked against this CPU), else :func:`detected`."""
    forced = os.environ.get(ENV, "").strip().lower()
    if not forced and os.environ.get("QFRAME_CPU_KERNEL", "").strip().lower() == "portable":
        forced = "portable"
    if not forced:
        return detected()
    if forced not in ISAS:
        raise one_of(ENV, forced, ISAS)
    if forced not in supported():
        raise QFrameError(f"{ENV}={forced} but this CPU ({platform.machine()}) supports only: "
                          f"{', '.join(supported())}")
    return forced
