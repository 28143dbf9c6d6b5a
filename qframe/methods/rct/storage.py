"""Single-copy weight storage for RCT: integer codes and per-channel scales, nothing else.

An :class:`RCTConv2d` / :class:`RCTLinear` holds its weight only as ``codes`` (int8 up to 8
bits, int16 up to 16) and a per-output-channel ``scale``; there is no float weight between
steps.

With ``integer_gemm`` (the default of :class:`~qframe.methods.rct.optimizer.RCTConfig`, for
widths up to 8 bits) the forward pass, the input gradient and the weight gradient run on the
codes through qframe's integer kernels (:mod:`.gemm`), and the weight gradient reaches the
layer's ``updater`` (the RCT optimizer) as an integer accumulator and its scale: no float tensor
of a weight's shape exists during a step. Without it (or above 8 bits) the forward pass
dequantizes into a transient float weight whose gradient is handed to the ``updater`` the moment
autograd has accumulated it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from qframe.errors import QFrameError
from qframe.methods.rct import gemm
from qframe.quant import functional as QF
from qframe.quant.functional import SCALE_EPS, stochastic_round
from qframe.quant.modules import TensorQuantizer
from qframe.quant.spec import check_bits as spec_check_bits
from qframe.utils.modules import zero_padding

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: int, what: str = "RCT bit width") -> int:
    return spec_check_bits(bits, what, MIN_BITS, MAX_BITS)


def code_range(bits: int) -> tuple[int, int]:
    """Signed two's-complement range of a ``bits``-wide code."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def code_dtype(bits: int) -> torch.dtype:
    """Smallest integer dtype that holds ``bits``-wide codes."""
    return torch.int8 if bits <= 8 else torch.int16


