"""Real quantized inference: turn a PTQ / QAT model's fake-quant layers into integer-weight layers.

:func:`convert` replaces every :class:`~qframe.quant.modules.QuantConv2d`,
:class:`~qframe.quant.modules.QuantConvTranspose2d` and :class:`~qframe.quant.modules.QuantLinear`
whose weight is quantized symmetrically along the output channels (per channel or per group, per
channel only for a ConvTranspose2d; zero point 0, a calibrated static range) by a module
that stores the integer weight, ``weight_int``, with float32 ``weight_scale`` ([N] or [N, groups])
and ``input_scale``, and runs it as follows:

============================================  =================================================
layer                                         runs
============================================  =================================================
2..4-bit weights, int8 input                  ``w4a8_mm`` (packed int4)
2..4-bit weights, float input                 ``w4a16_mm`` (packed int4); a conv over >= 256
                                              output positions: dequantized float conv
5..8-bit per-channel weights, int8 input      ``int8_mm`` (int8)
depthwise conv, int8 input, per-channel       integer multiply-and-sum of the int8 codes
anything else (8-bit weights with float       int8 storage, dequantized for a float conv / linear
input, per-group 5..8-bit, grouped conv)      (weight-only int8)
============================================  =================================================

"int8 input" means the layer's input quantizer is a calibrated static per-tensor symmetric signed
8-bit one; the input is then quantized with its scale (rounding half to even, as the fake-quant
model does). Conv2d runs as a GEMM over the unfolded (im2col) input codes; depthwise products
(at most 128 * 128 * taps) are exact in float32. ConvTranspose2d runs the same GEMM paths over the
input positions, and col2im (a strided add per kernel tap) sums the overlapping columns into the
output; a grouped one runs as a float transposed convolution with its dequantized weight. The
outputs equal the fake-quant model's up to float rounding. Layers whose weights are per-tensor, asymmetric or dynamic
stay as they are (logged); weights are stored as packed int4 only where a GEMM op reads them. An input
quantizer of another kind (4-bit, asymmetric, per-channel, dynamic) stays on the layer
(``input_fake_quant``) and quantizes the input in float before the float-input paths (logged, listed).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from torch.nn import functional as F

from qframe.errors import QFrameError, one_of, require_fake_quant
from qframe.kernels.ops import int8_mm, w4a8_mm, w4a16_mm
from qframe.kernels.packing import pack_int4, unpack_int4
from qframe.kernels.reference import expand_group_scale
from qframe.quant import functional as QF
from qframe.quant.modules import (QUANT_LAYERS, QuantConv2d, QuantConvBn2d, QuantConvTranspose2d, QuantLinear,
                                  TensorQuantizer)
from qframe.utils.modules import copy_model, set_submodule, zero_padding

log = logging.getLogger(__name__)

ENGINES = ("auto", "onednn", "qframe")

# A float-input (w4a16) convolution with at least this many output positions (batch x height x
# width) runs as a float convolution with the dequantized weight instead of an unfolded GEMM.
WEIGHT_ONLY_CONV_MAX_ROWS = 256


def _static_input_scale(q: TensorQuantizer | None) -> tuple[torch.Tensor | None, int]:
    """(per-tensor scale, lowest code) of a symmetric signed 8-bit input quantizer; (None, -128) when the
    input stays float."""
    if q is None or not q.enabled or not q.calibrated or q.dynamic:
        return None, -128
    s = q.spec
    if s.granularity != "per_tensor" or not s.symmetric or not s.signed or s.bits != 8:
        return None, -128
    return q.scale.detach().float().reshape(()).clone(), s.qmin  # qmin -127 with a narrow range


def _weight_codes(layer) -> tuple[torch.Tensor, torch.Tensor, int, int | None] | str:
    """(integer codes [N, ...], scale [N] or [N, G], bits, group size) of a layer's weight, or why not; a
    ConvTranspose's codes keep its ``[in, out / groups, ...]`` layout, with ``out / groups`` scales."""
    q = layer.weight_quantizer
    if q is None or not q.enabled:
        return "weights not quantized"
    if q.dynamic or not q.calibrated:
        return "weight range dynamic or not calibrated"
    s, axis = q.spec, layer.weight_axis  # 1 for a ConvTranspose's [in, out / groups, ...] weight
    if s.granularity == "per_tensor" or s.axis != axis:
        return f"weights {s.granularity} on axis {s.axis} (needs per_channel or per_group along the output channels)"
    if not s.symmetric or not s.signed:
        return "weights asymmetric or unsigned (needs symmetric signed)"
    codes = QF.quantize(layer.weight.detach(), q.scale, q.zero_point, s)
    if axis:
        if s.granularity != "per_channel":
            return f"weights {s.granularity} on a {type(layer).__name__} (needs per_channel)"
        return codes, q.scale.detach().float().reshape(-1).clone(), s.bits, None
    scale = q.scale.detach().float().reshape(codes.shape[0], -1).clone()
    group_size = s.group_size if s.granularity == "per_group" and scale.shape[1] > 1 else None
    return codes, (scale if group_size else scale.reshape(-1)), s.bits, group_size  # one group is per-channel


