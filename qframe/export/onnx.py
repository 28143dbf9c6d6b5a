"""ONNX export with QuantizeLinear/DequantizeLinear, and onnxruntime parity and timing.

In export mode every TensorQuantizer runs ``torch.fake_quantize_per_{tensor,channel}_affine``,
which ``torch.onnx.export`` writes as a QuantizeLinear/DequantizeLinear pair. Those ops take only
8-bit ranges, so a sub-8-bit quantizer first puts the tensor on its own grid (qframe's
fake-quantize) and then passes through an 8-bit Q/DQ with the same scale: a 4-bit weight
exports with 4-bit levels in int8 codes, exactly.

Per-group weight scales (``w4a16``) have no form in QuantizeLinear/DequantizeLinear before opset
21. At ``opset=21`` the weight of a Linear layer with per-group scales is written as opset-21
block quantization: an INT4 (or INT8) initializer of the codes and a DequantizeLinear with
``axis=1, block_size=group_size`` in front of the Gemm (weight-only: the input stays float), which
onnxruntime runs and TensorRT 10 takes as weight-only quantization. A Conv with per-group scales
has no such form (blocks along the input channels only, not the kernel window) and is refused.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.quant import functional as QF
from qframe.quant.modules import TensorQuantizer, bake_int32_biases, quantizers

log = logging.getLogger(__name__)


def _export_forward(self: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    if not self.enabled or self.scale is None:
        return x
    spec = self.spec
    if spec.granularity == "per_group":  # weights are handled by _blocked_weights; activations have no form
        raise QFrameError("per-group activation scales cannot be exported as ONNX Q/DQ; use per_tensor inputs")
    scale = self.scale.detach().float()
    zero_point = self.zero_point.to(torch.int32)
    if spec.bits < 8 and not getattr(self, "_weights_on_grid", False):
        x = QF.fake_quantize(x, scale, self.zero_point, spec)  # onto the spec's own grid first
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    if spec.granularity == "per_tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, spec.axis % x.dim(), qmin, qmax)


@contextlib.contextmanager
def export_mode(model: nn.Module):
    """Within the block, the model's quantizers run the ops ONNX export turns into Q/DQ."""
    qs = [q for _, q in quantizers(model)]
    for q in qs:
        if q.dynamic or q.observing or q.calibrating:
            raise QFrameError("export needs fixed quantization ranges; calibrate (PTQ) or fold_qat() the model first")
        q.forward = _export_forward.__get__(q)
    try:
        yield model
    finally:
        for q in qs:
            del q.forward


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, *, opset: int = 17,
                dynamic_batch: bool = False) -> Path:
    """Write ``model`` (FP32, or PTQ / folded QAT) to ``path`` as ONNX; Q/DQ where it quantizes."""
    from qframe.methods.qat import fold_qat

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = bake_int32_biases(fold_qat(copy.deepcopy(model).eval().cpu()))
    blocked = _blocked_weights(model, opset)
    with torch.no_grad():
        for module in model.modules():
            q = getattr(module, "weight_quantizer", None)
            if isinstance(q, TensorQuantizer) and q.calibrated and q.spec.bits < 8 and q.spec.granularity != "per_group":
                # put sub-8-bit weights on their grid here, so the file holds them as constants
                module.weight.copy_(QF.fake_quantize(module.weight, q.scale, q.zero_point, q.spec))
                q._weights_on_grid = True
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    tmp = path.with_name(f".{path.name}.tmp")
    with export_mode(model), torch.no_grad(), warnings_quiet():
        torch.onnx.export(model, (example.cpu(),), str(tmp), opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes, do_constant_folding=True, dynamo=False)
    if blocked:
        _write_blocked_weights(tmp, blocked)
    tmp.replace(path)
    return path


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


