"""The export stage of a run: ONNX (FP32 and Q/DQ), TensorRT lint, onnxruntime parity and timing,
and the DLA placement report when the target has a DLA."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.io import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class ExportConfig:
    """Whether and how a run exports its quantized model (the ``*_orin`` / ``*_desktop`` experiments do)."""

    enabled: bool = False
    opset: int = 17
    lint: bool = True  # fail the run when the Q/DQ graph breaks a TensorRT rule
    parity: bool = True  # onnxruntime against PyTorch on the test split
    timing_runs: int = 50
    tensorrt: bool = True  # write build_engines.sh (trtexec commands, DLA calibration cache) into tensorrt/
    dla_core: int = 0
    gpu_fallback: bool = True

    def __post_init__(self):
        if not 13 <= self.opset <= 21:
            raise QFrameError(f"export.opset={self.opset!r} is invalid; valid: 13..21 (per-channel Q/DQ needs 13)")


def export_stage(cfg: ExportConfig, fp32: nn.Module, qmodel: nn.Module, label: str, data, run_dir: Path,
                 dla: bool) -> tuple[dict, list[dict]]:
    """Export both models, lint, check parity and time them; return the summary and report rows."""
    import onnx

    from qframe.export.dla import dla_report
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx, ort_parity, time_onnx

    example = torch.randn(1, data.channels, data.image_size, data.image_size)
    paths = {"fp32": export_onnx(fp32, example, run_dir / "model_fp32.onnx", opset=cfg.opset),
             label: export_onnx(qmodel, example, run_dir / f"model_{label}.onnx", opset=cfg.opset)}
    summary: dict = {"files": {k: p.name for k, p in paths.items()}}
    graph = onnx.load(str(paths[label]))
    if cfg.lint:
        violations = lint_tensorrt(graph)
        summary["lint"] = [v.message for v in violations]
        if violations:
            shown = "; ".join(v.message for v in violations[:3])
            raise QFrameError(f"exported {paths[label].name} breaks {len(violations)} TensorRT rules: {shown}")
        log.info("%s passes the TensorRT-rules lint", paths[label].name)
    if cfg.tensorrt:
        from qframe.export.tensorrt import prepare_tensorrt

        trt = prepare_tensorrt(run_dir / "tensorrt", paths[label], paths["fp32"], dla_core=cfg.dla_core,
                               gpu_fallback=cfg.gpu_fallback)
        summary["tensorrt"] = {k: str(v) if isinstance(v, Path) else v for k, v in trt.items()}
        log.info(trt["message"])
    rows = []
    shape = (data.channels, data.image_size, data.image_size)
    for name, path in paths.items():
        model = fp32 if name == "fp32" else qmodel
        timing = time_onnx(path, shape, 1, runs=cfg.timing_runs)
        row = {"method": "onnx", "precision": name, "backend": "onnxruntime / cpu", "latency_ms": timing["median_ms"],
               "latency_p90_ms": timing["p90_ms"], "latency_batch": 1, "throughput": timing["throughput"],
               "throughput_batch": 1, "size_bytes": path.stat().st_size, "size_kib": path.stat().st_size / 1024}
        if cfg.parity:
            parity = ort_parity(path, model, data.loader("test", 1))
            row.update(accuracy=parity["accuracy"], agreement=parity["agreement"], max_logit_diff=parity["max_logit_diff"])
            summary[f"parity_{name}"] = parity
            log.info("onnxruntime %s: top-1 agreement with PyTorch %.2f%%, max logit difference %.4f",
                     name, parity["agreement"], parity["max_logit_diff"])
        rows.append(row)
    summary["int8_vs_fp32_speed"] = rows[0]["latency_ms"] / rows[1]["latency_ms"]
    if dla:
        report = dla_report(graph)
        atomic_write_text(report.to_markdown() + "\n", run_dir / "dla_report.md")
        summary["dla"] = {"subgraphs": report.subgraphs, "boundaries": report.boundaries,
                          "gpu_layers": [r.name for r in report.rows if r.placement == "GPU"]}
        log.info("DLA report: %d DLA subgraphs, %d GPU<->DLA boundaries (dla_report.md)", report.subgraphs,
                 report.boundaries)
    return summary, rows
