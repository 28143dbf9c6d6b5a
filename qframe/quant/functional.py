"""Pure quantization maths: ranges to scales, quantize, dequantize, fake-quantize, rounding.

Everything here is a function of tensors and a :class:`QuantSpec`; modules and observers only
compose these. Scales and zero points have a canonical shape per granularity
(:func:`param_shape`): ``()`` per tensor, ``(C,)`` per channel, ``(C, G)`` per group.
"""

from __future__ import annotations

import math

import torch

from qframe.errors import QFrameError
from qframe.quant.spec import QuantSpec

SCALE_EPS = 1e-8  # floor for a scale, so an all-zero channel quantizes to 0 rather than NaN


def _axis(x: torch.Tensor, spec: QuantSpec) -> int:
    if x.dim() == 0:
        raise QFrameError(f"{spec.granularity} quantization needs a tensor with dims, got a scalar")
    if not -x.dim() <= spec.axis < x.dim():
        raise QFrameError(f"quantization axis={spec.axis} is out of range for a tensor of shape {tuple(x.shape)}")
    return spec.axis % x.dim()


def param_shape(shape: torch.Size | tuple, spec: QuantSpec) -> tuple:
    """Shape of the scale / zero point for a tensor of ``shape`` under ``spec``."""
    if spec.granularity == "per_tensor":
        return ()
    axis = _axis(torch.empty(shape, device="meta"), spec)
    channels = shape[axis]
    if spec.granularity == "per_channel":
        return (channels,)
    row = math.prod(shape) // channels if channels else 0
    return (channels, math.ceil(row / spec.group_size))


