"""Static lint of an ONNX graph against TensorRT's explicit-quantization (Q/DQ) rules.

TensorRT parses QuantizeLinear/DequantizeLinear as IQuantizeLayer/IDequantizeLayer and accepts
only symmetric signed int8 (zero point 0), per-tensor activation scales and per-channel weight
scales along the output-channel axis. A graph that breaks these rules either fails to parse or
silently runs layers unquantized, so the lint catches it before anyone copies it to a Jetson.

Sources: NVIDIA TensorRT Developer Guide, "Working with Quantized Types" / "Explicit
Quantization" (TensorRT 8.5-10.x) and the onnx-tensorrt operator support matrix; the facts are
summarised in the project DESIGN.md ("TensorRT and DLA facts").
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from qframe.errors import QFrameError, first_line

log = logging.getLogger(__name__)

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Layers TensorRT runs in int8 only when both the data and the weight input come from a DQ.
QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# The TensorRT ONNX parser has no importer for these integer-arithmetic ops.
REJECTED_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear")
# Shape-only ops TensorRT moves Q/DQ across, so a DQ behind them still quantizes the layer.
_PASS_THROUGH = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
# Opset 13 brings per-channel Q/DQ (``axis``); 21 is the newest the parser imports (TRT 10.x).
MIN_OPSET, MAX_OPSET = 13, 21


def onnx_model(model, verb: str):
    """``model`` as an ``onnx.ModelProto``: itself, or read from a path; one line naming ``verb`` (the function it
    was given to) for a missing or unreadable file or another type."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise QFrameError(f"{verb}: ONNX file {str(path)!r} {what}; valid: the path of an .onnx file or an "
                              "onnx.ModelProto")
        try:
            return onnx.load(str(path))
        except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX file
            raise QFrameError(f"{verb}: {str(path)!r} is not an ONNX model ({first_line(exc)})") from exc
    raise QFrameError(f"{verb} needs an ONNX model (a path or an onnx.ModelProto), got {type(model).__name__}")


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` id, the offending ``node`` name and a one-line ``message``.

    ``severity`` is ``"warning"`` for a layer the recipe chose to keep float (``chosen_float`` of
    :func:`lint_tensorrt`): TensorRT runs it in FP16/FP32, as asked; ``"error"`` otherwise.
    """

    rule: str
    node: str
    message: str
    severity: str = "error"


class Graph:
    """Lookup tables over an ONNX graph: producers, consumers and constant values.

    ``nested``: the nodes and initializers of the If / Loop / Scan subgraphs too (each subgraph's nodes
    right after the node that holds them; ``within`` maps a nested node's id to that node), so that the
    layers of a ``torch.jit.script_if_tracing`` function's branches are checked like the others.
    """

    def __init__(self, model, nested: bool = False):
        from onnx import numpy_helper

        self.model = model
        g = model.graph
        self.within: dict[int, object] = {}
        self.nodes = []
        inits = list(g.initializer)
        todo = [(n, None) for n in reversed(g.node)]
        while todo:  # pre-order, iterative
            node, outer = todo.pop()
            self.nodes.append(node)
            if outer is not None:
                self.within[id(node)] = outer
            if nested and node.attribute:
                for sub in reversed(subgraphs(node)):
                    inits += sub.initializer
                    todo += [(n, node) for n in reversed(sub.node)]
        self.init = {t.name: t for t in inits}
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in reads(n):
                self.consumers.setdefault(i, []).append(n)
        self._np = numpy_helper
        self._const_cache: dict[str, object] = {}
        self._constant: dict[bool, dict[str, bool]] = {}

    def value(self, name: str):
        """The numpy value of a constant tensor (initializer or Constant output), else None."""
        if not name:
            return None
        if name in self._const_cache:
            return self._const_cache[name]
        val = None
        if name in self.init:
            val = self._np.to_array(self.init[name])
        elif name in self.producer and self.producer[name].op_type == "Constant":
            for a in self.producer[name].attribute:
                if a.name == "value":
                    val = self._np.to_array(a.t)
        self._const_cache[name] = val
        return val

    def elem_type(self, name: str) -> int | None:
        """The ONNX element type of a constant tensor, else None."""
        if name in self.init:
            return self.init[name].data_type
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return a.t.data_type
        return None

    def is_constant(self, name: str, shapes: bool = False) -> bool:
        """True when ``name`` is computed from initializers/Constants only (a weight chain); ``shapes``: or
        from the shapes of other tensors (Shape, Size), never their values (a position table sized by a
        feature map)."""
        known = self._constant.setdefault(shapes, {})
        stack = [name]
        while stack:  # post-order over the producers, iterative: an activation's chain is as deep as the graph
            t = stack[-1]
            if t in known:
                stack.pop()
                continue
            node = self.producer.get(t)
            if t in self.init or (node is not None and (node.op_type == "Constant" or
                                                        (shapes and node.op_type in ("Shape", "Size")))):
                known[t] = True
            elif node is None:  # a graph input
                known[t] = False
            elif pending := [i for i in reads(node) if i and i not in known]:
                stack.extend(pending)
                continue
            else:
                known[t] = all(known[i] for i in reads(node) if i)
            stack.pop()
        return known[name]

    def reads_no_activation(self, node) -> str | None:
        """Why ``node`` is no runtime layer of the network's data, where it reads only constants and tensor
        shapes (a sine position table from a feature map's size), else None."""
        if any(i and not self.is_constant(i, shapes=True) for i in node.input):
            return None
        return "reads no activation (only constants and tensor shapes): it computes in float, where TensorRT does not fold it"

    def source(self, name: str):
        """The node producing ``name``, looking through shape-only pass-through ops."""
        node = self.producer.get(name)
        while node is not None and node.op_type in _PASS_THROUGH:
            node = self.producer.get(node.input[0])
        return node


def subgraphs(node) -> list:
    """The graphs in ``node``'s attributes: an If's branches, a Loop's or Scan's body."""
    return [a.g for a in node.attribute if a.HasField("g")] + [s for a in node.attribute for s in a.graphs]


def outer_reads(graph) -> set[str]:
    """The names that ``graph``'s nodes (in subgraphs of their own too) and outputs read from enclosing scopes.

    ``torch.jit.script_if_tracing`` functions export as If nodes whose branches read the outer graph's
    tensors by name, not through the If's inputs.
    """
    own = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    read = {i for n in graph.node for i in reads(n) if i} | {o.name for o in graph.output}
    return read - own


def reads(node) -> list[str]:
    """The names ``node`` reads: its inputs, then what its subgraphs read from enclosing scopes (sorted)."""
    inner = subgraphs(node) if node.attribute else []
    if not inner:
        return list(node.input)
    return [*node.input, *sorted(set().union(*map(outer_reads, inner)) - set(node.input))]


def rename_reads(node, renamed: dict[str, str]) -> None:
    """Point ``node``'s inputs, and what its subgraphs read from enclosing scopes, at ``renamed``'s new names.

    ONNX names are unique across a graph and its subgraphs, so a subgraph's own names are never in ``renamed``.
    """
    node.input[:] = [renamed.get(i, i) for i in node.input]
    for g in subgraphs(node):
        for n in g.node:
            rename_reads(n, renamed)
        for o in g.output:
            o.name = renamed.get(o.name, o.name)


def attr(node, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (ints, floats, strings, lists), or ``default``."""
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def default_opset(model) -> int | None:
    """The opset version of the default ONNX domain."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return None


def _label(node) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _check_qdq(g: Graph, node, out: list[Violation]) -> None:
    """Zero point, dtype and per-channel rules for one QuantizeLinear/DequantizeLinear."""
    from onnx import TensorProto

    name = _label(node)
    zp = node.input[2] if len(node.input) > 2 else ""
    blocked = attr(node, "block_size", 0) not in (0, None)
    int4_ok = (node.op_type == "DequantizeLinear" and blocked and g.is_constant(node.input[0]))
    if zp:
        dtype = g.elem_type(zp)
        zval = g.value(zp)
        if zval is not None and zval.size and (zval.astype("int64") != 0).any():
            out.append(Violation("qdq-zero-point", name, f"{name}: non-zero zero point; TensorRT "
                                 "takes symmetric quantization only (zero point 0)"))
    elif node.op_type == "QuantizeLinear":
        # Without a zero point QuantizeLinear outputs uint8 unless opset 21's output_dtype says otherwise.
        dtype = attr(node, "output_dtype", 0) or TensorProto.UINT8
    else:
        dtype = g.elem_type(node.input[0])
    if dtype is not None and dtype != TensorProto.INT8:
        is_int4 = dtype in (TensorProto.INT4, getattr(TensorProto, "UINT4", -1))
        if not (dtype == TensorProto.INT4 and int4_ok):
            tname = TensorProto.DataType.Name(dtype)
            hint = ("TensorRT takes INT4 only for weight-only block-quantized weights (opset 17 stores 4-bit "
                    "levels in int8)" if is_int4 else "TensorRT wants signed int8")
            out.append(Violation("qdq-dtype", name, f"{name}: dtype {tname}; {hint}"))
    scale = g.value(node.input[1]) if len(node.input) > 1 else None
    per_channel = scale is not None and scale.ndim >= 1 and scale.size > 1
    if per_channel and not blocked and not g.is_constant(node.input[0]):
        out.append(Violation("qdq-per-channel-activation", name, f"{name}: per-channel activation "
                             "scales; TensorRT takes per-tensor scales on activations"))


def _weight_axis(layer, rank: int) -> tuple[int, ...]:
    """Valid per-channel axes (non-negative) for a weight of rank ``rank`` read by ``layer``."""
    if layer.op_type == "Conv":
        return (0,)
    if layer.op_type == "ConvTranspose":  # ONNX layout (C_in, C_out/groups, k...)
        return (1,)
    if layer.op_type == "Gemm":
        return (0,) if attr(layer, "transB", 0) else (1,)
    return (rank - 1,)  # MatMul: (K, N) weight, N is the output channel


def _shape_ops(g: Graph, name: str) -> list:
    """The pass-through nodes between tensor ``name`` and the node that produces its data, nearest last."""
    chain = []
    node = g.producer.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        chain.append(node)
        node = g.producer.get(node.input[0])
    return chain[::-1]  # in data-flow order: the first applies to the DQ output


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _reshaped_axis(axis: int, before: list[int], after: list[int]) -> int | None:
    """Where axis ``axis`` of a tensor of shape ``before`` lies in its reshape to ``after`` (None: merged or split)."""
    lead = _prod(before[:axis])
    for j, d in enumerate(after):
        if _prod(after[:j]) == lead and d == before[axis]:
            return j
    return None


def follow_axis(g: Graph, axis: int, shape: list[int], chain: list) -> tuple[int | None, list[int] | None]:
    """Axis ``axis`` of a constant of shape ``shape`` after the shape ops ``chain`` (Transpose, Reshape,
    Flatten, Squeeze, Unsqueeze, Identity), with the resulting shape; ``(None, None)`` where it cannot
    be told (an axis merged with another, a shape computed at run time)."""
    shape = list(shape)
    for node in chain:
        op = node.op_type
        if op == "Identity":
            continue
        if op == "Transpose":
            perm = list(attr(node, "perm", None) or range(len(shape) - 1, -1, -1))
            axis, shape = perm.index(axis), [shape[p] for p in perm]
            continue
        if op == "Reshape":
            target = g.value(node.input[1]) if len(node.input) > 1 else None
            if target is None:
                return None, None
            new = [shape[i] if int(d) == 0 else int(d) for i, d in enumerate(target.tolist())]
            if -1 in new:
                known = _prod(d for d in new if d != -1)
                new[new.index(-1)] = _prod(shape) // max(known, 1)
        elif op == "Flatten":
            k = attr(node, "axis", 1)
            k = k + len(shape) if k < 0 else k
            new = [_prod(shape[:k]), _prod(shape[k:])]
        elif op == "Squeeze":
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                v = g.value(node.input[1])
                axes = None if v is None else v.tolist()
            axes = [a + len(shape) if a < 0 else a for a in (axes or [i for i, d in enumerate(shape) if d == 1])]
            new = [d for i, d in enumerate(shape) if i not in axes]
        elif op == "Unsqueeze":
            axes = attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                v = g.value(node.input[1])
                axes = None if v is None else v.tolist()
            if axes is None:
                return None, None
            rank = len(shape) + len(axes)
            axes = sorted(a + rank if a < 0 else a for a in axes)
            new, it = [], iter(shape)
            for i in range(rank):
                new.append(1 if i in axes else next(it))
        else:
            return None, None
        axis = _reshaped_axis(axis, shape, new)
        if axis is None:
            return None, None
        shape = new
    return axis, shape


def _check_layer(g: Graph, node, out: list[Violation]) -> None:
    """Q/DQ on both inputs, and the per-channel weight axis, for one quantizable layer."""
    name = _label(node)
    weight_src = g.source(node.input[1]) if len(node.input) > 1 else None
    # weight-only block quantization (INT4 Gemm / MatMul weights, TensorRT >= 10): float data input
    weight_only = (weight_src is not None and weight_src.op_type == "DequantizeLinear"
                   and attr(weight_src, "block_size", 0) not in (0, None) and node.op_type in ("Gemm", "MatMul"))
    for idx, what in ((0, "data"), (1, "weight")):
        if len(node.input) <= idx or not node.input[idx] or (idx == 0 and weight_only):
            continue
        src = g.source(node.input[idx])
        if src is None or src.op_type != "DequantizeLinear":
            out.append(Violation("qdq-missing", name, f"missing Q/DQ on input of {node.op_type} "
                                 f"{name} ({what} input {node.input[idx]!r})"))
            continue
        if idx != 1:
            continue
        scale = g.value(src.input[1]) if len(src.input) > 1 else None
        if scale is None or scale.ndim == 0 or scale.size <= 1 or attr(src, "block_size", 0):
            continue
        wval = g.value(src.input[0])
        rank = wval.ndim if wval is not None else 4
        axis = attr(src, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        chain = _shape_ops(g, node.input[1])
        if chain:  # the scales' axis as the layer sees it, through Transpose / Reshape
            if wval is None:
                continue
            axis, shape = follow_axis(g, axis, list(wval.shape), chain)
            if axis is None:
                continue  # cannot be told from the graph: no finding rather than a false one
            rank = len(shape)
        valid = _weight_axis(node, rank)
        if axis not in valid:
            through = f" (after {', '.join(n.op_type for n in chain)})" if chain else ""
            out.append(Violation("qdq-weight-axis", _label(src), f"{_label(src)}: per-channel weight "
                                 f"scales on axis {axis}{through} of {node.op_type} {name}; TensorRT wants "
                                 f"the output-channel axis {valid[0]}"))


def chosen_reason(chosen_float: dict[str, str] | None, node) -> str | None:
    """The reason the recipe keeps the layer of ``node`` float (its module or a module around it is in
    ``chosen_float``, by qualified name, or the op itself as ``"module::OpType"``), else None."""
    if not chosen_float:
        return None
    from qframe.export.qdq import module_path

    exact = module_path(node.name) if node.name else ""
    # a module called more than once is scoped "conv1_1", "conv1_2" ... in the exporter's later calls
    for path in dict.fromkeys((exact, re.sub(r"_\d+(?=\.|$)", "", exact))):
        op = f"{path}::{node.op_type}"  # an op the recipe keeps float (placement's einsums), not its whole module
        if op in chosen_float:
            return chosen_float[op]
        while path:
            if path in chosen_float:
                return chosen_float[path]
            path = path.rpartition(".")[0]
    return chosen_float.get("")


def lint_tensorrt(model, chosen_float: dict[str, str] | None = None) -> list[Violation]:
    """Every TensorRT explicit-quantization rule ``model`` breaks; [] for a clean graph.

    ``chosen_float`` maps qualified module names to the reason the recipe keeps them float (a
    ``keep_float`` rule, a weight-only recipe, a layer qframe's registry leaves float: see
    :func:`qframe.export.coverage.chosen_float_layers`); a missing Q/DQ on such a layer is a
    ``severity="warning"`` finding that names the reason, not an error.
    """
    model = onnx_model(model, "check_tensorrt")
    g = Graph(model, nested=True)
    out: list[Violation] = []
    opset = default_opset(model)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        out.append(Violation("opset", "<model>", f"unsupported opset {opset} of the default "
                             f"domain; TensorRT Q/DQ needs {MIN_OPSET}..{MAX_OPSET}"))
    has_qdq = any(n.op_type in QDQ_OPS for n in g.nodes)
    for node in g.nodes:
        if node.op_type in REJECTED_OPS:
            out.append(Violation("rejected-op", _label(node), f"{_label(node)}: {node.op_type} is "
                                 "rejected by the TensorRT ONNX parser; export Q/DQ instead"))
        elif node.op_type in QDQ_OPS:
            _check_qdq(g, node, out)
        elif has_qdq and node.op_type in QUANTIZABLE_OPS:
            found: list[Violation] = []
            _check_layer(g, node, found)
            why = chosen_reason(chosen_float, node) or g.reads_no_activation(node)
            if why is not None and any(v.rule == "qdq-missing" for v in found):  # one warning per layer
                found = [v for v in found if v.rule != "qdq-missing"] + [Violation(
                    "qdq-missing", _label(node), f"{node.op_type} {_label(node)} runs in FP16/FP32: {why}", "warning")]
            out.extend(found)
    log.debug("TensorRT lint: %d findings", len(out))
    return out


def errors(found: list[Violation]) -> list[Violation]:
    """The findings of :func:`lint_tensorrt` that are errors (not warnings)."""
    return [v for v in found if v.severity == "error"]


def check_tensorrt(model, *, shown: int = 3, chosen_float: dict[str, str] | None = None) -> list[Violation]:
    """Raise :class:`QFrameError` when ``model`` breaks any TensorRT Q/DQ rule; return the warnings
    (layers the recipe chose to keep float, see :func:`lint_tensorrt`)."""
    everything = lint_tensorrt(model, chosen_float)
    found = errors(everything)
    if found:
        first = "; ".join(v.message for v in found[:shown])
        more = f"; ... ({len(found) - shown} more)" if len(found) > shown else ""
        raise QFrameError(f"ONNX graph breaks TensorRT rules: {len(found)} violations: {first}{more}")
    return [v for v in everything if v.severity == "warning"]
