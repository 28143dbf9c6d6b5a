"""Quantized layers: a small TensorQuantizer, and Conv2d / Linear that compose it.

Modules hold state (spec, observer, scale, zero point) and call the pure functions of
:mod:`qframe.quant.functional`; they contain no quantization maths of their own.
"""

from __future__ import annotations

import torch
from torch import nn

from qframe.quant import functional as QF
from qframe.quant.observers import make_observer
from qframe.quant.spec import QuantSpec


class TensorQuantizer(nn.Module):
    """Fake-quantizes one tensor (a weight or an activation) onto a :class:`QuantSpec` grid.

    States: ``calibrating`` (the observer watches, the tensor passes unchanged), quantizing (once
    ``scale`` is set and ``enabled``), or off (``enabled=False``: pass-through).
    """

    def __init__(self, spec: QuantSpec, observer: str = "minmax", observer_args: dict | None = None):
        super().__init__()
        self.spec = spec
        self.observer_name = observer
        self.observer = make_observer(observer, spec, **(observer_args or {}))
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.calibrating = False
        self.enabled = True

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            return self.observer(x)
        if not self.enabled or self.scale is None:
            return x
        return QF.fake_quantize(x, self.scale, self.zero_point, self.spec)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # scale / zero_point start as None; take their shape from the checkpoint being loaded.
        for name in ("scale", "zero_point"):
            if prefix + name in state_dict and getattr(self, name) is None:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        state = "calibrating" if self.calibrating else ("quantizing" if self.calibrated and self.enabled else "off")
        return f"{self.spec.short()}, observer={self.observer_name}, {state}"


class _QuantLayer:
    """Mixin: optional quantizers on the input and on the weight."""

    input_quantizer: TensorQuantizer | None
    weight_quantizer: TensorQuantizer | None

    def _quant_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)
        return x, weight

    @classmethod
    def _attach(cls, layer, weight_quantizer, input_quantizer):
        layer.weight_quantizer = weight_quantizer
        layer.input_quantizer = input_quantizer
        return layer


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """``nn.Conv2d`` whose input and weight pass through fake quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quant_inputs(x)
        return self._conv_forward(x, weight, self.bias)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer=None, input_quantizer=None) -> "QuantConv2d":
        new = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return cls._attach(new, weight_quantizer, input_quantizer)


class QuantLinear(_QuantLayer, nn.Linear):
    """``nn.Linear`` whose input and weight pass through fake quantizers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, weight = self._quant_inputs(x)
        return nn.functional.linear(x, weight, self.bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer=None, input_quantizer=None) -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return cls._attach(new, weight_quantizer, input_quantizer)


QUANT_MODULES = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """All tensor quantizers in ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TensorQuantizer)]
