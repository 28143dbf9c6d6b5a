"""The onnxruntime form of a TensorRT-form Q/DQ graph: the layout onnxruntime's CPU provider fuses
into integer kernels (QLinearConv, QLinearAdd, QLinearGlobalAveragePool, QGemm).

The TensorRT form puts Q/DQ on layer *inputs*, with the activation (ReLU / ReLU6) and pooling
between a Conv and the next QuantizeLinear, and leaves the Conv before a residual Add or global
pooling unquantized (TensorRT fuses Conv + Add and sums in float). onnxruntime fuses
``DQ -> Conv -> Q`` into QLinearConv only when every Conv input (the bias as int32) comes from a
DequantizeLinear and the output goes to one QuantizeLinear, so it runs the TensorRT form as float
convolutions plus Q/DQ work: slower than FP32. :func:`onnxruntime_form` rewrites a copy:

- weights as int8 initializers behind DequantizeLinear (:func:`qframe.export.qdq.quantize_weights`);
- activation codes as uint8 with zero point + 128 (the same values: onnxruntime's x86 kernels are U8S8);
- each activation QuantizeLinear moved in front of the ReLU / Clip / MaxPool / Flatten before it,
  which then run on the codes: exact, since rounding and saturation are monotone and commute with
  clamping and max; QuantizeLinear nodes that quantize one tensor with one scale merged;
- int32 biases (units of input scale x weight scale) on the layers that become integer: the model
  rounds its biases so too (``QuantRecipe.int32_bias``), so the codes are the model's own;
- float weights (the same values) for layers that stay float, and ``float_convs`` leading Convs
  in float (:func:`fastest_form` times the choice);
- the input of an integer Conv with 1-3 input channels (a grayscale or RGB stem) zero-padded to 4
  channels, onnxruntime's fast int8 path (:func:`_pad_narrow_conv_inputs`; the same codes);
- global pooling of clamped codes as a float ReduceMean, channels-last where only a Flatten follows
  (see :func:`_clamped_pooling_as_reduce_mean`);
- with calibration batches, a uint8 Q/DQ over the observed range on the tensors the TensorRT form
  leaves float (:func:`float_tensors`), so residual branches and the pooled features run in integer
  too: an extra rounding of those tensors, to 256 levels over their calibrated range. A model
  quantized with ``w8a8_portable`` (symmetric int8, a TensorRT graph) or ``w8a8_ort`` (uint8)
  already quantizes them, and its form adds no rounding at all. With symmetric int8 a ReLU / ReLU6
  stays a Clip on the codes (an 8-bit range saturates for free at one of its two bounds only);
  ``w8a8_ort``'s uint8 range saturates where the activation clamps, so its form has no Clip.

It is not a TensorRT graph (Clip on uint8 codes, int32 biases, uint8 zero points): TensorRT gets
the TensorRT form, lint-checked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qframe.errors import QFrameError
from qframe.export.qdq import (EditGraph, attr, dequantize_array, dq_source, drop_dead_nodes, quantize_weights,
                               topological_sort)

log = logging.getLogger(__name__)

CLAMPS = ("Relu", "Clip")
# ops that commute with per-tensor quantization (see _chain_to)
COMMUTING = CLAMPS + ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
INT_LAYERS = ("Conv", "Gemm")


def _clamp_range(g: EditGraph, node) -> tuple[float, float] | None:
    """``(low, high)`` of a Relu / Clip with constant bounds, else None."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    low = high = None
    if len(node.input) > 1 and node.input[1]:
        low = g.const(node.input[1])
    elif attr(node, "min") is not None:  # Clip before opset 11
        low = np.float32(attr(node, "min"))
    if len(node.input) > 2 and node.input[2]:
        high = g.const(node.input[2])
    elif attr(node, "max") is not None:
        high = np.float32(attr(node, "max"))
    if (len(node.input) > 1 and node.input[1] and low is None) or (len(node.input) > 2 and node.input[2] and high is None):
        return None  # a bound computed at run time
    return (float(low) if low is not None else -float("inf"), float(high) if high is not None else float("inf"))


def _per_tensor_qparams(g: EditGraph, q) -> tuple[np.float32, np.ndarray] | None:
    scale = g.const(q.input[1])
    zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or scale.size != 1 or zp is None or zp.size != 1:
        return None
    return np.float32(scale.reshape(())), zp.reshape(())


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
        if len([o for o in node.output if o and g.consumers.get(o)]) != 1 or len(g.consumers.get(node.input[0], [])) != 1:
            break
        chain.append(node)
        src = node.input[0]
    return chain, src