def _channel_view(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.view(-1, *([1] * (like.dim() - 1)))


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel codes and scales of ``weight`` (round half to even)."""
    check_bits(bits)
    qmin, qmax = code_range(bits)
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    scale = torch.clamp(amax / qmax, min=SCALE_EPS)
    codes = torch.clamp(torch.round(w / _channel_view(scale, w)), qmin, qmax)
    return codes.to(code_dtype(bits)), scale


def requantize(codes: torch.Tensor, scale: torch.Tensor, old_bits: int, new_bits: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Move codes to a new width, keeping the values they stand for where that is possible.

    Widening by ``k`` bits is exact: codes times ``2**k`` on a step ``2**k`` times finer.
    Narrowing divides the codes by ``2**k`` with stochastic rounding (exact in expectation) on a
    coarser step, clipped to the narrower range. Both are integer arithmetic on the codes.
    """
    check_bits(new_bits)
    shift = new_bits - old_bits
    if shift == 0:
        return codes, scale
    qmin, qmax = code_range(new_bits)
    if shift > 0:
        return (codes.to(torch.int32) << shift).to(code_dtype(new_bits)), scale / 2.0 ** shift
    narrowed = torch.clamp(shift_round(codes, -shift, generator), qmin, qmax)
    return narrowed.to(code_dtype(new_bits)), scale * 2.0 ** -shift


def shift_round(codes: torch.Tensor, k: int | torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``codes / 2**k`` stochastically rounded, in integer arithmetic: ``floor((q + r) / 2**k)`` with
    ``r`` uniform in ``[0, 2**k)`` rounds up with probability equal to the fraction, so it is exact in
    expectation. ``k`` is an int or an int tensor broadcasting against ``codes`` (per row); int32 result."""
    q = codes.to(torch.int32)
    k = torch.as_tensor(k, dtype=torch.int32, device=q.device)
    noise = torch.randint(0, 2 ** 30, q.shape, generator=generator, dtype=torch.int32,
                          device="cpu" if generator is not None else q.device).to(q.device)
    return (q + (noise >> (30 - k))) >> k


@torch.no_grad()
def fold_bn_into_layer(layer: "RCTLayer", bn: nn.Module) -> None:
    """Fold a BatchNorm's running statistics into ``layer``'s per-channel scales and bias, in place.

    ``w * f`` with ``f = gamma / sqrt(var + eps)`` is ``codes * (scale * |f|)`` where ``f > 0``:
    the codes stay as they are and the fold is exact. A channel with ``f < 0`` has its codes
    negated (exact, except that a code at the negative end of the range moves one step, to the
    positive end); a channel with ``f == 0`` gets the smallest scale (``SCALE_EPS``: its output is
    the bias alone). The bias becomes ``beta + (bias - mean) * f``.
    """
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    negative = factor < 0
    if bool(negative.any()):
        _, qmax = code_range(layer.bits)
        flipped = torch.clamp(-layer.codes.to(torch.int32), max=qmax).to(layer.codes.dtype)
        layer.codes.copy_(torch.where(_channel_view(negative, layer.codes), flipped, layer.codes))
    layer.scale.copy_(torch.clamp(layer.scale.double() * factor.abs(), min=SCALE_EPS).float())
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    folded = (beta + (bias - bn.running_mean.double()) * factor).float()
    if layer.bias is None:
        layer.bias = nn.Parameter(folded.to(layer.scale.device))
    else:
        layer.bias.copy_(folded)


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; the backward error is put on a ``bits``-wide per-tensor grid (stochastic rounding)."""

    @staticmethod
    def forward(ctx, x, bits, generator):
        ctx.bits, ctx.generator = bits, generator
        return x.clone()  # a view would clash with in-place activations after the layer

    @staticmethod
    def backward(ctx, grad):
        qmax = 2 ** (ctx.bits - 1) - 1
        scale = torch.clamp(grad.abs().amax() / qmax, min=1e-30)
        codes = torch.clamp(stochastic_round(grad / scale, ctx.generator), -qmax, qmax)
        return codes * scale, None, None


class RCTLayer(nn.Module):
    """Shared state of the RCT layers: codes, scales, bit width, bias, input quantizer.

    ``updater(layer, grad)`` is called with the weight gradient during backward; RCT's optimizer
    sets it. ``grad_bits`` (or None) quantizes the error arriving at this layer's output, so all
    three GEMMs of a training step take integer operands.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, bias: Optional[torch.Tensor],
                 input_quantizer: TensorQuantizer | None, grad_bits: int | None = None):
        super().__init__()
        check_bits(bits)
        self.register_buffer("codes", codes.to(code_dtype(bits)))
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("bit_width", torch.tensor(bits, dtype=torch.int16))
        self.bias = nn.Parameter(bias.detach().float().clone()) if bias is not None else None
        self.input_quantizer = input_quantizer
        self.grad_bits = grad_bits
        self.updater: Callable | None = None
        self.generator: torch.Generator | None = None
        self.integer_gemm = False  # forward and both gradients on the integer kernels (see module docstring)

    @property
    def bits(self) -> int:
        return int(self.bit_width)

    @property
    def weight(self) -> torch.Tensor:
        """The weight the codes stand for: a fresh float tensor, not stored anywhere."""
        return self.codes.float() * _channel_view(self.scale, self.codes)

    def set_bits(self, bits: int, generator: torch.Generator | None = None) -> None:
        """Re-quantize the weight to ``bits`` (see :func:`requantize`)."""
        self.codes, self.scale = requantize(self.codes, self.scale, self.bits, bits, generator)
        self.bit_width.fill_(bits)

    def _weight_for_forward(self) -> torch.Tensor:
        w = self.weight
        if self.training and self.updater is not None and torch.is_grad_enabled():
            w.requires_grad_(True)
            w.register_post_accumulate_grad_hook(self._apply_update)
        return w

    def _apply_update(self, w: torch.Tensor) -> None:
        grad, w.grad = w.grad, None  # the gradient is consumed here and not kept
        self.updater(self, grad)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _bias(self) -> torch.Tensor | None:
        """The bias on the int32 accumulator grid (input scale x weight scale), as a QuantConv2d /
        QuantLinear rounds it (:func:`qframe.quant.functional.quantize_bias`), where the input is quantized."""
        si = None if self.input_quantizer is None else self.input_quantizer.active_scale()
        if self.bias is None or si is None or si.numel() != 1:
            return self.bias
        return QF.quantize_bias(self.bias, si.float().reshape(()) * self.scale)

    def _integer(self) -> bool:
        return self.integer_gemm and self.bits <= 8

    def _input_and_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (fake-)quantized input and its per-tensor scale where it sits on a symmetric <= 8-bit
        grid; otherwise the input as it is and None (the GEMM then quantizes it dynamically)."""
        iq = self.input_quantizer
        x = self._input(x)
        s = None if iq is None else iq.active_scale(x)
        zp = None if iq is None else iq.zero_point
        if s is None or s.numel() != 1 or iq.spec.bits > 8 or (zp is not None and bool(zp.ne(0).any())):
            return x, None
        return x, s

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if self.grad_bits is not None and self.training and y.requires_grad:
            return _QuantizeGrad.apply(y, self.grad_bits, self.generator)
        return y

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the codes' dtype follows the bit width, which a checkpoint may have changed
        for name in ("codes", "scale"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weight_bytes(self) -> int:
        """Bytes the weight takes when packed at its bit width (codes plus float32 scales)."""
        return -(-self.codes.numel() * self.bits // 8) + self.scale.numel() * 4


class RCTConv2d(RCTLayer):
    """A Conv2d whose weight exists only as integer codes (see :class:`RCTLayer`)."""

    def __init__(self, conv: nn.Conv2d, bits: int, input_quantizer=None, grad_bits=None):
        padding = zero_padding(conv, "RCT")  # numbers: the integer GEMM pads by them ('same' / 'valid' too)
        if isinstance(padding, str):
            raise QFrameError(padding)
        codes, scale = quantize_weight(conv.weight, bits)
        super().__init__(codes, scale, bits, conv.bias, input_quantizer, grad_bits)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, padding, conv.dilation, conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._integer():
            x, s = self._input_and_scale(x)
            return gemm.conv2d(self, x, s, self._bias())
        y = F.conv2d(self._input(x), self._weight_for_forward(), self._bias(), self.stride, self.padding,
                     self.dilation, self.groups)
        return self._output(y)

    def extra_repr(self) -> str:
        out, inp, kh, kw = self.codes.shape
        return f"{inp * self.groups}, {out}, kernel_size=({kh}, {kw}), stride={self.stride}, groups={self.groups}, " \
               f"bits={self.bits}"


class RCTLinear(RCTLayer):
    """A Linear whose weight exists only as integer codes (see :class:`RCTLayer`)."""

    def __init__(self, linear: nn.Linear, bits: int, input_quantizer=None, grad_bits=None):
        codes, scale = quantize_weight(linear.weight, bits)
        super().__init__(codes, scale, bits, linear.bias, input_quantizer, grad_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._integer():
            x, s = self._input_and_scale(x)
            return gemm.linear(self, x, s, self._bias())
        return self._output(F.linear(self._input(x), self._weight_for_forward(), self._bias()))

    def extra_repr(self) -> str:
        return f"in_features={self.codes.shape[1]}, out_features={self.codes.shape[0]}, bits={self.bits}"


def rct_layers(model: nn.Module) -> list[tuple[str, RCTLayer]]:
    """The RCT layers of ``model`` with their qualified names, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RCTLayer)]
