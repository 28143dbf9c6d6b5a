"""The OpenVINO form: qframe's standard Q/DQ form (:mod:`qframe.export.qdq`) without the requantizations
OpenVINO's CPU plugin cannot merge. The same codes and values; a second file next to the standard one.

The standard form gives a layer whose output is quantized only after a ReLU / Clip / max pooling /
shape op a QuantizeLinear -> DequantizeLinear of its own, with the parameters of the quantizer that
follows (``Conv -> Q -> DQ -> Clip -> Q -> DQ``): the layout in which TensorRT and onnxruntime run
the layer with an integer output. OpenVINO turns each pair into a FakeQuantize and fuses every one
of them into the convolution as a post-op, so such a convolution quantizes its output twice, and a
ResNet block's second convolution three times (its add's input, its add's output, the next layer's
input). Here each such first pair goes (``Conv -> Clip -> Q -> DQ``): exactly the same codes, since
``Q(f(DQ(Q(y)))) == Q(f(y))`` for a clamp, a max or a reshape ``f`` and equal parameters (rounding
and saturation are monotone, and ``Q(DQ(c)) == c``). Equal QuantizeLinear nodes of one tensor are
merged too (one FakeQuantize instead of several).

Measured on OpenVINO 2026.4 (1 thread, AVX-512 VNNI; docs/decisions.md): this is the layout NNCF
writes, and each convolution then runs with one quantizing post-op instead of two or three.

Not a TensorRT graph: TensorRT's Conv + Add fusion wants the quantized layer outputs of the standard form.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qframe.export.ort_form import COMMUTING, _clamp_range, _merge_quantizers, _qparams, _same
from qframe.export.qdq import EditGraph, topological_sort

log = logging.getLogger(__name__)


def _chain_from(g: EditGraph, tensor: str) -> tuple[list, str] | None:
    """The ops after ``tensor`` that commute with per-tensor quantization, each the only reader of the
    tensor before it, and the tensor they end in; None where a graph output is on the way."""
    chain = []
    while tensor not in g.outputs:
        users = g.consumers.get(tensor, [])
        if len(users) != 1 or users[0].op_type not in COMMUTING or users[0].input[0] != tensor:
            return chain, tensor
        node = users[0]
        if node.op_type == "Clip" and _clamp_range(g, node) is None:
            return chain, tensor  # a bound computed at run time
        chain.append(node)
        tensor = node.output[0]
    return None


def _drop_output_requantization(g: EditGraph) -> int:
    """Remove each ``Q -> DQ`` whose dequantized values reach, through commuting ops only, nothing but
    QuantizeLinear nodes with the same parameters (see the module docstring). Returns how many went."""
    dropped = 0
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        params = _qparams(g, q)
        if params is None or g.const(q.input[0]) is not None or q.output[0] in g.outputs:
            continue
        readers = g.consumers.get(q.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "DequantizeLinear" or not _same(params, _qparams(g, readers[0])):
            continue
        dq = readers[0]
        found = _chain_from(g, dq.output[0])
        if found is None:
            continue
        _, end = found
        users = g.consumers.get(end, [])
        if not users or any(u.op_type != "QuantizeLinear" or not _same(params, _qparams(g, u)) for u in users):
            continue
        g.rename_input(dq.output[0], q.input[0])
        g.remove([q, dq])
        dropped += 1
    return dropped


def _merge_equal_quantizers(g: EditGraph) -> int:
    """One QuantizeLinear per tensor and parameters: returns how many were merged away."""
    merged = 0
    for tensor in list(g.consumers):
        qs = [n for n in g.consumers.get(tensor, []) if n.op_type == "QuantizeLinear"]
        if len(qs) < 2 or g.const(tensor) is not None:
            continue
        params = [_qparams(g, q) for q in qs]
        if all(_same(params[0], p) for p in params[1:]):
            _merge_quantizers(g, tensor, qs)
            merged += len(qs) - 1
    return merged


CLAMP_PASS = ("MaxPool", "GlobalMaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")  # commute with a clamp
NONNEGATIVE_PASS = ("MaxPool", "GlobalAveragePool", "AveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Squeeze",
                    "Unsqueeze", "Transpose")


def _nonnegative(g: EditGraph, tensor: str, seen: dict[str, bool]) -> bool:
    """True where every value of ``tensor`` is >= 0 by construction: a ReLU, a Clip with a constant lower
    bound >= 0, pooling / shape ops over such a tensor, or the dequantized uint8 codes of one."""
    if tensor in seen:
        return seen[tensor]
    seen[tensor] = False  # a cycle proves nothing
    node = g.producer.get(tensor)
    ok = False
    if node is not None:
        if node.op_type == "Relu":
            ok = True
        elif node.op_type == "Clip":
            bounds = _clamp_range(g, node)
            ok = bounds is not None and bounds[0] >= 0
        elif node.op_type in NONNEGATIVE_PASS:
            ok = _nonnegative(g, node.input[0], seen)
        elif node.op_type == "DequantizeLinear":
            params = _qparams(g, node)
            ok = params is not None and params[1].dtype == np.uint8 and int(params[1]) == 0
    seen[tensor] = ok
    return ok


def _clamp_at_code_127(g: EditGraph, q, scale: np.float32) -> None:
    """Clamp the input of ``q`` to ``[0, 127 * scale]``: a ReLU or a Clip that only ``q`` reads, directly or through
    max pooling / shape ops (which commute with a clamp), takes the bound itself (one clamp for the runtime
    to fuse into the layer before it), else a Clip goes in front of ``q``."""
    from onnx import helper

    def alone(t):
        return len(g.consumers.get(t, [])) == 1 and t not in g.outputs

    tensor = q.input[0]
    node = g.producer.get(tensor)
    while node is not None and node.op_type in CLAMP_PASS and alone(tensor):
        tensor = node.input[0]
        node = g.producer.get(tensor)
    high = np.float32(127) * scale
    if node is None or not alone(tensor):
        node, tensor = None, q.input[0]
    bounds = _clamp_range(g, node) if node is not None and node.op_type == "Clip" else None
    if bounds is not None and bounds[0] <= high:
        low, old = bounds
        bounds = [g.add_init(np.array(low, np.float32), f"{tensor}.low"),
                  g.add_init(np.array(min(old, high), np.float32), f"{tensor}.high")]
        node.input[1:] = bounds
        return
    low = g.add_init(np.array(0, np.float32), f"{tensor}.low")
    bound = g.add_init(np.array(high, np.float32), f"{tensor}.code127")
    if node is not None and node.op_type == "Relu":
        node.op_type = "Clip"
        node.input[1:] = [low, bound]
        return
    clamped = f"{q.output[0]}.clamped"
    g.nodes.append(helper.make_node("Clip", [q.input[0], low, bound], [clamped], name=f"{q.name or clamped}_clamp127"))
    q.input[0] = clamped


def _unsigned_codes(g: EditGraph) -> int:
    """A symmetric int8 QuantizeLinear (zero point 0) of a tensor that is >= 0 by construction becomes uint8
    with zero point 0 behind a Clip at ``127 * scale``: the same codes (0..127) and values, which OpenVINO
    runs as unsigned activations without a zero point. Returns how many QuantizeLinear changed."""
    changed, seen = 0, {}
    zero = None
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        params = _qparams(g, q)
        if params is None or params[1].dtype != np.int8 or int(params[1]) != 0 or g.const(q.input[0]) is not None:
            continue
        if not _nonnegative(g, q.input[0], seen):
            continue
        readers = g.consumers.get(q.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" or not _same(params, _qparams(g, r)) for r in readers):
            continue
        zero = zero or g.add_init(np.array(0, np.uint8), "zero_point.uint8")
        _clamp_at_code_127(g, q, params[0])
        for node in (q, *readers):
            node.input[2] = zero
        changed += 1
    g.refresh()
    return changed


def openvino_form(model):
    """A copy of the standard-form Q/DQ ``model`` (``onnx.ModelProto`` or path) without the layer-output
    requantizations OpenVINO runs as extra post-ops (see the module docstring). Returns the new
    ``onnx.ModelProto``; the codes it computes are the standard form's."""
    import onnx

    source = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    model = onnx.ModelProto.FromString(source.SerializeToString())
    g = EditGraph(model)
    merged = _merge_equal_quantizers(g)
    dropped = _drop_output_requantization(g)
    unsigned = _unsigned_codes(g)
    topological_sort(g)
    g.commit()
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    log.info("OpenVINO form: %d QuantizeLinear merged, %d layer-output requantizations dropped, "
             "%d as uint8 codes", merged, dropped, unsigned)
    return model
