"""The OpenVINO form: qframe's standard Q/DQ form (:mod:`qframe.export.qdq`) without the requantizations
OpenVINO's CPU plugin cannot merge. The same codes and values; a second file next to the standard one.

The standard form gives a layer whose output is quantized only after a ReLU / Clip / max pooling /
shape op a QuantizeLinear -> DequantizeLinear of its own, with the parameters of the quantizer that
follows (``Conv -> Q -> DQ -> Clip -> Q -> DQ``): the layout in which TensorRT and onnxruntime run
the layer with an integer output. OpenVINO turns each pair into a FakeQuantize and fuses all of them
into the convolution as post-ops, so such a convolution quantized its output twice, and a ResNet
block's second convolution three times (its add's input, its add's output, the next layer's input).
Two exact changes:

- where only clamps separate the pair from equal quantizers, the pair goes (``Conv -> Clip -> Q ->
  DQ``): the same codes, since ``Q(clamp(DQ(Q(y)))) == Q(clamp(y))`` for equal parameters (rounding
  and saturation are monotone, and ``Q(DQ(c)) == c``). Equal QuantizeLinear nodes of one tensor are
  merged (one FakeQuantize instead of several);
- a symmetric int8 quantizer right after a ReLU / ReLU6 becomes uint8 with zero point 0 and the clamp
  stops at code 127: the same codes, which OpenVINO runs as unsigned activations without a zero
  point; signed codes it runs with one, which costs every convolution that reads them. (The other
  activation codes as uint8 + 128, as in the onnxruntime form, measured within the noise: not done.)

Measured on OpenVINO 2026.4 (1 thread, AVX-512 VNNI; docs/decisions.md): this is the layout NNCF
writes, and each convolution then runs with one quantizing post-op instead of two or three.

Not a TensorRT graph: TensorRT's Conv + Add fusion wants the quantized layer outputs of the standard form.
"""

from __future__ import annotations

import logging

import numpy as np

from qframe.export.ort_form import _clamp_range, _merge_quantizers, _qparams, _same
from qframe.export.lint import onnx_model
from qframe.export.qdq import EditGraph, topological_sort

log = logging.getLogger(__name__)


CLAMPS = ("Relu", "Clip")


def _clamp(g: EditGraph, tensor: str):
    """The Relu / Clip (constant bounds) that is the only reader of ``tensor``, else None."""
    users = g.consumers.get(tensor, [])
    if tensor in g.outputs or len(users) != 1 or users[0].op_type not in CLAMPS or users[0].input[0] != tensor:
        return None
    return users[0] if _clamp_range(g, users[0]) is not None else None


def _drop_output_requantization(g: EditGraph) -> int:
    """Remove each ``Q -> DQ`` whose dequantized values reach, through clamps only, nothing but QuantizeLinear
    nodes with the same parameters (see the module docstring). Returns how many went.

    Only clamps: OpenVINO fuses them into the layer with the quantizer after them, so the layer still
    writes integer codes. Through a max pooling or a reshape the layer would write floats (bf16 on
    CPUs with AVX-512 BF16) and the codes would no longer be exactly the standard form's."""
    dropped = 0
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        params = _qparams(g, q)
        if params is None or g.const(q.input[0]) is not None or q.output[0] in g.outputs:
            continue
        readers = g.consumers.get(q.output[0], [])
        if len(readers) != 1 or readers[0].op_type != "DequantizeLinear" or not _same(params, _qparams(g, readers[0])):
            continue
        dq = readers[0]
        end = dq.output[0]
        while (clamp := _clamp(g, end)) is not None:
            end = clamp.output[0]
        users = g.consumers.get(end, [])
        if end in g.outputs or not users or any(u.op_type != "QuantizeLinear" or not _same(params, _qparams(g, u))
                                                for u in users):
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


