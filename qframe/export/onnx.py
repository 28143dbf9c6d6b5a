"""ONNX export in qframe's standard Q/DQ form (:mod:`qframe.export.qdq`).

In export mode every TensorQuantizer runs ``torch.fake_quantize_per_{tensor,channel}_affine``,
which ``torch.onnx.export`` writes as a QuantizeLinear/DequantizeLinear pair; :func:`export_onnx`
then rewrites the graph into the standard form (integer weight initializers, quantized layer
outputs, no Identity chains) that TensorRT and onnxruntime both take. Those ops take only 8-bit
ranges, so a sub-8-bit quantizer first puts the tensor on its own grid (qframe's fake-quantize)
and then passes through an 8-bit Q/DQ with the same scale: a 4-bit weight exports with 4-bit
levels in int8 codes, exactly, or as INT4 codes at ``opset=21``.

Per-group weight scales (``w4a16``) have no form in QuantizeLinear/DequantizeLinear before opset
21. At ``opset=21`` the weight of a Linear layer with per-group scales is written as opset-21
block quantization: an INT4 (or INT8) initializer of the codes and a DequantizeLinear with
``axis=1, block_size=group_size`` in front of the Gemm (weight-only: the input stays float), which
onnxruntime runs and TensorRT 10 takes as weight-only quantization. A Conv with per-group scales
has no such form (blocks along the input channels only, not the kernel window) and is refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import numbers
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError, first_line, require_fake_quant, require_module
from qframe.quant import functional as QF
from qframe.quant.modules import TensorQuantizer, bake_int32_biases, quantizers
from qframe.export.rewrites import ExportRewrites
from qframe.utils.io import atomic_onnx_save, ensure_folder, unwritable
from qframe.utils.modules import copy_model, zero_padding

log = logging.getLogger(__name__)


def _export_forward(self: TensorQuantizer, x: torch.Tensor, dynamo: bool = False) -> torch.Tensor:
    if not self.enabled or self.scale is None:
        return x
    spec = self.spec
    if spec.granularity == "per_group":  # weights are handled by _blocked_weights; activations have no form
        raise QFrameError("per-group activation scales cannot be exported as ONNX Q/DQ; use per_tensor inputs")
    scale = self.scale.detach().float()
    if spec.bits < 8 and not getattr(self, "_weights_on_grid", False):
        x = QF.fake_quantize(x, scale, self.zero_point, spec)  # onto the spec's own grid first
    if dynamo:  # torch.export traces no fake-quantize op: qframe's own, written as the same Q/DQ pair
        from qframe.export.dynamo import quantize_dequantize

        axis = None if spec.granularity == "per_tensor" else spec.axis % x.dim()
        return quantize_dequantize(x, scale, self.zero_point, axis, spec.signed)
    zero_point = self.zero_point.to(torch.int32)
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    if spec.granularity == "per_tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, spec.axis % x.dim(), qmin, qmax)


@contextlib.contextmanager
def export_mode(model: nn.Module, *, dynamo: bool = False):
    """Within the block, the model's quantizers run the ops ONNX export turns into Q/DQ: torch's fake-quantize
    ops for the TorchScript exporter, qframe's own op (:mod:`qframe.export.dynamo`) for ``dynamo``."""
    qs = [q for _, q in quantizers(model)]
    for q in qs:
        if q.dynamic or q.observing or q.calibrating:
            raise QFrameError("export needs fixed quantization ranges; calibrate (PTQ) or fold_qat() the model first")
        q.forward = functools.partial(_export_forward, q, dynamo=dynamo)
    try:
        yield model
    finally:
        for q in qs:
            del q.forward


EXPORTERS = ("auto", "torchscript", "dynamo")


