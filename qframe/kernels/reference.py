"""Pure-torch implementations of the qframe low-bit GEMMs: the test oracle and the ``reference`` backend.

Written for clarity rather than speed. Integer products are computed in float64, which is exact
here: every term is at most 128 * 128 = 2**14 in magnitude, so every partial sum is an integer
below 2**53 for any K up to 2**39, whatever order BLAS adds in. Unlike int64 matmul, float64 matmul
runs on every device. Inputs are assumed valid (``qframe.kernels.ops`` checks them).

A per-group weight scale ``w_scale[n, g]`` covers ``k`` in ``[g * group_size, (g + 1) * group_size)``;
``sum_g a_scale[m] * w_scale[n, g] * dot_g`` equals ``a_scale[m] * (a[m] . (w[n] * s[n]))`` with ``s``
the scale expanded to every k, which is how it is computed below.
"""

from __future__ import annotations

from typing import Optional

import torch

from qframe.kernels.packing import unpack_int4


def expand_group_scale(w_scale: torch.Tensor, group_size: Optional[int], k: int) -> torch.Tensor:
    """Weight scales as ``[N, k]`` (one per element) from per-channel ``[N]`` or per-group ``[N, G]``.

    The last group may be shorter than ``group_size`` (ragged); its scale covers what is left of K.
    """
    if not group_size:
        return w_scale.reshape(-1, 1).expand(-1, k)
    return w_scale.repeat_interleave(group_size, dim=1)[:, :k]


def _int8_rows_times(a, a_scale, w_scaled: torch.Tensor, bias) -> torch.Tensor:
    """``(a @ w_scaled.T) * a_scale[:, None] + bias`` in float64, returned as float32: the shared epilogue."""
    out = torch.matmul(a.double(), w_scaled.t()) * a_scale.double()[:, None]
    if bias is not None:
        out = out + bias.double()
    return out.float()


def int8_mm_i32(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ w.T`` for ``a: int8 [M, K]``, ``w: int8 [N, K]`` as ``int32 [M, N]``."""
    return torch.matmul(a.double(), w.double().t()).to(torch.int32)


def int8_mm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``(a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias`` as float32 ``[M, N]``."""
    return _int8_rows_times(a, a_scale, w.double() * w_scale.double()[:, None], bias)


def w4a8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """int8 activations times packed int4 weights with per-channel or per-group scales, float32 ``[M, N]``."""
    k = a.shape[1]
    w = unpack_int4(w_packed, k).double() * expand_group_scale(w_scale.double(), group_size, k)
    return _int8_rows_times(a, a_scale, w, bias)


def w4a16_mm(
    a: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float activations times dequantized packed int4 weights, ``a @ (w * scale).T + bias`` in ``a.dtype``.

    Accumulates in float32, or in float64 when ``a`` is float64 (how the tests build their oracle).
    """
    k = a.shape[1]
    acc_dtype = torch.promote_types(a.dtype, torch.float32)
    w = unpack_int4(w_packed, k).to(acc_dtype) * expand_group_scale(w_scale.to(acc_dtype), group_size, k)
    out = torch.matmul(a.to(acc_dtype), w.t())
    if bias is not None:
        out = out + bias.to(acc_dtype)
    return out.to(a.dtype)