class _IntLayer(nn.Module):
    """Integer weight storage and the GEMM paths shared by the converted Linear and Conv2d."""

    float_dtype = torch.float32  # a layer pickled before it had one (whole-model torch.save) was float32

    def __init__(self, codes2d: torch.Tensor, scale: torch.Tensor, bits: int, bias, input_scale, group_size,
                 gemm: bool, input_qmin: int = -128, float_dtype: torch.dtype = torch.float32):
        super().__init__()
        # the float layer's dtype: of the dequantized ``weight``, and of the output for uint8 codes in
        self.float_dtype = float_dtype
        self.bits, self.k, self.group_size, self.input_qmin = bits, codes2d.shape[1], group_size, input_qmin
        self.packed = gemm and bits <= 4
        per_channel = scale.dim() == 1
        if self.packed:
            self.path = "w4a16_mm" if input_scale is None else "w4a8_mm"
        elif gemm and input_scale is not None and per_channel:
            self.path = "int8_mm"
        else:
            self.path = "dequantize"
        weight = pack_int4(codes2d.to(torch.int8)) if self.packed else codes2d.to(torch.int8)
        self.register_buffer("weight_int", weight.contiguous())
        self.register_buffer("weight_scale", scale.contiguous())
        self.register_buffer("input_scale", input_scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        # an input quantizer the integer kernels cannot take (not 8-bit symmetric per-tensor: w4a4's 4-bit inputs)
        # runs as it did in the fake-quant model, in float, before the float-input (weight-only) paths
        self.input_fake_quant: TensorQuantizer | None = None

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_fake_quant is None else self.input_fake_quant(x)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes of ``x`` on the input quantizer's grid (round half to even, clamp to [qmin, 127])."""
        return torch.clamp(torch.round(x.float() / self.input_scale), self.input_qmin, 127).to(torch.int8)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[N, K]`` the integer codes stand for (what the fake-quant model used)."""
        codes = unpack_int4(self.weight_int, self.k) if self.packed else self.weight_int
        return codes.float() * expand_group_scale(self.weight_scale, self.group_size, self.k)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight in the float layer's shape, dequantized on each access (no float copy is kept): models
        read ``layer.weight.dtype`` or ``.shape`` (DeiT, DINOv2 and BEiT's patch embeddings cast their input to it)."""
        return self.dequantized_weight().to(self.float_dtype)

    def _as_input(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A float output ``y`` in the dtype of the input ``x`` (the model's for uint8 codes), as the float and
        fake-quant layers return it; the kernels compute in float32. uint8 codes out stay as they are."""
        dtype = x.dtype if x.is_floating_point() else self.float_dtype
        return y.to(dtype) if y.is_floating_point() and y.dtype != dtype else y

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_engine_conv", None)  # the prepacked weight is rebuilt on first use (deepcopy, pickle)
        state.pop("_float_weight", None)
        return state

    def _kept_float_weight(self) -> torch.Tensor:
        """The dequantized weight, made on first use and kept in memory (the ``float`` engine)."""
        weight = self.__dict__.get("_float_weight")
        if weight is None:
            weight = self.__dict__["_float_weight"] = self.dequantized_weight().contiguous()
        return weight

    def _float_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the weight-only path sees it: fake-quantized when the layer quantizes its input."""
        from qframe.kernels.int_graph import fake_quantize

        return x.float() if self.input_scale is None else fake_quantize(x, self.input_scale, self.input_qmin)

    def _gemm(self, x2d: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``x2d`` float [M, K] -> float32 [M, N] through this layer's op (not the dequantize path); ``bias=False``:
        without the bias."""
        if self.path == "w4a16_mm":
            return w4a16_mm(x2d.float().contiguous(), self.weight_int, self.weight_scale, self.group_size,
                            self.bias if bias else None)
        return self._gemm_codes(self.quantize_input(x2d), bias)

    def _gemm_codes(self, codes: torch.Tensor, bias: bool = True) -> torch.Tensor:
        a_scale, b = self.input_scale.expand(codes.shape[0]).contiguous(), self.bias if bias else None
        if self.packed:
            return w4a8_mm(codes.contiguous(), a_scale, self.weight_int, self.weight_scale, self.group_size, b)
        return int8_mm(codes.contiguous(), a_scale, self.weight_int, self.weight_scale, b)

    def extra_repr(self) -> str:
        form = "packed int4" if self.packed else "int8"
        act = "int8" if self.input_scale is not None else "float" if self.input_fake_quant is None else \
            f"fake-quantized {self.input_fake_quant.spec.bits}-bit"
        return f"weights {self.bits}-bit as {form}, {act} activations, runs {self.path}"


@torch.no_grad()
def _deployed_bias(layer) -> torch.Tensor | None:
    """The bias the fake-quant layer adds: rounded to its int32 accumulator grid where it rounds it."""
    return layer._quant_bias(layer.bias, layer.weight_to_quantize())


class IntLinear(_IntLayer):
    """nn.Linear with integer weights (see :func:`convert`)."""

    def __init__(self, layer: QuantLinear, codes, scale, bits, input_scale, group_size=None, input_qmin=-128):
        super().__init__(codes, scale, bits, _deployed_bias(layer), input_scale, group_size, gemm=True,
                         input_qmin=input_qmin, float_dtype=layer.weight.dtype)
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._as_input(self._forward(self.fake_quant_input(x)), x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "dequantize":
            return F.linear(self._float_input(x), self.dequantized_weight(), self.bias)
        lead = x.shape[:-1]
        return self._gemm(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_features)


def _check_conv_input(layer, x: torch.Tensor) -> None:
    """A QFrameError for an input that is not ``[N, C, H, W]`` or ``[C, H, W]`` with the layer's C (oneDNN and the
    GEMM paths would fail without naming it)."""
    if x.dim() not in (3, 4) or x.shape[-3] != layer.in_channels:
        raise QFrameError(f"{type(layer).__name__} of {layer.in_channels} input channels got input of shape "
                          f"{tuple(x.shape)}; valid: [N, {layer.in_channels}, H, W] or [{layer.in_channels}, H, W], "
                          "as the model it was converted from takes")


def _batched(x: torch.Tensor) -> torch.Tensor:
    """``x [C, H, W]`` as a batch of one, keeping the scale uint8 codes from a linked producer carry."""
    return _carry_scale(x, x.unsqueeze(0))


def _unbatched(y: torch.Tensor) -> torch.Tensor:
    """A batch of one back as ``[C, H, W]``, keeping the scale of uint8 codes handed to the next layer."""
    return _carry_scale(y, y.squeeze(0))


def _carry_scale(source: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    from qframe.kernels import int_graph

    scale = int_graph.scale_of(source)
    if scale is not None:  # a view is a new tensor: without the scale its consumer would read codes as values
        setattr(view, int_graph.SCALE_ATTR, scale)
    return view


def _im2col_nhwc(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """``x [B, C, H, W]`` (any dtype) -> ``[B * OH * OW, kh * kw * C]``, columns in (kh, kw, C) order.

    One gathering copy through an NHWC view, so int8 codes stay int8 (F.unfold takes floats only and
    returns the transposed layout)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph)).contiguous()
    b, hp, wp, c = xp.shape
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    view = xp.as_strided((b, oh, ow, kh, kw, c), (hp * wp * c, sh * wp * c, sw * c, dh * wp * c, dw * c, 1))
    return view.reshape(b * oh * ow, kh * kw * c)


class IntConv2d(_IntLayer):
    """nn.Conv2d with integer weights, run as a GEMM over the unfolded input (see :func:`convert`).

    With per-channel scales the weight is stored with K in (kh, kw, C) order and the input unfolded
    the same way from an NHWC view; per-group scales keep nn.Conv2d's (C, kh, kw) order, over which
    the groups were formed. Outputs are NCHW tensors in channels-last memory."""

    def __init__(self, layer: QuantConv2d, codes, scale, bits, input_scale, group_size=None, input_qmin=-128):
        out, inp, kh, kw = codes.shape
        padding = zero_padding(layer, "convert")
        if isinstance(padding, str):
            raise QFrameError(padding)
        gemm = layer.groups == 1
        nhwc = gemm and scale.dim() == 1
        codes2d = (codes.permute(0, 2, 3, 1) if nhwc else codes).reshape(out, -1)
        super().__init__(codes2d, scale, bits, _deployed_bias(layer), input_scale, group_size, gemm=gemm,
                         input_qmin=input_qmin, float_dtype=layer.weight.dtype)
        self.nhwc = nhwc
        depthwise = layer.groups > 1 and inp == 1 and layer.groups == out
        if depthwise and input_scale is not None and scale.dim() == 1:
            self.path = "depthwise"
        self.in_channels, self.out_channels = inp * layer.groups, out
        self.kernel_size, self.stride = (kh, kw), layer.stride
        self.padding, self.dilation, self.groups = padding, layer.dilation, layer.groups
        # engine "onednn": torch's oneDNN int8 convolution (qframe.kernels.int_graph), with a fused
        # activation and, when linked, uint8 codes out at out_scale; "qframe": the GEMM paths above
        # input_zero: the uint8 code of zero on oneDNN (128: int8 codes + 128; 0: codes 0..127 of an input that
        # is never negative, the only exact form without AVX-512 VNNI); engine "float": a float convolution
        # with the dequantized weight (kept in memory) on the fake-quantized input
        self.engine, self.act, self.out_scale, self.out_qmin, self.input_zero = "qframe", "none", None, -128, 128

    def _onednn_forward(self, x: torch.Tensor) -> torch.Tensor:
        from qframe.kernels import int_graph

        conv = self.__dict__.get("_engine_conv")
        if conv is None:
            conv = self.__dict__["_engine_conv"] = int_graph.OneDnnConv(self)
        if self.input_zero == int_graph.ZERO:
            q = int_graph.codes_for(x, conv.x_scale, self.input_qmin)
        else:
            q = int_graph.nonnegative_codes(x, conv.x_scale)
        return conv(q, self.bias, self.out_scale, self.act)

    def _float_engine_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self._float_input(x), self._kept_float_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[N, C / groups, kh, kw]`` the integer codes stand for."""
        w = super().dequantized_weight()
        if self.nhwc:
            return w.reshape(self.out_channels, *self.kernel_size, -1).permute(0, 3, 1, 2)
        return w.reshape(self.out_channels, -1, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_conv_input(self, x)
        if x.dim() == 3:  # unbatched [C, H, W], as nn.Conv2d takes it: a batch of one
            return _unbatched(self.forward(_batched(x)))
        return self._as_input(self._forward(self.fake_quant_input(x)), x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine == "onednn":
            return self._onednn_forward(x)
        if self.engine == "float":
            return self._float_engine_forward(x)
        if self.path == "dequantize":
            return F.conv2d(self._float_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        if self.path == "depthwise":
            # integer codes carried in float32: every product and sum is an integer below 2**24, exact
            codes = self.quantize_input(x).float()
            weight = self.weight_int.float().reshape(self.out_channels, 1, *self.kernel_size)
            acc = F.conv2d(codes, weight, None, self.stride, self.padding, self.dilation, self.groups)
            y = acc * (self.input_scale * self.weight_scale).reshape(1, -1, 1, 1)
            return y if self.bias is None else y + self.bias.reshape(1, -1, 1, 1)
        b = x.shape[0]
        oh, ow = self._out_hw(x.shape[2], x.shape[3])
        if self.path == "w4a16_mm" and b * oh * ow >= WEIGHT_ONLY_CONV_MAX_ROWS:
            # weight-only int4 pays where weight traffic dominates (few output positions); over many,
            # a float convolution with the dequantized weight (the fake-quant model's own sums)
            # beats unfolding the input for a GEMM
            return F.conv2d(x.float(), self.dequantized_weight(), self.bias, self.stride, self.padding,
                            self.dilation, self.groups)
        source = x.float() if self.path == "w4a16_mm" else self.quantize_input(x)
        if self.nhwc:
            cols = _im2col_nhwc(source, self.kernel_size, self.stride, self.padding, self.dilation)
        else:  # (C, kh, kw) order for per-group scales; F.unfold works on floats
            cols = F.unfold(source.float(), self.kernel_size, self.dilation, self.padding, self.stride)
            cols = cols.transpose(1, 2).reshape(-1, cols.shape[1]).to(source.dtype)
        y = self._gemm(cols) if self.path == "w4a16_mm" else self._gemm_codes(cols)
        return y.reshape(b, oh, ow, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.engine == "onednn":
            out = "int8 codes" if self.out_scale is not None else "float"
            codes = ", input codes 0..127" if self.input_zero == 0 else ""
            text += f" on oneDNN int8 conv (act={self.act}, out={out}{codes})"
        elif self.engine == "float":
            text += " as a float conv (dequantized weight)"
        return text

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        dims = []
        for size, k, s, p, d in zip((h, w), self.kernel_size, self.stride, self.padding, self.dilation):
            dims.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return dims[0], dims[1]


class IntConvTranspose2d(_IntLayer):
    """nn.ConvTranspose2d with integer weights (see :func:`convert`).

    A transposed convolution is a GEMM followed by col2im: every input position times the weight gives
    ``out * kh * kw`` columns, and col2im (:func:`_col2im`) adds the overlapping ones into the output.
    The weight ``[in, out / groups, kh, kw]`` is stored as GEMM rows ``(out, kh, kw)`` over K = in,
    each row with its output channel's scale; the input is read NHWC. The GEMM paths need groups 1 and
    per-channel scales; a grouped layer keeps int8 codes and runs a float transposed convolution with the
    dequantized weight (``dequantize``)."""

    def __init__(self, layer: QuantConvTranspose2d, codes, scale, bits, input_scale, group_size=None,
                 input_qmin=-128):
        inp, out_per_group, kh, kw = codes.shape
        codes2d = codes.permute(1, 2, 3, 0).reshape(out_per_group * kh * kw, inp)
        gemm = layer.groups == 1
        super().__init__(codes2d, scale.repeat_interleave(kh * kw), bits, _deployed_bias(layer), input_scale,
                         group_size, gemm=gemm, input_qmin=input_qmin, float_dtype=layer.weight.dtype)
        self.in_channels, self.out_channels = inp, out_per_group * layer.groups
        self.kernel_size, self.stride, self.padding = (kh, kw), layer.stride, layer.padding
        self.output_padding, self.dilation, self.groups = layer.output_padding, layer.dilation, layer.groups
        # "float" (convert's oneDNN engine, where qframe's int8 GEMM and col2im measured slower than torch's float
        # transposed convolution): the dequantized weight, kept in memory, on the fake-quantized input
        self.engine = "qframe"

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``[in, out / groups, kh, kw]`` the integer codes stand for."""
        return super().dequantized_weight().reshape(-1, *self.kernel_size, self.in_channels).permute(3, 0, 1, 2)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        _check_conv_input(self, x)
        if x.dim() == 3:  # unbatched [C, H, W], as nn.ConvTranspose2d takes it (output_size then [C, ]OH, OW)
            size = list(output_size)[-2:] if output_size is not None and len(output_size) == 3 else output_size
            return self.forward(x.unsqueeze(0), size).squeeze(0)
        output_padding = nn.ConvTranspose2d._output_padding(
            self, x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        return self._as_input(self._forward(self.fake_quant_input(x), output_padding), x)

    def _forward(self, x: torch.Tensor, output_padding) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.engine == "float":
            return F.conv_transpose2d(self._float_input(x), self._kept_float_weight(), self.bias, self.stride,
                                      self.padding, output_padding, self.groups, self.dilation)
        float_path = self.path == "dequantize" or self.path == "w4a16_mm" and b * h * w >= WEIGHT_ONLY_CONV_MAX_ROWS
        if float_path:  # w4a16 over many positions: as IntConv2d, a float convolution beats the GEMM + col2im
            source = x.float() if self.path == "w4a16_mm" else self._float_input(x)
            return F.conv_transpose2d(source, self.dequantized_weight(), self.bias, self.stride, self.padding,
                                      output_padding, self.groups, self.dilation)
        cols = self._gemm(x.permute(0, 2, 3, 1).reshape(-1, c), bias=False)  # [B * H * W, out * kh * kw]
        return _col2im(cols.reshape(b, h, w, self.out_channels, *self.kernel_size), self.stride, self.padding,
                       self.dilation, output_padding, self.bias)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text + " as a float transposed conv (dequantized weight)" if self.engine == "float" else text


def _col2im(cols: torch.Tensor, stride, padding, dilation, output_padding, bias) -> torch.Tensor:
    """``cols [B, H, W, C, kh, kw]`` (each input position's contribution to its kernel window) summed into the
    transposed convolution's output ``[B, C, OH, OW]``, plus ``bias``: one strided add per kernel tap
    (``F.fold`` does the same sum, measured 1.6-3.1x slower on CPU: benchmarks/convert_transpose.py)."""
    b, h, w, c, kh, kw = cols.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + output_padding[0] + 1
    ow = (w - 1) * sw - 2 * pw + dw * (kw - 1) + output_padding[1] + 1
    full = cols.new_zeros(b, c, max((h - 1) * sh + dh * (kh - 1) + 1, ph + oh),
                          max((w - 1) * sw + dw * (kw - 1) + 1, pw + ow))
    for i in range(kh):
        for j in range(kw):
            full[:, :, i * dh:i * dh + (h - 1) * sh + 1:sh, j * dw:j * dw + (w - 1) * sw + 1:sw] += \
                cols[..., i, j].permute(0, 3, 1, 2)
    y = full[:, :, ph:ph + oh, pw:pw + ow]
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def _integer_graph(target: nn.Module, new: dict, mode: str) -> None:
    """Put the int8 convolutions on oneDNN and link them (qframe.kernels.int_graph). ``mode`` (see
    :func:`qframe.kernels.int_graph.onednn_mode`): ``full`` runs every int8 convolution there and hands int8
    codes on; ``nonnegative`` runs there only the (non-grouped) ones whose input is a ReLU's output, with
    codes 0..127, the others as float convolutions, and hands floats from layer to layer."""
    from qframe.kernels import int_graph
    from qframe.quant.modules import QuantPool, QuantResidualAdd

    convs = {n: m for n, m in new.items() if isinstance(m, IntConv2d) and m.path in ("int8_mm", "depthwise")}
    if not convs:
        return
    for name, module in list(target.named_modules()):
        if isinstance(module, QuantResidualAdd):
            set_submodule(target, name, int_graph.IntResidualAdd(module))
        elif isinstance(module, QuantPool):
            set_submodule(target, name, int_graph.IntPool(module))
    graph = int_graph.trace(target)  # once, for the ReLU-fed inputs and for linking
    if mode == "full":
        for module in convs.values():
            module.engine = "onednn"
    else:
        nonneg = int_graph.nonnegative_inputs(target, graph) if graph is not None else set()
        for name, module in convs.items():
            if module.path == "int8_mm" and name in nonneg:
                module.engine, module.input_zero = "onednn", 0
            else:  # signed codes would saturate oneDNN's int16 pair sums; a depthwise conv gains nothing
                module.engine = "float"
    linked = int_graph.link(target, hand_over=mode == "full", graph=graph) if graph is not None else 0
    engined = sum(m.engine == "onednn" for m in convs.values())
    log.info("convert: %d convolutions on oneDNN int8%s; %d producers hand int8 codes to the next layers", engined,
             f" with input codes 0..127, {len(convs) - engined} as float convolutions" if mode != "full" else "",
             linked)


_INTEGER_KINDS = {QuantLinear: IntLinear, QuantConv2d: IntConv2d, QuantConvTranspose2d: IntConvTranspose2d}


def resolve_engine(engine: str) -> tuple:
    """``(engine, mode)``: ``onednn`` with its :func:`~qframe.kernels.int_graph.onednn_mode` where torch's oneDNN
    int8 convolution runs here (``auto`` and ``onednn``), else ``qframe``."""
    if engine not in ENGINES:
        raise one_of("convert engine", engine, ENGINES)
    if engine == "qframe":
        return engine, None
    from qframe.kernels import int_graph

    mode, reason = int_graph.onednn_mode()
    if engine == "onednn" and mode is None:
        raise QFrameError(f"convert engine 'onednn' cannot run here: {reason}; use engine='qframe' or 'auto'")
    return ("onednn", mode) if mode else ("qframe", None)


def convert(model: nn.Module, inplace: bool = False, engine: str = "auto") -> nn.Module:
    """A copy of a PTQ / QAT model (``inplace=True``: the model itself) whose quantized layers hold
    integer weights and run qframe's integer GEMM ops (see the module docstring for which).

    ``engine``: ``qframe`` runs every layer on qframe's kernel ops as in the table above;
    ``onednn`` runs the 8-bit convolutions with static int8 inputs (``int8_mm`` and ``depthwise``
    paths) on torch's oneDNN int8 convolution instead, with ReLU / ReLU6 fused and int8 codes
    handed from layer to layer where the graph allows (:mod:`qframe.kernels.int_graph`); on x86
    without AVX-512 VNNI only the convolutions whose input is a ReLU's output, exactly, and the
    others as float convolutions (:func:`~qframe.kernels.int_graph.onednn_mode`); it runs the
    ConvTranspose2d layers as float transposed convolutions with their dequantized weights, kept in
    memory, on the fake-quantized input (qframe's GEMM and col2im measured slower there); ``auto``
    (default) takes ``onednn`` where torch's oneDNN int8 convolution runs (x86, torch with oneDNN),
    else ``qframe``.

    QAT models must be folded first (:func:`qframe.methods.qat.fold_qat`). Quantized layers it does not
    convert (weights per-tensor, asymmetric or dynamic; padding other than zeros; a Conv1d / Conv3d, a
    ConvTranspose1d / 3d; per-group weights on a ConvTranspose2d) stay fake-quant: one warning names them
    with the reason, and so does the returned model's ``qframe_fake_quant_layers`` (``{layer name:
    reason}``); the PTQ model's ``qframe_float_layers`` carry over. Converted layers whose inputs the
    integer kernels cannot take keep their input quantizer (in float) and are listed in
    ``qframe_float_input_layers`` with its kind. Raises :class:`QFrameError` for a
    non-module, an unfolded QAT model, or a model with no layer to convert. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise QFrameError(f"convert needs an nn.Module (a model from qframe.ptq), got {type(model).__name__}")
    require_fake_quant(model, "qframe.convert (the model is converted already)")
    engine, mode = resolve_engine(engine)
    if any(isinstance(m, QuantConvBn2d) for m in model.modules()):
        raise QFrameError("convert needs BN folded: call qframe.methods.qat.fold_qat(model) on a QAT model first")
    bases = tuple(_INTEGER_KINDS)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, bases)]
    if not layers:
        others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, QUANT_LAYERS)})
        raise QFrameError("convert found no quantized layer it has an integer form for (QuantConv2d / "
                          "QuantConvTranspose2d / QuantLinear); " + (
                              f"the model's are {', '.join(others)}: they run as fake-quant layers (export them "
                              "to ONNX for an integer runtime)" if others else "run qframe.ptq first"))
    kept = {n: f"convert has integer layers for Conv2d, ConvTranspose2d and Linear only, not {type(m).__name__}"
            for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS) and not isinstance(m, bases)}
    for name, layer in layers:  # a registered twin adding to the forward (a padding first): an integer layer would drop it
        base = next(b for b in bases if isinstance(layer, b))
        if type(layer).forward is not base.forward:
            kept[name] = (f"{type(layer).__name__} overrides {base.__name__}.forward; convert has no integer form "
                          "of what it adds")
    layers = [(n, m) for n, m in layers if n not in kept]
    new, float_inputs = {}, {}
    for name, layer in layers:  # build every replacement first: an error leaves the model untouched
        found = _weight_codes(layer)
        if isinstance(found, str):
            kept[name] = found
            continue
        if isinstance(layer, QuantConv2d) and isinstance(padding := zero_padding(layer, "convert"), str):
            kept[name] = padding
            continue
        codes, scale, bits, group_size = found
        input_scale, input_qmin = _static_input_scale(layer.input_quantizer)
        kind = next(k for b, k in _INTEGER_KINDS.items() if isinstance(layer, b))
        try:
            new[name] = kind(layer, codes, scale, bits, input_scale, group_size, input_qmin).train(layer.training)
        except QFrameError as exc:
            raise QFrameError(f"convert: layer {name!r}: {exc}") from None
        q = layer.input_quantizer
        if input_scale is None and q is not None and q.enabled and (q.calibrated or q.dynamic):
            new[name].input_fake_quant = copy.deepcopy(q)
            float_inputs[name] = f"{q.spec.bits}-bit {q.spec.granularity.replace('_', '-')} " \
                f"{'symmetric' if q.spec.symmetric else 'asymmetric'}{' dynamic' if q.dynamic else ''}"
    if not new:
        raise QFrameError(f"convert found no layer it can convert: {_listed(kept)}")
    target = model if inplace else copy_model(model)
    for name, module in new.items():
        set_submodule(target, name, module)
    if engine == "onednn":
        for module in new.values():
            if isinstance(module, IntConvTranspose2d) and module.path != "dequantize":
                module.engine = "float"
        _integer_graph(target, new, mode)
    target.qframe_fake_quant_layers = kept
    if kept:
        log.warning("convert: %d quantized layers kept as fake-quant (float kernels): %s", len(kept), _listed(kept))
    if float_inputs:
        log.warning("convert: %d layers keep integer weights but fake-quantize their inputs in float and run a "
                    "float-input GEMM (the integer kernels take 8-bit symmetric per-tensor inputs): %s%s",
                    len(float_inputs), _listed(dict(list(float_inputs.items())[:8])),
                    " ... (all in qframe_float_input_layers)" if len(float_inputs) > 8 else "")
    target.qframe_float_input_layers = float_inputs
    log.info("convert: %d layers hold integer weights", len(new))
    return target


def _listed(reasons: dict[str, str]) -> str:
    return "; ".join(f"{name} ({why})" for name, why in reasons.items())
