"""The integer GEMMs of an RCT training step: forward, input gradient and weight gradient on codes.

For a layer with integer weight codes ``C`` (``[N, K]`` after flattening a conv kernel) and
per-output-channel scales ``s``:

* forward      ``y  = (xq @ C.T)        * sx * s + b``   (xq: int8 input, per-tensor scale sx)
* input grad   ``gx = (hq @ C)          * sh``           (hq: int8 codes of ``g * s``, per tensor)
* weight grad  ``gW = (gq.T @ xq) [int] * sg * sx``      (gq: int8 codes of ``g``, per tensor)

Every product runs as ``qframe.kernels.int8_mm_i32`` (int8 x int8 -> int32), through the same
dispatch as inference (reference, CPU, Triton, CUDA); the scales are applied to the int32 result.
The weight scale ``s`` varies along the reduction of the input gradient, so it is folded into the
error before that error is quantized. The weight gradient leaves as the int32 accumulator and its
scale; the RCT optimizer applies it to the codes tile by tile (:mod:`.optimizer`), so no float
tensor of a weight's shape exists at any point of a step.

Convolutions are GEMMs over int8 im2col columns (built by strided views, recomputed in backward
from the int8 input that autograd keeps instead of a float copy). Depthwise convolutions (one input
channel per group) have a reduction of ``kh * kw`` terms: they run as exact int32 multiply-adds,
one kernel tap at a time, not through the GEMM dispatch. Other grouped convolutions run one GEMM
per group.

Errors are quantized with stochastic rounding (unbiased) to ``grad_bits`` (at most 8 here).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch.nn import functional as F

from qframe.kernels import ops
from qframe.quant.functional import SCALE_EPS, stochastic_round

# int8 x int8 products are at most 128 * 128 = 2**14: this many of them always fit an int32 sum.
_INT32_SAFE_K = (2 ** 31 - 1) // (2 ** 14)

_recorders: list[list] = []
_counters: list[dict] = []


@contextlib.contextmanager
def count_macs() -> Iterator[dict]:
    """Count the integer multiply-adds run inside the block: ``{"int8_gemm": n, "int8_depthwise": n}``.

    Every product here multiplies int8 by int8 into an int32 sum, whatever width the codes use."""
    counts = {"int8_gemm": 0, "int8_depthwise": 0}
    _counters.append(counts)
    try:
        yield counts
    finally:
        _counters.remove(counts)


def _count(kind: str, macs: int) -> None:
    for counts in _counters:
        counts[kind] += int(macs)


@contextlib.contextmanager
def record_gemms() -> Iterator[list]:
    """Collect ``(kind, a, w, out)`` for every integer product run inside the block (for tests).

    ``kind`` is ``"mm"`` (``out = a @ w.T`` through the kernel dispatch) or one of the depthwise
    products: ``"depthwise"`` (``a`` the input, ``w[0]`` the codes), ``"depthwise_input_grad"``
    (``a`` the errors, ``w[0]`` the codes), ``"depthwise_weight_grad"`` (``a`` the errors, ``w[0]``
    the input); ``w[1]`` is ``(stride, padding, dilation)``.
    """
    rows: list = []
    _recorders.append(rows)
    try:
        yield rows
    finally:
        _recorders.remove(rows)


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` for int8 ``a [M, K]``, ``w [N, K]`` as an exact integer ``[M, N]`` through the dispatch.

    A reduction longer than an int32 can always hold is split, and the parts summed in int64.
    """
    k = a.shape[1]
    if k <= _INT32_SAFE_K:
        out = ops.int8_mm_i32(a.contiguous(), w.contiguous())
    else:
        out = sum(ops.int8_mm_i32(a[:, i:i + _INT32_SAFE_K].contiguous(), w[:, i:i + _INT32_SAFE_K].contiguous())
                  .to(torch.int64) for i in range(0, k, _INT32_SAFE_K))
    _count("int8_gemm", a.shape[0] * a.shape[1] * w.shape[0])
    for rows in _recorders:  # copies: the codes change in place when the layer is updated
        rows.append(("mm", a.clone(), w.clone(), out))
    return out


