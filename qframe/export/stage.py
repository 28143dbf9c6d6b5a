"""The export stage of a run: FP32 and quantized ONNX (the standard Q/DQ form, its onnxruntime form and its
OpenVINO form), TensorRT lint, onnxruntime parity that stops the run when it fails, timing, OpenVINO parity
and timing where ``openvino`` imports, and the DLA report when the target has a DLA."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError, check_field_types
from qframe.export.onnx import EXPORTERS
from qframe.utils.io import atomic_onnx_save, atomic_write_text

log = logging.getLogger(__name__)


TARGETS = ("tensorrt", "onnxruntime")
PARITY_LEVELS = ("basic", "all")  # the graph's own semantics, and the level the files are timed at


@dataclass
class ExportConfig:
    """Whether and how a run exports its quantized model (the ``*_orin`` / ``*_desktop`` experiments do)."""

    enabled: bool = False
    opset: int = 17
    dynamic_batch: bool = True  # a symbolic batch axis in the ONNX files (TensorRT then builds for batch 1)
    # torch's ONNX exporter: auto (TorchScript, dynamo where it rejects the model), torchscript, dynamo
    exporter: str = "auto"
    # tensorrt: the Q/DQ graph must pass the TensorRT lint, build_engines.sh and the DLA report are
    # written; onnxruntime: the lint is only reported (e.g. a recipe with uint8 activations)
    target: str = "tensorrt"
    lint: bool = True  # check the Q/DQ graph against TensorRT's rules (fatal when target=tensorrt)
    parity: bool = True  # onnxruntime against PyTorch on the test split, at ORT_ENABLE_BASIC and ORT_ENABLE_ALL
    onnxruntime_form: bool = True  # also write model_<label>_onnxruntime.onnx, laid out for onnxruntime's x86 kernels
    # where openvino imports: parity and timing of the FP32 and Q/DQ files in OpenVINO too (one log line where not)
    openvino: bool = True
    openvino_form: bool = True  # with openvino: also write model_<label>_openvino.onnx (qframe.export.ov_form)
    # the OpenVINO form with full_unsigned_range: 256 codes over each ReLU range, no clamp (faster, closer to
    # FP32, no longer bit-exact with the fake-quant model)
    openvino_full_range: bool = False
    min_agreement: float = 99.0  # % top-1 agreement below which the stage stops (at either level)
    parity_batch: int = 64  # images per onnxruntime call in the parity check (> 1: the file must run batched)
    timing_runs: int = 50  # timed calls per model and batch size
    timing_batch: int = 32  # the throughput batch (latency is timed at batch 1)
    threads: int = 2  # onnxruntime intra-op threads
    tensorrt: bool = True  # write build_engines.sh (trtexec commands, DLA calibration cache) into tensorrt/
    dla_core: int = 0
    gpu_fallback: bool = True

    def __post_init__(self):
        check_field_types(self, 'export', kinds=('bool',))  # the numbers have checks of their own below
        if self.target not in TARGETS:
            raise QFrameError(f"export.target={self.target!r} is invalid; valid: {', '.join(TARGETS)}")
        if self.exporter not in EXPORTERS:
            raise QFrameError(f"export.exporter={self.exporter!r} is invalid; valid: {', '.join(EXPORTERS)}")
        if not 13 <= self.opset <= 21:
            raise QFrameError(f"export.opset={self.opset!r} is invalid; valid: 13..21 (per-channel Q/DQ needs 13)")
        if isinstance(self.min_agreement, bool) or not isinstance(self.min_agreement, (int, float)) \
                or not 0 <= self.min_agreement <= 100:
            raise QFrameError(f"export.min_agreement={self.min_agreement!r} is invalid; valid: a number in [0, 100]")
        for name, low in (("timing_runs", 1), ("timing_batch", 1), ("threads", 1), ("parity_batch", 2), ("dla_core", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise QFrameError(f"export.{name}={value!r} is invalid; valid: an integer >= {low}")


def _timing_row(name: str, timing: dict, size: int, form: str, runtime: str = "onnxruntime") -> dict:
    lat, thr = timing[1], timing.get("throughput", timing[1])
    return {"method": "onnx", "precision": name, "backend": f"{runtime} / cpu{form}", "latency_ms": lat["median_ms"],
            "latency_p90_ms": lat["p90_ms"], "latency_batch": 1, "throughput": thr["throughput"],
            "throughput_batch": thr["batch_size"], "size_bytes": size, "size_kib": size / 1024}


def check_parity(name: str, parity: dict[str, dict], min_agreement: float, saturating: str | None = None) -> list[str]:
    """Raise, in one line, when the agreement of ``parity`` (:func:`qframe.export.ort.ort_parity`) is
    below ``min_agreement`` % at any level.

    ``saturating`` (:func:`qframe.export.ort.integer_kernels_saturate`) says why this CPU's integer kernels
    are inexact: there a shortfall above ORT_ENABLE_BASIC (the graph's own semantics, still checked) is
    onnxruntime's numerics on this CPU, not the file's, and comes back as a note instead.
    """
    notes = []
    for key, p in parity.items():
        if p["agreement"] >= min_agreement:
            continue
        text = (f"{name} agrees with the PyTorch model on {p['agreement']:.2f}% of {p['images']} test images in "
                f"onnxruntime at {p['level']} (max logit difference {p['max_logit_diff']:.4g}), below "
                f"export.min_agreement={min_agreement:g}%")
        if not saturating or key in ("disabled", "basic"):
            raise QFrameError(text)
        notes.append(f"{text}: {saturating}; the file itself agrees at ORT_ENABLE_BASIC, and runs exactly on a "
                     "CPU with VNNI")
    return notes


def _lint(cfg: ExportConfig, graph, path: Path, chosen: dict[str, str]) -> tuple[list[str], list[str]]:
    """Errors and warnings of the TensorRT lint; errors stop the stage when the target is TensorRT.
    Layers the recipe chose to keep float (``chosen``) are warnings, listed, not errors."""
    from qframe.export.lint import lint_tensorrt

    found = lint_tensorrt(graph, chosen)
    violations = [v for v in found if v.severity == "error"]
    warnings = [v.message for v in found if v.severity == "warning"]
    if violations and cfg.target == "tensorrt":
        shown = "; ".join(v.message for v in violations[:3])
        raise QFrameError(f"exported {path.name} breaks {len(violations)} TensorRT rules: {shown} "
                          "(for a recipe TensorRT cannot run, set export.target=onnxruntime)")
    log.info("%s %s the TensorRT-rules lint%s", path.name,
             f"breaks {len(violations)} rules of" if violations else "passes",
             f" with {len(warnings)} warnings (layers the recipe keeps float)" if warnings else "")
    for w in warnings[:8]:
        log.warning("TensorRT lint: %s", w)
    return [v.message for v in violations], warnings


def write_coverage(graph, chosen: dict[str, str], run_dir: Path) -> dict:
    """Write ``tensorrt_coverage.md`` (per compute layer: INT8 or FP16/FP32 and why); return its data."""
    from qframe.export.coverage import tensorrt_coverage

    report = tensorrt_coverage(graph, chosen)
    atomic_write_text(report.to_markdown() + "\n", run_dir / "tensorrt_coverage.md")
    (log.warning if report.fallbacks(chosen=False) else log.info)("%s (tensorrt_coverage.md)", report.summary())
    return report.to_dict()


def _openvino_rows(cfg: ExportConfig, fp32: nn.Module, qmodel: nn.Module, label: str, data, run_dir: Path,
                   paths: dict[str, Path], graph, summary: dict) -> list[dict]:
    """Parity and timing of the FP32 file, the standard Q/DQ form and the OpenVINO form in OpenVINO, into
    ``summary["openvino"]``; their rows. Where ``openvino`` does not import: one log line, no rows.

    OpenVINO's numerics are its own (float parts in bf16 on CPUs with AVX-512 BF16; the FP32 file runs
    at f32), so its parity is reported and warned about below ``cfg.min_agreement``, not fatal: the
    onnxruntime check above is the one that stops the stage.
    """
    from qframe.export.ov import openvino_missing, openvino_version, ov_parity, time_openvino
    from qframe.export.ort import paired_speedup

    missing = openvino_missing()
    if missing:
        log.info("%s: no OpenVINO parity or timing rows (pip install openvino to add them)", missing)
        summary["openvino"] = {"skipped": missing}
        return []
    files = {"fp32": paths["fp32"], label: paths[label]}
    ov_name = f"{label}_openvino"
    if cfg.openvino_form:
        import onnx

        from qframe.export.ov_form import openvino_form

        files[ov_name] = run_dir / f"model_{ov_name}.onnx"
        atomic_onnx_save(openvino_form(graph, full_unsigned_range=cfg.openvino_full_range), files[ov_name])
    result: dict = {"version": openvino_version(), "files": {k: p.name for k, p in files.items()}}
    precision = {"fp32": "f32"}
    if cfg.parity:
        result["parity"] = {}
        for name, path in files.items():
            p = ov_parity(path, fp32 if name == "fp32" else qmodel, data.loader("test", cfg.parity_batch),
                          threads=cfg.threads, precision=precision.get(name))
            result["parity"][name] = p
            (log.warning if p["agreement"] < cfg.min_agreement else log.info)(
                "OpenVINO %s: top-1 agreement with PyTorch %.2f%% of %d test images (max logit difference %.4f)%s",
                path.name, p["agreement"], p["images"], p["max_logit_diff"],
                f", below export.min_agreement={cfg.min_agreement:g}%" if p["agreement"] < cfg.min_agreement else "")
    shape = (data.channels, data.image_size, data.image_size)
    rounds = 10
    timings: dict[str, dict] = {n: {} for n in files}
    for batch in dict.fromkeys((1, cfg.timing_batch)):
        key = 1 if batch == 1 else "throughput"
        for name, t in time_openvino(files, shape, batch, threads=cfg.threads, rounds=rounds,
                                     runs=max(1, cfg.timing_runs // rounds), precision=precision).items():
            timings[name][key] = t
    result["timing"] = {n: {str(k): v for k, v in t.items()} for n, t in timings.items()}
    for key, batch in ((1, 1), ("throughput", cfg.timing_batch)):
        result[f"int8_vs_fp32_speed_batch{batch}"] = {
            name: paired_speedup(timings["fp32"][key], timings[name][key]) for name in files if name != "fp32"}
    summary["openvino"] = result
    rows = []
    for name, path in files.items():
        form = {label: ", standard Q/DQ", ov_name: ", OpenVINO form" + (", full uint8 range after ReLU"
                                                                          if cfg.openvino_full_range else "")}.get(name, "")
        row = _timing_row(label if name == ov_name else name, timings[name], path.stat().st_size, form, "openvino")
        if cfg.parity:
            p = result["parity"][name]
            row.update(accuracy=p["accuracy"], agreement=p["agreement"], max_logit_diff=p["max_logit_diff"])
        rows.append(row)
        if name != "fp32":
            log.info("OpenVINO %s, %d threads: %.2fx the speed of FP32 at batch %d, %.2fx at batch 1", path.name,
                     cfg.threads, result[f"int8_vs_fp32_speed_batch{cfg.timing_batch}"][name], cfg.timing_batch,
                     result["int8_vs_fp32_speed_batch1"][name])
    return rows


def export_stage(cfg: ExportConfig, fp32: nn.Module, qmodel: nn.Module, label: str, data, run_dir: Path,
                 dla: bool) -> tuple[dict, list[dict]]:
    """Export both models, lint, check parity and time them; return the summary and report rows.

    Files: ``model_fp32.onnx``, ``model_<label>.onnx`` (the standard Q/DQ form: lint-checked, handed
    to TensorRT and to the DLA report, run by onnxruntime) and ``model_<label>_onnxruntime.onnx``
    (:func:`qframe.export.ort_form.onnxruntime_form`, when ``cfg.onnxruntime_form``). Parity is
    measured for every file at ORT_ENABLE_BASIC and ORT_ENABLE_ALL; below ``cfg.min_agreement`` the
    stage stops with one line. Each file gets a results row. Where ``openvino`` imports (and
    ``cfg.openvino``), the FP32 file, the standard form and ``model_<label>_openvino.onnx``
    (:func:`qframe.export.ov_form.openvino_form`) also get OpenVINO parity and timing rows.
    """
    import onnx

    from qframe.export.dla import dla_report
    from qframe.export.onnx import export_onnx, with_batch
    from qframe.export.ort import (PAD_FUSION, integer_kernels_saturate, ort_parity, paired_speedup,
                                   pad_fusion_breaks_max_pooling, time_onnx, zero_pads_before_max_pooling)

    example = torch.randn(1, data.channels, data.image_size, data.image_size)
    kw = {"opset": cfg.opset, "dynamic_batch": cfg.dynamic_batch, "exporter": cfg.exporter}
    paths = {"fp32": export_onnx(fp32, example, run_dir / "model_fp32.onnx", **kw),
             label: export_onnx(qmodel, example, run_dir / f"model_{label}.onnx", **kw)}
    graph = onnx.load(str(paths[label]))
    from qframe.export.coverage import chosen_float_layers

    chosen = chosen_float_layers(qmodel)
    saturating = integer_kernels_saturate()  # why this CPU's uint8 x int8 kernels are inexact, or None
    summary: dict = {}
    if cfg.lint:
        summary["lint"], summary["lint_warnings"] = _lint(cfg, graph, paths[label], chosen)
    if cfg.target == "tensorrt":
        summary["tensorrt_coverage"] = write_coverage(graph, chosen, run_dir)
    pads = zero_pads_before_max_pooling(graph)
    if pads and (why := pad_fusion_breaks_max_pooling()):
        note = (f"{', '.join(pads)} pad(s) with zeros into a MaxPool: {why}. qframe's sessions run without "
                f"its '{PAD_FUSION}' rule; a session of yours needs disabled_optimizers=['{PAD_FUSION}'] "
                "(onnxruntime 1.32.0 fuses the pair correctly)")
        log.warning("%s", note)
        summary["onnxruntime_notes"] = [note]
    ort_name = f"{label}_onnxruntime"
    if cfg.onnxruntime_form:
        from qframe.export.ort_form import onnxruntime_form

        paths[ort_name] = run_dir / f"model_{ort_name}.onnx"
        # uint8 weights where onnxruntime's uint8 x int8 kernels saturate (ort_form's docstring)
        summary["onnxruntime_form_uint8_weights"] = saturating is not None
        atomic_onnx_save(onnxruntime_form(graph, summary["onnxruntime_form_uint8_weights"]), paths[ort_name])
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
            for note in check_parity(path.name, parity, cfg.min_agreement, saturating):
                log.warning("%s", note)
                summary.setdefault("parity_notes", []).append(note)
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
        form = {label: ", standard Q/DQ", ort_name: ", onnxruntime form"
                + (" (uint8 weights)" if summary.get("onnxruntime_form_uint8_weights") else "")}.get(name, "")
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
    if cfg.openvino:
        rows += _openvino_rows(cfg, fp32, qmodel, label, data, run_dir, paths, graph, summary)
    if dla and cfg.target == "tensorrt":
        report = dla_report(with_batch(graph, 1))  # the DLA engine is built for batch 1 (static shapes)
        atomic_write_text(report.to_markdown() + "\n", run_dir / "dla_report.md")
        summary["dla"] = {"subgraphs": report.subgraphs, "boundaries": report.boundaries,
                          "gpu_layers": [r.name for r in report.rows if r.placement == "GPU"]}
        log.info("DLA report: %d DLA subgraphs, %d GPU<->DLA boundaries (dla_report.md)", report.subgraphs,
                 report.boundaries)
    return summary, rows
