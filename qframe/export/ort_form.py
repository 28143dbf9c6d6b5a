"""The onnxruntime form: qframe's standard Q/DQ form (:mod:`qframe.export.qdq`) rewritten for the way
onnxruntime's x86 CPU kernels run integer graphs. The same values; a second file next to the standard one.

Measured on top of the standard form at batch 32 (docs/decisions.md), on onnxruntime 1.31.1 and
1.32.0 alike: MobileNetV2 x0.5 2.0-2.6x faster, the compact CNN 1.2-1.3x, ResNet-18 1.1x, with the
same agreement. Two exact changes, each useless without the other:

- activation codes as uint8 (the int8 code + 128, zero point + 128): the x86 kernels multiply uint8
  activations by int8 weights. onnxruntime converts an int8 Q -> DQ pair itself only where the
  QuantizeLinear has a single reader, so a tensor read by two layers (the output of a MobileNetV2
  block, read by the next block and by its residual add) keeps the layer before it in float;
- each activation QuantizeLinear moved in front of the ReLU / Clip / MaxPool / shape ops before it,
  which then run on the codes (rounding and saturation are monotone: a clamp of the values is a
  Clip of the codes), QuantizeLinear nodes of one tensor with equal parameters merged, and a
  requantization with the parameters of the codes it reads (the standard form's layer-output
  quantizer followed by its reader's) dropped. onnxruntime otherwise runs each ReLU / ReLU6 as
  DequantizeLinear -> float op -> QuantizeLinear.

Not a TensorRT graph (uint8 zero points, Clip on codes): TensorRT gets the standard form. On an x86 CPU
without VNNI onnxruntime's uint8 x int8 kernels saturate (:func:`qframe.export.ort.integer_kernels_saturate`):
there the export stage writes the weights as uint8 too (``uint8_weights``), which onnxruntime multiplies
exactly (uint8 x uint8), measured 1.0x (batch 1) and 0.77x (batch 32) the speed of the saturating form
and 3-5x faster than the exact int8 x int8 path of the standard form (docs/decisions.md).
"""

from __future__ import annotations

import logging

import numpy as np

from qframe.export.lint import onnx_model
from qframe.export.qdq import EditGraph, topological_sort

log = logging.getLogger(__name__)

CLAMPS = ("Relu", "Clip")
# ops that commute with per-tensor quantization (see _chain_to)
COMMUTING = CLAMPS + ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze")
# layers onnxruntime runs in integer given quantized inputs, and DequantizeLinear (codes already)
INTEGER_SOURCES = ("Conv", "Gemm", "Add", "GlobalAveragePool", "DequantizeLinear")


