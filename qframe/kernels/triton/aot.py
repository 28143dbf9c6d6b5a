"""Compile qframe's Triton kernels for an NVIDIA GPU target on a machine without one.

Triton compiles to PTX and cubin with its own ``ptxas``; only loading and launching need a GPU.
:func:`compile_gemm` runs an op's real launcher (the same heuristic or autotuning choice, the same
argument specialization: unit strides, 16-byte divisibility) under a stand-in driver that reports
the target instead of a device, so every configuration the launch would compile is compiled and
nothing runs. Each result says what the GPU would have to hold: shared memory against the
architecture's per-block limit, registers, stack bytes (register spills) and whether the inner
product uses tensor cores (``wgmma`` on Hopper, ``mma.sync`` before it).

This finds what the interpreter cannot: a tile that does not compile for the target, or needs more
shared memory than the GPU has, or spills. Used by tests/kernels/test_triton_compile.py and
benchmarks/triton_compile.py.
"""

import contextlib
import dataclasses
import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, Iterator, List, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as _driver

from qframe.errors import QFrameError, first_line
from qframe.kernels.triton import KERNELS
from qframe.kernels.triton.int8_mm import COMPILE_ONLY, INTERPRET

# Shared memory one block may use (the opt-in maximum), bytes, from NVIDIA's CUDA programming guide.
SHARED_LIMIT = {
    "sm_80": 163 * 1024,  # A100
    "sm_86": 99 * 1024,  # RTX 30xx, A10
    "sm_87": 163 * 1024,  # Jetson AGX Orin / Orin NX / Orin Nano
    "sm_89": 99 * 1024,  # L4, RTX 40xx
    "sm_90": 227 * 1024,  # H100, H200
}


@dataclasses.dataclass
class Compiled:
    """One configuration of one kernel, compiled for ``arch``."""

    arch: str
    kernel: str
    config: Dict[str, int]
    shared: int  # bytes of shared memory per block
    registers: Optional[int]  # per thread; None without cuobjdump
    stack: Optional[int]  # stack bytes per thread: register spills (0 when everything fits)
    tensor_cores: str  # "wgmma", "mma" or "none"
    fp_fusion: Optional[bool]  # float multiply-adds fused (the option it was compiled with; None: not recorded)

    @property
    def fits(self) -> bool:
        return self.shared <= SHARED_LIMIT[self.arch]

    def tile(self) -> str:
        c = self.config
        return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} s{c.get('num_stages', 3)} w{c.get('num_warps', 4)}"


class _TargetDriver:
    """Stands in for triton's CUDA driver: reports ``target`` and no device, so launches only compile."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return f"qframe-aot-{self.target.arch}"  # its own key in triton's per-device kernel caches

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _arch_number(arch: str) -> int:
    match = re.fullmatch(r"sm_(\d+)", arch)
    if not match or arch not in SHARED_LIMIT:
        raise QFrameError(f"GPU architecture {arch!r} is not known here; valid: {', '.join(SHARED_LIMIT)}")
    return int(match.group(1))


def available() -> tuple:
    """Whether triton here can compile for NVIDIA targets (its CUDA backend and ptxas present)."""
    if INTERPRET:
        return False, "triton was imported under TRITON_INTERPRET=1: kernels are interpreted, not compiled"
    if not hasattr(triton, "knobs"):
        return False, f"triton {triton.__version__} is too old to compile without a GPU here (needs triton.knobs, 3.4+)"
    try:
        from triton.backends import backends
    except ImportError:
        return False, "this triton has no backend registry"
    if "nvidia" not in backends:
        return False, "this triton has no NVIDIA backend"
    if not hasattr(_driver, "_active"):  # compiling_for swaps triton's active driver
        return False, f"triton {triton.__version__} keeps its active driver elsewhere than qframe knows"
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as exc:  # knobs raise when the tool is missing
        return False, f"triton's NVIDIA assembler (ptxas) is not usable: {first_line(exc)}"
    if not ptxas or not os.path.exists(ptxas):
        return False, "triton's NVIDIA assembler (ptxas) is missing"
    return True, "triton can compile for NVIDIA targets"


@contextlib.contextmanager
def compiling_for(arch: str) -> Iterator[list]:
    """Within the block, qframe's Triton launches compile for ``arch`` instead of running; yields the
    list that collects ``(config, compiled kernel)`` pairs."""
    ok, why = available()
    if not ok:
        raise QFrameError(f"cannot compile Triton kernels for {arch}: {why}")
    target = GPUTarget("cuda", _arch_number(arch), 32)
    previous = _driver._active  # set_active/reset_active would create the real driver, which needs a GPU
    _driver.set_active(_TargetDriver(target))
    token = COMPILE_ONLY.set([])
    try:
        yield COMPILE_ONLY.get()
    finally:
        COMPILE_ONLY.reset(token)
        _driver._active = previous


def _cuobjdump() -> Optional[str]:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> tuple:
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return (int(registers.group(1)) if registers else None), (int(stack.group(1)) if stack else None)


def _inputs(op: str, m: int, n: int, k: int, group_size: int, dtype: torch.dtype, bias: bool) -> tuple:
    """CPU tensors with the shapes, dtypes and strides the op's launcher gets on the GPU."""
    scales = torch.empty(n, math.ceil(k / group_size)) if group_size else torch.empty(n)
    if op == "int8_mm_i32":
        return (torch.empty(m, k, dtype=torch.int8), torch.empty(n, k, dtype=torch.int8)), {}
    if op == "int8_mm":
        args = (torch.empty(m, k, dtype=torch.int8), torch.empty(m), torch.empty(n, k, dtype=torch.int8), torch.empty(n))
        return args, {"bias": torch.empty(n) if bias else None}
    packed = torch.empty(n, (k + 1) // 2, dtype=torch.uint8)
    if op == "w4a8_mm":
        args = (torch.empty(m, k, dtype=torch.int8), torch.empty(m), packed, scales)
        return args, {"group_size": group_size, "bias": torch.empty(n) if bias else None}
    if op == "w4a16_mm":
        args = (torch.empty(m, k, dtype=dtype), packed, scales)
        return args, {"group_size": group_size, "bias": torch.empty(n, dtype=dtype) if bias else None}
    raise QFrameError(f"Triton op {op!r} is not known; valid: {', '.join(KERNELS)}")


def compile_gemm(
    op: str,
    m: int,
    n: int,
    k: int,
    arch: str = "sm_90",
    *,
    group_size: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    bias: bool = True,
    config: Optional[dict] = None,
) -> List[Compiled]:
    """Compile what ``op`` on an ``[m, k] x [k, n]`` product would compile on ``arch``.

    The autotuned path compiles every configuration autotuning would try for this shape; the
    heuristic path its one configuration (or ``config``). ``dtype`` is ``w4a16_mm``'s activation
    type; ``group_size`` 0 is per channel.
    """
    args, kwargs = _inputs(op, m, n, k, group_size, dtype, bias)
    with compiling_for(arch) as record:
        KERNELS[op](*args, **kwargs, config=config)
    results = []
    for cfg, kernel in record:
        registers, stack = _resources(kernel.asm["cubin"])
        ptx = kernel.asm["ptx"]
        cores = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
        fused = getattr(kernel.metadata, "enable_fp_fusion", None)
        results.append(Compiled(arch, op, dict(cfg), kernel.metadata.shared, registers, stack, cores, fused))
    return results
