"""Which modules ``quantize_`` swaps, and for what: an open registry matched with ``isinstance``.

The built-in pairs (``QUANT_MODULES``: Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear, qframe's ConvBn2d) are matched by
type first, then by subclass, so a user's ``class Classifier(nn.Linear)`` is quantized like a
Linear. A subclass keeps everything it adds (attributes, methods, submodules): its quantized twin
is a class derived from both the twin and the user's class, built on the fly, whose ``forward``
is the twin's. That is only right when the subclass computes what its base computes: one that
overrides ``forward`` is quantized as its base only where it gives the base's output on probe
inputs (timm's ``Linear`` overrides ``forward`` for TorchScript alone: it is quantized; a conv that
pads by the input size first stays float), and otherwise stays float with a reason that says how
to register a twin for it::

    qframe.register_module(MyConv, MyQuantConv)   # MyQuantConv.from_float(module, weight_q, input_q)

Registered pairs are tried before the built-in ones, most recent first. :func:`quant_class_for`
answers, for one module, which twin (or why none); ``quantize_`` lists the float layers by type.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.quant.modules import QUANT_BLOCKS, QUANT_LAYERS, QUANT_MODULES

_USER: list[tuple[type, type]] = []

# Types users commonly hold that have no quantized twin yet: listed as float with this reason.
NO_TWIN = (nn.Bilinear, nn.LazyLinear, nn.RNNBase, nn.RNNCellBase)  # RNNBase: RNN, LSTM, GRU


def register_module(float_type: type, quant_type: type) -> None:
    """Make ``quantize_`` swap every ``float_type`` module (and subclass) for ``quant_type``.

    ``quant_type.from_float(module, weight_quantizer, input_quantizer)`` builds the twin; giving it
    the attributes ``weight_quantizer`` and ``input_quantizer`` (e.g. by deriving from
    :class:`qframe.quant.modules.QuantLinear`) lets calibration, QAT and export find them.
    """
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)) or float_type is nn.Module:
        raise QFrameError(f"register_module: float_type={float_type!r} is not a layer class; valid: a subclass of "
                          "nn.Module (nn.Module itself would match every module)")
    if not (isinstance(quant_type, type) and issubclass(quant_type, nn.Module)
            and callable(getattr(quant_type, "from_float", None))):
        raise QFrameError(f"register_module: quant_type={quant_type!r} is not a valid twin; valid: an nn.Module "
                          "class with a classmethod from_float(module, weight_quantizer, input_quantizer)")
    _USER[:] = [(f, q) for f, q in _USER if f is not float_type]
    _USER.insert(0, (float_type, quant_type))


def unregister_module(float_type: type) -> None:
    """Undo :func:`register_module` for ``float_type`` (built-in pairs stay)."""
    _USER[:] = [(f, q) for f, q in _USER if f is not float_type]


def _pairs() -> list[tuple[type, type]]:
    return _USER + list(QUANT_MODULES.items())


def quant_class_for(module: nn.Module) -> Tuple[Optional[type], Optional[str]]:
    """``(twin class, None)`` for a module ``quantize_`` can swap, ``(None, reason)`` for a layer it
    leaves float, ``(None, None)`` for a module that is no compute layer (an activation, a norm)."""
    if isinstance(module, QUANT_LAYERS + QUANT_BLOCKS):
        return None, None  # already quantized
    kind = type(module)
    for float_type, quant_type in _pairs():
        if kind is float_type:
            why = getattr(quant_type, "cannot_quantize", lambda _m: None)(module)  # a setting the twin lacks
            return (None, why) if why else (quant_type, None)
    for float_type, quant_type in _pairs():
        if isinstance(module, float_type):
            if kind.forward is not float_type.forward and not computes_as(module, float_type):
                return None, (f"{kind.__name__} overrides {float_type.__name__}.forward; register a quantized twin "
                              f"with qframe.register_module({kind.__name__}, ...)")
            return _twin_of_subclass(kind, quant_type), None
    if isinstance(module, NO_TWIN):
        return None, (f"no quantized {kind.__name__} in qframe; register one with "
                      f"qframe.register_module({kind.__name__}, ...)")
    return None, None


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _probes(module: nn.Module, base: type) -> list[torch.Tensor]:
    """Inputs for ``module`` as a ``base`` layer: a Linear's features; for a conv, spatial sizes at every
    residue modulo the stride (an input-dependent padding differs from the base's at one of them)."""
    g = torch.Generator().manual_seed(0)
    like = {"dtype": module.weight.dtype}
    if base is nn.Linear:
        return [torch.randn(3, module.in_features, generator=g, **like).to(module.weight.device)]
    if base not in _CONVS:
        return []
    span = [(k - 1) * d + 2 * s + 3 for k, d, s in zip(module.kernel_size, module.dilation, module.stride)]
    return [torch.randn(2, module.in_channels, *(n + r for n in span), generator=g, **like).to(module.weight.device)
            for r in range(max(2, *module.stride))]


def computes_as(module: nn.Module, base: type) -> bool:
    """Whether ``module`` (a subclass of ``base`` that overrides forward) gives ``base.forward``'s output on
    probe inputs, to float rounding: then its quantized twin is ``base``'s. False where it cannot be run."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.is_meta:
        return False
    try:
        with torch.no_grad():
            for x in _probes(module, base) or [None]:
                if x is None:
                    return False
                out, ref = type(module).forward(module, x), base.forward(module, x)  # no hooks fire
                if not (isinstance(out, torch.Tensor) and out.shape == ref.shape
                        and (out - ref).abs().max() <= 1e-6 * ref.abs().max() + 1e-30):
                    return False
    except Exception:  # noqa: BLE001 (a forward that cannot take a probe is not the base's)
        return False
    return True


_TWINS: dict[tuple[type, type], type] = {}


def _twin_of_subclass(kind: type, quant_type: type) -> type:
    """A class deriving from ``quant_type`` and the user's ``kind``: the twin's forward, the user's extras."""
    key = (kind, quant_type)
    if key not in _TWINS:
        twin = type(f"Quant{kind.__name__}", (quant_type, kind), {"__module__": kind.__module__})
        twin.from_float = classmethod(_from_float_keeping_extras)
        _TWINS[key] = twin
    return _TWINS[key]


def _from_float_keeping_extras(cls, module: nn.Module, weight_quantizer=None, input_quantizer=None):
    """The twin of a subclass instance: the same parameters, buffers, submodules and attributes."""
    new = cls.__new__(cls)
    for key, value in module.__dict__.items():  # own copies of the parameter, module and hook tables
        new.__dict__[key] = type(value)(value) if isinstance(value, (dict, set)) else value
    new.weight_quantizer = cls.fit_weight_quantizer(weight_quantizer) if hasattr(cls, "fit_weight_quantizer") \
        else weight_quantizer
    new.input_quantizer = input_quantizer
    return new