def _hoist_quantize(g: EditGraph) -> tuple[int, int]:
    """Merge same-scale QuantizeLinear nodes of one tensor and move them in front of the ops that commute.

    ``Conv -> Relu -> MaxPool -> Q`` becomes ``Conv -> Q -> Clip(codes) -> MaxPool(codes)``, which
    onnxruntime fuses into QLinearConv. Returns (QuantizeLinear nodes merged away, ops moved onto codes).
    """
    from onnx import NodeProto, helper

    merged = moved = 0
    for tensor in list(g.consumers):
        users = g.consumers.get(tensor, [])
        qs = [n for n in users if n.op_type == "QuantizeLinear"]
        if not qs or g.const(tensor) is not None:
            continue
        params = [_per_tensor_qparams(g, q) for q in qs]
        if any(p is None for p in params):
            continue
        scale, zp = params[0]
        if any(s != scale or z != zp or z.dtype != zp.dtype for s, z in params):
            continue
        keep, others = qs[0], qs[1:]
        for q in others:  # one quantization of the tensor serves every consumer
            g.rename_input(q.output[0], keep.output[0])
        if others:
            g.remove(others)
            merged += len(others)
        if len(users) != len(qs) or tensor in g.outputs:
            continue  # a float consumer still needs the tensor itself
        chain, src = _chain_to(g, tensor)
        if not chain or src in g.outputs or not _integer_capable(g, g.producer.get(src)) \
                or _kept_float(g, g.producer.get(src)):
            continue  # ReLU / pooling of a float layer run fastest in float, before the QuantizeLinear
        codes = keep.output[0]
        renamed = f"{codes}_codes"
        g.rename_input(codes, renamed)  # the DequantizeLinear nodes now read the end of the moved chain
        keep.input[0] = src
        for k, node in enumerate(reversed(chain)):
            out = renamed if k == len(chain) - 1 else f"{node.output[0]}_codes"
            if node.op_type in CLAMPS:
                low, high = _clamp_range(g, node)
                info = np.iinfo(zp.dtype)
                lo, hi = _code_of(low, scale, zp), _code_of(high, scale, zp)
                if lo <= info.min and hi >= info.max:
                    continue  # the codes' own range already clamps: nothing left to do
                lo = g.add_init(np.array(lo, zp.dtype), f"{out}_min")
                hi = g.add_init(np.array(hi, zp.dtype), f"{out}_max")
                g.nodes.append(helper.make_node("Clip", [codes, lo, hi], [out], name=f"{node.name or out}_codes"))
            else:
                moved_node = NodeProto.FromString(node.SerializeToString())
                moved_node.input[0] = codes
                del moved_node.output[:]
                moved_node.output.append(out)
                moved_node.name = f"{node.name or out}_codes"
                g.nodes.append(moved_node)
            codes = out
        g.remove(chain)  # the new nodes sit at the end of the list; the order is restored later
        if codes != renamed:  # the last op was a clamp with nothing to clamp
            g.rename_input(renamed, codes)
            g.refresh()
        moved += len(chain)
    return merged, moved


def _integer_capable(g: EditGraph, node) -> bool:
    """True when onnxruntime has an integer kernel for ``node`` given quantized inputs (its output aside)."""
    if node is None:
        return False
    if node.op_type in INT_LAYERS:
        return dq_source(g, node.input[0]) is not None and dq_source(g, node.input[1]) is not None
    if node.op_type in ("Add", "GlobalAveragePool"):
        return all(dq_source(g, i) is not None for i in node.input)
    return False


def _kept_float(g: EditGraph, node) -> bool:
    """True for a layer the caller asked to run in float (``onnxruntime_form(float_convs=...)``)."""
    return node is not None and node.name in getattr(g, "keep_float", ())


def _integer_layer(g: EditGraph, node) -> bool:
    """True when onnxruntime can run ``node`` (Conv / Gemm) as an integer kernel: both inputs from
    DequantizeLinear and, for a Conv, the output read by one QuantizeLinear alone (QGemm may output float)."""
    if node.op_type not in INT_LAYERS or not _integer_capable(g, node) or _kept_float(g, node):
        return False
    if node.op_type == "Gemm":
        return not (attr(node, "transA", 0) or not attr(node, "transB", 0) or attr(node, "alpha", 1.0) != 1.0
                    or attr(node, "beta", 1.0) != 1.0)
    users = g.consumers.get(node.output[0], [])
    return len(users) == 1 and users[0].op_type == "QuantizeLinear" and node.output[0] not in g.outputs


