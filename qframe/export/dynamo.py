"""The dynamo (``torch.export``) route of :func:`qframe.export.onnx.export_onnx`.

torch's TorchScript ONNX exporter is deprecated ("the feature will be removed", torch 2.13); the
dynamo exporter replaces it, and takes models the TorchScript one rejects. It traces with
``torch.export``, which has no fake kernel for torch's fake-quantize ops, so on this route each
quantizer calls one custom op, ``qframe::quantize_dequantize``, that computes the same values in
PyTorch and that the exporter writes as a QuantizeLinear -> DequantizeLinear pair
(:func:`translation_table`). The exporter names nodes after the ATen op (``node_conv2d_1``) and
keeps the module path in each node's metadata; :func:`scope_names` names them in the TorchScript
exporter's form (``/features/features.2/Conv``), which the standard Q/DQ form, the lint, the
coverage report and the bisection read, so both routes end in the same kind of file.

Nothing here registers or imports anything until an export takes this route.
"""

from __future__ import annotations

import ast
import logging

import torch

log = logging.getLogger(__name__)

OP_NAME = "qframe::quantize_dequantize"
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_registered = None


def quantize_dequantize_op():
    """``torch.ops.qframe.quantize_dequantize(x, scale, zero_point, axis)``, registered on the first call.

    ``scale`` is a float32 scalar tensor (per tensor) or one scale per index of ``axis``;
    ``zero_point`` has the same shape and the codes' dtype (int8 or uint8), whose range the codes
    take, as in ONNX's QuantizeLinear.
    """
    global _registered
    if _registered is None:
        schema = "(Tensor x, Tensor scale, Tensor zero_point, int axis) -> Tensor"

        @torch.library.custom_op(OP_NAME, mutates_args=(), schema=schema)
        def quantize_dequantize(x, scale, zero_point, axis):
            info = torch.iinfo(zero_point.dtype)
            zp = zero_point.to(torch.int32)
            if scale.dim() == 0:
                return torch.fake_quantize_per_tensor_affine(x, scale.float(), zp, info.min, info.max)
            return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, info.min, info.max)

        @quantize_dequantize.register_fake
        def _(x, scale, zero_point, axis):
            return torch.empty_like(x)

        _registered = torch.ops.qframe.quantize_dequantize.default
    return _registered


def supported() -> str | None:
    """None where this torch's ONNX exporter takes this route, else why not (one line)."""
    import inspect

    if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
        return (f"torch {torch.__version__.split('+')[0]}'s ONNX exporter takes no custom ops "
                "(custom_translation_table); the dynamo route needs a newer torch")
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter translates with it)
    except ImportError:
        return "the dynamo ONNX exporter needs the onnxscript package (pip install onnxscript)"
    return None


def translation_table() -> dict:
    """The custom op's ONNX form for ``torch.onnx.export(..., custom_translation_table=...)``."""
    from onnxscript import opset18 as op

    def quantize_dequantize(x, scale, zero_point, axis: int):
        codes = op.QuantizeLinear(x, scale, zero_point, axis=axis)
        return op.DequantizeLinear(codes, scale, zero_point, axis=axis)

    return {quantize_dequantize_op(): quantize_dequantize}


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None,
                        signed: bool) -> torch.Tensor:
    """What a quantizer computes in export mode on this route: per tensor where ``axis`` is None."""
    codes = torch.int8 if signed else torch.uint8
    if axis is None:
        return quantize_dequantize_op()(x, scale.reshape(()), zero_point.to(codes).reshape(()), 0)
    return quantize_dequantize_op()(x, scale.reshape(-1), zero_point.to(codes).reshape(-1), axis)


def _scopes(node) -> list[str] | None:
    for prop in node.metadata_props:
        if prop.key == _SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            return [str(s) for s in scopes] if isinstance(scopes, list) else None
    return None


def scope_names(model, parameters: set[str]) -> None:
    """Name each node of ``model`` (``onnx.ModelProto`` from the dynamo exporter) as the TorchScript exporter
    does, by the modules it ran in: ``/c1/c1.input_quantizer/QuantizeLinear``, ``/blk/blk.0/MatMul_2``,
    ``/Relu`` (the root module); :func:`qframe.export.qdq.module_path` reads the module back from it.

    Initializers that are not ``parameters`` (the model's parameter and buffer names) are the exporter's
    constants (``val_50``); they get a ``/`` in front, as the TorchScript exporter's own have, so the
    standard form names them after the node that reads them.
    """
    from qframe.export.lint import rename_reads

    taken: set[str] = set()
    for node in model.graph.node:
        scopes = _scopes(node)
        if scopes is None:
            continue
        modules = [s for s in scopes[1:-1] if s]  # the first is the root module, the last the ATen op
        base = "/" + "".join(f"{s}/" for s in modules) + node.op_type
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        node.name = name
    renamed = {t.name: f"/{t.name}" for t in model.graph.initializer
               if t.name not in parameters and not t.name.startswith("/")}
    if renamed:
        for t in model.graph.initializer:
            t.name = renamed.get(t.name, t.name)
        for node in model.graph.node:
            rename_reads(node, renamed)
        for value in model.graph.input:
            value.name = renamed.get(value.name, value.name)
