"""TensorRT INT8 coverage: which compute layers of a Q/DQ graph TensorRT runs in INT8, and why not the rest.

TensorRT's explicit quantization runs a Conv / ConvTranspose / Gemm / MatMul in INT8 only when
both its data and its weight input come from a DequantizeLinear (it moves Q/DQ across shape-only
ops); otherwise the layer runs in FP16/FP32, silently: "INT8 no faster than FP16" usually means
that Q/DQ sit where they do not reach the layers. This report says, per compute layer, INT8 or
FP16/FP32 and why (which input lacks Q/DQ and what produces it instead, an op TensorRT has no
INT8 kernel for, a layer the recipe chose to keep float, Q/DQ that break the rules TensorRT enforces and
:func:`qframe.export.lint.lint_tensorrt` checks: dtype, zero point, scales' axis), from the graph alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from qframe.export.lint import _PASS_THROUGH, Graph, _check_layer, _check_qdq, attr, chosen_reason

INT8, FLOAT = "INT8", "FP16/FP32"
# Layers TensorRT can run in INT8 when Q/DQ feed their inputs: the data and the weight input.
INT8_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Compute layers TensorRT runs in FP16/FP32 whatever Q/DQ surround them.
FLOAT_ONLY = {"Einsum": "TensorRT has no INT8 Einsum", "LSTM": "TensorRT has no INT8 LSTM",
              "GRU": "TensorRT has no INT8 GRU", "RNN": "TensorRT has no INT8 RNN",
              "Attention": "TensorRT's ONNX Attention runs in FP16/FP32 (quantize the math path's MatMuls)"}
COMPUTE_OPS = INT8_LAYERS + tuple(FLOAT_ONLY)


@dataclass
class CoverageRow:
    """One compute layer: ``precision`` is INT8 or FP16/FP32; ``reason`` says why it is not INT8."""

    name: str
    op: str
    module: str
    precision: str
    reason: str = ""
    chosen: bool = False  # the recipe chose float for it (a warning, not a placement fault)


@dataclass
class CoverageReport:
    rows: list[CoverageRow] = field(default_factory=list)

    @property
    def int8(self) -> int:
        return sum(r.precision == INT8 for r in self.rows)

    def fallbacks(self, chosen: bool | None = None) -> list[CoverageRow]:
        """Layers not in INT8; ``chosen=False``: only those the recipe did not choose to keep float."""
        return [r for r in self.rows if r.precision != INT8 and (chosen is None or r.chosen == chosen)]

    def summary(self) -> str:
        chosen = len(self.fallbacks(True))
        return (f"TensorRT INT8 coverage: {self.int8}/{len(self.rows)} compute layers in INT8, "
                f"{len(self.fallbacks(False))} fall back to FP16/FP32 unasked, {chosen} kept float by the recipe")

    def to_dict(self) -> dict:
        return {"int8": self.int8, "layers": len(self.rows), "rows": [asdict(r) for r in self.rows]}

    def to_markdown(self) -> str:
        lines = [self.summary() + ".", "", "| layer | op | module | precision | why not INT8 |", "|---|---|---|---|---|"]
        for r in self.rows:
            why = (("recipe: " if r.chosen else "") + r.reason).replace("|", "/")
            lines.append(f"| {r.name} | {r.op} | {r.module} | {r.precision} | {why} |")
        return "\n".join(lines)


def chosen_float_layers(model: nn.Module) -> dict[str, str]:
    """Qualified module names the recipe chose to leave (partly) float, with the reason: ``keep_float``
    rules and layers qframe's registry leaves float (``model.qframe_float_layers``), layers whose input
    or weight the recipe does not quantize (weight-only / activation-only), and nn.MultiheadAttention
    modules left float (one with ``add_bias_kv`` or ``add_zero_attn``, or kept float by a rule)."""
    from qframe.quant.modules import QUANT_BLOCKS

    chosen = dict(getattr(model, "qframe_float_layers", {}) or {})
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and not isinstance(module, QUANT_BLOCKS):
            chosen.setdefault(name, "nn.MultiheadAttention reads its projection weights directly; qframe keeps them float")
        if not hasattr(module, "weight_quantizer") or not hasattr(module, "input_quantizer"):
            continue
        if module.input_quantizer is None and module.weight_quantizer is not None:
            chosen.setdefault(name, "weight-only recipe: the layer's input stays float")
        elif module.weight_quantizer is None and module.input_quantizer is not None:
            chosen.setdefault(name, "the recipe quantizes no weights")
    return chosen


def _why_not_dq(g: Graph, tensor: str) -> str:
    """What feeds ``tensor`` instead of a DequantizeLinear (looking through shape-only ops)."""
    node = g.producer.get(tensor)
    seen = []
    while node is not None and node.op_type in _PASS_THROUGH:
        seen.append(node.op_type)
        node = g.producer.get(node.input[0])
    if node is None:
        return "a graph input" if tensor not in g.init else "a float initializer"
    if node.op_type == "Constant" or g.is_constant(tensor):
        return "a float constant"
    upstream = [i for i in node.input if i and (p := g.producer.get(i)) is not None and p.op_type == "DequantizeLinear"]
    text = f"{node.op_type} {node.name or node.output[0]}"
    if upstream:  # Q/DQ placed, but before an op TensorRT does not move them across
        text += f" (Q/DQ sit before the {node.op_type}, which TensorRT does not move them across)"
    return text


def _rejected_qdq(g: Graph, node) -> list[str]:
    """What the lint finds wrong with the Q/DQ feeding ``node`` (zero point, dtype, per-channel activation
    scales, the weight's axis: rules TensorRT enforces, failing the parse or leaving the layer unquantized)."""
    found: list = []
    checked: set[int] = set()
    for name in node.input[:2]:
        dq = g.source(name) if name else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = g.producer.get(dq.input[0])
        for qdq in (q, dq) if q is not None and q.op_type == "QuantizeLinear" else (dq,):
            if id(qdq) not in checked:
                checked.add(id(qdq))
                _check_qdq(g, qdq, found)
    _check_layer(g, node, found)
    return list(dict.fromkeys(v.message for v in found if v.rule != "qdq-missing"))


def tensorrt_coverage(model, chosen_float: dict[str, str] | None = None) -> CoverageReport:
    """Per compute layer of ``model`` (an ``onnx.ModelProto``): INT8, or FP16/FP32 and why.

    ``chosen_float`` (see :func:`chosen_float_layers`) marks the layers the recipe kept float on
    purpose, with its reason.
    """
    from qframe.export.qdq import module_path

    g = Graph(model, nested=True)
    report = CoverageReport()
    for node in g.nodes:
        if node.op_type not in COMPUTE_OPS:
            continue
        name = node.name or node.output[0]
        why_chosen = chosen_reason(chosen_float, node) or g.reads_no_activation(node)
        reasons = []
        if node.op_type in FLOAT_ONLY:
            reasons.append(FLOAT_ONLY[node.op_type])
        else:
            weight = g.source(node.input[1]) if len(node.input) > 1 else None
            if (weight is not None and weight.op_type == "DequantizeLinear" and attr(weight, "block_size", 0)
                    and node.op_type in ("Gemm", "MatMul")):
                reasons.append("weight-only block-quantized weight: TensorRT dequantizes it and runs the GEMM in FP16")
            else:
                for idx, what in ((0, "data"), (1, "weight" if g.is_constant(node.input[1]) else "second")):
                    if len(node.input) <= idx or not node.input[idx]:
                        continue
                    src = g.source(node.input[idx])
                    if src is None or src.op_type != "DequantizeLinear":
                        reasons.append(f"{what} input {node.input[idx]!r} has no Q/DQ: it comes from "
                                       f"{_why_not_dq(g, node.input[idx])}")
            if rejected := _rejected_qdq(g, node):
                reasons.append(f"TensorRT rejects its Q/DQ: {'; '.join(rejected)}")
        precision = FLOAT if reasons else INT8
        if reasons and id(node) in g.within:  # where to find it: not among the graph's own nodes
            outer = g.within[id(node)]
            reasons.append(f"inside {outer.op_type} {outer.name or outer.output[0]}'s subgraph")
        if why_chosen is not None and reasons:
            reasons.insert(0, why_chosen)
        report.rows.append(CoverageRow(name, node.op_type, module_path(name) if node.name else "", precision,
                                       "; ".join(reasons), chosen=bool(reasons) and why_chosen is not None))
    return report
