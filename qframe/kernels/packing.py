"""Packed int4 weights: two signed 4-bit values per byte along K.

Layout (fixed; the Triton, CPU and CUDA kernels all read it): ``w`` is ``int8 [N, K]`` in
nn.Linear's layout with values in ``[-8, 7]``; ``pack_int4(w)`` is ``uint8 [N, ceil(K/2)]`` where
byte ``j`` of row ``n`` holds ``w[n, 2j]`` in the low nibble and ``w[n, 2j+1]`` in the high nibble,
each as a 4-bit two's-complement value (``w & 0xF``). An odd K is padded with a zero nibble.
"""

from __future__ import annotations

import torch

from qframe.errors import QFrameError

INT4_MIN, INT4_MAX = -8, 7


def packed_cols(k: int) -> int:
    """Number of bytes per row that hold ``k`` int4 values: ``ceil(k / 2)``."""
    return (k + 1) // 2


def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """Pack ``int8 [N, K]`` values in ``[-8, 7]`` into ``uint8 [N, ceil(K/2)]`` (low nibble first)."""
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8 or w.dim() != 2:
        got = f"{w.dtype} of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise QFrameError(f"pack_int4 needs a 2-D int8 tensor [N, K] with values in [-8, 7], got {got}")
    if w.numel() and (int(w.min()) < INT4_MIN or int(w.max()) > INT4_MAX):
        raise QFrameError(
            f"pack_int4 got values in [{int(w.min())}, {int(w.max())}]; int4 values must lie in [{INT4_MIN}, {INT4_MAX}]"
        )
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    # The int16 detour keeps the shift and the mask free of int8 sign-extension surprises.
    nibbles = w.to(torch.int16) & 0xF
    return (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Unpack ``uint8 [N, ceil(k/2)]`` into the signed ``int8 [N, k]`` values :func:`pack_int4` stored."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        got = f"{packed.dtype} of shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise QFrameError(f"unpack_int4 needs a 2-D uint8 tensor [N, ceil(K/2)], got {got}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or packed_cols(k) != packed.shape[1]:
        raise QFrameError(
            f"unpack_int4 got k={k!r} for {packed.shape[1]} packed bytes per row; "
            f"valid: k={2 * packed.shape[1]} or k={max(2 * packed.shape[1] - 1, 0)}"
        )
    p = packed.to(torch.int16)
    # (nibble ^ 8) - 8 sign-extends a 4-bit two's-complement value.
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return torch.stack((lo, hi), dim=2).reshape(packed.shape[0], -1)[:, :k].to(torch.int8)
