"""The export stage of a run: ONNX (FP32, the TensorRT-form Q/DQ graph and its onnxruntime form),
TensorRT lint, onnxruntime parity and timing, and the DLA placement report when the target has a DLA."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.io import atomic_write_text

log = logging.getLogger(__name__)


TARGETS = ("tensorrt", "onnxruntime")


@dataclass
class ExportConfig:
    """Whether and how a run exports its quantized model (the ``*_orin`` / ``*_desktop`` experiments do)."""

    enabled: bool = False
    opset: int = 17
    dynamic_batch: bool = False  # a symbolic batch axis in the ONNX files (TensorRT then builds for batch 1)
    # tensorrt: the Q/DQ graph must pass the TensorRT lint, build_engines.sh and the DLA report are
    # written; onnxruntime: a model laid out for onnxruntime (quant=w8a8_ort), lint only reported
    target: str = "tensorrt"
    lint: bool = True  # check the Q/DQ graph against TensorRT's rules (fatal when target=tensorrt)
    parity: bool = True  # onnxruntime against PyTorch on the test split
    onnxruntime_form: bool = True  # also write model_<label>_onnxruntime.onnx, the form onnxruntime runs in integer
    calibration_batches: int = 8  # train batches that set the ranges the onnxruntime form adds (0: add none)
    # leading Convs the onnxruntime form runs in float: "auto" times 0 and 1 and keeps the faster
    # (onnxruntime's int8 convolution is slow on a one- or three-channel image), or a number
    ort_float_convs: Any = "auto"
    timing_runs: int = 50  # timed calls per model and batch size
    timing_batch: int = 32  # the throughput batch (latency is timed at batch 1)
    threads: int = 2  # onnxruntime intra-op threads
    tensorrt: bool = True  # write build_engines.sh (trtexec commands, DLA calibration cache) into tensorrt/
    dla_core: int = 0
    gpu_fallback: bool = True

    def __post_init__(self):
        if self.target not in TARGETS:
            raise QFrameError(f"export.target={self.target!r} is invalid; valid: {', '.join(TARGETS)}")
        if not 13 <= self.opset <= 21:
            raise QFrameError(f"export.opset={self.opset!r} is invalid; valid: 13..21 (per-channel Q/DQ needs 13)")
        if not (self.ort_float_convs == "auto" or (isinstance(self.ort_float_convs, int)
                                                    and not isinstance(self.ort_float_convs, bool)
                                                    and self.ort_float_convs >= 0)):
            raise QFrameError(f"export.ort_float_convs={self.ort_float_convs!r} is invalid; valid: 'auto' or an "
                              "integer >= 0")
        for name, low in (("calibration_batches", 0), ("timing_runs", 1), ("timing_batch", 1), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise QFrameError(f"export.{name}={value!r} is invalid; valid: an integer >= {low}")


def _timing_row(name: str, timing: dict, size: int, backend: str) -> dict:
    lat, thr = timing[1], timing.get("throughput", timing[1])
    return {"method": "onnx", "precision": name, "backend": backend, "latency_ms": lat["median_ms"],
            "latency_p90_ms": lat["p90_ms"], "latency_batch": 1, "throughput": thr["throughput"],
            "throughput_batch": thr["batch_size"], "size_bytes": size, "size_kib": size / 1024}


def export_stage(cfg: ExportConfig, fp32: nn.Module, qmodel: nn.Module, label: str, data, run_dir: Path,
                 dla: bool) -> tuple[dict, list[dict]]:
    """Export both models, lint, check parity and time them; return the summary and report rows.

    Files: ``model_fp32.onnx``, ``model_<label>.onnx`` (the TensorRT-form Q/DQ graph: lint-checked,
    handed to TensorRT and to the DLA report) and ``model_<label>_onnxruntime.onnx`` (the same model
    rewritten for onnxruntime's integer CPU kernels). Parity is measured for every file; the
    quantized row of the results times and reports the onnxruntime form, and says so.
    """
    import onnx

    from qframe.export.dla import dla_report
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx, ort_parity, paired_speedup, time_onnx
    from qframe.export.ort_form import fastest_form

    example = torch.randn(1, data.channels, data.image_size, data.image_size)
    kw = {"opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch}
    paths = {"fp32": export_onnx(fp32, example, run_dir / "model_fp32.onnx", **kw),
             label: export_onnx(qmodel, example, run_dir / f"model_{label}.onnx", **kw)}
    summary: dict = {"files": {k: p.name for k, p in paths.items()}}
    graph = onnx.load(str(paths[label]))
    if cfg.lint:
        violations = lint_tensorrt(graph)
        summary["lint"] = [v.message for v in violations]
        if violations and cfg.target == "onnxruntime":
            log.info("%s breaks %d TensorRT rules (target onnxruntime: not a TensorRT graph)", paths[label].name,
                     len(violations))
        elif violations:
            shown = "; ".join(v.message for v in violations[:3])
            raise QFrameError(f"exported {paths[label].name} breaks {len(violations)} TensorRT rules: {shown} "
                              "(a model quantized for onnxruntime, e.g. quant=w8a8_ort: set export.target=onnxruntime)")
        else:
            log.info("%s passes the TensorRT-rules lint", paths[label].name)
    ort_name = f"{label}_onnxruntime"
    if cfg.onnxruntime_form:
        calib = None
        if cfg.calibration_batches:
            batches = itertools.islice(data.loader("train", 64, shuffle=True, seed=0), cfg.calibration_batches)
            calib = [x for x, _ in batches]
        paths[ort_name] = run_dir / f"model_{ort_name}.onnx"
        shape = (data.channels, data.image_size, data.image_size)
        candidates = (0, 1) if cfg.ort_float_convs == "auto" else (cfg.ort_float_convs,)
        form, summary["ort_float_convs"], summary["ort_float_convs_ms"] = fastest_form(
            graph, shape, cfg.timing_batch, calib, candidates=candidates, threads=cfg.threads)
        onnx.save(form, str(paths[ort_name]))
        summary["files"][ort_name] = paths[ort_name].name
    if cfg.tensorrt and cfg.target == "tensorrt":
        from qframe.export.tensorrt import prepare_tensorrt

        shape = (1, data.channels, data.image_size, data.image_size) if cfg.dynamic_batch else None
        trt = prepare_tensorrt(run_dir / "tensorrt", paths[label], paths["fp32"], dla_core=cfg.dla_core,
                               gpu_fallback=cfg.gpu_fallback, input_shape=shape)
        summary["tensorrt"] = {k: str(v) if isinstance(v, Path) else v for k, v in trt.items()}
        log.info(trt["message"])
    if cfg.parity:
        for name, path in paths.items():
            parity = ort_parity(path, fp32 if name == "fp32" else qmodel, data.loader("test", 64))
            summary[f"parity_{name}"] = parity
            log.info("onnxruntime %s: top-1 agreement with PyTorch %.2f%%, max logit difference %.4f",
                     path.name, parity["agreement"], parity["max_logit_diff"])
    shape = (data.channels, data.image_size, data.image_size)
    rounds = 10  # the files take turns this often, so load from other processes falls on all of them alike
    timings: dict[str, dict] = {n: {} for n in paths}
    for batch in dict.fromkeys((1, cfg.timing_batch)):
        key = 1 if batch == 1 else "throughput"
        for name, t in time_onnx(paths, shape, batch, threads=cfg.threads, rounds=rounds,
                                 runs=max(1, cfg.timing_runs // rounds)).items():
            timings[name][key] = t
    summary["timing"] = {n: {str(k): v for k, v in t.items()} for n, t in timings.items()}
    timed = ort_name if ort_name in paths else label
    rows = []
    for name in ("fp32", timed):
        form = "" if name == "fp32" else (", onnxruntime-form Q/DQ" if name == ort_name else ", TensorRT-form Q/DQ")
        row = _timing_row("fp32" if name == "fp32" else label, timings[name], paths[name].stat().st_size,
                          f"onnxruntime / cpu{form}")
        if cfg.parity:
            p = summary[f"parity_{name}"]
            row.update(accuracy=p["accuracy"], agreement=p["agreement"], max_logit_diff=p["max_logit_diff"])
        rows.append(row)
    for key, batch in ((1, 1), ("throughput", cfg.timing_batch)):  # paired per round: see paired_speedup
        summary[f"int8_vs_fp32_speed_batch{batch}"] = {
            n: paired_speedup(timings["fp32"][key], timings[n][key]) for n in paths if n != "fp32"}
    summary["int8_vs_fp32_speed"] = summary[f"int8_vs_fp32_speed_batch{cfg.timing_batch}"][timed]
    log.info("onnxruntime, %d threads: %s is %.2fx the speed of FP32 at batch %d, %.2fx at batch 1 "
             "(TensorRT form: %.2fx, %.2fx)", cfg.threads, paths[timed].name, summary["int8_vs_fp32_speed"],
             cfg.timing_batch, summary["int8_vs_fp32_speed_batch1"][timed],
             summary[f"int8_vs_fp32_speed_batch{cfg.timing_batch}"][label], summary["int8_vs_fp32_speed_batch1"][label])
    if dla and cfg.target == "tensorrt":
        report = dla_report(graph)
        atomic_write_text(report.to_markdown() + "\n", run_dir / "dla_report.md")
        summary["dla"] = {"subgraphs": report.subgraphs, "boundaries": report.boundaries,
                          "gpu_layers": [r.name for r in report.rows if r.placement == "GPU"]}
        log.info("DLA report: %d DLA subgraphs, %d GPU<->DLA boundaries (dla_report.md)", report.subgraphs,
                 report.boundaries)
    return summary, rows
