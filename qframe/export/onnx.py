"""ONNX export with QuantizeLinear/DequantizeLinear, and onnxruntime parity and timing.

In export mode every TensorQuantizer runs ``torch.fake_quantize_per_{tensor,channel}_affine``,
which ``torch.onnx.export`` writes as a QuantizeLinear/DequantizeLinear pair. Those ops take only
8-bit ranges, so a sub-8-bit quantizer first puts the tensor on its own grid (qframe's
fake-quantize) and then passes through an 8-bit Q/DQ with the same scale: a 4-bit weight
exports as an int8 initializer holding the 4-bit levels, exactly. Per-group scales have no
Q/DQ form before opset 21 block quantization and are refused with a clear error.
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
from qframe.quant.modules import TensorQuantizer, quantizers

log = logging.getLogger(__name__)


def _export_forward(self: TensorQuantizer, x: torch.Tensor) -> torch.Tensor:
    if not self.enabled or self.scale is None:
        return x
    spec = self.spec
    if spec.granularity == "per_group":
        raise QFrameError("per-group scales cannot be exported as ONNX Q/DQ (opset < 21); use per_channel weights")
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
    model = fold_qat(copy.deepcopy(model).eval().cpu())
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
    tmp.replace(path)
    return path


@contextlib.contextmanager
def warnings_quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (onnxruntime is imported here, not at qframe import)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise QFrameError(f"onnxruntime is not installed ({exc}); pip install 'qframe[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def ort_parity(path: str | Path, model: nn.Module, loader) -> dict:
    """Top-1 agreement (%) and max |logit difference| of the ONNX model against ``model``."""
    session = ort_session(path)
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


def time_onnx(path: str | Path, input_shape: tuple[int, ...], batch_size: int, *, warmup: int = 5, runs: int = 20) -> dict:
    """Median latency (ms) and throughput of an onnxruntime session at one batch size."""
    import numpy as np

    from qframe.measure.timing import benchmark

    session = ort_session(path)
    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    result = benchmark(lambda inputs: session.run(None, inputs), {"input": x}, warmup=warmup, runs=runs,
                       device="cpu", batch_size=batch_size)
    return result.to_dict()
