"""Static DLA placement report: which layers of an ONNX graph TensorRT can run on the DLA.

On Jetson AGX Orin, TensorRT with ``allowGPUFallback`` runs each layer the DLA supports on the
DLA and the rest on the GPU; every GPU<->DLA edge costs a reformat and every DLA run becomes a
loadable (16 per core at most). This report predicts that split from the graph alone, with the
rules in :mod:`qframe.export.dla_rules`, so a model can be reshaped before it meets a Jetson.

Q/DQ nodes are not layers here: for the DLA they become calibration scales (JetPack's TensorRT
does not run Q/DQ on the DLA), so they are "folded", as are constant-only subgraphs.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from qframe.errors import QFrameError, one_of
from qframe.export import dla_rules as R
from qframe.export.lint import QDQ_OPS, Graph, attr, default_opset, onnx_model

log = logging.getLogger(__name__)

DLA, GPU, FOLDED = "DLA", "GPU", "folded"
TRIVIAL_OPS = ("Identity", "Constant")  # grouped in the markdown table, not listed one by one

# More DLA rules of the same guide, beside the ranges in dla_rules. Convolution, Activation, ElementWise and
# Pooling are "2D only" (TensorRT's ONNX parser lifts a 1-D Conv or pooling to 2-D; a 3-D one stays 3-D).
MAX_SPATIAL_DIMS = 2
MAX_RANK = 2 + MAX_SPATIAL_DIMS        # N, C and two spatial dims
CHW_DIMS = 3                           # the DLA reads the last three dims as C, H, W ("NPQRS": batch N*P)
# Resize (TensorRT's IResizeLayer notes on the DLA): scales exactly [1, 1, sh, sw] with integer sh, sw in these
# ranges, and only these coordinate transforms (with their nearest rounding); the ONNX parser maps half_pixel
# and pytorch_half_pixel to HALF_PIXEL, round_prefer_floor / _ceil to HALF_DOWN / HALF_UP.
RESIZE_SCALES = {"nearest": (1, 32), "linear": (1, 4)}
RESIZE_TRANSFORMS = {
    "nearest": {("asymmetric", "floor"), ("half_pixel", "round_prefer_floor"), ("half_pixel", "round_prefer_ceil")},
    "linear": {"half_pixel", "pytorch_half_pixel"},
}


@dataclass
class DlaRow:
    """Placement of one node; ``reason`` says why it is not on the DLA (empty on the DLA)."""

    name: str
    op: str
    placement: str
    reason: str = ""
    note: str = ""


@dataclass
class DlaReport:
    """Per-node placement plus the DLA subgraph (loadable) and GPU<->DLA boundary counts."""

    rows: list[DlaRow]
    subgraphs: int
    boundaries: int
    precision: str
    source: str = R.SOURCE
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> DlaRow:
        """The row of node ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise one_of("node", name, [r.name for r in self.rows])

    def to_dict(self) -> dict:
        """Plain-data form (JSON-ready)."""
        return asdict(self)

    def to_markdown(self) -> str:
        """A summary line, a table with one row per layer, and one row per group of trivial nodes
        (Q/DQ and constants folded away, identities) with their count, at the end."""
        on_dla = sum(r.placement == DLA for r in self.rows)
        layers = sum(r.placement != FOLDED for r in self.rows)
        lines = [f"DLA ({self.precision}): {on_dla}/{layers} layers, {self.subgraphs} subgraphs, "
                 f"{self.boundaries} GPU<->DLA boundaries. Rules: {self.source}.", "",
                 "| node | op | placement | reason |", "|---|---|---|---|"]
        groups: dict[tuple[str, str, str], int] = {}
        for r in self.rows:
            why = "; ".join(x for x in (r.reason, r.note) if x).replace("|", "/")
            if r.placement == FOLDED or r.op in TRIVIAL_OPS:
                groups[(r.op, r.placement, why)] = groups.get((r.op, r.placement, why), 0) + 1
                continue
            lines.append(f"| {r.name} | {r.op} | {r.placement} | {why} |")
        for (op, placement, why), count in groups.items():
            lines.append(f"| ({count} nodes) | {op} | {placement} | {why} |")
        return "\n".join(lines)


def _in_range(what: str, values, bounds) -> str:
    lo, hi = bounds
    bad = [int(v) for v in values if not lo <= v <= hi]
    return f"{what} {bad} outside [{lo}, {hi}]" if bad else ""


