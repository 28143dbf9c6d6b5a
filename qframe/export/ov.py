"""OpenVINO beside onnxruntime: compiled models, parity with the PyTorch model and timing of ONNX files.

OpenVINO reads qframe's Q/DQ ONNX as FakeQuantize nodes and runs the quantized layers in INT8 (its
low-precision transformations). It is optional: :func:`openvino_missing` says why it cannot run,
and the export stage then logs one line and goes on without OpenVINO rows.

On a CPU with AVX-512 BF16 OpenVINO runs the float parts of a model in bf16 unless told otherwise;
:func:`ov_compile` takes ``precision="f32"`` for an FP32 file, so that its rows are FP32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError

log = logging.getLogger(__name__)


def openvino_missing() -> str | None:
    """None where ``openvino`` imports, else the reason (one line)."""
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not installed ({exc})"
    return None


def openvino_version() -> str:
    import openvino

    return openvino.__version__.split("-")[0]


def ov_compile(model, threads: int | None = None, *, precision: str | None = None, batch: int | None = None):
    """An OpenVINO CPU compiled model of a path or ``onnx.ModelProto``: ``threads`` inference threads,
    the latency hint, ``precision`` (``"f32"``, ``"bf16"``; None: OpenVINO's default for this CPU) and,
    with ``batch``, a static batch size (else the file's own shapes, a symbolic batch included)."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise QFrameError(f"openvino is not installed ({exc}); pip install openvino") from None
    core = ov.Core()
    if isinstance(model, (str, Path)):
        graph = core.read_model(str(model))
    else:
        graph = core.read_model(model.SerializeToString(), b"")
    if batch is not None:
        shape = graph.input(0).get_partial_shape()
        shape[0] = batch
        graph.reshape({graph.input(0).get_any_name(): shape})
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core.compile_model(graph, "CPU", config)


def _infer(compiled, request, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(request.infer([x.numpy()])[compiled.output(0)].copy())


@torch.no_grad()
def ov_parity(path, model: nn.Module, loader, *, threads: int | None = None, precision: str | None = None) -> dict:
    """How the ONNX model (a path or ``onnx.ModelProto``) run by OpenVINO agrees with ``model`` over
    ``loader``'s batches: ``{"runtime", "agreement", "max_logit_diff", "images", "accuracy"}`` as in
    :func:`qframe.export.ort.ort_parity` (one entry: OpenVINO has no optimization levels to compare)."""
    from qframe.export.ort import with_dynamic_batch

    compiled = ov_compile(with_dynamic_batch(path), threads, precision=precision)
    request = compiled.create_infer_request()
    model = model.eval().cpu()
    agree = correct = total = 0
    max_diff = 0.0
    for x, y in loader:
        ref, out = model(x), _infer(compiled, request, x)
        agree += (out.argmax(1) == ref.argmax(1)).sum().item()
        correct += (out.argmax(1) == y).sum().item()
        max_diff = max(max_diff, (out - ref).abs().max().item())
        total += x.shape[0]
    if not total:
        raise QFrameError("OpenVINO parity got no batches; pass a loader with at least one image")
    return {"runtime": f"OpenVINO {openvino_version()}", "agreement": 100.0 * agree / total, "max_logit_diff": max_diff,
            "images": total, "accuracy": 100.0 * correct / total}


def time_openvino(models: dict, input_shape: tuple[int, ...], batch_size: int, *, threads: int = 2, rounds: int = 10,
                  runs: int = 5, warmup: int = 3, precision: dict[str, str] | None = None) -> dict[str, dict]:
    """Latency and throughput of several ONNX models in OpenVINO, timed side by side at a static
    ``batch_size``, in the format of :func:`qframe.export.ort.time_onnx` (its ``round_median_ms``
    feeds :func:`qframe.export.ort.paired_speedup`). ``precision`` maps a name to its inference
    precision (e.g. ``{"fp32": "f32"}``)."""
    import numpy as np

    from qframe.export.ort import time_in_turns

    precision = precision or {}
    compiled = {name: ov_compile(m, threads, precision=precision.get(name), batch=batch_size)
                for name, m in models.items()}
    runners = {name: (lambda inputs, q=c.create_infer_request(): q.infer(inputs)) for name, c in compiled.items()}
    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    return time_in_turns(runners, [x], batch_size, threads=threads, rounds=rounds, runs=runs, warmup=warmup)