def _write_blocked_weights(path: Path, blocked: dict[str, dict]) -> None:
    """Replace each float Gemm weight of ``blocked`` by codes -> DequantizeLinear(axis=1, block_size), in place."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
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
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


# onnxruntime's WeightBiasQuantization pass (BiasQuantization in earlier releases) rounds the float bias of
# every Conv / Gemm with dequantized inputs to int32 in units of input scale x weight scale, and
# quantizes float weights next to quantized inputs, even where the layer then runs in float. Those
# roundings are not in the model: measured on MobileNetV2 x0.5 they moved top-1 agreement of the
# TensorRT-form graph with PyTorch from 99.6-100 % down to 98.1-98.9 %. qframe's onnxruntime form
# stores the int32 biases its integer layers need itself.
ORT_DISABLED_OPTIMIZERS = ("WeightBiasQuantization", "BiasQuantization")


def ort_session(model, threads: int | None = None, *, optimized_path: str | Path | None = None,
                profile_prefix: str | Path | None = None):
    """An onnxruntime CPU session for a path or an ``onnx.ModelProto`` (onnxruntime is imported here only).

    Graph optimizations run at ``ORT_ENABLE_ALL`` (the Q/DQ fusions into integer kernels need it);
    ``optimized_path`` saves the graph onnxruntime actually runs, to see which nodes stayed float;
    ``profile_prefix`` turns on onnxruntime's profiler (its JSON file from ``end_profiling()``).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise QFrameError(f"onnxruntime is not installed ({exc}); pip install 'qframe[export]'") from None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.log_severity_level = 3  # not the warning that the saved graph is specific to this CPU
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS))


@torch.no_grad()
def ort_parity(path, model: nn.Module, loader) -> dict:
    """Top-1 agreement (%) and max |logit difference| of the ONNX model (a path or ``onnx.ModelProto``)
    against ``model``, over ``loader``'s batches (any batch size: the batch axis is made symbolic)."""
    session = ort_session(with_dynamic_batch(path))
    model = model.eval().cpu()
    agree = correct = total = 0
    max_diff = 0.0
    for x, y in loader:
        ref = model(x)
        out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
        agree += (out.argmax(1) == ref.argmax(1)).sum().item()
        correct += (out.argmax(1) == y).sum().item()
        total += x.shape[0]
        max_diff = max(max_diff, (out - ref).abs().max().item())
    return {"agreement": 100.0 * agree / total, "max_logit_diff": max_diff, "images": total,
            "accuracy": 100.0 * correct / total}


