"""Peak memory of a piece of work, from the allocator, not from the resident set.

The resident set (``VmHWM``) is the wrong instrument for a training step: pages a step frees go
back to the allocator, not to the kernel, so a second step of the same size shows no growth at
all. What this module measures instead:

* CUDA tensors: ``torch.cuda.max_memory_allocated`` during the work, minus what was allocated
  before (``method = "cuda max_memory_allocated"``).
* CPU tensors (Linux with glibc): the bytes the C allocator has handed out and not taken back
  (``mallinfo2``: ``uordblks + hblkhd``), read after every ATen operation through a
  ``TorchDispatchMode``, so the peak is the largest amount of live memory between two operations
  of the forward pass, the backward pass and the optimizer step (``method = "allocator
  (mallinfo2) after each op"``). Scratch memory an operation frees before it returns is not
  seen; everything that outlives an op (activations autograd saves, gradients, optimizer state,
  temporaries held across ops) is. Without glibc the result says it is unavailable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qframe.errors import require_device


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2() -> Optional[Callable[[], _Mallinfo2]]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


def allocated_bytes() -> Optional[int]:
    """Bytes the C allocator holds for the process now (glibc ``mallinfo2``), or None where unavailable."""
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return int(info.uordblks + info.hblkhd)


class _PeakMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        now = allocated_bytes()
        if now > self.peak:
            self.peak = now
        return out


def step_peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> dict:
    """Run ``fn()`` once and return the peak of live memory it reached above what was live before.

    ``{"peak_bytes": ..., "before_bytes": ..., "method": ...}``; ``peak_bytes`` is None with a
    ``method`` that says why where nothing could be measured. See the module docstring.
    """
    dev = require_device(device, "step_peak_memory") or torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return {"peak_bytes": int(torch.cuda.max_memory_allocated(dev) - before), "before_bytes": int(before),
                "method": "cuda max_memory_allocated"}
    if allocated_bytes() is None:
        fn()
        return {"peak_bytes": None, "before_bytes": None, "method": "unavailable (no glibc mallinfo2)"}
    with _PeakMode():  # a first use of the mode allocates for itself; keep that out of the baseline
        torch.zeros(1).add_(1)
    mode = _PeakMode()
    before = allocated_bytes()
    mode.peak = before
    with mode:
        fn()
    return {"peak_bytes": int(mode.peak - before), "before_bytes": int(before),
            "method": "allocator (mallinfo2) after each op"}