def quantize_error(g: torch.Tensor, bits: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``g`` on a ``bits``-wide symmetric per-tensor grid (stochastic rounding) and the scale."""
    qmax = 2 ** (bits - 1) - 1
    scale = torch.clamp(g.abs().amax() / qmax, min=1e-30)
    codes = torch.clamp(stochastic_round(g / scale, generator), -qmax, qmax).to(torch.int8)
    return codes, scale


def quantize_input(x: torch.Tensor, scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of a layer input and its per-tensor scale.

    With ``scale`` (the layer's calibrated input quantizer, which has already put ``x`` on its
    grid) the codes are ``x / scale`` exactly; without, a dynamic symmetric 8-bit range is used.
    """
    if scale is None:
        scale = torch.clamp(x.detach().abs().amax() / 127, min=SCALE_EPS)
    scale = scale.detach().float().reshape(())
    return torch.clamp(torch.round(x.detach() / scale), -128, 127).to(torch.int8), scale


def _grad_bits(layer) -> int:
    return min(8, layer.grad_bits or 8)


# ---------------------------------------------------------------------------------------------
# Linear


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer, x_scale):
        shape = x.shape
        xq, sx = quantize_input(x.reshape(-1, shape[-1]), x_scale)
        y = int_mm(xq, layer.codes).float() * (sx * layer.scale)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(xq, sx)
        ctx.layer, ctx.shape, ctx.has_bias = layer, shape, bias is not None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        xq, sx = ctx.saved_tensors
        layer, bits = ctx.layer, _grad_bits(ctx.layer)
        g = g.reshape(-1, g.shape[-1])
        gx = gb = None
        if ctx.needs_input_grad[0]:
            hq, sh = quantize_error(g * layer.scale, bits, layer.generator)
            gx = (int_mm(hq, layer.codes.t()).float() * sh).reshape(ctx.shape)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = g.sum(0)
        if layer.updater is not None:
            gq, sg = quantize_error(g, bits, layer.generator)
            layer.updater(layer, int_mm(gq.t(), xq.t()), sg * sx)
        return gx, gb, None, None


def linear(layer, x: torch.Tensor, x_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``layer``'s linear map of ``x`` on integer kernels (see the module docstring)."""
    return _LinearFn.apply(x, bias, layer, x_scale)


# ---------------------------------------------------------------------------------------------
# Conv2d


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _taps(xp: torch.Tensor, kernel, stride, dilation, out_hw) -> torch.Tensor:
    """A strided view ``[B, C, Ho, Wo, kh, kw]`` of the padded input: every kernel tap of every output."""
    b, c = xp.shape[:2]
    sb, sc, sh, sw = xp.stride()
    return xp.as_strided((b, c, *out_hw, *kernel),
                         (sb, sc, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1]))


