"""Triton W4A16 GEMM: bfloat16 / float16 / float32 activations times packed int4 weights.

The int4 tile is unpacked exactly as in the W4A8 kernel. Int4 values are exact in every float
format, so the dot runs on the unscaled integers in the activation dtype (tensor cores for 16-bit
types) and the float32 result is scaled afterwards, which rounds less than scaling the weights
first:

* per-channel: one float32 accumulator over all of K, times ``w_scale[n]`` in the epilogue;
* per-group with ``group_size % BLOCK_K == 0``: each block's dot times its group's scales;
* any other group size: the tile is dequantized element by element in float32 and multiplied in
  float32.

float32 activations use IEEE float32 dots (never TF32), matching ``torch.mm``'s default.

Triton's interpreter keeps bfloat16 as raw uint16 bits: its dots and int casts on bfloat16 are
wrong and its float32 -> bfloat16 conversion truncates. Under ``TRITON_INTERPRET=1`` bfloat16
activations are therefore upcast in the kernel (``F32_DOT``) and the output is rounded to bfloat16
by torch; on a GPU the bfloat16 path runs as written.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from qframe.kernels.triton.int8_mm import INTERPRET, _config, launch, m_bucket, tile_offsets
from qframe.kernels.triton.w4a8_mm import (
    MIN_BLOCK_K_16BIT, block_k_for, float_dot_config, load_group_scales, load_int4_tile, prune_configs, scale_strides,
)


# 16-bit tensor-core tiles: half the K depth of the int8 tiles for the same shared memory.
CONFIGS = [
    _config(128, 128, 64, 3, 8),
    _config(128, 128, 32, 4, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(32, 128, 64, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(16, 64, 128, 4, 4),
    _config(16, 128, 64, 4, 4),
    _config(16, 256, 64, 3, 4),
    _config(16, 128, 32, 4, 4),
    _config(64, 128, 32, 4, 4),
    _config(16, 32, 128, 4, 4),  # more programs over large weights at decode-sized M
    _config(16, 32, 256, 3, 4),
]


def heuristic_config(m: int, n: int, k: int, group_size: int, f32_dot: bool = False) -> dict:
    """One reasonable configuration without autotuning; ``BLOCK_K`` divides ``group_size`` when possible."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    preferred = min(64 if m > 16 else 128, max(32, triton.next_power_of_2(k)))
    block_k = block_k_for(group_size, preferred, MIN_BLOCK_K_16BIT)
    if f32_dot or (group_size and group_size % block_k):
        return float_dot_config(block_m, block_n)
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    if F32_DOT:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _w4a16_mm_kernel(
    a_ptr, w_ptr, out_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on, stride_sn, stride_sg,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K - k0), other=0.0)
        if F32_DOT:
            a = a.to(tl.float32)
        w = load_int4_tile(w_ptr, offs_n, k0, K, stride_wn, stride_wk, N, BLOCK_K)
        if GROUP_SIZE == 0:
            acc = _dot(a, tl.trans(w.to(a.dtype)), acc, F32_DOT)
        elif GROUP_SIZE % BLOCK_K == 0:
            scale = tl.load(w_scale_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=mask_n, other=0.0)
            block = _dot(a, tl.trans(w.to(a.dtype)), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), F32_DOT)
            acc += block * scale[None, :]
        else:
            scale = load_group_scales(w_scale_ptr, offs_n, k0 + offs_k, K, N, stride_sn, stride_sg, GROUP_SIZE)
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32) * scale), acc, input_precision="ieee")
        a_ptrs += BLOCK_K * stride_ak

    if GROUP_SIZE == 0:
        acc *= tl.load(w_scale_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_w4a16_mm_tuned = triton.autotune(
    CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": prune_configs}
)(_w4a16_mm_kernel)


def w4a16_mm(
    a: torch.Tensor,
    w_packed: torch.Tensor,
    w_scale: torch.Tensor,
    group_size: Optional[int] = 0,
    bias: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``[M, N]`` in ``a.dtype``: ``a @ (unpack(w_packed) * scale).T + bias``, float32 accumulation.

    Inputs already validated. ``config`` fixes the tiling instead of autotuning (see ``int8_mm``).
    """
    m, k = a.shape
    n = w_packed.shape[0]
    group_size = group_size or 0
    interpreted_bf16 = INTERPRET and a.dtype == torch.bfloat16
    out = torch.empty((m, n), dtype=torch.float32 if interpreted_bf16 else a.dtype, device=a.device)
    args = (
        a, w_packed, out, w_scale, bias if bias is not None else out,
        m, n, k, m_bucket(m),
        a.stride(0), a.stride(1), w_packed.stride(0), w_packed.stride(1), out.stride(0), out.stride(1),
        *scale_strides(w_scale),
    )  # fmt: skip
    f32_dot = a.dtype == torch.float32 or interpreted_bf16
    flags = {"GROUP_SIZE": group_size, "HAS_BIAS": bias is not None, "F32_DOT": f32_dot}
    default = lambda: heuristic_config(m, n, k, group_size, f32_dot)  # noqa: E731
    launch(_w4a16_mm_kernel, _w4a16_mm_tuned, prune_configs, args, flags, config, m, n, k, default)
    return out.to(a.dtype)
