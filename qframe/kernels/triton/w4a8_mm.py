"""Triton W4A8 GEMM: int8 activations times packed int4 weights, int32 accumulation on tensor cores.

Weights arrive packed by ``qframe.kernels.pack_int4`` (``uint8 [N, ceil(K/2)]``, low nibble = even
k). Each K step loads a ``[BLOCK_N, BLOCK_K // 2]`` byte tile (contiguous along K), splits the
nibbles, sign-extends them and interleaves them back into a ``[BLOCK_N, BLOCK_K]`` int8 tile, so the
activations are read densely.

Scales, by how ``group_size`` relates to ``BLOCK_K``:

* per-channel (``group_size`` 0): one int32 accumulator over all of K, scaled in the epilogue;
* per-group with ``group_size % BLOCK_K == 0``: every K block lies inside one group, so each
  block's int32 dot is scaled by that group's ``[BLOCK_N]`` scales and added to a float32
  accumulator; a ragged last group is just a group with fewer (masked) blocks;
* any other group size: the weight tile is dequantized element by element (each k looks up its
  own group) and multiplied in float32, which is exact for int8 activations up to float32 rounding.

The launcher picks ``BLOCK_K`` to divide ``group_size`` where it can (:func:`block_k_for`).
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from qframe.kernels.triton.int8_mm import _config, launch, m_bucket, prune_by_m, tile_offsets


# Int4 weights halve the bytes per tile, so the same shared memory holds longer K strips than int8.
CONFIGS = [
    _config(128, 128, 128, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 256, 64, 3, 8),
    _config(64, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 128, 128, 4, 4),
    _config(32, 64, 256, 3, 4),
    _config(16, 64, 256, 3, 4),
    _config(16, 128, 128, 4, 4),
    _config(16, 256, 64, 4, 4),
    _config(16, 128, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(16, 32, 256, 4, 4),  # more programs over large weights at decode-sized M
]

# The smallest K a tensor-core dot takes (triton checks it when compiling for an NVIDIA GPU; its
# interpreter does not): 32 for 8-bit operands, 16 for 16- and 32-bit ones.
MIN_BLOCK_K_INT8 = 32
MIN_BLOCK_K_16BIT = 16


def block_k_for(group_size: int, preferred: int, minimum: int = MIN_BLOCK_K_INT8) -> int:
    """``preferred`` if it tiles the groups; else the largest power of two dividing ``group_size``
    (at least ``minimum``); else ``preferred``, leaving the per-element scale path to handle the groups."""
    if group_size == 0 or group_size % preferred == 0:
        return preferred
    block_k = preferred
    while block_k > minimum and group_size % block_k:
        block_k //= 2
    return block_k if group_size % block_k == 0 else preferred


def prune_configs(configs, named_args, **kwargs):
    """Configs fitting M; per-group, only those whose BLOCK_K divides the group size. Where none does,
    or the activations are float32 (``w4a16_mm``'s ``F32_DOT``), the kernel takes the float32 FMA dot,
    for which the tensor-core tiles overflow shared memory or spill: autotuning then runs the one
    :func:`float_dot_config` tile."""
    args = {**named_args, **kwargs}
    group_size = args["GROUP_SIZE"]
    configs = prune_by_m(configs, named_args, **kwargs)
    aligned = [c for c in configs if group_size == 0 or group_size % c.kwargs["BLOCK_K"] == 0]
    if aligned and not args.get("F32_DOT"):
        return aligned
    tile = float_dot_config(64, 64)
    return [_config(tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"], tile["num_stages"], tile["num_warps"])]


def heuristic_config(m: int, n: int, k: int, group_size: int) -> dict:
    """One reasonable configuration without autotuning; ``BLOCK_K`` divides ``group_size`` when possible."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = block_k_for(group_size, min(128, max(32, triton.next_power_of_2(k))))
    if group_size and group_size % block_k:
        return float_dot_config(block_m, block_n)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}