def block_view(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``x`` as a 2-D ``[blocks, elements]`` tensor, one row per scale (for observers).

    Rows of a per-group view are zero-padded to ``group_size``.
    """
    if spec.granularity == "per_tensor":
        return x.reshape(1, -1)
    rows = x.movedim(_axis(x, spec), 0).reshape(x.shape[spec.axis], -1)
    if spec.granularity == "per_channel":
        return rows
    return _pad_groups(rows, spec.group_size).reshape(-1, spec.group_size)


def _pad_groups(rows: torch.Tensor, group_size: int) -> torch.Tensor:
    pad = -rows.shape[1] % group_size
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(rows.shape[0], -1, group_size)


def _apply(fn, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Run elementwise ``fn(x, scale, zero_point)`` with the parameters broadcast to ``x``."""
    expected = param_shape(x.shape, spec)
    if tuple(scale.shape) != expected or tuple(zero_point.shape) != expected:
        raise QFrameError(
            f"scale shape {tuple(scale.shape)} / zero point shape {tuple(zero_point.shape)} do not fit a tensor "
            f"of shape {tuple(x.shape)} quantized {spec.short()}; expected {expected}"
        )
    if spec.granularity == "per_tensor":
        return fn(x, scale, zero_point)
    axis = _axis(x, spec)
    if spec.granularity == "per_channel":
        view = [1] * x.dim()
        view[axis] = -1
        return fn(x, scale.view(view), zero_point.view(view))
    moved = x.movedim(axis, 0)
    rows = moved.reshape(moved.shape[0], -1)
    out = fn(_pad_groups(rows, spec.group_size), scale.unsqueeze(-1), zero_point.unsqueeze(-1))
    out = out.reshape(rows.shape[0], -1)[:, : rows.shape[1]]
    return out.reshape(moved.shape).movedim(0, axis)


def expand_qparams(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point repeated to ``x``'s shape (any granularity): elementwise maths such as
    learned rounding can then treat every element alike."""
    scales = _apply(lambda v, s, z: torch.zeros_like(v) + s, torch.zeros_like(x, dtype=torch.float32), scale.float(),
                    zero_point, spec)
    zeros = _apply(lambda v, s, z: torch.zeros_like(v) + z, torch.zeros_like(x, dtype=torch.float32), scale.float(),
                   zero_point, spec)
    return scales, zeros


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` (per block) onto the spec's grid.

    The range is widened to contain 0 so that 0 is exactly representable. Symmetric specs use
    ``scale = amax / qmax`` and zero point 0 (TensorRT's convention); asymmetric specs spread
    ``[min, max]`` over all ``levels`` codes.
    """
    min_val, max_val = min_val.float(), max_val.float()
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise QFrameError("cannot compute quantization parameters: the observed range contains NaN or Inf")
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    if spec.symmetric:
        amax = torch.maximum(-min_neg, max_pos) if spec.signed else max_pos
        scale = torch.clamp(amax / spec.qmax, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / (spec.qmax - spec.qmin), min=SCALE_EPS)
        zero_point = torch.clamp(spec.qmin - torch.round(min_neg / scale), spec.qmin, spec.qmax).to(torch.int32)
    return scale, zero_point


def storage_dtype(spec: QuantSpec) -> torch.dtype:
    """Smallest torch integer dtype that holds the spec's codes."""
    return torch.int8 if spec.signed else torch.uint8


def round_half(x: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """Round to the nearest integer; ties to even (``half_even``) or away from zero (``half_away``)."""
    if rounding == "half_away":
        return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)
    return torch.round(x)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zp, qmin, qmax)`` in :func:`storage_dtype`, rounding
    ties as ``spec.rounding`` says (half to even by default)."""

    def fn(v, s, z):
        return torch.clamp(round_half(v / s, spec.rounding) + z, spec.qmin, spec.qmax)

    return _apply(fn, x.float(), scale, zero_point, spec).to(storage_dtype(spec))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Float values ``(q - zp) * scale``."""
    return _apply(lambda v, s, z: (v - z) * s, q.float(), scale, zero_point, spec)


def clamp_ste(x: torch.Tensor, lo=None, hi=None) -> torch.Tensor:
    """``torch.clamp(x, lo, hi)`` whose gradient passes wherever ``lo <= x <= hi``, the bounds included.

    torch 2.13 and before pass the gradient at a bound; torch 2.14 passes none there (half with tensor
    bounds). The codes at ``qmin`` / ``qmax`` are a quantizer's most frequent ones, so the STE and LSQ
    gradients must not depend on that convention, nor must a learned scale held at ``SCALE_EPS``."""
    if lo is None and hi is None:
        return x
    flat = x.detach()
    inside = flat >= lo if lo is not None else None
    if hi is not None:
        inside = flat <= hi if inside is None else inside & (flat <= hi)
    return torch.where(inside, x, torch.clamp(flat, lo, hi))


def _fake_quantize_values(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``(clamp(round(v / s) + z, qmin, qmax) - z) * s`` in few elementwise passes (``s`` and ``z`` broadcast)."""
    code = round_half(v / s, spec.rounding)
    if spec.symmetric:  # zero point 0
        return code.clamp_(spec.qmin, spec.qmax).mul_(s)
    z = z.to(v.dtype)
    return code.add_(z).clamp_(spec.qmin, spec.qmax).sub_(z).mul_(s)


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization with the STE gradient for ``v`` and the LSQ gradient for ``s``, written out: a dozen
    autograd nodes of elementwise maths become one, and the backward pass reads one mask (and, for a learned
    scale, recomputes the quotient)."""

    @staticmethod
    def forward(ctx, v, s, z, spec):
        zf = z.to(v.dtype)
        code = round_half(v / s, spec.rounding).add_(zf)
        inside = (code >= spec.qmin) & (code <= spec.qmax)  # the bounds included: their codes pass the gradient
        ctx.spec = spec
        ctx.save_for_backward(inside, v if ctx.needs_input_grad[1] else None, s, z)
        return code.clamp_(spec.qmin, spec.qmax).sub_(zf).mul_(s)

    @staticmethod
    def backward(ctx, grad):
        inside, v, s, z = ctx.saved_tensors
        grad_v = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_v = torch.where(inside, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        if ctx.needs_input_grad[1]:  # d out / d s: round(v / s) - v / s inside, the clipped code outside
            spec, zf = ctx.spec, z.to(v.dtype)
            quotient = v / s
            code = round_half(quotient, spec.rounding)
            outside = code.add(zf).clamp_(spec.qmin, spec.qmax).sub_(zf)
            grad_s = (grad * torch.where(inside, code - quotient, outside)).sum_to_size(s.shape)
        return grad_v, grad_s, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize then dequantize, differentiable.

    The gradient to ``x`` is the straight-through estimator: 1 where the rounded code is inside
    ``[qmin, qmax]`` (the bounds included), 0 where it is clipped. When ``scale`` requires grad it receives the
    learned-step-size (LSQ) gradient ``round(x/s) - x/s`` inside the range and ``qmin - zp`` /
    ``qmax - zp`` outside. Without autograd the values alone are computed, the same ones.
    """
    graph = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)
    fn = _FakeQuantize.apply if graph else _fake_quantize_values
    if x.dtype in (torch.float16, torch.bfloat16):
        # codes in float32: v / s in bfloat16 is 1 / 256 off, so 8-bit codes from 64 up came one step off (1 in 10
        # of a weight's codes; the integer form, from quantize(), rounds in float32); the result in x's dtype
        # and a scale floored again: a model's .half() casts its scales too, and SCALE_EPS is 0 in float16
        scale = clamp_ste(scale.float(), SCALE_EPS)  # a learned scale held at the floor keeps its gradient
        return _apply(lambda v, s, z: fn(v, s, z, spec), x.float(), scale, zero_point, spec).to(x.dtype)
    return _apply(lambda v, s, z: fn(v, s, z, spec), x, scale.to(x.dtype), zero_point, spec)


INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_bias(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``bias`` on the grid of an int32 accumulator whose unit is ``step`` (input scale x weight scale).

    Integer convolution and GEMM kernels (onnxruntime's QLinearConv / QGemm, qframe's int8
    kernels) add the bias to the int32 accumulator, so it is rounded (half to even, in float64)
    to a multiple of ``step`` per output channel. The gradient passes straight through. A bias that
    int32 cannot hold on that grid (a channel whose weights are all 0, e.g. a zero BN gamma folded
    in, has the smallest scale there is) stays as it is rather than clipping to a wrong value.
    """
    exact = bias.detach().double()
    codes = torch.round(exact / step.detach().double())
    on_grid = torch.where((codes >= INT32_MIN) & (codes <= INT32_MAX), codes * step.detach().double(), exact)
    return on_grid.to(bias.dtype) + (bias - bias.detach())


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round down or up with probability given by the fraction, so ``E[round(x)] == x``."""
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.floor(x + noise)
