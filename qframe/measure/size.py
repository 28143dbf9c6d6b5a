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
    scaffolding and does not count. A tensor counts once however many modules hold it; a weight
    that a float module holds too (an embedding tied to a quantized output layer) counts at its
    float size, since that module reads the float values.
    """
    require_module(model, "model_size_bytes")
    override: dict[int, int] = {}  # id(tensor) -> bytes it takes when stored
    packed: dict[int, int] = {}  # id(weight) -> its bytes at the bits of the quantized layer(s) holding it
    read_as_float: set[int] = set()  # ids of tensors some module holds other than as a quantized layer's weight
    for module in model.modules():
        if isinstance(module, TensorQuantizer):
            for t in module.observer.state_dict(keep_vars=True).values():
                override[id(t)] = 0
            if module.zero_point is not None:
                override[id(module.zero_point)] = 0 if module.spec.symmetric else module.zero_point.numel()
        wq = getattr(module, "weight_quantizer", None)
        weight = None
        if isinstance(wq, TensorQuantizer) and wq.calibrated and wq.enabled:
            weight = module.weight
            size = math.ceil(weight.numel() * wq.spec.bits / 8)
            packed[id(weight)] = max(size, packed.get(id(weight), 0))  # tied to two layers: the wider width
        for t in (*module._parameters.values(), *module._buffers.values()):
            if t is not None and t is not weight:
                read_as_float.add(id(t))
    override.update((key, size) for key, size in packed.items() if key not in read_as_float)
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += override.get(id(tensor), tensor.numel() * tensor.element_size())
    return total