class _Ctx:
    """Graph tables plus inferred shapes (None for unknown dims)."""

    def __init__(self, model):
        import onnx

        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception as exc:  # a partly inferable graph still gets a report
            log.warning("shape inference failed (%s); using the shapes stored in the graph", exc)
        self.g = Graph(model)
        self.opset = default_opset(model) or 13
        self.shapes: dict[str, list] = {}
        gr = model.graph
        for vi in list(gr.input) + list(gr.value_info) + list(gr.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in t.shape.dim]
        for t in gr.initializer:
            self.shapes[t.name] = list(t.dims)

    def shape(self, name: str):
        return self.shapes.get(name)

    def rank(self, name: str, default: int = 4) -> int:
        s = self.shape(name)
        return len(s) if s is not None else default

    def axis(self, node, default: int) -> int:
        a = attr(node, "axis", default)
        return a + self.rank(node.input[0]) if a < 0 else a


def _pads(node, kernel, dilations) -> list[int]:
    pads = attr(node, "pads")
    if pads:
        return list(pads)
    if attr(node, "auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        # stride-1 estimate: total padding (k-1)*d split over both sides
        half = [((k - 1) * d + 1) // 2 for k, d in zip(kernel, dilations)]
        return half + half
    return [0] * (2 * len(kernel))


def _conv(c: _Ctx, node) -> str:
    w = c.shape(node.input[1]) if len(node.input) > 1 else None
    if w is None or any(d is None for d in w):
        return "weight shape unknown"
    kernel = attr(node, "kernel_shape") or w[2:]
    n = len(kernel)
    if n > MAX_SPATIAL_DIMS:
        return f"{n}-D {'deconvolution' if node.op_type == 'ConvTranspose' else 'convolution'} (DLA: 2-D only)"
    strides = attr(node, "strides") or [1] * n
    dil = attr(node, "dilations") or [1] * n
    group = attr(node, "group", 1)
    pads = _pads(node, kernel, dil)
    if node.op_type == "ConvTranspose":
        out_ch = w[1] * group
        rules = R.DECONV
        extra = [("grouped deconvolution", group > 1), ("dilated deconvolution", any(d > 1 for d in dil)),
                 ("padded deconvolution", any(p != 0 for p in pads))]
        checks = [_in_range("kernel", kernel, rules["kernel"]), _in_range("stride", strides, rules["stride"])]
    else:
        out_ch = w[0]
        rules = R.CONV
        extra = [("padding not smaller than kernel", any(p >= kernel[i % n] for i, p in enumerate(pads)))]
        checks = [_in_range("kernel", kernel, rules["kernel"]), _in_range("stride", strides, rules["stride"]),
                  _in_range("padding", pads, rules["padding"]), _in_range("dilation", dil, rules["dilation"])]
    checks.append(_in_range("output channels", [out_ch], rules["out_channels"]))
    checks += [what for what, bad in extra if bad]
    return "; ".join(x for x in checks if x)


def _gemm(c: _Ctx, node) -> str:
    if attr(node, "transA", 0):
        return "Gemm with transA is not a DLA fully-connected layer"
    if not c.g.is_constant(node.input[1]):
        return "Gemm weight is not a constant (not a fully-connected layer)"
    b = c.shape(node.input[1])
    if b is None or len(b) != 2 or None in b:
        return "Gemm weight shape unknown"
    out_ch = b[0] if attr(node, "transB", 0) else b[1]
    return _in_range("output channels", [out_ch], R.CONV["out_channels"])


def _pool(c: _Ctx, node) -> str:
    kernel = attr(node, "kernel_shape") or []
    n = len(kernel)
    if n > MAX_SPATIAL_DIMS:
        return f"{n}-D pooling (DLA: 2-D only)"
    return "; ".join(x for x in (
        _in_range("pool window", kernel, R.POOL["window"]),
        _in_range("pool stride", attr(node, "strides") or [1] * n, R.POOL["stride"]),
        _in_range("pool padding", attr(node, "pads") or [0] * (2 * n), R.POOL["padding"])) if x)


def _global_pool(c: _Ctx, node, notes: list[str]) -> str:
    s = c.shape(node.input[0])
    if s is not None and len(s) > MAX_RANK:
        return f"{len(s) - 2}-D pooling (DLA: 2-D only)"
    if s is None or len(s) < 3 or any(d is None for d in s[2:]):
        notes.append("spatial size unknown: assumed to fit the 8x8 pooling window")
        return ""
    return _in_range("global pool window", s[2:], R.POOL["window"])


def _clip(c: _Ctx, node) -> str:
    lo = c.g.value(node.input[1]) if len(node.input) > 1 and node.input[1] else attr(node, "min")
    hi = c.g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else attr(node, "max")
    if lo is None or float(lo) != 0.0:
        return f"Clip min {lo} is not 0 (DLA has clipped ReLU only)"
    if hi is not None and not R.CLIP_MAX[0] <= float(hi) <= R.CLIP_MAX[1]:
        return f"Clip max {float(hi)} outside {list(R.CLIP_MAX)}"
    return ""


def _dq_scale(c: _Ctx, name: str):
    node = c.g.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        return c.g.value(node.input[1])
    return None


def _elementwise(c: _Ctx, node, precision: str) -> str:
    if precision != "int8" or len(node.input) < 2:
        return ""
    a, b = (_dq_scale(c, i) for i in node.input[:2])
    if a is not None and b is not None and (a.shape != b.shape or (abs(a - b) > 1e-6 * abs(a).max()).any()):
        return f"INT8 {node.op_type} needs equal input scales ({a.ravel()[:1]} vs {b.ravel()[:1]})"
    return ""


def _resize(c: _Ctx, node) -> str:
    mode = attr(node, "mode", "nearest")
    if mode not in R.RESIZE_MODES:
        return f"Resize mode {mode!r} (DLA: nearest or linear)"
    coord = attr(node, "coordinate_transformation_mode", "half_pixel")
    rounding = attr(node, "nearest_mode", "round_prefer_floor")
    if mode == "nearest" and (coord, rounding) not in RESIZE_TRANSFORMS[mode]:
        return (f"nearest Resize with coordinate_transformation_mode {coord!r}, nearest_mode {rounding!r} (DLA: "
                "asymmetric with floor, or half_pixel with round_prefer_floor / round_prefer_ceil)")
    if mode == "linear" and coord not in RESIZE_TRANSFORMS[mode]:
        return f"linear Resize with coordinate_transformation_mode {coord!r} (DLA: half_pixel, align_corners=False)"
    scales = c.g.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if scales is None or scales.size == 0:
        sizes = c.g.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        x = c.shape(node.input[0])
        if sizes is None or x is None or None in x:
            return "Resize scales unknown"
        scales = sizes.astype("float64") / [max(d, 1) for d in x]
    s = [float(v) for v in scales.ravel()]
    if len(s) != MAX_RANK or s[:2] != [1.0, 1.0]:
        return f"Resize scales {s} (DLA: 4-D, [1, 1, height, width])"
    if any(v != int(v) or v < 1 for v in s[2:]):
        return f"Resize scales {s} are not integers >= 1"
    return _in_range(f"{mode} Resize scale", s[2:], RESIZE_SCALES[mode])


def _concat(c: _Ctx, node) -> str:
    rank, axis = c.rank(node.input[0]), c.axis(node, 1)
    if rank < CHW_DIMS:
        return f"Concat on axis {axis} of a rank-{rank} tensor (DLA: the C axis of C, H, W only)"
    channel = rank - CHW_DIMS  # 1 for [N, C, H, W]; 0 for a rank-3 [C, H, W] (tokens [B, T, D] included)
    return "" if axis == channel else f"Concat on axis {axis} of a rank-{rank} tensor, not the channel axis {channel}"


def _rank(c: _Ctx, node) -> int:
    """Rank of ``node``'s output where known, else of its first input (0 when neither is)."""
    for name in (node.output[0], node.input[0] if node.input else ""):
        if (s := c.shape(name)) is not None:
            return len(s)
    return 0


def _node_reason(c: _Ctx, node, precision: str, notes: list[str]) -> str:
    """Why ``node`` cannot run on the DLA ("" when it can)."""
    op = node.op_type
    if op in R.EXPLICIT_GPU:
        return R.EXPLICIT_GPU[op]
    if op in ("Conv", "ConvTranspose"):
        return _conv(c, node)
    if op == "Gemm":
        return _gemm(c, node)
    if op in ("MaxPool", "AveragePool"):
        return _pool(c, node)
    if op == "GlobalAveragePool":
        return _global_pool(c, node, notes)
    if (op in R.ACTIVATIONS or op in R.ELEMENTWISE) and (rank := _rank(c, node)) > MAX_RANK:
        return f"{op} on a rank-{rank} tensor (DLA: 2-D only, rank <= {MAX_RANK})"
    if op == "Clip":
        return _clip(c, node)
    if op == "PRelu":
        return "" if c.g.is_constant(node.input[1]) else "PRelu slope is not a constant"
    if op in R.ACTIVATIONS or op in R.SCALE_LAYERS:
        return ""
    if op in R.ELEMENTWISE:
        return _elementwise(c, node, precision)
    if op == "Concat":
        return _concat(c, node)
    if op == "Softmax":
        axis = c.axis(node, 1 if c.opset < 13 else -1)
        return "" if axis == R.CHANNEL_AXIS else f"Softmax on axis {axis}, not the channel axis"
    if op == "Resize":
        return _resize(c, node)
    return f"{op} is not a DLA layer"


def _dynamic_inputs(model) -> list[str]:
    init = {t.name for t in model.graph.initializer}
    bad = []
    for vi in model.graph.input:
        if vi.name in init:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                bad.append(f"{vi.name}[{i}]={d.dim_param or '?'}")
    return bad


def dla_report(model, *, precision: str = "int8", max_loadables: int = R.MAX_LOADABLES) -> DlaReport:
    """Predict the DLA/GPU placement of every node of ``model`` (an ``onnx.ModelProto`` or the path of one)."""
    model = onnx_model(model, "dla_report")
    if precision not in R.KNOWN_PRECISIONS:
        raise one_of("precision", precision, R.KNOWN_PRECISIONS)
    if isinstance(max_loadables, bool) or not isinstance(max_loadables, int) or max_loadables < 1:
        raise QFrameError(f"max_loadables must be an integer >= 1, got {max_loadables!r}")
    c = _Ctx(model)
    g = c.g
    whole = ""
    if precision not in R.PRECISIONS:
        whole = f"precision {precision}: DLA runs FP16/INT8 only"
    elif dyn := _dynamic_inputs(model):
        whole = f"dynamic shapes ({', '.join(dyn)}): DLA needs static shapes"
    rows, notes = [], []
    for node in g.nodes:
        name = node.name or node.output[0]
        if node.op_type in QDQ_OPS:
            rows.append(DlaRow(name, node.op_type, FOLDED, note="Q/DQ becomes a DLA calibration scale"))
        elif node.op_type == "Constant" or (node.input and all(g.is_constant(i) for i in node.input if i)):
            rows.append(DlaRow(name, node.op_type, FOLDED, note="constant, folded by TensorRT"))
        else:
            node_notes: list[str] = []
            reason = whole or _node_reason(c, node, precision, node_notes)
            rows.append(DlaRow(name, node.op_type, GPU if reason else DLA, reason, "; ".join(node_notes)))
    # DLA runs in topological order; the ones past the per-core loadable limit go to the GPU.
    runs, prev = 0, None
    for row in rows:
        if row.placement == FOLDED:
            continue
        if row.placement == DLA and prev != DLA:
            runs += 1
        prev = row.placement
        if row.placement == DLA and runs > max_loadables:
            row.placement = GPU
            row.reason = f"more than {max_loadables} DLA loadables (subgraphs) per core"
    subgraphs = min(runs, max_loadables)
    boundaries = _boundaries(g, rows)
    if precision == "int8" and any(r.placement == FOLDED and r.op in QDQ_OPS for r in rows):
        notes.append("JetPack TensorRT runs no Q/DQ on the DLA: export its scales as a calibration cache")
    log.info("DLA report: %d subgraphs, %d boundaries", subgraphs, boundaries)
    return DlaReport(rows, subgraphs, boundaries, precision, notes=notes)


def _boundaries(g: Graph, rows: list[DlaRow]) -> int:
    """GPU<->DLA edges between layers, looking through folded (Q/DQ, constant) nodes."""
    place = {}
    for node, row in zip(g.nodes, rows):
        for o in node.output:
            place[o] = (row.placement, node)

    def layer_sources(tensor, seen):
        hit = place.get(tensor)
        if hit is None or tensor in seen:
            return set()
        seen.add(tensor)
        where, node = hit
        if where != FOLDED:
            return {(id(node), where)}
        return set().union(*(layer_sources(i, seen) for i in node.input if i)) if node.input else set()

    count = 0
    for node, row in zip(g.nodes, rows):
        if row.placement == FOLDED:
            continue
        srcs = set().union(*(layer_sources(i, set()) for i in node.input if i)) if node.input else set()
        count += sum(where != row.placement for _, where in srcs)
    return count
