"""Editing exported Q/DQ graphs, and int8 weight initializers.

``torch.onnx.export`` writes a quantized weight as a float initializer feeding QuantizeLinear ->
DequantizeLinear. :func:`quantize_weights` stores the integer codes instead (one initializer read
by DequantizeLinear alone): a quarter of the size, the weight codes fixed in the file rather than
recomputed by every runtime, and the form TensorRT's own tools (ModelOpt) export. A sub-8-bit
weight becomes an int8 initializer holding its clipped levels (e.g. [-8, 7] for 4 bits).

:class:`EditGraph` is the small mutable view of a graph the rewrites here and in
:mod:`qframe.export.ort_form` share.
"""

from __future__ import annotations

import logging

import numpy as np

from qframe.errors import QFrameError
from qframe.export.lint import attr  # noqa: F401  (re-exported for qframe.export.ort_form)

log = logging.getLogger(__name__)


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
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)

    def const(self, name: str):
        """The numpy value of initializer ``name``, else None."""
        t = self.inits.get(name)
        return None if t is None else self._np.to_array(t)

    def add_init(self, array: np.ndarray, name: str, *, exact: bool = False) -> str:
        """Add an initializer; its name is ``name``, made unique unless ``exact``."""
        base, k = name, 0
        while not exact and (name in self.inits or name in self.producer):
            k += 1
            name = f"{base}_{k}"
        t = self._np.from_array(array, name)
        self.g.initializer.append(t)
        self.inits[name] = t
        return name

    def rename_input(self, old: str, new: str) -> None:
        """Point every reader of ``old`` at ``new`` (call :meth:`refresh` before looking readers up again)."""
        for n in self.consumers.get(old, []):
            for i, v in enumerate(n.input):
                if v == old:
                    n.input[i] = new

    def remove(self, nodes) -> None:
        drop = {id(n) for n in nodes}
        self.nodes = [n for n in self.nodes if id(n) not in drop]
        self.refresh()

    def commit(self) -> None:
        """Write the edited node list back into the model and drop initializers no node reads."""
        del self.g.node[:]
        self.g.node.extend(self.nodes)
        self.nodes = list(self.g.node)
        self.prune()

    def prune(self) -> None:
        """Drop initializers no node reads (raw float weights once their codes are stored)."""
        used = {i for n in self.nodes for i in n.input} | self.outputs
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        graph_inputs = [i for i in self.g.input if i.name not in self.inits or i.name in used]
        del self.g.input[:]
        self.g.input.extend(graph_inputs)
        self.refresh()


def inline_constants(model) -> None:
    """Constant nodes become initializers and Identity nodes over constants disappear, in place.

    The TorchScript exporter writes scales and zero points as Constant nodes and repeats shared
    ones through Identity nodes; one initializer per value makes the graph plain to read and edit.
    """
    from onnx import numpy_helper

    g = EditGraph(model)
    dropped = []
    for node in list(g.nodes):
        if node.op_type == "Constant" and node.output[0] not in g.outputs:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is None:  # value_float(s) / value_int(s) forms: leave them
                continue
            g.add_init(numpy_helper.to_array(value), node.output[0], exact=True)
            dropped.append(node)
        elif node.op_type == "Identity" and node.input[0] in g.inits and node.output[0] not in g.outputs:
            g.rename_input(node.output[0], node.input[0])
            dropped.append(node)
    g.remove(dropped)
    g.commit()
    # a chain Identity -> Identity over a Constant resolves in a second pass
    if any(n.op_type == "Identity" and n.input[0] in g.inits and n.output[0] not in g.outputs for n in g.nodes):
        inline_constants(model)


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


def quantize_weights(model) -> int:
    """Store every quantized weight as integer codes read by its DequantizeLinear, in place.

    Each QuantizeLinear whose input is a float initializer is removed; its DequantizeLinear
    consumers read a new initializer ``<weight>_quantized`` holding the codes. Returns how many
    weights were converted.
    """
    inline_constants(model)
    g = EditGraph(model)
    dropped = []
    for q in [n for n in g.nodes if n.op_type == "QuantizeLinear"]:
        w = g.const(q.input[0])
        if w is None or w.dtype.kind != "f":
            continue
        consumers = g.consumers.get(q.output[0], [])
        if not consumers or any(c.op_type != "DequantizeLinear" for c in consumers) or q.output[0] in g.outputs:
            continue
        scale = g.const(q.input[1])
        zp = g.const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None:
            continue
        codes = g.add_init(_codes(w, scale, zp, attr(q, "axis", 1)), f"{q.input[0]}_quantized")
        g.rename_input(q.output[0], codes)
        dropped.append(q)
    g.remove(dropped)
    g.commit()
    log.debug("stored %d quantized weights as integer initializers", len(dropped))
    return len(dropped)


def topological_sort(g: EditGraph) -> None:
    """Reorder nodes so that each comes after the producers of its inputs (Kahn's algorithm)."""
    nodes = g.nodes
    available = set(g.inits) | {i.name for i in g.g.input} | {""}
    pending = {id(n): [i for i in n.input if i and i not in available] for n in nodes}
    order, done = [], set()
    ready = [n for n in nodes if not pending[id(n)]]
    produced = set(available)
    waiting = {id(n): n for n in nodes if pending[id(n)]}
    while ready:
        n = ready.pop(0)
        order.append(n)
        done.add(id(n))
        produced.update(o for o in n.output if o)
        for key in list(waiting):
            node = waiting[key]
            if all(i in produced for i in pending[key]):
                ready.append(node)
                del waiting[key]
    if waiting:
        raise QFrameError(f"the rewritten ONNX graph has a cycle or a missing input at {len(waiting)} nodes")
    g.nodes = order
    g.refresh()


def dq_source(g: EditGraph, name: str):
    """The DequantizeLinear node that produces ``name``, else None."""
    node = g.producer.get(name)
    return node if node is not None and node.op_type == "DequantizeLinear" else None


def drop_dead_nodes(g: EditGraph) -> None:
    """Remove nodes none of whose outputs is read (e.g. a weight DequantizeLinear whose layer got float weights)."""
    while dead := [n for n in g.nodes if not any(o in g.consumers or o in g.outputs for o in n.output if o)]:
        g.remove(dead)