def export_onnx(model: nn.Module, example, path: str | Path, *, opset: int = 17, dynamic_batch: bool = True,
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                exporter: str = "auto") -> Path:
    """Write ``model`` (FP32, or PTQ / folded QAT) to ``path`` as ONNX; Q/DQ in the standard form where it quantizes.

    ``example`` is one input tensor or a tuple of them (a model with several inputs). Names: by
    default ``input`` / ``logits`` for a model of one tensor in and one out; with several inputs the
    parameter names of the model's ``forward``; with several outputs the keys of a dict output
    (``output_<i>`` for a tuple). ``dynamic_batch`` (the default) makes the batch axis of every
    input and output symbolic; a model whose graph fixes its batch anyway is caught by
    :func:`qframe.export.ort.ort_parity`. nn.MultiheadAttention exports through its math path
    (TorchScript has no ONNX form of its fused kernel).

    ``exporter``: ``"torchscript"`` (torch's TorchScript exporter, deprecated by torch), ``"dynamo"``
    (torch.export and ``onnxscript``: :mod:`qframe.export.dynamo`; it writes opset 18 or newer where
    ``opset`` cannot be converted to) or ``"auto"`` (the default): TorchScript, and dynamo for a model
    the TorchScript exporter rejects or a torch that has none. On the TorchScript route an op that
    needs a newer opset than ``opset`` (``F.fold`` is Col2Im, opset 18) exports at that opset, with a
    warning, up to opset 21.
    """
    import onnx

    from qframe.export.qdq import standard_form
    from qframe.export.traced import traced_parts
    from qframe.methods.qat import fold_qat

    if exporter not in EXPORTERS:
        raise QFrameError(f"exporter={exporter!r} is invalid; valid: {', '.join(EXPORTERS)}")
    require_module(model, "export_onnx")
    require_fake_quant(model, "export_onnx")
    requested, writable = opset, _writable_opset(opset)  # a bad opset is one line before anything is traced
    examples = example if isinstance(example, (tuple, list)) else (example,)
    if not examples or not all(isinstance(t, torch.Tensor) for t in examples):
        raise QFrameError(f"export_onnx: example is {type(example).__name__}; valid: an input batch (a tensor, or a "
                          "tuple of tensors for a model of several inputs), e.g. torch.randn(1, 3, 224, 224)")
    used = [q for _, q in quantizers(model)]
    if used and not any(q.calibrated or q.dynamic for q in used):
        raise QFrameError(f"export_onnx: none of {type(model).__name__}'s {len(used)} quantizers is calibrated, so "
                          "the file would be a float model; valid: a model calibrated by qframe.ptq / calibrate or "
                          "trained by qframe.qat")
    if path is None or not str(path).strip() or Path(path).is_dir():
        raise QFrameError(f"export_onnx: path={str(path)!r} is not a file name; valid: a path such as model.onnx")
    path = Path(path)
    ensure_folder(path)
    model = bake_int32_biases(fold_qat(copy_model(model).eval().cpu()))
    _numeric_same_padding(model)
    low = sorted({str(t.dtype).removeprefix("torch.") for t in [*model.parameters(), *model.buffers(), *examples]
                  if t.dtype in (torch.float16, torch.bfloat16)})
    if low:  # Q/DQ scales are float32 (and QuantizeLinear reads no float16 input before opset 19)
        log.info("export_onnx: the %s weights and inputs of %s are exported as float32, which onnxruntime runs and "
                 "TensorRT builds in the precisions its builder is given", "/".join(low), type(model).__name__)
        model.float()
        examples = tuple(t.float() if t.is_floating_point() else t for t in examples)
    blocked = _blocked_weights(model, opset)
    int4 = []
    with torch.no_grad():
        for name, module in model.named_modules():
            q = getattr(module, "weight_quantizer", None)
            if isinstance(q, TensorQuantizer) and q.calibrated and q.spec.bits < 8 and q.spec.granularity != "per_group":
                # put sub-8-bit weights on their grid here, so the file holds them as constants
                module.weight.copy_(QF.fake_quantize(module.weight, q.scale, q.zero_point, q.spec))
                q._weights_on_grid = True
                if opset >= 21 and q.spec.bits <= 4 and q.spec.signed and q.spec.symmetric:
                    int4.append(f"{name}.weight" if name else "weight")
    args = tuple(t.cpu() for t in examples)
    inputs, outputs = _io_names(model, args, input_names, output_names, _require_fitting(model, args))
    opset = writable
    axes = {n: {0: "batch"} for n in inputs + outputs} if dynamic_batch else None
    # the exporter writes a file of its own; it becomes `path` only as the finished graph, by an atomic write
    try:
        scratch_folder = tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:  # a folder the file system does not let us write to
        raise unwritable(path, exc) from None
    with scratch_folder as scratch:
        tmp = Path(scratch) / path.name
        rejected, dynamo = None, exporter == "dynamo"
        with torch.no_grad(), warnings_quiet(), _mha_math_path(), traced_parts(model, f"export_onnx {path.name}"):
            if not dynamo:
                try:
                    with _given_arguments_only(model, len(args)):  # torch.export keeps defaults as constants itself
                        _export_torchscript(model, args, tmp, opset, inputs, outputs, axes)
                except Exception as exc:  # the TorchScript exporter names the op it has no ONNX form for
                    if exporter == "torchscript":
                        raise QFrameError(f"the TorchScript ONNX exporter rejects {type(model).__name__} "
                                          f"({first_line(exc)}); exporter='dynamo' takes the other route") from exc
                    rejected, dynamo = exc, True
            if dynamo:
                _export_dynamo(model, args, tmp, requested, inputs, outputs, dynamic_batch, rejected)
        graph = onnx.load(str(tmp))
    if dynamo:
        from qframe.export.dynamo import scope_names

        scope_names(graph, set(model.state_dict()))
        _convert_opset(graph, requested)
    elif requested != opset:
        _restamp_opset(graph, opset, requested)
    if blocked:
        _write_blocked_weights(graph, blocked)
    counts = standard_form(graph, int4_weights=int4)
    _check_shapes(graph, path)
    atomic_onnx_save(graph, path)
    log.debug("exported %s: %s", path.name, counts)
    return path


