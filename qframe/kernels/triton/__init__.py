"""The Triton backend: one kernel family per module, each with its configs, kernel and launcher.

Imported only when the dispatcher first needs it (this imports triton). Every launcher takes the
op's arguments, already validated and contiguous, plus an optional ``config`` that fixes the
tiling instead of autotuning. Under ``TRITON_INTERPRET=1`` (set before this package is imported)
the kernels run on CPU tensors through triton's interpreter, which is how they are tested without
a GPU.

The submodules share the op names, so the launchers are listed in ``KERNELS`` rather than
re-exported here (a function ``int8_mm`` would shadow the module ``int8_mm``).
"""

from typing import Tuple

from qframe.kernels.triton import int8_mm, w4a8_mm, w4a16_mm

KERNELS = {
    "int8_mm_i32": int8_mm.int8_mm_i32,
    "int8_mm": int8_mm.int8_mm,
    "w4a8_mm": w4a8_mm.w4a8_mm,
    "w4a16_mm": w4a16_mm.w4a16_mm,
}


def available() -> Tuple[bool, str]:
    """Triton imported; whether a tensor's device suits it is the dispatcher's question."""
    return True, "triton ready"


__all__ = ["KERNELS", "available", "int8_mm", "w4a8_mm", "w4a16_mm"]
