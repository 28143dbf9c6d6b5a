"""Quantized layers: a small TensorQuantizer, and the Conv / ConvTranspose / Linear / residual add that compose it.

Modules hold state (spec, observer, scale, zero point) and call the pure functions of
:mod:`qframe.quant.functional`; they contain no quantization maths of their own.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.models.ops import ResidualAdd
from qframe.quant import functional as QF
from qframe.quant.conv_bn import ConvBn2d
from qframe.quant.frozen import quantize_weight
from qframe.quant.observers import make_observer
from qframe.quant.spec import QuantSpec


def _scaled_grad(scale: torch.Tensor, factor: float) -> torch.Tensor:
    """``scale`` in the forward pass, its gradient times ``factor`` in the backward pass (LSQ)."""
    return (scale - scale * factor).detach() + scale * factor


# Quantizers with a learned step size. After every optimizer step (any optimizer: qframe's loops or the user's
# own) their scales are put back to at least SCALE_EPS: an Adam or SGD step can take a small per-channel step
# below zero (seen with torch 2.4 in a two-process QAT run). The forward pass clamps it anyway, but there the
# clamp blocks the gradient, so the channel would stay dead, and export and convert read the stored scale.
_LEARNED: "weakref.WeakSet[TensorQuantizer]" = weakref.WeakSet()
_STEP_HOOK = None


def _keep_learned_scales_positive(_optimizer, _args, _kwargs) -> None:
    with torch.no_grad():
        for quantizer in list(_LEARNED):
            if quantizer.learned:
                quantizer.scale.clamp_(min=QF.SCALE_EPS)


def _track_learned(quantizer: "TensorQuantizer") -> None:
    global _STEP_HOOK
    _LEARNED.add(quantizer)
    if _STEP_HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _STEP_HOOK = register_optimizer_step_post_hook(_keep_learned_scales_positive)


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor (a weight or an activation) onto a :class:`QuantSpec` grid.

    Where the range comes from, in order of precedence:

    * ``calibrating``: the observer watches and the tensor passes unchanged (PTQ calibration);
    * ``dynamic``: from the tensor itself at every call (QAT weights: per-channel min/max);
    * ``observing`` (training only): the observer keeps updating ``scale`` while quantizing
      (QAT warm-up, before the ranges are frozen);
    * otherwise the stored ``scale`` / ``zero_point``: a buffer, or a learned parameter after
      :meth:`learn_scale` (LSQ).

    ``enabled=False`` passes tensors through unchanged.
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", observer_args: dict | None = None):
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.observer_args = dict(observer_args or {})
        self.observer = make_observer(observer, spec, **self.observer_args)
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.calibrating = False
        self.dynamic = False
        self.observing = False
        self.enabled = True

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    @property
    def learned(self) -> bool:
        return isinstance(self.scale, nn.Parameter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self.observer(x)
        if not self.enabled:
            return x
        if self.dynamic:
            return QF.fake_quantize(x, *self._range_of(x), self.spec)
        if self.observing and self.training:
            self.observer(x)
            self.scale, self.zero_point = self.observer.compute_qparams()
        if self.scale is None:
            return x
        scale = self.scale
        if self.learned:
            # LSQ's gradient scale 1/sqrt(N * qmax), N = elements per scale, keeps step updates
            # commensurate with weight updates; the clamp keeps the step positive.
            factor = 1.0 / math.sqrt(max(1, x.numel() // max(1, scale.numel())) * self.spec.qmax)
            scale = QF.clamp_ste(_scaled_grad(scale, factor), lo=QF.SCALE_EPS)  # a scale held at the floor learns
        return QF.fake_quantize(x, scale, self.zero_point, self.spec)

    def active_scale(self, x: torch.Tensor | None = None) -> torch.Tensor | None:
        """The scale (detached) this quantizer applies now, to ``x`` where the range is dynamic;
        None where tensors pass unchanged (off, calibrating, uncalibrated, or dynamic without ``x``)."""
        if self.calibrating or not self.enabled:
            return None
        if self.dynamic:
            return None if x is None else self._range_of(x)[0]
        return None if self.scale is None else self.scale.detach()

    def _range_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = QF.block_view(x.detach(), self.spec)
        shape = QF.param_shape(x.shape, self.spec)
        return QF.compute_qparams(rows.amin(1).reshape(shape), rows.amax(1).reshape(shape), self.spec)

    def on_axis(self, axis: int) -> "TensorQuantizer":
        """This quantizer with its per-channel (or per-group) scales along ``axis``: itself where they already
        are, or where it has one scale; otherwise a new, uncalibrated quantizer with the same settings."""
        if self.spec.granularity == "per_tensor" or self.spec.axis == axis:
            return self
        if self.calibrated or self.calibrating or self.dynamic:  # its range is for the old axis
            raise QFrameError(f"a quantizer already in use cannot move its scales from axis {self.spec.axis} to {axis}")
        import dataclasses

        new = TensorQuantizer(dataclasses.replace(self.spec, axis=axis), self.observer_name,
                              getattr(self, "observer_args", {}))
        new.enabled = self.enabled
        return new

    def transposed(self) -> "TensorQuantizer":
        """This quantizer for the weight a layer stores transposed (``[in, out, ...]`` where the recipe speaks of
        ``[out, in, ...]``: a ConvTranspose, a matmul's ``[K, N]`` weight): scales on axis 0 go to axis 1, and
        the other way round (:meth:`on_axis`)."""
        return self.on_axis({0: 1, 1: 0}.get(self.spec.axis, self.spec.axis))

    def freeze_dynamic(self, tensor: torch.Tensor) -> None:
        """Fix a dynamic range at the one ``tensor`` gives now (the final weights, for export)."""
        self.scale, self.zero_point = self._range_of(tensor)
        self.dynamic = False

    def finalize(self) -> None:
        """Turn what the observer saw into scale and zero point, and start quantizing."""
        scale, zero_point = self.observer.compute_qparams()
        self.scale, self.zero_point = scale, zero_point
        self.observer.reset()  # histograms can be large; they are of no use once the range is set
        self.calibrating = False

    def calibrate_from(self, tensor: torch.Tensor) -> None:
        """Calibrate on one static tensor (a weight) and start quantizing."""
        self.observer.reset()
        self.observer(tensor.detach())
        self.finalize()

    def learn_scale(self) -> None:
        """Make the calibrated scale a trainable parameter (learned step size, LSQ)."""
        if self.scale is None:
            raise QFrameError("a learned step size starts from a calibrated scale; calibrate the model first")
        if not self.learned:
            value = self.scale.detach().clone()
            del self._buffers["scale"]
            self.scale = nn.Parameter(value)
        _track_learned(self)
        self.dynamic = self.observing = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # scale / zero_point start as None; take their shape from the checkpoint being loaded.
        for name in ("scale", "zero_point"):
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        if self.calibrating:
            state = "calibrating"
        elif not self.enabled:
            state = "off"
        elif self.dynamic:
            state = "dynamic range"
        elif self.calibrated:
            state = "learned step" if self.learned else ("observing" if self.observing else "quantizing")
        else:
            state = "uncalibrated"
        return f"{self.spec.short()}, observer={self.observer_name}, {state}"


class _QuantLayer:
    """Mixin: optional quantizers on the input and on the weight.

    With both quantizing, the bias is rounded to the int32 accumulator grid (unit: input scale x
    weight scale), as integer kernels add it (``int32_bias``; :func:`QF.quantize_bias`), so the
    fake-quant model computes what onnxruntime's integer layers and qframe's kernels compute.
    """

    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None
    int32_bias: bool = True
    # the weight's output-channel axis: 0 in Conv / Linear layout [out, in, ...], 1 for a ConvTranspose
    # [in, out / groups, ...]; a recipe's weight axis is given in Conv / Linear layout (0: output channels)
    weight_axis: int = 0

    @classmethod
    def fit_weight_quantizer(cls, quantizer: TensorQuantizer | None) -> TensorQuantizer | None:
        """``quantizer`` (made from a recipe, whose axes are in Conv / Linear layout) for this layer's weight."""
        return quantizer if quantizer is None or cls.weight_axis == 0 else quantizer.transposed()

    def bias_step(self, weight: torch.Tensor) -> torch.Tensor | None:
        """Unit of the int32 accumulator per output channel, shape ``(out,)`` or ``(1,)``; None where the
        layer is not integer (an input or weight not quantized, per-group weight scales)."""
        iq, wq = self.input_quantizer, self.weight_quantizer
        if iq is None or wq is None or iq.spec.granularity != "per_tensor":
            return None
        if wq.spec.granularity == "per_group" or (
                wq.spec.granularity == "per_channel" and wq.spec.axis % weight.dim() != self.weight_axis):
            return None
        si, sw = iq.active_scale(), wq.active_scale(weight)
        if si is None or sw is None:
            return None
        step = (si.float().reshape(()) * sw.float()).reshape(-1)
        if self.weight_axis and step.numel() > 1:  # a grouped ConvTranspose: the out / groups scales, per group
            step = step.repeat(getattr(self, "groups", 1))
        return step

    def _quant_bias(self, bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
        if bias is None or not self.int32_bias:
            return bias
        step = self.bias_step(weight)
        return bias if step is None else QF.quantize_bias(bias, step)

    @torch.no_grad()
    def bake_int32_bias(self) -> None:
        """Store the int32-grid bias itself and stop rounding it in the forward pass (export, convert)."""
        if self.int32_bias and self.bias is not None:
            self.bias.copy_(self._quant_bias(self.bias, self.weight_to_quantize()))
        self.int32_bias = False

    def weight_to_quantize(self) -> torch.Tensor:
        """The weight as it will be deployed (after any folding): what the weight quantizer sees."""
        return self.weight

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _quant_weight(self, weight: torch.Tensor) -> torch.Tensor:  # once per pass inside frozen_weights()
        return weight if self.weight_quantizer is None else quantize_weight(self.weight_quantizer, weight)

    @classmethod
    def _attach(cls, layer, weight_quantizer, input_quantizer):
        layer.weight_quantizer = cls.fit_weight_quantizer(weight_quantizer)
        layer.input_quantizer = input_quantizer
        return layer


class _QuantConv(_QuantLayer):
    """The forward and ``from_float`` shared by the quantized Conv1d / Conv2d / Conv3d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        return self._conv_forward(x, self._quant_weight(self.weight), self._quant_bias(self.bias, self.weight))

    @classmethod
    def from_float(cls, conv, weight_quantizer=None, input_quantizer=None):
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return cls._attach(new, weight_quantizer, input_quantizer)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` whose input and weight pass through fake quantizers."""


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through fake quantizers."""


class QuantConv3d(_QuantConv, nn.Conv3d):
    """``nn.Conv3d`` whose input and weight pass through fake quantizers."""


class _QuantConvTranspose(_QuantLayer):
    """The forward and ``from_float`` shared by the quantized ConvTranspose1d / 2d / 3d.

    The weight is ``[in, out / groups, *kernel]``: per-channel scales lie along axis 1, as ONNX's
    DequantizeLinear gives them to a ConvTranspose and TensorRT wants them (its output channels). A
    grouped layer has ``out / groups`` scales, each shared by that channel of every group: the one
    per-axis form a ConvTranspose weight can have in ONNX (a depthwise one thus has a single scale).
    """

    weight_axis = 1
    _functional = None  # F.conv_transpose1d / 2d / 3d
    _dims = 0

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise QFrameError(f"{type(self).__name__}: padding_mode={self.padding_mode!r} is invalid; valid: 'zeros'")
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size,
                                              self._dims, self.dilation)
        x = self._quant_input(x)
        return self._conv_forward(x, self._quant_weight(self.weight), self._quant_bias(self.bias, self.weight),
                                  output_padding)

    def _conv_forward(self, x, weight, bias, output_padding=None) -> torch.Tensor:
        """The transposed convolution of ``x`` with ``weight`` and ``bias``, as the quantized convs' own
        ``_conv_forward`` (``output_padding``: the layer's, unless a forward's ``output_size`` chose another)."""
        output_padding = self.output_padding if output_padding is None else output_padding
        return self._functional(x, weight, bias, self.stride, self.padding, output_padding, self.groups,
                                self.dilation)

    @classmethod
    def from_float(cls, conv, weight_quantizer=None, input_quantizer=None):
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.output_padding,
                  conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return cls._attach(new, weight_quantizer, input_quantizer)


class QuantConvTranspose1d(_QuantConvTranspose, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` whose input and weight pass through fake quantizers."""

    _functional, _dims = staticmethod(nn.functional.conv_transpose1d), 1


class QuantConvTranspose2d(_QuantConvTranspose, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose input and weight pass through fake quantizers."""

    _functional, _dims = staticmethod(nn.functional.conv_transpose2d), 2


class QuantConvTranspose3d(_QuantConvTranspose, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` whose input and weight pass through fake quantizers."""

    _functional, _dims = staticmethod(nn.functional.conv_transpose3d), 3


class QuantConvBn2d(_QuantLayer, ConvBn2d):
    """Conv + BN trained the way deployment folds them: the quantizer sees the folded weight.

    While BN trains, the conv runs with the quantized folded weight ``q(w * gamma / sigma_run)``,
    its output is scaled back by ``sigma_run / gamma`` and batch-normalised with batch statistics
    (Jacob et al. 2018; PyTorch's ConvBn QAT). Once :meth:`freeze_bn` is called, or in eval mode,
    it computes exactly the folded conv ``conv(x, q(w_fold)) + b_fold`` that TensorRT runs.
    """

    bn_frozen = False

    def weight_to_quantize(self) -> torch.Tensor:
        """The folded weight, except that channels whose gamma is 0 (weight 0 once deployed) show
        their unscaled weight ``w / sigma``: their quantizer keeps a real range, training sees the
        conv's output there, and the deployed zero weight quantizes to 0 on any grid."""
        return self.weight * self._training_factor().view(-1, 1, 1, 1)

    def _training_factor(self) -> torch.Tensor:
        factor = self.fold_factor()
        return torch.where(factor == 0, torch.rsqrt(self.bn.running_var + self.bn.eps), factor)

    def freeze_bn(self) -> None:
        """Stop updating BN statistics; from now on training sees the deployed folded layer."""
        self.bn_frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        if self.training and not self.bn_frozen:
            # Channels whose gamma is 0 (residual blocks often start so) would divide by 0 below: they
            # run on the unscaled grid, 1 / sigma, so the BN still sees the conv's output and gamma
            # still gets a gradient; the deployed (eval) layer uses the true fold, a zero weight.
            factor = self._training_factor()
            weight = self._quant_weight(self.weight * factor.view(-1, 1, 1, 1))
            y = self._conv_forward(x, weight, None) / factor.view(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.view(1, -1, 1, 1)
            return self.bn(y)
        folded_weight, bias = self.folded()
        return self._conv_forward(x, self._quant_weight(folded_weight), self._quant_bias(bias, folded_weight))

    @classmethod
    def from_float(cls, layer: ConvBn2d, weight_quantizer=None, input_quantizer=None) -> "QuantConvBn2d":
        new = cls.from_pair(layer, layer.bn)
        return cls._attach(new, weight_quantizer, input_quantizer)

    def to_folded(self) -> QuantConv2d:
        """The deployed layer: a QuantConv2d holding the folded weight and bias, same quantizers."""
        weight, bias = (t.detach() for t in self.folded())
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, True, self.padding_mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
        new = QuantConv2d.from_float(conv, self.weight_quantizer, self.input_quantizer).train(self.training)
        new.int32_bias = self.int32_bias
        return new


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        return nn.functional.linear(x, self._quant_weight(self.weight), self._quant_bias(self.bias, self.weight))

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer=None, input_quantizer=None) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return cls._attach(new, weight_quantizer, input_quantizer)


class QuantMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computed from four :class:`QuantLinear` projections, ``q_proj``, ``k_proj``,
    ``v_proj`` and ``out_proj``, each with its own weight and input quantizers.

    ``nn.MultiheadAttention`` reads its packed in-projection weight itself (and in inference runs a fused
    kernel that reads every weight), so no quantized Linear could stand in for part of it. The twin splits
    the packed weight by rows, which keeps each output channel's scale, and computes what
    ``F.multi_head_attention_forward`` does: batch-first or not, unbatched inputs, boolean or float
    ``attn_mask`` (2-D, or 3-D per batch and head) and ``key_padding_mask``, ``is_causal``, dropout on the
    attention weights in training, and the weights themselves (averaged over heads or not) where
    ``need_weights``. The attention runs as ``F.scaled_dot_product_attention`` (as matmuls and a softmax where
    the weights are returned), whose inputs placement quantizes. ``add_bias_kv`` and ``add_zero_attn`` have no
    twin: such a module stays float with that reason (:meth:`cannot_quantize`).

    Its ``in_proj_weight`` and ``in_proj_bias`` are None, so ``nn.TransformerEncoderLayer`` takes its
    step-by-step path, which calls this module, not its fused kernel, which would read the float weights.
    """

    LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")  # what rules, calibration, export and convert see

    @classmethod
    def cannot_quantize(cls, mha: nn.MultiheadAttention) -> str | None:
        if mha.bias_k is not None or mha.bias_v is not None:
            return "nn.MultiheadAttention with add_bias_kv=True has no quantized twin in qframe"
        if mha.add_zero_attn:
            return "nn.MultiheadAttention with add_zero_attn=True has no quantized twin in qframe"
        return None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, weight_quantizer=None, input_quantizer=None):
        """The twin of ``mha``; the quantizers are copied for each projection, or given per projection as dicts
        ``{"q_proj": ..., ...}`` (None: that projection stays float)."""
        import copy

        def own(quantizer, part):
            return quantizer.get(part) if isinstance(quantizer, dict) else copy.deepcopy(quantizer)

        why = cls.cannot_quantize(mha)
        if why:
            raise QFrameError(why)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first",
                     "head_dim", "add_zero_attn"):
            setattr(new, name, getattr(mha, name))
        for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "bias_k", "bias_v"):
            new.register_parameter(name, None)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weights, biases):
            linear = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                if b is not None:
                    linear.bias.copy_(b)
            setattr(new, name, QuantLinear.from_float(linear.train(mha.training), own(weight_quantizer, name),
                                                      own(input_quantizer, name)))
        new.out_proj = QuantLinear.from_float(mha.out_proj, own(weight_quantizer, "out_proj"),
                                              own(input_quantizer, "out_proj"))
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        F = nn.functional
        batched = query.dim() == 3
        if not batched:  # [L, E]: one sequence
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, N, E]
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tgt, src, heads = query.shape[0], query.shape[1], key.shape[1], self.num_heads
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention); "
                               "nn.Transformer.generate_square_subsequent_mask(length) makes one")
        causal = is_causal and key_padding_mask is None and not need_weights  # sdpa's own causal mask
        attn_mask = None if causal else F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                                          other_name="", target_type=query.dtype, check_other=False)
        q = self.q_proj(query).view(n, tgt, heads, self.head_dim).transpose(1, 2)  # [N, H, L, D]
        k = self.k_proj(key).view(n, src, heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, src, heads, self.head_dim).transpose(1, 2)
        mask = None
        if attn_mask is not None:  # [L, S] for all, or [N * H, L, S]
            mask = attn_mask.view(n, heads, tgt, src) if attn_mask.dim() == 3 else attn_mask
        if key_padding_mask is not None:
            padding = key_padding_mask.view(n, 1, 1, src)
            mask = padding if mask is None else mask + padding
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = torch.matmul(q * self.head_dim ** -0.5, k.transpose(-2, -1))
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = torch.matmul(F.dropout(weights, dropout) if dropout else weights, v)
            weights = weights.mean(1) if average_attn_weights else weights
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(n, tgt, self.embed_dim))
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights


class QuantResidualAdd(ResidualAdd):
    """``x + q(skip)``: the skip branch arrives quantized, so TensorRT fuses conv + add.

    With ``input_quantizer`` the other input (the branch's conv output) is quantized too,
    ``q1(x) + q2(skip)``: onnxruntime's integer add (QLinearAdd) takes two 8-bit inputs, so the
    branch is re-quantized before the add there, and the model then computes the same.
    """

    def __init__(self, skip_quantizer: TensorQuantizer, input_quantizer: TensorQuantizer | None = None):
        super().__init__()
        self.skip_quantizer = skip_quantizer
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return x + self.skip_quantizer(skip)


class QuantPool(nn.Module):
    """A pooling layer whose input is quantized: onnxruntime's QLinearGlobalAveragePool averages
    8-bit codes, so an integer graph quantizes the features before the pooling, not after."""

    def __init__(self, pool: nn.Module, input_quantizer: TensorQuantizer):
        super().__init__()
        self.pool = pool
        self.input_quantizer = input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.input_quantizer(x))


# The built-in float type -> quantized twin pairs; qframe.quant.registry matches them with isinstance
# and takes users' own registrations first.
QUANT_MODULES = {ConvBn2d: QuantConvBn2d, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d,
                 nn.ConvTranspose1d: QuantConvTranspose1d, nn.ConvTranspose2d: QuantConvTranspose2d,
                 nn.ConvTranspose3d: QuantConvTranspose3d, nn.Linear: QuantLinear,
                 nn.MultiheadAttention: QuantMultiheadAttention}
QUANT_LAYERS = (_QuantLayer,)
# quantized modules made of quantized layers (the layers are what calibration, export and convert see)
QUANT_BLOCKS = (QuantMultiheadAttention,)


def bake_int32_biases(model: nn.Module) -> nn.Module:
    """Round every quantized layer's bias onto its int32 grid once, in place (BN folded first)."""
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS):
            if isinstance(module, QuantConvBn2d):
                raise QFrameError("bake_int32_biases needs BN folded: call qframe.methods.qat.fold_qat(model) first")
            module.bake_int32_bias()
    return model


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """All tensor quantizers in ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TensorQuantizer)]


def set_rounding(model: nn.Module, rounding: str, *, weights: bool = False) -> int:
    """Make ``model``'s activation quantizers (and its weight quantizers with ``weights=True``) round
    ties as ``rounding`` says, in place; returns how many changed. The Jetson DLA rounds activations
    half away from zero where the GPU rounds half to even (weights are quantized by TensorRT's
    builder either way), so a model meant for the DLA trains and evaluates with
    ``set_rounding(model, "half_away")``."""
    import dataclasses

    changed = 0
    for name, q in quantizers(model):
        if (weights or not name.endswith("weight_quantizer")) and q.spec.rounding != rounding:
            q.spec = dataclasses.replace(q.spec, rounding=rounding)
            changed += 1
    return changed

