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


@pytest.mark.parametrize("field, value", [("timing_batch", 0), ("calibration_batches", -1), ("threads", 0),
                                          ("timing_runs", True), ("opset", 11)])
def test_export_config_rejects_bad_values(field, value):
    with pytest.raises(QFrameError, match=f"export.{field}="):
        ExportConfig(**{field: value})