def im2col(xq: torch.Tensor, kernel, stride, padding, dilation) -> tuple[torch.Tensor, tuple[int, int]]:
    """int8 columns ``[B * Ho * Wo, C * kh * kw]`` of an int8 ``[B, C, H, W]`` input, and ``(Ho, Wo)``."""
    b, c, h, w = xq.shape
    out_hw = (_out_size(h, kernel[0], stride[0], padding[0], dilation[0]),
              _out_size(w, kernel[1], stride[1], padding[1], dilation[1]))
    xp = F.pad(xq, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else xq.contiguous()
    cols = _taps(xp, kernel, stride, dilation, out_hw).permute(0, 2, 3, 1, 4, 5)
    return cols.reshape(b * out_hw[0] * out_hw[1], c * kernel[0] * kernel[1]), out_hw


def _conv_args(layer):
    return tuple(layer.codes.shape[2:]), layer.stride, layer.padding, layer.dilation


def _depthwise(xq: torch.Tensor, codes: torch.Tensor, layer) -> torch.Tensor:
    """Exact int32 depthwise convolution of int8 ``xq`` with int8 ``codes [C, 1, kh, kw]``."""
    kernel, stride, padding, dilation = _conv_args(layer)
    h, w = xq.shape[2:]
    out_hw = (_out_size(h, kernel[0], stride[0], padding[0], dilation[0]),
              _out_size(w, kernel[1], stride[1], padding[1], dilation[1]))
    xp = F.pad(xq, (padding[1], padding[1], padding[0], padding[0]))
    taps = _taps(xp, kernel, stride, dilation, out_hw)
    taps_w = codes.reshape(codes.shape[0], -1).to(torch.int32)
    acc = torch.zeros((xq.shape[0], xq.shape[1], *out_hw), dtype=torch.int32, device=xq.device)
    for t in range(kernel[0] * kernel[1]):
        i, j = divmod(t, kernel[1])
        acc += taps[..., i, j].to(torch.int32) * taps_w[:, t].view(1, -1, 1, 1)
    _count("int8_depthwise", acc.numel() * kernel[0] * kernel[1])
    for rows in _recorders:
        rows.append(("depthwise", xq.clone(), (codes.clone(), (stride, padding, dilation)), acc))
    return acc


def _depthwise_input_grad(gq: torch.Tensor, codes: torch.Tensor, layer, in_hw) -> torch.Tensor:
    """Exact int32 input gradient of a depthwise convolution for int8 errors ``gq``."""
    kernel, stride, padding, dilation = _conv_args(layer)
    b, c, ho, wo = gq.shape
    hp, wp = in_hw[0] + 2 * padding[0], in_hw[1] + 2 * padding[1]
    gxp = torch.zeros((b, c, hp, wp), dtype=torch.int32, device=gq.device)
    taps = _taps(gxp, kernel, stride, dilation, (ho, wo))
    g32 = gq.to(torch.int32)
    taps_w = codes.reshape(c, -1).to(torch.int32)
    for t in range(kernel[0] * kernel[1]):
        i, j = divmod(t, kernel[1])
        taps[..., i, j].add_(g32 * taps_w[:, t].view(1, -1, 1, 1))
    gx = gxp[:, :, padding[0]:padding[0] + in_hw[0], padding[1]:padding[1] + in_hw[1]]
    _count("int8_depthwise", gq.numel() * kernel[0] * kernel[1])
    for rows in _recorders:
        rows.append(("depthwise_input_grad", gq.clone(), (codes.clone(), (stride, padding, dilation)), gx))
    return gx


def _depthwise_weight_grad(gq: torch.Tensor, xq: torch.Tensor, layer) -> torch.Tensor:
    """Exact int64 weight gradient ``[C, kh * kw]`` of a depthwise convolution."""
    kernel, stride, padding, dilation = _conv_args(layer)
    xp = F.pad(xq, (padding[1], padding[1], padding[0], padding[0]))
    taps = _taps(xp, kernel, stride, dilation, tuple(gq.shape[2:]))
    g32 = gq.to(torch.int32)
    gw = torch.stack([(g32 * taps[..., i, j].to(torch.int32)).sum((0, 2, 3))
                      for i in range(kernel[0]) for j in range(kernel[1])], 1)
    _count("int8_depthwise", gq.numel() * kernel[0] * kernel[1])
    for rows in _recorders:
        rows.append(("depthwise_weight_grad", gq.clone(), (xq.clone(), (stride, padding, dilation)), gw))
    return gw


def _dense_forward(xq, codes2d, layer):
    kernel, stride, padding, dilation = _conv_args(layer)
    cols, out_hw = im2col(xq, kernel, stride, padding, dilation)
    return int_mm(cols, codes2d), out_hw


def _dense_input_grad(hq, sh, codes2d, layer, in_shape):
    """Input gradient of a dense (one-group) convolution: int32 columns of ``hq @ C``, scaled, folded back."""
    kernel, stride, padding, dilation = _conv_args(layer)
    b, c, h, w = in_shape
    cols = int_mm(hq, codes2d.t())  # [B * Ho * Wo, C * kh * kw]
    cols = cols.float().mul_(sh).reshape(b, -1, cols.shape[1]).transpose(1, 2)
    if kernel == (1, 1) and stride == (1, 1) and not any(padding):
        return cols.reshape(b, c, h, w)
    return F.fold(cols, (h, w), kernel, dilation, padding, stride)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, layer, x_scale):
        xq, sx = quantize_input(x, x_scale)
        b, groups = x.shape[0], layer.groups
        n = layer.codes.shape[0]
        if _is_depthwise(layer, x):
            acc = _depthwise(xq, layer.codes, layer)
            y = acc.float() * (sx * layer.scale).view(1, -1, 1, 1)
        else:
            codes2d = layer.codes.reshape(n, -1)
            ng, cg = n // groups, x.shape[1] // groups
            parts = []
            for gi in range(groups):
                acc, out_hw = _dense_forward(xq[:, gi * cg:(gi + 1) * cg], codes2d[gi * ng:(gi + 1) * ng], layer)
                parts.append(acc)
            acc = parts[0] if groups == 1 else torch.cat(parts, 1)
            y = (acc.float() * (sx * layer.scale)).reshape(b, *out_hw, n).permute(0, 3, 1, 2)
        if bias is not None:
            y = y + bias.view(1, -1, 1, 1)
        ctx.save_for_backward(xq, sx)
        ctx.layer, ctx.has_bias = layer, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        xq, sx = ctx.saved_tensors
        layer, bits = ctx.layer, _grad_bits(ctx.layer)
        gx = gb = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            gb = g.sum((0, 2, 3))
        if _is_depthwise(layer, xq):
            gq, sg = quantize_error(g, bits, layer.generator)
            if ctx.needs_input_grad[0]:
                gx = _depthwise_input_grad(gq, layer.codes, layer, xq.shape[2:]).float()
                gx = gx * (sg * layer.scale).view(1, -1, 1, 1)
            if layer.updater is not None:
                layer.updater(layer, _depthwise_weight_grad(gq, xq, layer), sg * sx)
            return gx, gb, None, None
        n, groups = layer.codes.shape[0], layer.groups
        ng, cg = n // groups, xq.shape[1] // groups
        codes2d = layer.codes.reshape(n, -1)
        g2 = g.permute(0, 2, 3, 1).reshape(-1, n)  # rows: (b, ho, wo), as the im2col columns
        if ctx.needs_input_grad[0]:
            hq, sh = quantize_error(g2 * layer.scale, bits, layer.generator)
            in_shape = (xq.shape[0], cg, *xq.shape[2:])
            parts = [_dense_input_grad(hq[:, gi * ng:(gi + 1) * ng], sh, codes2d[gi * ng:(gi + 1) * ng], layer,
                                       in_shape) for gi in range(groups)]
            gx = parts[0] if groups == 1 else torch.cat(parts, 1)
        if layer.updater is not None:
            gq, sg = quantize_error(g2, bits, layer.generator)
            kernel, stride, padding, dilation = _conv_args(layer)
            parts = []
            for gi in range(groups):
                cols, _ = im2col(xq[:, gi * cg:(gi + 1) * cg], kernel, stride, padding, dilation)
                parts.append(int_mm(gq[:, gi * ng:(gi + 1) * ng].t(), cols.t()))
            layer.updater(layer, parts[0] if groups == 1 else torch.cat(parts, 0), sg * sx)
        return gx, gb, None, None


def _is_depthwise(layer, x) -> bool:
    return layer.groups > 1 and layer.groups == x.shape[1] == layer.codes.shape[0]


def conv2d(layer, x: torch.Tensor, x_scale: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``layer``'s convolution of ``x`` on integer kernels (see the module docstring)."""
    return _ConvFn.apply(x, bias, layer, x_scale)
