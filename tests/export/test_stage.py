"""The export stage: both Q/DQ forms written, lint, parity of every file, timing rows that say what they time."""

import pytest
import torch

import qframe
from qframe.errors import QFrameError
from qframe.export.stage import ExportConfig, export_stage

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def test_export_stage_writes_both_forms_and_times_the_onnxruntime_form(tmp_path):
    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    cfg = ExportConfig(enabled=True, dynamic_batch=True, timing_runs=5, timing_batch=8, calibration_batches=2)
    summary, rows = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=True)
    for name in ("model_fp32.onnx", "model_ptq_w8a8.onnx", "model_ptq_w8a8_onnxruntime.onnx", "dla_report.md",
                 "tensorrt/build_engines.sh", "tensorrt/model_int8_noqdq.calib"):
        assert (tmp_path / name).is_file(), name
    assert summary["lint"] == []
    assert "--shapes=input:1x1x16x16" in (tmp_path / "tensorrt/build_engines.sh").read_text()  # dynamic batch: DLA builds batch 1
    assert summary["parity_fp32"]["agreement"] == 100.0
    for name in ("ptq_w8a8", "ptq_w8a8_onnxruntime"):
        assert summary[f"parity_{name}"]["agreement"] >= 95.0 and summary[f"parity_{name}"]["images"] == len(data.test)
    assert [r["precision"] for r in rows] == ["fp32", "ptq_w8a8"]
    assert "onnxruntime-form" in rows[1]["backend"] and rows[1]["throughput_batch"] == 8
    assert rows[1]["agreement"] == summary["parity_ptq_w8a8_onnxruntime"]["agreement"]
    for name in ("fp32", "ptq_w8a8", "ptq_w8a8_onnxruntime"):
        assert summary["timing"][name]["1"]["median_ms"] > 0 and summary["timing"][name]["throughput"]["batch_size"] == 8
    assert set(summary["int8_vs_fp32_speed_batch1"]) == {"ptq_w8a8", "ptq_w8a8_onnxruntime"}
    assert summary["int8_vs_fp32_speed"] == summary["int8_vs_fp32_speed_batch8"]["ptq_w8a8_onnxruntime"]
    # "auto" timed both layouts of the one-channel stem and kept the faster
    assert summary["ort_float_convs"] in (0, 1) and set(summary["ort_float_convs_ms"]) == {0, 1}
    assert summary["ort_float_convs_ms"][summary["ort_float_convs"]] == min(summary["ort_float_convs_ms"].values())


@pytest.mark.parametrize("field, value", [("timing_batch", 0), ("calibration_batches", -1), ("threads", 0),
                                          ("timing_runs", True), ("opset", 11), ("ort_float_convs", -1),
                                          ("ort_float_convs", "fast")])
def test_export_config_rejects_bad_values(field, value):
    with pytest.raises(QFrameError, match=f"export.{field}="):
        ExportConfig(**{field: value})


def test_onnxruntime_target_reports_tensorrt_rules_without_failing(tmp_path):
    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.25).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8_ort"), data.loader("train", 64, shuffle=True), 2)
    with pytest.raises(QFrameError, match="breaks .* TensorRT rules: .*zero point"):
        export_stage(ExportConfig(enabled=True, timing_runs=2, timing_batch=4), model, qmodel, "ptq_w8a8_ort",
                     data, tmp_path / "trt", dla=True)
    cfg = ExportConfig(enabled=True, target="onnxruntime", timing_runs=2, timing_batch=4, ort_float_convs=0)
    summary, rows = export_stage(cfg, model, qmodel, "ptq_w8a8_ort", data, tmp_path / "ort", dla=True)
    assert summary["lint"] and not (tmp_path / "ort/tensorrt").exists() and not (tmp_path / "ort/dla_report.md").exists()
    assert summary["ort_float_convs"] == 0 and summary["parity_ptq_w8a8_ort_onnxruntime"]["agreement"] >= 99.0


def test_export_target_must_be_known():
    with pytest.raises(QFrameError, match="export.target='trt' is invalid; valid: tensorrt, onnxruntime"):
        ExportConfig(target="trt")