def float_dot_config(block_m: int, block_n: int) -> dict:
    """Tiles for the float32 FMA dot (per-element group scales, float32 activations): tensor-core
    sized tiles need more shared memory than a GPU has there (245,760 bytes for 64x128x128 on sm_90)
    and spill registers; 64x64x32 with 8 warps fits on sm_87 and sm_90 without spilling
    (qframe.kernels.triton.aot)."""
    block_m, block_n = min(block_m, 64), min(block_n, 64)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


@triton.jit
def load_int4_tile(w_ptr, offs_n, k0, K, stride_wn, stride_wk, N, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_N, BLOCK_K]`` int32 weight tile for k in ``[k0, k0 + BLOCK_K)`` from packed bytes.

    Columns past K (and the zero pad nibble of an odd K) read as 0.
    """
    offs_kp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    mask = (offs_n[:, None] < N) & (offs_kp[None, :] < (K + 1) // 2)
    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kp[None, :] * stride_wk, mask=mask, other=0)
    byte = packed.to(tl.int32)
    # (nibble ^ 8) - 8 sign-extends a 4-bit two's-complement value; int32 keeps the arithmetic unambiguous.
    lo = ((byte & 0xF) ^ 8) - 8
    hi = ((byte >> 4) ^ 8) - 8
    return tl.interleave(lo, hi)


@triton.jit
def load_group_scales(scale_ptr, offs_n, offs_k, K, N, stride_sn, stride_sg, GROUP_SIZE: tl.constexpr):
    """``[BLOCK_N, BLOCK_K]`` per-element scales: each k looks up the scale of its own group."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = scale_ptr + offs_n[:, None] * stride_sn + (offs_k // GROUP_SIZE)[None, :] * stride_sg
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _w4a8_mm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_sn, stride_sg,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak

    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_f = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0)
        w = load_int4_tile(w_ptr, offs_n, k0, K, stride_wn, stride_wk, N, BLOCK_K)
        if GROUP_SIZE == 0:
            acc_i = tl.dot(a, tl.trans(w.to(tl.int8)), acc_i, out_dtype=tl.int32)
        elif GROUP_SIZE % BLOCK_K == 0:
            scale = tl.load(w_scale_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)
            block = tl.dot(a, tl.trans(w.to(tl.int8)), out_dtype=tl.int32)
            acc_f += block.to(tl.float32) * scale[None, :]
        else:
            scale = load_group_scales(w_scale_ptr, offs_n, k0 + offs_k, K, N, stride_sn, stride_sg, GROUP_SIZE)
            w_f = w.to(tl.float32) * scale
            acc_f = tl.dot(a.to(tl.float32), tl.trans(w_f), acc_f, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak

    a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
    if GROUP_SIZE == 0:
        w_scale = tl.load(w_scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
        out = acc_i.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    else:
        out = acc_f * a_scale[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_n[None, :])


_w4a8_mm_tuned = triton.autotune(
    CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": prune_configs}
)(_w4a8_mm_kernel)


def scale_strides(w_scale: torch.Tensor) -> tuple:
    """(row, group) strides of a ``[N]`` or ``[N, G]`` scale tensor; per-channel has no group stride."""
    return (w_scale.stride(0), w_scale.stride(1)) if w_scale.dim() == 2 else (w_scale.stride(0), 0)


def w4a8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: Optional[int] = 0,
    bias: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``float32 [M, N]``: int8 ``a`` times packed int4 ``w_packed`` with per-channel or per-group scales.

    Inputs already validated. ``config`` fixes the tiling instead of autotuning (see ``int8_mm``).
    """
    m, k = a.shape
    n = w_packed.shape[0]
    group_size = group_size or 0
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    args = (
        a, w_packed, out, a_scale, w_scale, bias if bias is not None else out,
        m, n, k, m_bucket(m),
        a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), out.stride(0), out.stride(1),
        *scale_strides(w_scale),
    )  # fmt: skip
    flags = {"GROUP_SIZE": group_size, "HAS_BIAS": bias is not None}
    default = lambda: heuristic_config(m, n, k, group_size)  # noqa: E731
    launch(_w4a8_mm_kernel, _w4a8_mm_tuned, prune_configs, args, flags, config, m, n, k, default)
    return out