def with_dynamic_batch(model):
    """A copy of ``model`` (a path or ``onnx.ModelProto``) whose inputs and outputs have a symbolic batch axis.

    The exporter's graphs are batch-agnostic (Flatten, not a Reshape to a fixed batch), so a
    static batch-1 file for TensorRT can also be timed at a throughput batch in onnxruntime.
    """
    import onnx

    model = onnx.load(str(model)) if isinstance(model, (str, Path)) else onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name for t in model.graph.initializer}
    for value in [*[i for i in model.graph.input if i.name not in inits], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    return model


def _in_turns(names, rounds: int):
    """``(round, name)`` for ``rounds`` rounds in which the models take turns, after a short pause each.

    onnxruntime's pool threads spin for a while after a run; on a 2-core machine the previous
    model's spinning threads would slow the next one's calls (measured: FP32 at batch 32 took 7.3 ms
    right after another session, 3.3 ms alone), so they get 50 ms to settle.
    """
    import time

    for r in range(rounds):
        for name in names:
            time.sleep(0.05)
            yield r, name


def time_onnx(models: dict, input_shape: tuple[int, ...], batch_size: int, *, threads: int = 2, rounds: int = 10,
              runs: int = 5, warmup: int = 3) -> dict[str, dict]:
    """Latency and throughput of several ONNX models in onnxruntime, timed side by side.

    ``models`` maps a name to a path or ``onnx.ModelProto``; each gets a session with
    ``threads`` intra-op threads (graph optimizations at ``ORT_ENABLE_ALL``). The models take
    turns: ``rounds`` rounds of ``runs`` timed calls each (:func:`qframe.measure.timing.benchmark`),
    so load from other processes falls on all of them alike. Returns ``{name: TimingResult dict}``
    over all ``rounds * runs`` calls (median, p90, min, throughput at ``batch_size``) plus
    ``round_median_ms``, the median of each round, for :func:`paired_speedup`.
    """
    import statistics

    import numpy as np

    from qframe.measure.timing import benchmark, summarize

    sessions = {name: ort_session(with_dynamic_batch(m), threads) for name, m in models.items()}
    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    per_round: dict[str, list[float]] = {name: [] for name in sessions}
    for r, name in _in_turns(sessions, rounds):
        result = benchmark(lambda inputs, s=sessions[name]: s.run(None, inputs), {"input": x}, device="cpu",
                           warmup=warmup if r == 0 else 2, runs=runs, batch_size=batch_size)
        samples[name] += result.samples_ms
        per_round[name].append(statistics.median(result.samples_ms))
    return {name: {**summarize(v, warmup=warmup, batch_size=batch_size).to_dict(), "threads": threads,
                   "round_median_ms": per_round[name]} for name, v in samples.items()}


def paired_speedup(base: dict, other: dict) -> float:
    """How many times faster ``other`` runs than ``base`` (two :func:`time_onnx` results of one call).

    The median over rounds of the ratio of their round medians: each ratio compares calls made
    moments apart, so a burst of load from other processes cancels out instead of landing on
    whichever model happened to run then.
    """
    import statistics

    return statistics.median(b / o for b, o in zip(base["round_median_ms"], other["round_median_ms"]))


def module_path(node_name: str) -> str:
    """The PyTorch module a node of an exported graph (or of onnxruntime's rewrite of it) came from.

    ``torch.onnx.export`` names a node by its module scopes, each child written with its parent's
    dotted name (``/features/features.2/conv/conv.0/conv.0.0/Conv``); onnxruntime and
    :mod:`qframe.export.ort_form` keep that prefix when they fuse or add nodes
    (``.../conv.0.0/Conv_token_10``, ``.../conv.0.2/Clip_output_0_nchwc``). Returns the dotted
    path (``features.2.conv.0.0``), or ``""`` for a node with no scope (a layout Transpose).
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


def profile_onnx(models: dict, input_shape: tuple[int, ...], batch_size: int, *, threads: int = 2,
                 rounds: int = 10, runs: int = 10, warmup: int = 5) -> dict[str, dict[str, dict]]:
    """Kernel time of each node onnxruntime runs, for several ONNX models profiled side by side.

    ``models`` maps a name to a path or ``onnx.ModelProto``. Each runs under onnxruntime's profiler
    (same session settings as :func:`time_onnx`): ``warmup`` runs, then ``rounds`` rounds of
    ``runs`` calls, the models taking turns as in :func:`time_onnx` so load from other processes
    falls on all of them alike. Returns ``{name: {node: {"op", "median_ms"}}}`` for the nodes of
    each optimized graph (median over the timed calls). Kernel times leave out what onnxruntime
    spends between nodes and include the profiler's own cost: compare models and nodes with each
    other, and the wall clock with :func:`time_onnx`.
    """
    import json
    import os
    import statistics
    import tempfile

    import numpy as np

    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: ort_session(with_dynamic_batch(m), threads, profile_prefix=os.path.join(tmp, f"p{k}"))
                    for k, (name, m) in enumerate(models.items())}
        feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
        for name, session in sessions.items():
            for _ in range(warmup):
                session.run(None, feeds[name])
        for _, name in _in_turns(sessions, rounds):
            for _ in range(runs):
                sessions[name].run(None, feeds[name])
        events = {}
        for name, session in sessions.items():
            with open(session.end_profiling()) as f:
                events[name] = json.load(f)
    result = {}
    for name, evs in events.items():
        samples: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in evs:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                node = e["name"][: -len("_kernel_time")]
                samples.setdefault(node, []).append(e["dur"] / 1000)  # in run order
                ops[node] = e["args"]["op_name"]
        result[name] = {node: {"op": ops[node], "median_ms": statistics.median(v[warmup:] or v)}
                        for node, v in samples.items()}
    return result
