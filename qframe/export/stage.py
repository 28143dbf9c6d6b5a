"""The export stage of a run: FP32 and quantized ONNX (the standard Q/DQ form, and its onnxruntime form),
TensorRT lint, onnxruntime parity that stops the run when it fails, timing, and the DLA report when the
target has a DLA."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.io import atomic_write_text

log = logging.getLogger(__name__)


TARGETS = ("tensorrt", "onnxruntime")
PARITY_LEVELS = ("basic", "all")  # the graph's own semantics, and the level the files are timed at


@dataclass
class ExportConfig:
    """Whether and how a run exports its quantized model (the ``*_orin`` / ``*_desktop`` experiments do)."""

    enabled: bool = False
    opset: int = 17
    dynamic_batch: bool = True  # a symbolic batch axis in the ONNX files (TensorRT then builds for batch 1)
    # tensorrt: the Q/DQ graph must pass the TensorRT lint, build_engines.sh and the DLA report are
    # written; onnxruntime: the lint is only reported (e.g. a recipe with uint8 activations)
    target: str = "tensorrt"
    lint: bool = True  # check the Q/DQ graph against TensorRT's rules (fatal when target=tensorrt)
    parity: bool = True  # onnxruntime against PyTorch on the test split, at ORT_ENABLE_BASIC and ORT_ENABLE_ALL
    onnxruntime_form: bool = True  # also write model_<label>_onnxruntime.onnx, laid out for onnxruntime's x86 kernels
    min_agreement: float = 99.0  # % top-1 agreement below which the stage stops (at either level)
    parity_batch: int = 64  # images per onnxruntime call in the parity check (> 1: the file must run batched)
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
        if isinstance(self.min_agreement, bool) or not isinstance(self.min_agreement, (int, float)) \
                or not 0 <= self.min_agreement <= 100:
            raise QFrameError(f"export.min_agreement={self.min_agreement!r} is invalid; valid: a number in [0, 100]")
        for name, low in (("timing_runs", 1), ("timing_batch", 1), ("threads", 1), ("parity_batch", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise QFrameError(f"export.{name}={value!r} is invalid; valid: an integer >= {low}")


def _timing_row(name: str, timing: dict, size: int, form: str) -> dict:
    lat, thr = timing[1], timing.get("throughput", timing[1])
    return {"method": "onnx", "precision": name, "backend": f"onnxruntime / cpu{form}", "latency_ms": lat["median_ms"],
            "latency_p90_ms": lat["p90_ms"], "latency_batch": 1, "throughput": thr["throughput"],
            "throughput_batch": thr["batch_size"], "size_bytes": size, "size_kib": size / 1024}


def check_parity(name: str, parity: dict[str, dict], min_agreement: float) -> None:
    """Raise, in one line, when the agreement of ``parity`` (:func:`qframe.export.ort.ort_parity`) is
    below ``min_agreement`` % at any level."""
    for p in parity.values():
        if p["agreement"] < min_agreement:
            raise QFrameError(f"{name} agrees with the PyTorch model on {p['agreement']:.2f}% of {p['images']} test "
                              f"images in onnxruntime at {p['level']} (max logit difference {p['max_logit_diff']:.4g}), "
                              f"below export.min_agreement={min_agreement:g}%")


def _lint(cfg: ExportConfig, graph, path: Path) -> list[str]:
    from qframe.export.lint import lint_tensorrt

    violations = lint_tensorrt(graph)
    if violations and cfg.target == "tensorrt":
        shown = "; ".join(v.message for v in violations[:3])
        raise QFrameError(f"exported {path.name} breaks {len(violations)} TensorRT rules: {shown} "
                          "(for a recipe TensorRT cannot run, set export.target=onnxruntime)")
    log.info("%s %s the TensorRT-rules lint", path.name,
             f"breaks {len(violations)} rules of" if violations else "passes")
    return [v.message for v in violations]


def export_stage(cfg: ExportConfig, fp32: nn.Module, qmodel: nn.Module, label: str, data, run_dir: Path,
                 dla: bool) -> tuple[dict, list[dict]]:
    """Export both models, lint, check parity and time them; return the summary and report rows.

    Files: ``model_fp32.onnx``, ``model_<label>.onnx`` (the standard Q/DQ form: lint-checked, handed
    to TensorRT and to the DLA report, run by onnxruntime) and ``model_<label>_onnxruntime.onnx``
    (:func:`qframe.export.ort_form.onnxruntime_form`, when ``cfg.onnxruntime_form``). Parity is
    measured for every file at ORT_ENABLE_BASIC and ORT_ENABLE_ALL; below ``cfg.min_agreement`` the
    stage stops with one line. Each file gets a results row.
    """
    import onnx

    from qframe.export.dla import dla_report
    from qframe.export.onnx import export_onnx, with_batch
    from qframe.export.ort import ort_parity, paired_speedup, time_onnx

    example = torch.randn(1, data.channels, data.image_size, data.image_size)
    kw = {"opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch}
    paths = {"fp32": export_onnx(fp32, example, run_dir / "model_fp32.onnx", **kw),
             label: export_onnx(qmodel, example, run_dir / f"model_{label}.onnx", **kw)}
    graph = onnx.load(str(paths[label]))
    summary: dict = {"lint": _lint(cfg, graph, paths[label])} if cfg.lint else {}
    ort_name = f"{label}_onnxruntime"
    if cfg.onnxruntime_form:
        from qframe.export.ort_form import onnxruntime_form

        paths[ort_name] = run_dir / f"model_{ort_name}.onnx"
        onnx.save(onnxruntime_form(graph), str(paths[ort_name]))
    sizes = {name: p.stat().st_size for name, p in paths.items()}
    summary.update(files={k: p.name for k, p in paths.items()}, size_bytes=sizes,
                   size_ratio=sizes[label] / sizes["fp32"])
    if cfg.parity:
        for name, path in paths.items():
            parity = ort_parity(path, fp32 if name == "fp32" else qmodel, data.loader("test", cfg.parity_batch),
                                levels=PARITY_LEVELS)
            summary[f"parity_{name}"] = parity
            log.info("onnxruntime %s: top-1 agreement with PyTorch %s", path.name, ", ".join(
                f"{p['agreement']:.2f}% at {p['level']} (max logit difference {p['max_logit_diff']:.4f})"
                for p in parity.values()))
            check_parity(path.name, parity, cfg.min_agreement)
    if cfg.tensorrt and cfg.target == "tensorrt":
        from qframe.export.tensorrt import prepare_tensorrt

        shape = (1, data.channels, data.image_size, data.image_size) if cfg.dynamic_batch else None
        trt = prepare_tensorrt(run_dir / "tensorrt", paths[label], paths["fp32"], dla_core=cfg.dla_core,
                               gpu_fallback=cfg.gpu_fallback, input_shape=shape)
        summary["tensorrt"] = {k: str(v) if isinstance(v, Path) else v for k, v in trt.items()}
        log.info(trt["message"])
        from qframe.export.testset import FILE_NAME, save_test_set  # what python -m qframe.deploy checks engines on

        save_test_set(run_dir / "tensorrt" / FILE_NAME, data, {"fp32": fp32, label: qmodel})
    shape = (data.channels, data.image_size, data.image_size)
    rounds = 10  # the files take turns this often, so load from other processes falls on both alike
    timings: dict[str, dict] = {n: {} for n in paths}
    for batch in dict.fromkeys((1, cfg.timing_batch)):
        key = 1 if batch == 1 else "throughput"
        for name, t in time_onnx(paths, shape, batch, threads=cfg.threads, rounds=rounds,
                                 runs=max(1, cfg.timing_runs // rounds)).items():
            timings[name][key] = t
    summary["timing"] = {n: {str(k): v for k, v in t.items()} for n, t in timings.items()}
    rows = []
    for name in paths:
        form = {label: ", standard Q/DQ", ort_name: ", onnxruntime form"}.get(name, "")
        row = _timing_row(label if name == ort_name else name, timings[name], sizes[name], form)
        if cfg.parity:
            p = summary[f"parity_{name}"]["all"]  # the level the row is timed at
            row.update(accuracy=p["accuracy"], agreement=p["agreement"], max_logit_diff=p["max_logit_diff"])
        rows.append(row)
    for key, batch in ((1, 1), ("throughput", cfg.timing_batch)):  # paired per round: see paired_speedup
        summary[f"int8_vs_fp32_speed_batch{batch}"] = {
            name: paired_speedup(timings["fp32"][key], timings[name][key]) for name in paths if name != "fp32"}
    summary["int8_vs_fp32_speed"] = summary[f"int8_vs_fp32_speed_batch{cfg.timing_batch}"][label]
    for name in paths:
        if name != "fp32":
            log.info("onnxruntime, %d threads: %s is %.2fx the speed of FP32 at batch %d, %.2fx at batch 1; %.0f%% of "
                     "its bytes", cfg.threads, paths[name].name,
                     summary[f"int8_vs_fp32_speed_batch{cfg.timing_batch}"][name], cfg.timing_batch,
                     summary["int8_vs_fp32_speed_batch1"][name], 100 * sizes[name] / sizes["fp32"])
    if dla and cfg.target == "tensorrt":
        report = dla_report(with_batch(graph, 1))  # the DLA engine is built for batch 1 (static shapes)
        atomic_write_text(report.to_markdown() + "\n", run_dir / "dla_report.md")
        summary["dla"] = {"subgraphs": report.subgraphs, "boundaries": report.boundaries,
                          "gpu_layers": [r.name for r in report.rows if r.placement == "GPU"]}
        log.info("DLA report: %d DLA subgraphs, %d GPU<->DLA boundaries (dla_report.md)", report.subgraphs,
                 report.boundaries)
    return summary, rows