def _clamp_range(g: EditGraph, node) -> tuple[float, float] | None:
    """``(low, high)`` of a Relu / Clip with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    bounds = [g.const(i) if i else None for i in list(node.input[1:3]) + [""] * (3 - len(node.input))]
    if any(i and b is None for i, b in zip(node.input[1:3], bounds)):
        return None  # a bound computed at run time
    low, high = bounds[0], bounds[1]
    return (float(low) if low is not None else -float("inf"), float(high) if high is not None else float("inf"))


def _qparams(g: EditGraph, node) -> tuple[np.float32, np.ndarray] | None:
    """Scale and zero point of a per-tensor QuantizeLinear / DequantizeLinear with constant parameters."""
    scale = g.const(node.input[1])
    zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scale is None or scale.size != 1 or zp is None or zp.size != 1:
        return None
    return np.float32(scale.reshape(())), zp.reshape(())


def _same(a, b) -> bool:
    return a is not None and b is not None and a[0] == b[0] and a[1] == b[1] and a[1].dtype == b[1].dtype


def _code_of(value: float, scale: np.float32, zp: np.ndarray) -> int:
    info = np.iinfo(zp.dtype)
    if not np.isfinite(value):
        return info.max if value > 0 else info.min
    return int(np.clip(np.rint(np.float32(value) / scale) + int(zp), info.min, info.max))


def _chain_to(g: EditGraph, tensor: str) -> tuple[list, str]:
    """The ops before ``tensor`` that commute with quantization, nearest first, and the tensor they start from.

    Rounding and saturating are monotone, so ``Q(clamp(y)) == clamp'(Q(y))``, ``Q(maxpool(y)) ==
    maxpool(Q(y))`` and shape-only ops move values without changing them: any of these can run on
    the integer codes instead of the floats. Each link must be its input's only reader.
    """
    chain, src = [], tensor
    while (node := g.producer.get(src)) is not None and node.op_type in COMMUTING:
        if node.op_type in CLAMPS and _clamp_range(g, node) is None:
            break
        read = [o for o in node.output if o and g.consumers.get(o)]
        if len(read) != 1 or len(g.consumers.get(node.input[0], [])) != 1:
            break
        chain.append(node)
        src = node.input[0]
    return chain, src


def _merge_quantizers(g: EditGraph, tensor: str, qs: list) -> None:
    """One QuantizeLinear of ``tensor`` serves every reader of ``qs`` (equal parameters, so equal codes)."""
    for q in qs[1:]:
        g.rename_input(q.output[0], qs[0].output[0])
    if len(qs) > 1:
        g.remove(qs[1:])


def _move_onto_codes(g: EditGraph, q, chain: list, src: str) -> None:
    """``src -> chain -> q`` becomes ``src -> q -> chain on the codes`` (clamps in code units)."""
    from onnx import NodeProto, helper

    scale, zp = _qparams(g, q)
    codes = q.output[0]
    last = f"{codes}.moved"
    g.rename_input(codes, last)  # the DequantizeLinear nodes now read the end of the moved chain
    q.input[0] = src
    for k, node in enumerate(reversed(chain)):
        out = last if k == len(chain) - 1 else f"{node.output[0]}.codes"
        if node.op_type in CLAMPS:
            low, high = _clamp_range(g, node)
            info = np.iinfo(zp.dtype)
            lo, hi = _code_of(low, scale, zp), _code_of(high, scale, zp)
            if lo <= info.min and hi >= info.max:
                continue  # the codes' own range already clamps: nothing left to do
            bounds = [g.add_init(np.array(v, zp.dtype), f"{out}.{role}") for v, role in ((lo, "min"), (hi, "max"))]
            g.nodes.append(helper.make_node("Clip", [codes, *bounds], [out], name=f"{node.name or out}_codes"))
        else:
            moved = NodeProto.FromString(node.SerializeToString())
            moved.input[0] = codes
            moved.output[:] = [out]
            moved.name = f"{node.name or out}_codes"
            g.nodes.append(moved)
        codes = out
    g.remove(chain)
    if codes != last:  # the last op was a clamp with nothing to clamp
        g.rename_input(last, codes)
        g.refresh()


def _hoist_quantize(g: EditGraph) -> tuple[int, int]:
    """Merge equal QuantizeLinear nodes of each tensor and move them in front of the ops that commute.

    ``Conv -> Q -> DQ -> Relu -> MaxPool -> Q -> DQ`` becomes ``Conv -> Q -> DQ -> Q -> Clip(codes) ->
    MaxPool(codes) -> DQ`` (and then, by :func:`_drop_requantization`, ``Conv -> Q -> Clip(codes) ->
    MaxPool(codes) -> DQ``), which onnxruntime fuses into QLinearConv. Returns (QuantizeLinear nodes
    merged away, ops moved onto integer codes).
    """
    merged = moved = 0
    for tensor in list(g.consumers):
        users = g.consumers.get(tensor, [])
        qs = [n for n in users if n.op_type == "QuantizeLinear"]
        if not qs or g.const(tensor) is not None:
            continue
        params = [_qparams(g, q) for q in qs]
        if not all(_same(params[0], p) for p in params):
            continue
        _merge_quantizers(g, tensor, qs)
        merged += len(qs) - 1
        if len(users) != len(qs) or tensor in g.outputs:
            continue  # a float reader still needs the tensor itself
        chain, src = _chain_to(g, tensor)
        producer = g.producer.get(src)
        if chain and src not in g.outputs and producer is not None and producer.op_type in INTEGER_SOURCES:
            _move_onto_codes(g, qs[0], chain, src)
            moved += len(chain)
    return merged, moved


def _drop_requantization(g: EditGraph) -> int:
    """``codes -> DQ -> Q`` with equal parameters is ``codes``: the readers of the QuantizeLinear read
    the codes, and the pair goes where nothing else reads it. Returns how many QuantizeLinear went."""
    dropped = []
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        dq = g.producer.get(q.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or q.output[0] in g.outputs:
            continue
        if not _same(_qparams(g, q), _qparams(g, dq)):
            continue
        g.rename_input(q.output[0], dq.input[0])
        dropped.append(q)
        if len(g.consumers.get(dq.output[0], [])) == 1 and dq.output[0] not in g.outputs:
            dropped.append(dq)
    g.remove(dropped)
    return sum(n.op_type == "QuantizeLinear" for n in dropped)


def _as_uint8(codes: np.ndarray) -> np.ndarray:
    """int8 codes (or zero points) c as the uint8 c + 128: with the zero point shifted alike, the same values."""
    return (codes.astype(np.int16) + 128).astype(np.uint8)


def _uint8_activations(g: EditGraph) -> int:
    """int8 activation codes c become uint8 codes c + 128 with zero point + 128: the same values, exactly."""
    count = 0
    shifted: dict[str, str] = {}
    for node in g.nodes:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or g.const(node.input[0]) is not None:
            continue
        if len(node.input) > 2 and node.input[2] and (zp := g.const(node.input[2])) is not None and zp.dtype == np.int8:
            if node.input[2] not in shifted:
                shifted[node.input[2]] = g.add_init(_as_uint8(zp), f"{node.input[2]}.uint8")
            node.input[2] = shifted[node.input[2]]
            count += node.op_type == "QuantizeLinear"
    g.refresh()
    return count


def _uint8_weights(g: EditGraph) -> int:
    """int8 weight codes w become uint8 codes w + 128 with zero point + 128: the same values, exactly.
    onnxruntime then multiplies uint8 x uint8 (``vpmaddwd`` on 16-bit lanes), which cannot saturate."""
    count = 0
    shifted: dict[str, str] = {}
    for node in g.nodes:
        if node.op_type != "DequantizeLinear" or (w := g.const(node.input[0])) is None or w.dtype != np.int8:
            continue
        scale = g.const(node.input[1])
        zp = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
            continue  # parameters computed at run time
        if node.input[0] not in shifted:
            shifted[node.input[0]] = g.add_init(_as_uint8(w), f"{node.input[0]}.uint8")
        zp = np.zeros(scale.shape, np.int8) if zp is None else np.broadcast_to(zp, scale.shape)
        zp_name = g.add_init(_as_uint8(zp), f"{node.input[0]}.zero_point.uint8")
        node.input[0] = shifted[node.input[0]]
        if len(node.input) > 2:
            node.input[2] = zp_name
        else:
            node.input.append(zp_name)
        count += 1
    g.refresh()
    return count


def onnxruntime_form(model, uint8_weights: bool = False):
    """A copy of the standard-form Q/DQ ``model`` (``onnx.ModelProto`` or path) rewritten for onnxruntime's
    x86 integer kernels (see the module docstring). Returns the new ``onnx.ModelProto``.

    ``uint8_weights``: weight codes as uint8 too (+ 128, zero point 128), for x86 CPUs without VNNI, where
    onnxruntime's uint8 x int8 kernels saturate and its uint8 x uint8 ones do not
    (:func:`qframe.export.ort.integer_kernels_saturate`); the export stage sets it on such a CPU.
    """
    import onnx

    source = onnx_model(model, "onnxruntime_form")
    model = onnx.ModelProto.FromString(source.SerializeToString())
    g = EditGraph(model)
    shifted = _uint8_activations(g)
    weights = _uint8_weights(g) if uint8_weights else 0
    merged, moved = _hoist_quantize(g)
    dropped = _drop_requantization(g)
    topological_sort(g)
    g.commit()
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    log.info("onnxruntime form: %d QuantizeLinear as uint8, %d merged, %d requantizations dropped, %d ops moved "
             "onto integer codes%s", shifted, merged, dropped, moved,
             f", {weights} weights as uint8" if uint8_weights else "")
    return model