def _unsigned_codes(g: EditGraph) -> int:
    """A symmetric int8 QuantizeLinear (zero point 0) that is the only reader of a ReLU / Clip with a lower bound
    >= 0 becomes uint8 with zero point 0, the clamp's upper bound lowered to ``127 * scale``: the same codes
    (0..127) and values, which OpenVINO runs as unsigned activations without a zero point (the clamp folds
    into the layer before it). Returns how many QuantizeLinear changed."""
    changed = 0
    zero = None
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        params = _qparams(g, q)
        if params is None or params[1].dtype != np.int8 or int(params[1]) != 0:
            continue
        clamp = g.producer.get(q.input[0])
        if clamp is None or _clamp(g, clamp.input[0]) is not clamp or len(g.consumers.get(q.input[0], [])) != 1 \
                or q.input[0] in g.outputs:
            continue
        low, high = _clamp_range(g, clamp)
        if low < 0:
            continue
        readers = g.consumers.get(q.output[0], [])
        if not readers or any(r.op_type != "DequantizeLinear" or not _same(params, _qparams(g, r)) for r in readers):
            continue
        high = min(high, float(np.float32(127) * params[0]))
        if low > high:
            continue
        bounds = [g.add_init(np.array(v, np.float32), f"{clamp.output[0]}.{role}") for v, role in ((low, "low"),
                                                                                                   (high, "high"))]
        clamp.op_type = "Clip"
        clamp.input[1:] = bounds
        zero = zero or g.add_init(np.array(0, np.uint8), "zero_point.uint8")
        for node in (q, *readers):
            node.input[2] = zero
        changed += 1
    g.refresh()
    return changed


def _full_unsigned_range(g: EditGraph) -> int:
    """Each uint8 quantizer (zero point 0) right after a Clip with lower bound 0, as :func:`_unsigned_codes`
    leaves them, spreads its 256 codes over the clamp's range: scale ``high / 255``, the Clip a Relu (the
    quantizer saturates at ``high`` by itself). Returns how many changed."""
    changed = 0
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        params = _qparams(g, q)
        clamp = g.producer.get(q.input[0])
        if params is None or params[1].dtype != np.uint8 or int(params[1]) != 0 or clamp is None \
                or clamp.op_type != "Clip" or _clamp(g, clamp.input[0]) is not clamp:
            continue
        low, high = _clamp_range(g, clamp)
        readers = g.consumers.get(q.output[0], [])
        if low != 0 or not high > 0 or any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        scale = g.add_init(np.array(np.float32(high) / np.float32(255), np.float32), f"{q.output[0]}.scale_u8")
        for node in (q, *readers):
            node.input[1] = scale
        clamp.op_type = "Relu"
        del clamp.input[1:]
        changed += 1
    g.refresh()
    return changed


def openvino_form(model, *, full_unsigned_range: bool = False):
    """A copy of the standard-form Q/DQ ``model`` (``onnx.ModelProto`` or path) without the layer-output
    requantizations OpenVINO runs as extra post-ops (see the module docstring). Returns the new
    ``onnx.ModelProto``; the codes it computes are the standard form's.

    ``full_unsigned_range=True`` also spreads each unsigned activation quantizer after a ReLU / ReLU6 over
    all 256 codes of its range (``[0, 127 * scale]`` or the ReLU6 bound): half the step, the same
    clipping point, and no separate clamp (OpenVINO folds the saturation into the quantizer, as in NNCF's
    graphs). Values then differ from the standard form's by up to half its step: closer to FP32, no
    longer bit-exact with the fake-quant model."""
    import onnx

    source = onnx_model(model, "openvino_form")
    model = onnx.ModelProto.FromString(source.SerializeToString())
    g = EditGraph(model)
    merged = _merge_equal_quantizers(g)
    dropped = _drop_output_requantization(g)
    unsigned = _unsigned_codes(g)
    full = _full_unsigned_range(g) if full_unsigned_range else 0
    topological_sort(g)
    g.commit()
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    log.info("OpenVINO form: %d QuantizeLinear merged, %d layer-output requantizations dropped, "
             "%d as uint8 codes after a clamp%s", merged, dropped, unsigned,
             f", {full} over the full uint8 range" if full_unsigned_range else "")
    return model