def _quantize_biases(g: EditGraph) -> int:
    """Int32 bias (scale = input scale x weight scale) behind a DequantizeLinear, for integer layers.

    onnxruntime's integer Conv / Gemm kernels add the bias to the int32 accumulator, so it must be
    an int32 in units of ``input scale x weight scale``: the one rounding this form adds (at most
    half that unit per channel). Layers that stay float keep their float bias.
    """
    from onnx import helper

    count = 0
    for node in [n for n in g.nodes if _integer_layer(g, n)]:
        if len(node.input) < 3 or not node.input[2] or (b := g.const(node.input[2])) is None or b.dtype.kind != "f":
            continue
        dx, dw = dq_source(g, node.input[0]), dq_source(g, node.input[1])
        if g.const(dw.input[0]) is None:
            continue
        sx, sw = g.const(dx.input[1]), g.const(dw.input[1])
        if sx is None or sw is None or sx.size != 1 or b.ndim != 1:
            continue
        scale = (np.float32(sx.reshape(())) * sw.astype(np.float32)).astype(np.float32)
        if scale.size not in (1, b.size) or not (scale > 0).all():
            continue
        codes = np.clip(np.rint(b.astype(np.float64) / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        qb = g.add_init(codes, f"{node.input[2]}_int32")  # a bias shared by several layers gets one copy per scale
        sb = g.add_init(scale, f"{qb}_scale")
        zb = g.add_init(np.zeros(scale.shape, np.int32), f"{qb}_zero_point")
        out = f"{qb}_dequantized"
        g.nodes.append(helper.make_node("DequantizeLinear", [qb, sb, zb], [out], name=f"{qb}_dq", axis=0))
        node.input[2] = out
        count += 1
    g.refresh()
    return count


# onnxruntime's int8 convolution is slow on 1-3 input channels (measured, MobileNetV2 stem at batch 32:
# 0.45 ms in int8 against 0.08-0.15 ms in float); padded to 4 the whole form ran 4-5 % faster than with
# the float stem, padded to 8 or 16 slower (docs/decisions.md)
MIN_INT8_CONV_CHANNELS = 4


def _pad_narrow_conv_inputs(g: EditGraph) -> int:
    """Zero-pad the input of integer Convs with 1-3 input channels to 4 channels, in place.

    The padded channels hold the zero point's code (value 0) and meet zero weights, so the
    accumulator, and with it every output code, is the same. Returns how many Convs were padded.
    """
    from onnx import helper

    count = 0
    for node in [n for n in g.nodes if n.op_type == "Conv" and _integer_layer(g, n) and attr(n, "group", 1) == 1]:
        dx, dw = dq_source(g, node.input[0]), dq_source(g, node.input[1])
        codes, zp = g.const(dw.input[0]), g.const(dx.input[2]) if len(dx.input) > 2 and dx.input[2] else None
        if codes is None or codes.ndim != 4 or codes.shape[1] >= MIN_INT8_CONV_CHANNELS or zp is None or zp.size != 1:
            continue
        extra = MIN_INT8_CONV_CHANNELS - codes.shape[1]
        padded = np.concatenate([codes, np.zeros((codes.shape[0], extra, *codes.shape[2:]), codes.dtype)], axis=1)
        pads = g.add_init(np.array([0, 0, 0, 0, 0, extra, 0, 0], np.int64), f"{node.name}_channel_pads")
        fill = g.add_init(zp.reshape(()), f"{node.name}_channel_pad_value")
        x = f"{dx.input[0]}_padded_for_{node.name}"
        w = g.add_init(padded, f"{dw.input[0]}_padded")
        # new DequantizeLinear nodes: the old ones may feed other layers
        g.nodes += [helper.make_node("Pad", [dx.input[0], pads, fill], [x], name=f"{node.name}_channel_pad"),
                    helper.make_node("DequantizeLinear", [x, *dx.input[1:]], [f"{x}_dq"], name=f"{x}_dq"),
                    helper.make_node("DequantizeLinear", [w, *dw.input[1:]], [f"{w}_dq"], name=f"{w}_dq",
                                     axis=attr(dw, "axis", 1))]
        node.input[0], node.input[1] = f"{x}_dq", f"{w}_dq"
        count += 1
    g.refresh()
    return count


def _float_weights_for_float_layers(g: EditGraph) -> int:
    """Dequantize, once, the weights of layers onnxruntime will run in float (output not quantized).

    With a DequantizeLinear in front of its weight onnxruntime would re-compute that weight at
    every run, could not re-block it for its fast NCHWc convolution, and would round its bias to
    int32 (its WeightBiasQuantization pass). The stored float weight is the very same value
    (codes x scale).
    """
    count = 0
    for node in [n for n in g.nodes if n.op_type in INT_LAYERS and not _integer_layer(g, n)]:
        dq = dq_source(g, node.input[1])
        if dq is None or (codes := g.const(dq.input[0])) is None:
            continue
        scale = g.const(dq.input[1])
        zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or (zp is None and len(dq.input) > 2 and dq.input[2]):
            continue
        value = dequantize_array(codes, scale, zp, attr(dq, "axis", 1), attr(dq, "block_size", 0))
        node.input[1] = g.add_init(value, f"{dq.input[0]}_dequantized")
        count += 1
    g.refresh()
    return count


def _uint8_activations(g: EditGraph) -> int:
    """int8 activation codes c become uint8 codes c + 128 with zero point + 128: the same values, exactly.

    onnxruntime's x86 integer kernels take uint8 activations and int8 weights (U8S8); it converts
    int8 Q -> DQ pairs itself, but not codes that pass through a Clip between them.
    """
    count = 0
    shifted: dict[str, str] = {}

    def as_uint8(name: str) -> str:
        if name not in shifted:
            value = g.const(name).astype(np.int16) + 128
            shifted[name] = g.add_init(value.astype(np.uint8), f"{name}_uint8")
        return shifted[name]

    for node in g.nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and g.const(node.input[0]) is None:
            if len(node.input) > 2 and node.input[2] and (zp := g.const(node.input[2])) is not None and zp.dtype == np.int8:
                node.input[2] = as_uint8(node.input[2])
                count += node.op_type == "QuantizeLinear"
    g.refresh()
    return count


# ops onnxruntime has integer (QLinear*) kernels for, when every input comes from DequantizeLinear
# and the output goes to one QuantizeLinear
_INTEGER_CONSUMERS = ("Add", "GlobalAveragePool")


def _clamp_chain_end(g: EditGraph, tensor: str) -> str:
    """Follow single-reader Relu / Clip nodes (constant bounds) from ``tensor``; return the last output."""
    while (users := g.consumers.get(tensor, [])) and len(users) == 1 and users[0].op_type in CLAMPS \
            and _clamp_range(g, users[0]) is not None and tensor not in g.outputs:
        tensor = users[0].output[0]
    return tensor


def float_tensors(model) -> list[str]:
    """Tensors a Q/DQ graph leaves in float that only an extra, calibrated quantization makes integer.

    The TensorRT form quantizes layer inputs. A Conv (with quantized inputs) whose result is not
    itself a layer input stays float in onnxruntime, which has no integer Conv with a float output:
    the last Conv of a residual branch (its Add takes it in float; TensorRT fuses Conv + Add and sums
    in float) and a Conv that feeds global average pooling. So does an Add whose inputs are (or are
    about to be) quantized and whose result feeds another such Add or the pooling. Returns, in
    graph order, each such tensor after the Relu / Clip that follows it.
    """
    g = model if isinstance(model, EditGraph) else EditGraph(model)
    quantized = {n.output[0] for n in g.nodes if n.op_type == "DequantizeLinear"}
    found = []
    for node in g.nodes:  # graph order, so an Add sees the branches quantized before it
        if node.op_type == "Conv":
            if node.input[0] not in quantized or node.input[1] not in quantized:
                continue
        elif node.op_type != "Add" or len(node.input) != 2 or any(i not in quantized for i in node.input):
            continue
        tensor = _clamp_chain_end(g, node.output[0])
        users = g.consumers.get(tensor, [])
        if not users or tensor in g.outputs or any(u.op_type not in _INTEGER_CONSUMERS for u in users):
            continue
        if any(u.op_type == "Add" and not all(i in quantized or i == tensor for i in u.input) for u in users):
            continue  # the Add stays float anyway: quantizing one of its inputs would only cost
        found.append(tensor)
        quantized.add(tensor)
    return found


def calibrate_ranges(model, tensors: list[str], batches, input_name: str = "input") -> dict[str, tuple[float, float]]:
    """``{tensor: (min, max)}`` of intermediate tensors of ``model`` over ``batches`` (numpy inputs), in onnxruntime."""
    import onnx

    from qframe.export.onnx import ort_session, with_dynamic_batch

    if not tensors:
        return {}
    probe = with_dynamic_batch(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors)
    session = ort_session(probe)
    ranges: dict[str, tuple[float, float]] = {}
    for x in batches:
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        for t, v in zip(tensors, session.run(tensors, {input_name: x.astype(np.float32)})):
            lo, hi = ranges.get(t, (np.inf, -np.inf))
            ranges[t] = (min(lo, float(v.min())), max(hi, float(v.max())))
    if not ranges:
        raise QFrameError("calibrating the onnxruntime form got no input batches; pass at least one")
    return ranges


def _uint8_qparams(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point that cover [low, high] (and 0) with 256 levels."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = np.float32(max(high - low, 1e-8) / 255.0)
    return scale, np.uint8(np.clip(np.rint(-low / scale), 0, 255))


def _quantize_float_tensors(g: EditGraph, ranges: dict[str, tuple[float, float]]) -> int:
    """Insert QuantizeLinear -> DequantizeLinear (uint8 over the calibrated range) on each tensor of ``ranges``."""
    from onnx import helper

    for tensor, (low, high) in ranges.items():
        scale, zp = _uint8_qparams(low, high)
        s = g.add_init(np.array(scale, np.float32), f"{tensor}_scale")
        z = g.add_init(np.array(zp, np.uint8), f"{tensor}_zero_point")
        codes, value = f"{tensor}_calibrated_codes", f"{tensor}_calibrated"
        g.rename_input(tensor, value)
        g.nodes += [helper.make_node("QuantizeLinear", [tensor, s, z], [codes], name=f"{tensor}_q"),
                    helper.make_node("DequantizeLinear", [codes, s, z], [value], name=f"{tensor}_dq")]
        g.refresh()
    return len(ranges)


def _conv_rank(g: EditGraph, tensor: str) -> int | None:
    """Rank of ``tensor`` when it is a Conv output behind shape-keeping ops (Q, DQ, Relu, Clip), else None."""
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear") + CLAMPS:
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Conv":
        return None
    dw = dq_source(g, node.input[1])
    weight = g.const(node.input[1]) if dw is None else g.const(dw.input[0])
    return None if weight is None else weight.ndim


def _flattened(g: EditGraph, tensor: str) -> bool:
    """True when ``tensor`` reaches the rest of the graph only through Q / DQ and a ``Flatten(axis=1)``,
    so ``[N, C, 1, 1]`` and ``[N, 1, 1, C]`` give the same result."""
    while tensor not in g.outputs and len(users := g.consumers.get(tensor, [])) == 1:
        node = users[0]
        if node.op_type == "Flatten":
            return attr(node, "axis", 1) == 1
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            return False
        tensor = node.output[0]
    return False


def _clamped_pooling_as_reduce_mean(g: EditGraph) -> tuple[int, int]:
    """Global average pooling of clamped codes (``Clip -> DQ -> GlobalAveragePool``) as a float ReduceMean.

    onnxruntime fuses that pooling into QLinearGlobalAveragePool but, with the Clip in front, keeps
    it in NCHW behind a Transpose, where it is slow (measured: 0.22 ms against 0.02 ms channels-last
    for MobileNetV2's 1280 x 2 x 2 features at batch 32). ReduceMean over H, W has no integer
    fusion: the mean of the dequantized codes, what the model computes. Where the pooled features
    only reach a ``Flatten``, the pooling is written channels-last (a Transpose to NHWC in front of
    the Clip, the mean over axes 1, 2): the Transpose then cancels the one onnxruntime puts after its
    channels-last integer Conv, and no layout change is left (MobileNetV2, batch 32: 4-5 % faster,
    paired runs). Returns (poolings rewritten, of which channels-last).
    """
    from onnx import helper

    opset = next((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), 17)
    count = channels_last = 0
    for node in [n for n in g.nodes if n.op_type == "GlobalAveragePool"]:
        dq = g.producer.get(node.input[0])
        src = None if dq is None or dq.op_type != "DequantizeLinear" else g.producer.get(dq.input[0])
        if src is None or src.op_type != "Clip":
            continue
        axes = [2, 3]
        rank = _conv_rank(g, src.input[0])
        scale = g.const(dq.input[1])
        per_tensor = scale is not None and scale.size == 1
        only_reader = g.consumers.get(src.output[0]) == [dq] and g.consumers.get(dq.output[0]) == [node]
        if rank is not None and rank >= 3 and per_tensor and only_reader and _flattened(g, node.output[0]):
            nhwc = f"{src.input[0]}_channels_last"
            g.nodes.append(helper.make_node("Transpose", [src.input[0]], [nhwc], name=f"{src.name or nhwc}_channels_last",
                                            perm=[0, *range(2, rank), 1]))
            src.input[0] = nhwc
            axes = list(range(1, rank - 1))
            channels_last += 1
        node.op_type = "ReduceMean"
        node.attribute.append(helper.make_attribute("keepdims", 1))
        if opset >= 18:
            node.input.append(g.add_init(np.array(axes, np.int64), f"{node.name or node.output[0]}_axes"))
        else:
            node.attribute.append(helper.make_attribute("axes", axes))
        count += 1
    g.refresh()
    return count, channels_last


def onnxruntime_form(model, calibration=None, *, input_name: str = "input", float_convs: int = 0):
    """A copy of the TensorRT-form Q/DQ ``model`` (``onnx.ModelProto`` or path) rewritten the way
    onnxruntime fuses it into integer kernels.

    See the module docstring: int8 weight initializers, uint8 activation codes, activation
    QuantizeLinear moved in front of ReLU / Clip / MaxPool / Flatten (which then run on the codes,
    exactly), duplicate QuantizeLinear merged, int32 biases on integer layers, and float weights on
    layers that stay float. With ``calibration`` (an iterable of input batches, numpy arrays or
    tensors), the tensors of :func:`float_tensors` (residual-branch Convs and Adds, the Conv before
    global pooling) are quantized too, uint8 over the range they take on those batches, so those
    layers run as integer kernels as well. Returns the new ``onnx.ModelProto``.
    """
    import onnx

    source = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    model = onnx.ModelProto.FromString(source.SerializeToString())
    quantize_weights(model)
    g = EditGraph(model)
    g.keep_float = {n.name for n in [n for n in g.nodes if n.op_type == "Conv"][:float_convs]}
    _uint8_activations(g)
    calibrated = 0
    if calibration is not None:
        calibrated = _quantize_float_tensors(g, calibrate_ranges(source, float_tensors(g), calibration, input_name))
    merged, moved = _hoist_quantize(g)
    topological_sort(g)
    biases = _quantize_biases(g)
    padded = _pad_narrow_conv_inputs(g)
    _float_weights_for_float_layers(g)
    pooled, channels_last = _clamped_pooling_as_reduce_mean(g)
    drop_dead_nodes(g)
    topological_sort(g)
    g.commit()
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    log.info("onnxruntime form: %d QuantizeLinear merged, %d ops moved onto integer codes, %d int32 biases, "
             "%d calibrated tensors, %d narrow Conv inputs padded, %d clamped poolings as ReduceMean (%d channels-last)",
             merged, moved, biases, calibrated, padded, pooled, channels_last)
    return model


def fastest_form(model, input_shape: tuple[int, ...], batch_size: int, calibration=None, *,
                 candidates: tuple[int, ...] = (0, 1), threads: int = 2, input_name: str = "input"):
    """The onnxruntime form that runs fastest on this CPU among ``float_convs`` in ``candidates``.

    Every candidate computes the same values (a float layer runs on the same quantized input and
    weight values); only the kernels differ, so the choice is made by timing, as TensorRT picks its
    tactics: onnxruntime's integer convolution on few input channels (a stem on a one-channel image,
    padded to 4) can be slower or faster than its float one, and is faster everywhere else. Returns
    ``(form, float_convs, {k: ms})``.
    """
    import onnx

    from qframe.export.onnx import time_onnx

    source = onnx.load(str(model)) if isinstance(model, (str, Path)) else model
    batches = None if calibration is None else list(calibration)
    forms = {k: onnxruntime_form(source, batches, input_name=input_name, float_convs=k) for k in dict.fromkeys(candidates)}
    if len(forms) == 1:
        (k, form), = forms.items()
        return form, k, {}
    times = time_onnx({str(k): f for k, f in forms.items()}, input_shape, batch_size, threads=threads, rounds=6, runs=5)
    ms = {int(k): t["median_ms"] for k, t in times.items()}
    best = min(ms, key=ms.get)
    log.info("onnxruntime form: %d leading Conv(s) in float runs fastest here (%s)", best,
             ", ".join(f"{k}: {v:.3f} ms" for k, v in ms.items()))
    return forms[best], best, ms
