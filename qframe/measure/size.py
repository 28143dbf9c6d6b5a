"""Model size: the bytes needed to store a model's parameters, with quantized weights packed."""

from __future__ import annotations

import math

from torch import nn

from qframe.errors import require_module
from qframe.quant.modules import TensorQuantizer


def model_size_bytes(model: nn.Module) -> int:
    """Storage bytes of ``model``: float tensors at their dtype size, quantized weights at ``bits``.

    A weight with a calibrated weight quantizer counts ``ceil(numel * bits / 8)`` bytes; every
    calibrated quantizer adds its float32 scales, and one byte per zero point when asymmetric
    (symmetric zero points are all 0 and are not stored). Observer state is calibration
    scaffolding and does not count.
    """
    require_module(model, "model_size_bytes")
    override: dict[int, int] = {}  # id(tensor) -> bytes it takes when stored
    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            for t in module.observer.state_dict(keep_vars=True).values():
                override[id(t)] = 0
            if module.zero_point is not None:
                override[id(module.zero_point)] = 0 if module.spec.symmetric else module.zero_point.numel()
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, TensorQuantizer) and wq.calibrated and wq.enabled:
            override[id(module.weight)] = math.ceil(module.weight.numel() * wq.spec.bits / 8)
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += override.get(id(tensor), tensor.numel() * tensor.element_size())
    return total