def _check_shapes(graph, path: Path) -> None:
    """A warning where ONNX's shape inference refuses the written graph (an exporter's shape that disagrees
    with the next op's): onnxruntime refuses to load such a file, and TensorRT's parser is likely to."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(graph, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        log.warning("ONNX export: %s fails ONNX shape inference (%s); onnxruntime will refuse to load it",
                    path.name, first_line(exc).replace("[ShapeInferenceError] Inference error(s): ", ""))
    except Exception as exc:  # noqa: BLE001 - a graph past protobuf's 2 GiB is checked by the runtimes instead
        log.debug("ONNX export: shape inference did not run on %s (%s)", path.name, first_line(exc))


# the newest opset whose Q/DQ TensorRT's parser takes (qframe.export.lint checks 13..21)
NEWEST_OPSET = 21


MIN_QDQ_OPSET = 13  # QuantizeLinear / DequantizeLinear with a per-channel axis


def _writable_opset(opset: int) -> int:
    """The opset torch's TorchScript exporter is asked for. It writes opset 20 at most (torch 2.4 refuses 21,
    torch 2.13 warns that 21 is unsupported); opset 21 only widened the types of the ops it changed (int4
    codes, Q/DQ blocks), so a graph written at 20 is stamped 21 afterwards (:func:`_restamp_opset`) and the
    Q/DQ rewrite adds the int4 forms."""
    from torch.onnx import _constants

    newest = getattr(_constants, "ONNX_MAX_OPSET", opset)
    scripted = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", newest)
    if opset == 21 and min(scripted, newest) == 20:
        return 20
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or opset < MIN_QDQ_OPSET:
        raise QFrameError(f"opset={opset!r} is invalid; valid: an integer {MIN_QDQ_OPSET}..{newest} (per-channel "
                          f"Q/DQ needs opset {MIN_QDQ_OPSET}; 21 writes 4-bit weights as INT4)")
    if opset > newest:
        raise QFrameError(f"torch {torch.__version__}'s ONNX exporter writes opsets up to {newest}; got opset={opset}")
    return int(opset)


def _restamp_opset(graph, written: int, opset: int) -> None:
    """Declare ``graph``, written at opset ``written`` (20), as opset ``opset`` (21)."""
    changed = {n.op_type for n in graph.graph.node} & {"GroupNormalization"}  # its scale shape changed in 21
    if changed:
        raise QFrameError(f"torch {torch.__version__}'s ONNX exporter writes opset {written} at most, and this graph "
                          f"has {', '.join(sorted(changed))}, which opset {opset} changed; export at opset={written}")
    for entry in graph.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    log.info("ONNX export: written at opset %d by torch %s's exporter, declared opset %d", written, torch.__version__,
             opset)


def _opset_that_has(exc: Exception, opset: int) -> int | None:
    """The opset the TorchScript exporter says an op it rejects at ``opset`` needs (MobileViTV2's ``F.fold`` is
    ONNX Col2Im, opset 18), where that is newer than ``opset`` and at most :data:`NEWEST_OPSET`; else None."""
    import re

    if not isinstance(exc, torch.onnx.errors.UnsupportedOperatorError):
        return None
    found = re.search(r"added in version (\d+)", str(exc))
    newer = int(found.group(1)) if found else None
    return newer if newer is not None and opset < newer <= NEWEST_OPSET else None


def _numeric_same_padding(model: nn.Module) -> None:
    """A convolution with ``padding="same"`` that pads both sides alike gets that padding as numbers, in place: the
    exporter writes ``"same"`` as ``auto_pad=SAME_UPPER``, which onnxruntime refuses beside a dilation."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.padding == "same":
            numbers = zero_padding(module, "export")
            if not isinstance(numbers, str):
                module.padding = numbers


