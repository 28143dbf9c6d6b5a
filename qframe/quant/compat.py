"""What a deployment target can run: TensorRT's explicit-quantization rules applied to a recipe.

TensorRT (8.x-10.x, GPU and DLA) runs Q/DQ graphs with symmetric INT8 quantization only: zero
point 0, codes clamped to [-128, 127], per-channel scales on weights (axis 0: the output
channel of Conv, and of Linear exported as Gemm with transB=1), per-tensor scales on
activations. Anything else is either impossible (an error here, before any training) or runs
differently from how it was trained (a warning that says what will happen).
"""

from __future__ import annotations

import logging

from qframe.errors import QFrameError
from qframe.quant.recipe import QuantizerConfig, QuantRecipe

log = logging.getLogger(__name__)


def _problems(role: str, q: QuantizerConfig, errors: list[str], warnings: list[str]) -> None:
    if not q.symmetric:
        errors.append(f"{role}.symmetric=false (TensorRT needs zero point 0: set {role}.symmetric=true)")
    if not q.signed:
        errors.append(f"{role}.signed=false (TensorRT quantizes to signed int8: set {role}.signed=true)")
    if role == "weight":
        if q.granularity == "per_group":
            errors.append("weight.granularity=per_group (TensorRT takes per_tensor or per_channel weights on convolutions)")
        elif q.granularity == "per_channel" and q.axis != 0:
            errors.append(f"weight.axis={q.axis} (TensorRT's per-channel weight scales are on axis 0, the output channel)")
    elif q.granularity != "per_tensor":
        errors.append(f"{role}.granularity={q.granularity} (TensorRT takes per-tensor activation scales only)")
    if q.bits != 8:
        warnings.append(f"{role} bits={q.bits}: TensorRT runs INT8, so these {q.bits}-bit values deploy as int8 "
                        "holding the same clipped levels (same accuracy, INT8 speed and size)")


def check_tensorrt(recipe: QuantRecipe, target: str = "tensorrt") -> list[str]:
    """Raise for what TensorRT cannot run; log and return warnings for what it runs differently."""
    errors, warnings = tensorrt_problems(recipe)
    if errors:
        raise QFrameError(f"quant recipe {recipe.name!r} cannot run on {target}: " + "; ".join(errors))
    for w in warnings:
        log.warning("%s on %s: %s", recipe.name, target, w)
    return warnings


def tensorrt_problems(recipe: QuantRecipe) -> tuple[list[str], list[str]]:
    """``(what TensorRT cannot run, what it runs otherwise than trained)`` in ``recipe``."""
    errors: list[str] = []
    warnings: list[str] = []
    if recipe.weight is not None:
        _problems("weight", recipe.weight, errors, warnings)
    if recipe.input is not None:
        _problems("input", recipe.input, errors, warnings)
        if not recipe.quantize_residual:
            warnings.append("quantize_residual=false: TensorRT will not fuse conv + residual add (slower engine)")
    else:
        warnings.append("input: null (weight-only): TensorRT runs these layers in FP16/FP32 with dequantized weights")
    for rule in recipe.rules:
        for role, bits in (("weight", rule.weight_bits), ("input", rule.input_bits)):
            if bits is not None and bits != 8:
                warnings.append(f"rule {rule.pattern!r} {role}_bits={bits}: deploys as int8 holding {bits}-bit levels")
    return errors, warnings
