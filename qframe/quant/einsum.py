"""A two-operand ``torch.einsum`` as one batched matmul: how placement quantizes it (TensorRT has no INT8 Einsum,
and runs a MatMul whose inputs are quantized in INT8)."""

from __future__ import annotations

import math

import torch


def einsum_operands(args, kwargs) -> tuple[str, list]:
    """``torch.einsum(equation, a, b)`` or ``torch.einsum(equation, [a, b])`` -> (equation, [a, b])."""
    equation = args[0] if args else kwargs.get("equation")
    operands = list(args[1:]) if len(args) > 1 else list(kwargs.get("operands", ()))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    return equation, operands


def einsum_plan(equation, shapes) -> tuple | None:
    """How a two-operand einsum runs as one batched matmul, or None where it does not (an ellipsis, a label
    repeated in one operand or summed inside one operand, a broadcast size): labels in (batch, rows of a,
    columns of b, contracted) and the output order."""
    if not isinstance(equation, str) or "." in equation or len(shapes) != 2:
        return None
    text = equation.replace(" ", "")
    if "->" not in text:
        return None
    inputs, out = text.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(x)) != len(x) for x in (a, b, out)) or len(a) != len(shapes[0]) or len(b) != len(shapes[1]):
        return None
    if not set(out) <= set(a) | set(b) or (set(a) ^ set(b)) - set(out):
        return None  # a label summed inside one operand
    size = {}
    for labels, shape in ((a, shapes[0]), (b, shapes[1])):
        for label, n in zip(labels, shape):
            if size.setdefault(label, n) != n:
                return None
    batch = [c for c in out if c in a and c in b]
    rows = [c for c in out if c in a and c not in b]
    cols = [c for c in out if c in b and c not in a]
    inner = [c for c in a if c in b and c not in out]
    return a, b, out, batch, rows, cols, inner, size


def einsum_matmul(equation, a, b, quantize_a, quantize_b):
    """A two-operand einsum as permute / reshape / matmul with both matmul inputs quantized (per-tensor
    quantization commutes with the permutes and reshapes, so this is the einsum of the quantized operands);
    the exported graph then has Q/DQ -> MatMul, which TensorRT runs in INT8 (it has no INT8 Einsum)."""
    la, lb, out, batch, rows, cols, inner, size = einsum_plan(equation, [a.shape, b.shape])
    prod = lambda labels: math.prod(size[c] for c in labels)  # noqa: E731
    a2 = a.permute(*[la.index(c) for c in batch + rows + inner]).reshape(prod(batch), prod(rows), prod(inner))
    b2 = b.permute(*[lb.index(c) for c in batch + inner + cols]).reshape(prod(batch), prod(inner), prod(cols))
    y = torch.matmul(quantize_a(a2), quantize_b(b2)).reshape([size[c] for c in batch + rows + cols])
    order = batch + rows + cols
    return y.permute(*[order.index(c) for c in out])