def _require_fitting(model: nn.Module, args: tuple):
    """``model``'s output on the example; one line where the example does not run through it (a shape the model
    does not take), before the exporter traces it."""
    try:
        with torch.no_grad():
            return model(*args)
    except QFrameError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        shapes = ", ".join(str(tuple(t.shape)) for t in args)
        raise QFrameError(f"export_onnx's example (shape {shapes}) does not fit {type(model).__name__}: "
                          f"{first_line(exc)}; valid: an input batch the model runs on, e.g. one calibration batch") from exc


def _io_names(model: nn.Module, args: tuple, input_names, output_names, out) -> tuple[list[str], list[str]]:
    """Input and output names for the ONNX graph (see :func:`export_onnx`); ``out``: the model's output on ``args``."""
    import inspect

    if input_names is None:
        if len(args) == 1:
            input_names = ["input"]
        else:
            params = [p.name for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
            input_names = params[:len(args)] if len(params) >= len(args) else [f"input_{i}" for i in range(len(args))]
    if output_names is None:
        if isinstance(out, dict):
            output_names = [str(k) for k, v in out.items() if isinstance(v, torch.Tensor)]
        elif isinstance(out, (tuple, list)) and len(out) > 1:
            output_names = [f"output_{i}" for i in range(len(out))]
        else:
            output_names = ["logits"]
    if len(input_names) != len(args):
        raise QFrameError(f"input_names={input_names!r} names {len(input_names)} inputs; the example has {len(args)}")
    return list(input_names), list(output_names)


@contextlib.contextmanager
def _given_arguments_only(model: nn.Module, count: int):
    """Within, ``model.forward`` takes the example's ``count`` arguments alone: the TorchScript exporter makes each
    defaulted argument of forward the example leaves out an input of the graph (``scale: float = 1.0`` became a
    required double input), where the default belongs in the graph as a constant."""
    import inspect

    if len(inspect.signature(model.forward).parameters) <= count:
        yield
        return
    bound = model.forward
    model.__dict__["forward"] = lambda *args: bound(*args)
    try:
        yield
    finally:
        del model.__dict__["forward"]


@contextlib.contextmanager
def _mha_math_path():
    """nn.MultiheadAttention's fused inference kernel (aten::_native_multi_head_attention) has no ONNX
    form in the TorchScript exporter; its math path (linear, softmax, matmul) exports everywhere."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def _export_torchscript(model, args, tmp: Path, opset: int, inputs, outputs, axes) -> None:
    """The TorchScript exporter, at ``opset`` or, for an op it says needs a newer one, at that opset."""
    with export_mode(model), ExportRewrites():
        try:
            torch.onnx.export(model, args, str(tmp), opset_version=opset, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, do_constant_folding=True, dynamo=False)
            return
        except Exception as exc:
            newer = _opset_that_has(exc, opset)
            if newer is None:
                raise
            first = exc
        try:
            torch.onnx.export(model, args, str(tmp), opset_version=newer, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, do_constant_folding=True, dynamo=False)
        except Exception:  # e.g. Col2Im at 18 wants static output sizes: the first error says more
            raise first from None
    log.warning("ONNX export: %s; exported at opset %d instead of %d", first_line(first), newer, opset)


def _export_dynamo(model, args, tmp: Path, opset: int, inputs, outputs, dynamic_batch: bool,
                   rejected: Exception | None) -> None:
    """The dynamo exporter (:mod:`qframe.export.dynamo`), asked directly or for a model the TorchScript one
    ``rejected``; one clear line where onnxscript, which it needs, is missing or it fails too."""
    from qframe.export.dynamo import supported, translation_table
    from qframe.quant.branches import MergedBranch, branches_as_marks
    from qframe.quant.placement import restored_after_tracing

    name = type(model).__name__
    before = f"the TorchScript ONNX exporter rejects {name} ({first_line(rejected)}); " if rejected else ""
    missing = supported()
    if missing:
        raise QFrameError(before + missing) from rejected
    if rejected is not None:
        log.warning("TorchScript ONNX export failed (%s); exporting %s with the dynamo exporter", first_line(rejected),
                    name)
    merged = any(isinstance(m, MergedBranch) for m in model.modules())
    # the model runs under qframe's modes while torch.export traces it, not while the exporter translates
    with restored_after_tracing(), export_mode(model, dynamo=True), \
            branches_as_marks() if merged else contextlib.nullcontext(), ExportRewrites(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
        try:
            program = None
            if dynamic_batch:
                # torch.export specializes a size of 1: a symbolic batch is traced at batch 2 (the example twice)
                batch = torch.export.Dim("batch")
                doubled = tuple(a.expand(2, *a.shape[1:]).contiguous() if a.dim() and a.shape[0] == 1 else a
                                for a in args)
                try:
                    program = torch.export.export(model, doubled, dynamic_shapes=tuple({0: batch} for _ in args),
                                                  strict=False)
                except Exception as exc:
                    log.warning("the dynamo exporter cannot make the batch of %s symbolic (%s); exported at the "
                                "example's batch", name, _root_cause(exc))
            if program is None:
                program = torch.export.export(model, args, strict=False)
        except Exception as exc:
            raise QFrameError(f"{before}torch.export, the dynamo ONNX exporter's tracer, rejects {name} too "
                              f"({_root_cause(exc)})") from exc
    # torch.onnx warns of every torchvision op it cannot register; onnx_ir logs each initializer it deduplicates
    quiet = {key: logging.getLogger(key) for key in ("torch.onnx", "onnx_ir", "onnxscript")}
    levels = {key: logger.level for key, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations
            torch.onnx.export(program, (), str(tmp), opset_version=max(opset, 18), input_names=inputs,
                              output_names=outputs, dynamo=True, external_data=False,
                              custom_translation_table=translation_table(), verbose=False)
    except Exception as exc:
        raise QFrameError(f"{before}the dynamo ONNX exporter rejects {name} too ({_root_cause(exc)})") from exc
    finally:
        for key, logger in quiet.items():
            logger.setLevel(levels[key])


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause of ``exc``: the dynamo exporter wraps torch.export's error in its own
    ("Failed to export the model with torch.export"), colours included."""
    import re

    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{type(exc).__name__}: {first_line(exc)}")


_HIDDEN = "qframe.unconverted"


def _hide_from_converter(graph) -> None:
    """The nodes opset 18 changed only by an input or attribute opsets 13-17 spell otherwise, which onnx's version
    converter has no adapter for: Pad without its new ``axes`` input, Split by sizes, and Split by
    ``num_outputs`` over an axis of known size (given the sizes as its ``split`` input instead). They wait in
    a domain of their own while the converter converts the rest (to an opset of 13 or newer)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qframe.export.lint import attr

    shapes = None
    hidden = []
    for node in graph.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Pad" and (len(node.input) < 4 or not node.input[3]):
            hidden.append(node)
        elif node.op_type == "Split" and len(node.input) > 1 and node.input[1]:
            hidden.append(node)
        elif node.op_type == "Split" and (count := attr(node, "num_outputs")) is not None:
            if shapes is None:  # only for a Split by count: the axis' size
                inferred = onnx.shape_inference.infer_shapes(graph)
                shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                   for d in v.type.tensor_type.shape.dim]
                          for v in [*inferred.graph.value_info, *inferred.graph.input]}
            dims, axis = shapes.get(node.input[0]), attr(node, "axis", 0)
            size = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
            if not size:
                continue
            step = -(-size // count)
            sizes = np.array([min(step, size - k * step) for k in range(count)], np.int64)
            graph.graph.initializer.append(numpy_helper.from_array(sizes, f"{node.output[0]}_split_sizes"))
            node.input[:] = [node.input[0], f"{node.output[0]}_split_sizes"]
            _keep_attributes(node, lambda name: name != "num_outputs")
            hidden.append(node)
    for node in hidden:
        node.domain = _HIDDEN
    if hidden:
        graph.opset_import.append(onnx.helper.make_opsetid(_HIDDEN, 1))


def _keep_attributes(node, keep) -> None:
    """Drop the attributes of ``node`` whose name ``keep`` refuses."""
    kept = [a for a in node.attribute if keep(a.name)]
    if len(kept) < len(node.attribute):
        del node.attribute[:]
        node.attribute.extend(kept)


def _convert_opset(graph, opset: int) -> None:
    """The dynamo exporter writes opset 18 or newer: a graph written newer than ``opset`` is converted to it by
    onnx's version converter, one opset at a time; where the converter cannot go further the file stays at the
    opset it reached, with a warning."""
    import onnx

    written = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    if written == opset:
        return
    if written == 18 and 13 <= opset < 18:  # Pad reads its pads and Split its sizes as inputs from opset 13 on
        _hide_from_converter(graph)
    converted, reached = graph, written
    for version in range(written - 1, opset - 1, -1):  # one opset at a time: as far down as the converter can
        try:
            converted, reached = onnx.version_converter.convert_version(converted, version), version
        except Exception as exc:
            log.warning("ONNX export: the dynamo exporter wrote opset %d, which onnx cannot convert to opset %d (%s); "
                        "the file is at opset %d", written, version, first_line(exc), reached)
            break
    for node in converted.graph.node:
        if node.domain == _HIDDEN:
            node.domain = ""
    imports = [o for o in converted.opset_import if o.domain != _HIDDEN]
    del converted.opset_import[:]
    converted.opset_import.extend(imports)
    if converted is graph:
        return
    for node in converted.graph.node:  # the converter keeps attributes the older op does not have
        if onnx.defs.has(node.op_type, node.domain):
            _keep_attributes(node, onnx.defs.get_schema(node.op_type, reached, node.domain).attributes.__contains__)
    graph.CopyFrom(converted)


@torch.no_grad()
def _blocked_weights(model: nn.Module, opset: int) -> dict[str, dict]:
    """Codes and scales of every per-group weight, by parameter name; the layer then exports in float.

    Each such layer's weight becomes its fake-quantized value and its weight quantizer is turned
    off, so the exporter writes a plain float Gemm weight that :func:`_write_blocked_weights`
    replaces by the block-quantized codes (the same values, exactly).
    """
    blocked = {}
    for name, module in model.named_modules():
        q = getattr(module, "weight_quantizer", None)
        if not (isinstance(q, TensorQuantizer) and q.enabled and q.calibrated and q.spec.granularity == "per_group"):
            continue
        if not isinstance(module, nn.Linear):
            raise QFrameError(f"layer {name!r} ({type(module).__name__}) has per-group weight scales; ONNX block "
                              "quantization (opset 21) covers Linear (Gemm) weights only; quantize convolutions "
                              "per channel, or keep them float with a layer rule (keep_float: true)")
        if opset < 21:
            raise QFrameError(f"layer {name!r} has per-group weight scales, which ONNX writes as block quantization "
                              f"from opset 21 on; export with opset=21 (got {opset})")
        codes = QF.quantize(module.weight, q.scale, q.zero_point, q.spec)
        blocked[f"{name}.weight" if name else "weight"] = {
            "codes": codes.numpy(), "scale": q.scale.detach().float().numpy(), "bits": q.spec.bits,
            "zero_point": q.zero_point.to(codes.dtype).numpy(), "block_size": q.spec.group_size}
        module.weight.copy_(QF.dequantize(codes, q.scale, q.zero_point, q.spec))
        q.enabled = False
    return blocked


def _write_blocked_weights(model, blocked: dict[str, dict]) -> None:
    """Replace each float Gemm weight of ``blocked`` by codes -> DequantizeLinear(axis=1, block_size), in place."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for name, b in blocked.items():
        users = [n for n in graph.node if name in n.input]
        if name not in inits or not users or any(
                n.op_type != "Gemm" or list(n.input).index(name) != 1 or not any(
                    a.name == "transB" and a.i == 1 for a in n.attribute) for n in users):
            raise QFrameError(f"per-group weight {name!r} did not export as the B input of a Gemm(transB=1); "
                              "its block quantization cannot be written")
        signed = b["codes"].dtype == np.int8
        if b["bits"] <= 4:
            dtype = TensorProto.INT4 if signed else TensorProto.UINT4
        else:
            dtype = TensorProto.INT8 if signed else TensorProto.UINT8
        codes = helper.make_tensor(f"{name}_quantized", dtype, b["codes"].shape, b["codes"].flatten().tolist())
        zp = helper.make_tensor(f"{name}_zero_point", dtype, b["zero_point"].shape, b["zero_point"].flatten().tolist())
        scale = numpy_helper.from_array(b["scale"].astype(np.float32), f"{name}_scale")
        graph.initializer.remove(inits[name])
        graph.initializer.extend([codes, scale, zp])
        graph.node.insert(0, helper.make_node("DequantizeLinear", [codes.name, scale.name, zp.name],
                                              [f"{name}_dequantized"], name=f"{name}_dq", axis=1,
                                              block_size=b["block_size"]))
        for n in users:
            n.input[1] = f"{name}_dequantized"


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def with_batch(model, batch: int):
    """A copy of ``model`` (``onnx.ModelProto``) whose inputs and outputs have the fixed batch size ``batch``:
    the shapes a static-shape build sees (the DLA, which ``build_engines.sh`` builds at batch 1)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    for value in [*[i for i in model.graph.input if i.name not in inits], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    del model.graph.value_info[:]
    return model
