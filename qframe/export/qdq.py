"""qframe's standard Q/DQ ONNX form, made from what ``torch.onnx.export`` writes.

The exporter turns each quantizer into QuantizeLinear -> DequantizeLinear: a weight stays a float
initializer quantized again by every runtime, shared scales reach their readers through chains
of Identity nodes, and a layer whose output the model quantizes only after a ReLU / pooling /
reshape has no quantized output of its own. :func:`standard_form` rewrites that graph, in place,
into the form TensorRT's explicit quantization and onnxruntime's QDQ kernels both take:

- constants as initializers, no Identity chains (:func:`inline_constants`);
- every weight stored as its integer codes, read by DequantizeLinear alone (per channel on the
  output-channel axis): int8, or INT4 for ``int4_weights`` where the opset has it (21);
- a Linear exported as ``MatMul(x, Transpose(DQ(W)))`` gets its codes stored transposed, so
  the DequantizeLinear feeds the MatMul with its scales on the output axis (axis 1 of [K, N]);
- a QuantizeLinear -> DequantizeLinear on the output of a Conv / Gemm / MatMul / Add / average
  pooling whose result reaches only equal per-tensor quantizers through ReLU, Clip, MaxPool or
  shape ops, with those quantizers' scale: the same values (rounding and saturation are monotone
  and commute with clamping, max and reshaping), and the layout in which runtimes run the layer
  with an integer output;
- each activation QuantizeLinear -> DequantizeLinear pair with a scale and zero point of its own, and
  every tensor, named after the module that computes it (``layer1.0.conv1.input.scale``,
  ``layer1.0.conv1.Conv``).

Symmetric quantization (zero point 0) is the model's; nothing here changes a value the model
computes.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np

from qframe.errors import QFrameError
from qframe.export.lint import attr, reads, rename_reads

log = logging.getLogger(__name__)

# ops that commute with per-tensor quantization: Q(op(y)) == op(Q(y)) for the codes (see module docstring)
COMMUTING = ("Relu", "Clip", "MaxPool", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose")
# layers whose output a runtime can produce in integer when a QuantizeLinear follows
OUTPUT_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "GlobalAveragePool", "AveragePool")


class EditGraph:
    """Mutable lookup over ``model.graph``: producer and consumers of each tensor, constants by name."""

    def __init__(self, model):
        from onnx import NodeProto, numpy_helper

        self.model, self.g, self._np = model, model.graph, numpy_helper
        self.outputs = {o.name for o in self.g.output}
        # edited as a Python list of detached copies; commit() writes them back in order
        self.nodes = [NodeProto.FromString(n.SerializeToString()) for n in self.g.node]
        self.refresh()

    def refresh(self) -> None:
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in reads(n):
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def const(self, name: str):
        """The numpy value of initializer ``name``, else None."""
        t = self.inits.get(name)
        return None if t is None else self._np.to_array(t)

    def add_init(self, array: np.ndarray, name: str) -> str:
        """Add an initializer named ``name`` (made unique); returns its name."""
        base, k = name, 0
        while name in self.inits or name in self.producer:
            k += 1
            name = f"{base}_{k}"
        t = self._np.from_array(array, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def rename_input(self, old: str, new: str) -> None:
        """Point every reader of ``old`` at ``new`` (call :meth:`refresh` before looking readers up again)."""
        for n in self.consumers.get(old, []):
            rename_reads(n, {old: new})

    def remove(self, nodes) -> None:
        drop = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in drop]
        self.refresh()

    def commit(self) -> None:
        """Write the edited node list back into the model and drop initializers no node reads."""
        del self.g.node[:]
        self.g.node.extend(self.nodes)
        self.nodes = list(self.g.node)
        used = {i for n in self.nodes for i in reads(n)} | self.outputs
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        graph_inputs = [i for i in self.g.input if i.name not in self.inits or i.name in used]
        del self.g.input[:]
        self.g.input.extend(graph_inputs)
        self.refresh()


def module_path(node_name: str) -> str:
    """The PyTorch module a node of an exported graph (or of onnxruntime's rewrite of it) came from.

    ``torch.onnx.export`` names a node by its module scopes, each child written with its parent's
    dotted name (``/features/features.2/conv/conv.0/conv.0.0/Conv``); onnxruntime keeps that
    prefix when it fuses or adds nodes (``.../conv.0.0/Conv_token_10``). Returns the dotted path
    (``features.2.conv.0.0``), or ``""`` for a node with no scope (a layout Transpose).
    """
    parts = node_name.split("/")[1:-1] if node_name.startswith("/") else []
    path: list[str] = []
    previous: list[str] = []
    for part in parts:
        segments = part.split(".")
        # a scope that extends the previous one names a child of it ("conv.0" after "conv")
        extends = previous and len(segments) > len(previous) and segments[:len(previous)] == previous
        path += segments[len(previous):] if extends else segments
        previous = segments
    return ".".join(path)


def inline_constants(model) -> None:
    """Constant nodes become initializers, one per value, and Identity nodes over constants disappear, in place.

    The TorchScript exporter writes scales, zero points and bounds as one Constant node per use and
    repeats shared ones through Identity nodes; one initializer per value makes the graph plain to
    read and edit (:func:`standard_form` then gives each quantizer parameters of its own).
    """
    from onnx import numpy_helper

    while True:
        g = EditGraph(model)
        dropped, values = [], {}
        for node in g.nodes:
            if node.op_type == "Constant" and node.output[0] not in g.outputs:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is None:  # value_float(s) / value_int(s) forms: leave them
                    continue
                array = numpy_helper.to_array(value)
                key = (array.dtype.str, array.shape, array.tobytes())
                if key in values:
                    g.rename_input(node.output[0], values[key])
                else:
                    values[key] = node.output[0]
                    g.g.initializer.append(numpy_helper.from_array(array, node.output[0]))
                dropped.append(node)
            elif node.op_type == "Identity" and node.input[0] in g.inits and node.output[0] not in g.outputs:
                g.rename_input(node.output[0], node.input[0])
                dropped.append(node)
        if not dropped:  # a chain Identity -> Identity over a Constant takes one pass per link
            return
        g.remove(dropped)
        g.commit()


def _codes(w: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """QuantizeLinear's codes: ``saturate(round_half_even(w / scale) + zero_point)`` in float32 arithmetic.

    A true division, as onnxruntime's QuantizeLinear and qframe's fake-quantize both compute it
    (``w * (1 / scale)`` can land on the other side of a rounding tie).
    """
    shape = [1] * w.ndim
    if scale.ndim:
        shape[axis % w.ndim] = -1
    s = scale.astype(np.float32).reshape(shape)
    z = zero_point.astype(np.float32).reshape(shape if zero_point.ndim else [1] * w.ndim)
    info = np.iinfo(zero_point.dtype)
    return np.clip(np.rint(w.astype(np.float32) / s) + z, info.min, info.max).astype(zero_point.dtype)


def dequantize_array(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None, axis: int = 1,
                     block_size: int = 0) -> np.ndarray:
    """DequantizeLinear in numpy, float32: ``(codes - zero_point) * scale``, per tensor, per axis or in
    blocks of ``block_size`` along ``axis`` (opset 21; the last block may be shorter)."""
    codes = codes.astype(np.float32)
    axis %= max(codes.ndim, 1)
    scale = scale.astype(np.float32)
    zp = np.zeros_like(scale) if zero_point is None else zero_point.astype(np.float32)
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(codes.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(codes.shape[axis]), axis=axis)
    elif scale.ndim == 1 and codes.ndim > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((codes - zp) * scale).astype(np.float32)


def _int4(codes: np.ndarray, name: str):
    """An INT4 initializer holding ``codes`` (values in [-8, 7])."""
    from onnx import TensorProto, helper

    if codes.min(initial=0) < -8 or codes.max(initial=0) > 7:
        raise QFrameError(f"weight {name!r} has codes outside [-8, 7]; it cannot be stored as INT4")
    return helper.make_tensor(name, TensorProto.INT4, codes.shape, codes.astype(np.int8).flatten().tolist())


def _store_weight_codes(g: EditGraph, int4_weights: Collection[str]) -> int:
    """Each QuantizeLinear of a float initializer goes; its DequantizeLinear nodes read the codes
    (``<weight>_quantized``) and a scale of their own (``<weight>_scale``); a zero point only where it is
    not 0 of the codes' type, the default. ``int4_weights`` name weights stored as INT4.
    """
    dropped = []
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        w = g.const(q.input[0])
        readers = g.consumers.get(q.output[0], [])
        if w is None or w.dtype.kind != "f" or not readers or q.output[0] in g.outputs:
            continue
        if any(r.op_type != "DequantizeLinear" for r in readers):
            continue
        scale = g.const(q.input[1])
        zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None:
            continue
        codes = _codes(w, scale, zp, attr(q, "axis", 1))
        name = f"{q.input[0]}_quantized"
        if q.input[0] in int4_weights:
            if zp.any():
                raise QFrameError(f"weight {q.input[0]!r} has a non-zero zero point; INT4 weights are stored symmetric")
            g.g.initializer.append(_int4(codes, name))
            g.refresh()
        else:
            name = g.add_init(codes, name)
        params = [g.add_init(scale, f"{q.input[0]}_scale")]
        if zp.any() or (zp.dtype != np.int8 and q.input[0] not in int4_weights):  # else the default, 0 of the codes' type
            params.append(g.add_init(zp, f"{q.input[0]}_zero_point"))
        for r in readers:
            del r.input[1:]
            r.input.extend(params)
        g.rename_input(q.output[0], name)
        dropped.append(q)
    g.remove(dropped)
    return len(dropped)


def _fold_weight_transposes(g: EditGraph) -> int:
    """``DQ(codes) -> Transpose`` over a stored weight becomes ``DQ(codes transposed)``, its axis moved along.

    ``torch.onnx.export`` writes a Linear on a 3-D input as ``MatMul(x, Transpose(W))``; stored
    transposed, the codes feed the MatMul through their DequantizeLinear alone, per channel on
    the output axis, as TensorRT and onnxruntime's quantized MatMul take them.
    """
    from onnx import TensorProto

    dropped = []
    for t in [n for n in g.nodes if n.op_type == "Transpose"]:
        dq = g.producer.get(t.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or len(g.consumers.get(dq.output[0], [])) != 1:
            continue
        codes = g.const(dq.input[0])
        if codes is None or dq.output[0] in g.outputs:
            continue
        perm = list(attr(t, "perm", None) or reversed(range(codes.ndim)))
        scale = g.const(dq.input[1])
        zp = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if scale is None or (len(dq.input) > 2 and dq.input[2] and zp is None):
            continue
        name = f"{dq.input[0]}_transposed"
        moved = codes.transpose(perm)
        if g.inits[dq.input[0]].data_type == TensorProto.INT4:
            g.g.initializer.append(_int4(moved.astype(np.int8), name))
            g.refresh()
        else:
            name = g.add_init(np.ascontiguousarray(moved), name)
        dq.input[0] = name
        if scale.ndim == codes.ndim:  # opset-21 blocks: scales (and zero points) shaped like the codes
            dq.input[1] = g.add_init(np.ascontiguousarray(scale.transpose(perm)), f"{dq.input[1]}_transposed")
            if zp is not None:
                dq.input[2] = g.add_init(np.ascontiguousarray(zp.transpose(perm)), f"{dq.input[2]}_transposed")
        if scale.size > 1:
            axis = attr(dq, "axis", 1) % codes.ndim
            _set_int_attr(dq, "axis", perm.index(axis))
        g.rename_input(t.output[0], dq.output[0])
        dropped.append(t)
    g.remove(dropped)
    return len(dropped)


def _set_int_attr(node, name: str, value: int) -> None:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _per_tensor_qparams(g: EditGraph, q) -> tuple | None:
    """``(scale bytes, zero point bytes, zero point dtype)`` of a per-tensor QuantizeLinear with constant parameters."""
    scale = g.const(q.input[1])
    zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else None
    if scale is None or scale.size != 1 or (len(q.input) > 2 and q.input[2] and zp is None):
        return None
    return (scale.astype(np.float32).tobytes(), None if zp is None else (zp.tobytes(), str(zp.dtype)),
            attr(q, "output_dtype", 0))


def _commutes(g: EditGraph, node) -> bool:
    """True for an op of :data:`COMMUTING` whose bounds (Clip) are constants."""
    if node.op_type not in COMMUTING:
        return False
    if node.op_type == "Clip":
        return all(g.const(i) is not None for i in node.input[1:] if i)
    return True


def _quantize_layer_outputs(g: EditGraph) -> int:
    """A QuantizeLinear -> DequantizeLinear on each layer output that only ops of :data:`COMMUTING`
    separate from quantizers (all with one per-tensor scale and zero point), with their parameters.

    The same values (see the module docstring); the layer then has the quantized output runtimes
    run it in integer with. Returns ``{id(Q): (Q, DQ, the quantizer whose parameters they take)}``.
    """
    from onnx import helper

    shared: dict[int, tuple] = {}
    for layer in [n for n in g.nodes if n.op_type in OUTPUT_LAYERS]:
        tensor = layer.output[0]
        chain = []
        while tensor not in g.outputs and len(users := g.consumers.get(tensor, [])) == 1 and _commutes(g, users[0]) \
                and users[0].input[0] == tensor:
            chain.append(users[0])
            tensor = users[0].output[0]
        users = g.consumers.get(tensor, [])
        if not chain or tensor in g.outputs or not users or any(u.op_type != "QuantizeLinear" for u in users):
            continue
        params = {_per_tensor_qparams(g, u) for u in users}
        if len(params) != 1 or None in params:
            continue
        q = users[0]
        out = layer.output[0]
        # a layer in the root module ("/MatMul") has no scope of its own: the output names it, uniquely
        scope = layer.name.rpartition("/")[0] if layer.name.startswith("/") and layer.name.count("/") > 1 else f"/{out}"
        name = f"{scope}/output_quantizer"
        g.rename_input(out, f"{out}_dequantized")
        pair = (helper.make_node("QuantizeLinear", [out, *q.input[1:]], [f"{out}_quantized"],
                                 name=f"{name}/QuantizeLinear"),
                helper.make_node("DequantizeLinear", [f"{out}_quantized", *q.input[1:]], [f"{out}_dequantized"],
                                 name=f"{name}/DequantizeLinear"))
        g.nodes += pair
        shared[id(pair[0])] = (*pair, q)
        g.refresh()
    return shared


def _quantizer_name(node) -> str:
    """``features.3.conv.0.0.input`` for a Q/DQ node of ``features.3.conv.0.0.input_quantizer``; "" without scope."""
    path = module_path(node.name)
    return path.removesuffix("_quantizer") if path else ""


def _own_qparams(g: EditGraph, shared: dict[int, tuple]) -> int:
    """Give every activation QuantizeLinear (and the DequantizeLinear nodes reading it) a scale and zero
    point of its own, ``<quantizer>.scale`` and ``<quantizer>.zp``; returns how many pairs.

    The exporter shares equal constants between quantizers. onnxruntime then takes two
    QuantizeLinear nodes of one tensor for one (measured: with shared parameters, even a shared zero
    point alone, it fused fewer convolutions of a ResNet into QLinearConv), and a QuantizeLinear with
    two readers is no Q -> DQ pair to fuse into an integer kernel. The output quantizers of
    :func:`_quantize_layer_outputs` (``shared``: ``{id(Q): (Q, DQ, the quantizer it copies)}``) read
    the parameters of the quantizer they copy: they quantize other tensors, so nothing merges them.
    """
    count = 0
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear" and g.const(n.input[0]) is None]:
        if id(q) in shared:
            continue
        dqs = g.consumers.get(q.output[0], [])
        params = [i for i in q.input[1:] if i]
        values = [g.const(i) for i in params]
        if any(v is None for v in values) or any(
                d.op_type != "DequantizeLinear" or list(d.input[1:]) != list(q.input[1:]) for d in dqs):
            continue
        base = _quantizer_name(q) or q.output[0]
        names = [g.add_init(v.copy(), f"{base}.{role}") for role, v in zip(("scale", "zp"), values)]
        for node in (q, *dqs):
            for k, name in enumerate(names, start=1):
                node.input[k] = name
        count += 1
    for q, dq, reader in shared.values():  # a layer's output quantizer: the parameters of the quantizer it stands for
        q.input[1:] = dq.input[1:] = reader.input[1:]
    g.refresh()
    return count


def _name_tensors(g: EditGraph) -> None:
    """Name each tensor after the module that computes it: ``features.3.conv.0.0.input`` for what the
    input quantizer of ``features.3.conv.0.0`` passes on, ``features.3.conv.0.0.input.codes`` for its
    integer codes, ``features.3.conv.0.0.Conv`` for the layer's output, ``features.3.conv.0.2.Clip.max``
    for a constant the exporter wrote as a Constant node (``Clip.max`` where several nodes share it;
    graph inputs and outputs keep their names).

    Short names, readable at a glance: the exporter's were 4 % of a MobileNetV2 x0.5 INT8 file.
    """
    from onnx import defs

    g.commit()  # drops initializers nothing reads (the float weights), whose names are free again
    keep = {i.name for i in g.g.input} | g.outputs | {t for t in g.inits if not t.startswith("/")}
    taken = set(keep)
    renamed: dict[str, str] = {}

    def claim(old: str, base: str) -> None:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        renamed[old] = name

    node_names = {n.name for n in g.nodes if not _quantizer_name(n)}
    for node in g.nodes:
        quantizer = _quantizer_name(node) if node.op_type in ("QuantizeLinear", "DequantizeLinear") else ""
        if quantizer:
            # unique: the output quantizers of several layers in one scope (adds in a module's own forward) share it
            base = node.name = f"/{quantizer}/{'Q' if node.op_type == 'QuantizeLinear' else 'DQ'}"
            k = 1
            while node.name in node_names:
                k += 1
                node.name = f"{base}_{k}"
            node_names.add(node.name)
            base = f"{quantizer}.codes" if node.op_type == "QuantizeLinear" else quantizer
        elif path := module_path(node.name):
            base = f"{path}.{node.op_type}"
        else:
            continue
        for k, out in enumerate(o for o in node.output if o and o not in keep):
            claim(out, base if k == 0 else f"{base}.{k}")
        schema = defs.get_schema(node.op_type) if defs.has(node.op_type) else None
        for k, i in enumerate(reads(node)):  # the exporter's constants ("/features/.../Constant_output_0")
            if i in g.inits and i not in keep and i not in renamed:
                if k >= len(node.input):  # read by a subgraph (an If's branch) from this graph
                    role = "outer"
                else:
                    role = schema.inputs[min(k, len(schema.inputs) - 1)].name if schema else str(k)
                claim(i, f"{base}.{role}" if len(g.consumers.get(i, [])) == 1 else f"{node.op_type}.{role}")
    for t in g.g.initializer:
        t.name = renamed.get(t.name, t.name)
    for node in g.nodes:
        rename_reads(node, renamed)
        node.output[:] = [renamed.get(o, o) for o in node.output]
    g.refresh()


def topological_sort(g: EditGraph) -> None:
    """Reorder nodes so that each comes after the producers of its inputs (Kahn's algorithm)."""
    available = set(g.inits) | {i.name for i in g.g.input} | {""}
    pending = {id(n): {i for i in reads(n) if i and i not in available} for n in g.nodes}
    order, ready = [], [n for n in g.nodes if not pending[id(n)]]
    waiting = {id(n): n for n in g.nodes if pending[id(n)]}
    readers: dict[str, list] = {}
    for n in waiting.values():
        for i in pending[id(n)]:
            readers.setdefault(i, []).append(n)
    while ready:
        n = ready.pop(0)
        order.append(n)
        for o in n.output:
            for r in readers.get(o, []):
                pending[id(r)].discard(o)
                if not pending[id(r)] and id(r) in waiting:
                    ready.append(waiting.pop(id(r)))
    if waiting:
        raise QFrameError(f"the ONNX graph has a cycle or a missing input at {len(waiting)} nodes")
    g.nodes = order
    g.refresh()


def standard_form(model, *, int4_weights: Collection[str] = ()) -> dict[str, int]:
    """Rewrite an exported Q/DQ graph (``onnx.ModelProto``) into qframe's standard form, in place.

    See the module docstring. ``int4_weights``: names of weight initializers to store as INT4
    (opset 21). Returns counts of what changed: ``weights`` stored as codes, ``transposed``
    weights, quantized layer ``outputs`` and activation Q/DQ pairs given ``own_qparams``.
    """
    import onnx

    inline_constants(model)
    g = EditGraph(model)
    counts = {"weights": _store_weight_codes(g, set(int4_weights))}
    counts["transposed"] = _fold_weight_transposes(g)
    outputs = _quantize_layer_outputs(g)
    counts["outputs"] = len(outputs)
    counts["own_qparams"] = _own_qparams(g, outputs)
    _name_tensors(g)
    topological_sort(g)
    g.commit()
    del model.graph.value_info[:]  # shapes of the exporter's graph; runtimes infer them again
    onnx.checker.check_model(model)
    log.debug("standard Q/DQ form: %s", counts)
    return counts
