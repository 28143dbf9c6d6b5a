"""Triton int8 x int8 GEMM: ``a [M, K] @ w[N, K].T`` with int32 accumulation.

One kernel serves both ops: ``int8_mm_i32`` stores the int32 accumulator, ``int8_mm`` applies the
per-row activation scale, the per-channel weight scale and the bias in the epilogue.

On CUDA the launcher autotunes over ``CONFIGS`` (tiles sized for H100 and Jetson Orin tensor cores,
pruned by the size of M) for products that are worth it (:func:`autotuned`); for small products,
under ``TRITON_INTERPRET=1`` or with an explicit ``config`` it runs one configuration, by default
the one :func:`heuristic_config` picks.
"""

import os
from contextvars import ContextVar
from typing import Callable, Optional

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    """Whether @triton.jit decorates under TRITON_INTERPRET=1 (triton.knobs from triton 3.4; before it,
    the decorator read the environment itself)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = _interpreting()  # what @triton.jit below was decorated under

# Compile options every launch states rather than leaves to Triton's default: fused multiply-adds in the
# float epilogue (acc * a_scale * w_scale + bias), Triton's default through 3.9, which turns it off from
# 3.10 (TRITON_DEFAULT_FP_FUSION) and warns in 3.9 where a launch leaves it unset.
OPTIONS = {"enable_fp_fusion": True}

# Set by qframe.kernels.triton.aot.compiling_for: launches then compile for that target and record
# (configuration, compiled kernel) here instead of running.
COMPILE_ONLY: ContextVar[Optional[list]] = ContextVar("qframe_triton_compile_only", default=None)


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps): large square tiles for prefill-sized M, thin
# BLOCK_M=16/32 tiles with long K strips for decode-sized M, where the GEMM is bandwidth-bound.
CONFIGS = [
    _config(128, 256, 128, 3, 8),  # deep int8 K steps (128 bytes) for Hopper's wgmma pipelines
    _config(128, 256, 128, 4, 8),
    _config(256, 128, 128, 3, 8),
    _config(128, 256, 64, 3, 8),
    _config(256, 128, 64, 3, 8),
    _config(128, 128, 64, 4, 8),
    _config(128, 128, 128, 3, 8),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(32, 128, 128, 4, 4),
    _config(16, 64, 256, 3, 4),
    _config(16, 128, 128, 4, 4),
    _config(16, 256, 128, 3, 8),
    _config(16, 32, 256, 4, 4),  # more programs over large weights at decode-sized M
]

M_BUCKET_MAX = 256  # autotuning keys on M rounded up to a power of two, capped here

# Autotuning compiles and times every config for each new (M bucket, N, K): seconds per shape. It
# pays for large products and for decode-sized products over large weights (the bandwidth-bound
# case, where the tile shape decides how many loads are in flight); a converted CNN's many small
# layers take one heuristic config each instead (a compile per distinct tiling, microseconds to run).
AUTOTUNE_MIN_MACS = 1 << 28
AUTOTUNE_MIN_WEIGHTS = 1 << 22


def autotuned(m: int, n: int, k: int) -> bool:
    """Whether a ``[m, k] x [k, n]`` product is worth autotuning (see ``AUTOTUNE_MIN_*``)."""
    return m * n * k >= AUTOTUNE_MIN_MACS or n * k >= AUTOTUNE_MIN_WEIGHTS


def m_bucket(m: int) -> int:
    """The M value autotuning keys on, so a new batch size rarely triggers a new tuning run."""
    return min(triton.next_power_of_2(max(m, 1)), M_BUCKET_MAX)


def prune_by_m(configs, named_args, **kwargs):
    """Drop configs whose BLOCK_M is far larger than M (their tiles would be mostly padding), and
    from 128 rows on the thin decode tiles (BLOCK_M < 64), which never win there."""
    bucket = {**named_args, **kwargs}["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket)]
    if bucket >= 128:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or kept
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


def heuristic_config(m: int, n: int, k: int) -> dict:
    """One reasonable configuration without autotuning: the tile grows with M, N and K up to 128."""
    block_m = min(128, max(16, triton.next_power_of_2(m)))
    block_n = min(128, max(16, triton.next_power_of_2(n)))
    block_k = min(128 if m <= 16 else 64, max(32, triton.next_power_of_2(k)))  # an int8 dot takes K >= 32
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of this program's output tile.

    Programs walk the output in bands of GROUP_M tile rows so neighbouring programs share weight
    tiles in L2.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * grid_n
    first_m = (pid // band) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows
    pid_n = (pid % band) // rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _int8_mm_kernel(
    a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_wn, stride_wk, stride_om, stride_on,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    offs_m, offs_n = tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # a [BLOCK_K, BLOCK_N] view of w.T

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SCALED:
        a_scale = tl.load(a_scale_ptr + offs_m, mask=mask_m, other=0.0)
        w_scale = tl.load(w_scale_ptr + offs_n, mask=mask_n, other=0.0)
        out = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        tl.store(out_ptrs, out, mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


_int8_mm_tuned = triton.autotune(CONFIGS, key=["M_BUCKET", "N", "K"], prune_configs_by={"early_config_prune": prune_by_m})(
    _int8_mm_kernel
)


def launch(
    kernel, tuned, prune: Callable, args: tuple, flags: dict, config: Optional[dict], m: int, n: int, k: int,
    default: Callable[[], dict],
) -> None:
    """Run ``kernel`` over an ``[m, n]`` output: ``tuned`` (its autotuner, configs pruned by ``prune``)
    for products worth it, else with ``config`` or ``default()``. Under
    :func:`qframe.kernels.triton.aot.compiling_for` nothing runs: each configuration this launch
    would compile is compiled for that target and recorded with its kernel."""
    record = COMPILE_ONLY.get()
    flags = {**flags, **OPTIONS}
    if config is None and not INTERPRET and autotuned(m, n, k):
        if record is not None:
            named = dict(zip(kernel.arg_names, args))
            for c in prune(tuned.configs, named, **flags):
                options = {"num_warps": c.num_warps, "num_stages": c.num_stages}
                compiled = kernel.warmup(*args, grid=(1,), **flags, **c.kwargs, **options)
                record.append(({**c.kwargs, **options}, compiled))
            return
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        tuned[grid](*args, **flags)
        return
    config = config or default()
    if record is not None:
        record.append((config, kernel.warmup(*args, grid=(1,), **flags, **config)))
        return
    kernel[(triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)](*args, **flags, **config)


def _launch(a, w, out, a_scale, w_scale, bias, config: Optional[dict]) -> torch.Tensor:
    m, k = a.shape
    n = w.shape[0]
    scaled = a_scale is not None
    args = (
        a, w, out,
        a_scale if scaled else out, w_scale if scaled else out, bias if bias is not None else out,
        m, n, k, m_bucket(m),
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    flags = {"SCALED": scaled, "HAS_BIAS": bias is not None}
    default = lambda: heuristic_config(m, n, k)  # noqa: E731
    launch(_int8_mm_kernel, _int8_mm_tuned, prune_by_m, args, flags, config, m, n, k, default)
    return out


def int8_mm_i32(a: torch.Tensor, w: torch.Tensor, *, config: Optional[dict] = None) -> torch.Tensor:
    """``int32 [M, N] = a @ w.T`` for ``a: int8 [M, K]``, ``w: int8 [N, K]`` (inputs already validated).

    ``config`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``GROUP_M`` and optionally ``num_warps``,
    ``num_stages``) fixes the tiling instead of autotuning.
    """
    out = torch.empty((a.shape[0], w.shape[0]), dtype=torch.int32, device=a.device)
    return _launch(a, w, out, None, None, None, config)


def int8_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    config: Optional[dict] = None,
) -> torch.Tensor:
    """``float32 [M, N] = (a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias`` (inputs already validated)."""
    out = torch.empty((a.shape[0], w.shape[0]), dtype=torch.float32, device=a.device)
    return _launch(a, w, out, a_scale, w_scale, bias, config)
