"""The export stage: the standard Q/DQ file, lint, parity at two optimization levels that stops the stage when
it fails, timing rows that say what they time."""

import logging
import sys

import numpy as np
import pytest
import torch

import qframe
import qframe.export.onnx as export_onnx_module
from qframe.errors import QFrameError
from qframe.export.ort import integer_kernels_saturate
from qframe.export.stage import ExportConfig, check_parity, export_stage
from qframe.train import TrainConfig, fit

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = qframe.build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.5).eval()
    fit(model, data, TrainConfig(epochs=2, batch_size=64), seed=0)
    qmodel = qframe.ptq(model.eval(), qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    return data, model.eval(), qmodel


def _agrees(summary: dict, name: str, images: int, uint8: bool) -> None:
    """Every level of ``name``'s parity agrees on >= 99 % of ``images``; for a file with uint8 activations,
    on a CPU whose onnxruntime uint8 x int8 kernels saturate, the levels above ORT_ENABLE_BASIC may fall short
    and then are a note naming the file and the cause instead (``check_parity``)."""
    parity = summary[f"parity_{name}"]
    assert [p["level"] for p in parity.values()] == ["ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"]
    assert all(p["images"] == images for p in parity.values())
    assert parity["basic"]["agreement"] >= 99.0
    if uint8 and integer_kernels_saturate() and parity["all"]["agreement"] < 99.0:
        note = next(n for n in summary["parity_notes"] if n.startswith(f"model_{name}.onnx agrees"))
        assert "ORT_ENABLE_ALL" in note and "VNNI" in note
    else:
        assert parity["all"]["agreement"] >= 99.0


def test_export_stage_writes_checks_and_times_the_standard_form(setup, tmp_path):
    data, model, qmodel = setup
    cfg = ExportConfig(enabled=True, timing_runs=5, timing_batch=8)
    summary, rows = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=True)
    for name in ("model_fp32.onnx", "model_ptq_w8a8.onnx", "model_ptq_w8a8_onnxruntime.onnx", "dla_report.md",
                 "tensorrt/build_engines.sh", "tensorrt/model_int8_noqdq.calib"):
        assert (tmp_path / name).is_file(), name
    assert summary["lint"] == [] and summary["lint_warnings"] == []
    coverage = summary["tensorrt_coverage"]  # every Conv / Gemm of the compact CNN runs in INT8
    assert coverage["layers"] == coverage["int8"] == sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                                                         for m in qmodel.modules())
    assert (tmp_path / "tensorrt_coverage.md").read_text().count("| INT8 |") == coverage["layers"]
    assert "--shapes=input:1x1x16x16" in (tmp_path / "tensorrt/build_engines.sh").read_text()  # dynamic batch: DLA builds batch 1
    assert summary["dla"]["subgraphs"] >= 1  # the DLA report sees that batch-1 graph, not the dynamic one
    files = ("fp32", "ptq_w8a8", "ptq_w8a8_onnxruntime")
    for name in files:  # the standard form is int8: exact on every CPU; the onnxruntime form's codes are uint8
        _agrees(summary, name, len(data.test), uint8=name.endswith("_onnxruntime"))
    assert summary["size_ratio"] == summary["size_bytes"]["ptq_w8a8"] / summary["size_bytes"]["fp32"] < 0.5
    rows = [r for r in rows if r["backend"].startswith("onnxruntime")]  # (OpenVINO rows: see below)
    assert [r["precision"] for r in rows] == ["fp32", "ptq_w8a8", "ptq_w8a8"] and rows[1]["throughput_batch"] == 8
    assert rows[1]["backend"].endswith("standard Q/DQ") and "onnxruntime form" in rows[2]["backend"]
    assert rows[1]["agreement"] == summary["parity_ptq_w8a8"]["all"]["agreement"]  # the timed level
    for name in files:
        assert summary["timing"][name]["1"]["median_ms"] > 0 and summary["timing"][name]["throughput"]["batch_size"] == 8
    assert set(summary["int8_vs_fp32_speed_batch8"]) == set(files[1:])
    assert summary["int8_vs_fp32_speed"] == summary["int8_vs_fp32_speed_batch8"]["ptq_w8a8"] > 0


def test_a_layer_kept_float_is_a_lint_warning_and_a_coverage_row(setup, tmp_path):
    data, model, _ = setup
    recipe = qframe.preset("w8a8")
    recipe.rules = [qframe.LayerRule(pattern=":last", keep_float=True)]
    qmodel = qframe.ptq(model, recipe, data.loader("train", 64, shuffle=True), 2)
    cfg = ExportConfig(enabled=True, timing_runs=1, timing_batch=2, parity=False, onnxruntime_form=False)
    summary, _ = export_stage(cfg, model, qmodel, "keep", data, tmp_path, dla=False)  # no abort: chosen float
    assert summary["lint"] == [] and len(summary["lint_warnings"]) == 1 and "kept float" in summary["lint_warnings"][0]
    rows = summary["tensorrt_coverage"]["rows"]
    fallback = [r for r in rows if r["precision"] != "INT8"]
    assert len(fallback) == 1 and fallback[0]["chosen"] and "no Q/DQ" in fallback[0]["reason"]
    assert len(rows) - 1 == sum(r["precision"] == "INT8" for r in rows) >= 2


def _plant_scale_mismatch(path):
    """Multiply the scale of one activation DequantizeLinear (a middle layer's input) by 4 in the file."""
    model = onnx.load(str(path))
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1].endswith(".input.scale")]
    dq = dqs[len(dqs) // 2]
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    planted = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float32(4), f"{scale.name}_x4")
    model.graph.initializer.append(planted)
    dq.input[1] = planted.name
    onnx.save(model, str(path))


def test_a_planted_scale_mismatch_stops_the_stage_with_one_line(setup, tmp_path, monkeypatch):
    data, model, qmodel = setup
    real = export_onnx_module.export_onnx

    def export_and_plant(m, example, path, **kw):
        out = real(m, example, path, **kw)
        if m is qmodel:
            _plant_scale_mismatch(out)
        return out

    monkeypatch.setattr(export_onnx_module, "export_onnx", export_and_plant)
    with pytest.raises(QFrameError) as err:
        export_stage(ExportConfig(enabled=True, timing_runs=2, timing_batch=4), model, qmodel, "ptq_w8a8", data,
                     tmp_path, dla=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model_ptq_w8a8.onnx agrees with the PyTorch model on ")
    agreement = float(message.split(" on ")[1].split("%")[0])
    assert agreement < 99.0 and "test images in onnxruntime at ORT_ENABLE_BASIC (max logit difference " in message
    assert message.endswith("below export.min_agreement=99%")
    assert not (tmp_path / "tensorrt").exists() and not (tmp_path / "dla_report.md").exists()  # it stopped there
    # the threshold is the user's: 0 lets the same file through
    summary, _ = export_stage(ExportConfig(enabled=True, timing_runs=2, timing_batch=4, min_agreement=0.0), model,
                              qmodel, "ptq_w8a8", data, tmp_path / "lenient", dla=False)
    assert round(summary["parity_ptq_w8a8"]["basic"]["agreement"], 2) == agreement


def test_check_parity_names_the_level_that_fails():
    parity = {"basic": {"level": "ORT_ENABLE_BASIC", "agreement": 100.0, "max_logit_diff": 0.01, "images": 80},
              "all": {"level": "ORT_ENABLE_ALL", "agreement": 98.75, "max_logit_diff": 1.5, "images": 80}}
    check_parity("m.onnx", parity, 98.0)
    with pytest.raises(QFrameError, match=r"^m.onnx agrees with the PyTorch model on 98.75% of 80 test images in "
                                          r"onnxruntime at ORT_ENABLE_ALL \(max logit difference 1.5\), below "
                                          r"export.min_agreement=99.5%$"):
        check_parity("m.onnx", parity, 99.5)


def test_check_parity_on_a_saturating_cpu_notes_the_fused_levels_but_still_checks_the_graph():
    parity = {"basic": {"level": "ORT_ENABLE_BASIC", "agreement": 100.0, "max_logit_diff": 0.01, "images": 80},
              "all": {"level": "ORT_ENABLE_ALL", "agreement": 90.0, "max_logit_diff": 1.5, "images": 80}}
    why = "this x86 CPU has no VNNI"
    notes = check_parity("m.onnx", parity, 99.0, why)
    assert len(notes) == 1 and notes[0].startswith("m.onnx agrees with the PyTorch model on 90.00% of 80 test images")
    assert "ORT_ENABLE_ALL" in notes[0] and why in notes[0]
    assert check_parity("m.onnx", parity, 90.0, why) == []  # nothing to say at or above the threshold
    parity["basic"]["agreement"] = 95.0  # the graph's own semantics are never excused
    with pytest.raises(QFrameError, match=r"at ORT_ENABLE_BASIC .*below export.min_agreement=99%$"):
        check_parity("m.onnx", parity, 99.0, why)
    with pytest.raises(QFrameError, match="at ORT_ENABLE_BASIC"):
        check_parity("m.onnx", parity, 99.0)


@pytest.mark.parametrize("field, value", [("timing_batch", 0), ("threads", 0), ("timing_runs", True), ("opset", 11),
                                          ("min_agreement", 101), ("min_agreement", "high"), ("parity_batch", 1)])
def test_export_config_rejects_bad_values(field, value):
    with pytest.raises(QFrameError, match=f"export.{field}="):
        ExportConfig(**{field: value})


def test_onnxruntime_target_reports_tensorrt_rules_without_failing(setup, tmp_path):
    data, model, _ = setup
    uint8 = {"input": {"signed": False, "symmetric": False}}  # asymmetric uint8 activations: no TensorRT graph
    qmodel = qframe.ptq(model, qframe.preset("w8a8", **uint8), data.loader("train", 64, shuffle=True), 2)
    with pytest.raises(QFrameError, match="breaks .* TensorRT rules: .*zero point"):
        export_stage(ExportConfig(enabled=True, timing_runs=2, timing_batch=4), model, qmodel, "ptq_u8",
                     data, tmp_path / "trt", dla=True)
    cfg = ExportConfig(enabled=True, target="onnxruntime", timing_runs=2, timing_batch=4)
    summary, rows = export_stage(cfg, model, qmodel, "ptq_u8", data, tmp_path / "ort", dla=True)
    assert summary["lint"] and not (tmp_path / "ort/tensorrt").exists() and not (tmp_path / "ort/dla_report.md").exists()
    for name in ("ptq_u8", "ptq_u8_onnxruntime"):
        _agrees(summary, name, len(data.test), uint8=True)


def test_export_target_must_be_known():
    with pytest.raises(QFrameError, match="export.target='trt' is invalid; valid: tensorrt, onnxruntime"):
        ExportConfig(target="trt")


def test_export_stage_runs_the_q_dq_files_in_openvino_where_it_imports(setup, tmp_path):
    """The FP32 file, the standard form and the OpenVINO form run in OpenVINO: parity on the test split, timing
    at batch 1 and the throughput batch, a row each beside the onnxruntime rows."""
    pytest.importorskip("openvino")
    data, model, qmodel = setup
    cfg = ExportConfig(enabled=True, target="onnxruntime", timing_runs=5, timing_batch=8)
    summary, rows = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=False)
    ov = summary["openvino"]
    assert (tmp_path / "model_ptq_w8a8_openvino.onnx").is_file()
    assert ov["files"] == {"fp32": "model_fp32.onnx", "ptq_w8a8": "model_ptq_w8a8.onnx",
                           "ptq_w8a8_openvino": "model_ptq_w8a8_openvino.onnx"}
    for name, p in ov["parity"].items():
        assert p["images"] == len(data.test) and p["runtime"].startswith("OpenVINO 20")
        # FP32 at f32 agrees fully; the INT8 files as closely as onnxruntime's run of the standard form
        assert p["agreement"] >= (99.9 if name == "fp32" else summary["parity_ptq_w8a8"]["all"]["agreement"] - 1.0)
    ov_rows = [r for r in rows if r["backend"].startswith("openvino")]
    assert [r["backend"] for r in ov_rows] == ["openvino / cpu", "openvino / cpu, standard Q/DQ",
                                               "openvino / cpu, OpenVINO form"]
    assert [r["precision"] for r in ov_rows] == ["fp32", "ptq_w8a8", "ptq_w8a8"]
    for row, name in zip(ov_rows, ov["files"]):
        assert row["latency_ms"] > 0 and row["throughput_batch"] == 8 and row["agreement"] == ov["parity"][name]["agreement"]
        assert row["size_bytes"] == (tmp_path / ov["files"][name]).stat().st_size
    assert set(ov["int8_vs_fp32_speed_batch8"]) == set(ov["int8_vs_fp32_speed_batch1"]) == {"ptq_w8a8", "ptq_w8a8_openvino"}
    assert all(v > 0 for v in ov["int8_vs_fp32_speed_batch8"].values())


def test_export_stage_without_openvino_says_so_in_one_line(setup, tmp_path, monkeypatch, caplog):
    data, model, qmodel = setup
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError, as where it is absent
    cfg = ExportConfig(enabled=True, target="onnxruntime", timing_runs=2, timing_batch=4, parity=False)
    with caplog.at_level(logging.INFO, logger="qframe.export.stage"):
        summary, rows = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=False)
    lines = [r.getMessage() for r in caplog.records if "openvino" in r.getMessage().lower()]
    assert len(lines) == 1 and lines[0].startswith("openvino is not installed (")
    assert lines[0].endswith("no OpenVINO parity or timing rows (pip install openvino to add them)")
    assert summary["openvino"]["skipped"].startswith("openvino is not installed")
    assert not any(r["backend"].startswith("openvino") for r in rows) and len(rows) == 3
    assert not (tmp_path / "model_ptq_w8a8_openvino.onnx").exists()


def test_export_stage_writes_the_full_range_openvino_form_when_asked(setup, tmp_path):
    """export.openvino_full_range (+experiment=ptq_cpu): the OpenVINO form spreads 256 codes over each ReLU range."""
    pytest.importorskip("openvino")
    onnx = pytest.importorskip("onnx")
    from qframe.export.ov_form import openvino_form

    data, model, qmodel = setup
    cfg = ExportConfig(enabled=True, target="onnxruntime", timing_runs=1, timing_batch=2, parity=False,
                       openvino_full_range=True)
    _, rows = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=False)
    written = onnx.load(str(tmp_path / "model_ptq_w8a8_openvino.onnx")).SerializeToString()
    standard = tmp_path / "model_ptq_w8a8.onnx"
    assert written == openvino_form(standard, full_unsigned_range=True).SerializeToString()
    assert written != openvino_form(standard).SerializeToString()
    assert rows[-1]["backend"] == "openvino / cpu, OpenVINO form, full uint8 range after ReLU"


def test_a_zero_pad_into_max_pooling_is_named_where_onnxruntime_fuses_it_wrongly_and_parity_holds(tmp_path):
    """A ConstantPad2d(0) before a MaxPool2d over mostly negative maps: the export stage's parity runs in qframe's
    sessions, which compute PyTorch's logits to float rounding at both levels, and where this onnxruntime folds such a pad into the
    pooling's -inf padding (before 1.32) the stage names the pad and what a user's own session needs."""
    from qframe.export.ort import pad_fusion_breaks_max_pooling

    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ConstantPad2d(1, 0.0),
                                torch.nn.MaxPool2d(3, 2), torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-2.0)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    cfg = ExportConfig(enabled=True, target="onnxruntime", onnxruntime_form=False, openvino=False, tensorrt=False,
                       timing_runs=1, timing_batch=2)
    summary, _ = export_stage(cfg, model, qmodel, "ptq_w8a8", data, tmp_path, dla=False)
    for name in ("fp32", "ptq_w8a8"):  # fused wrongly: logits up to 1.4 apart (the top-1 still agreed)
        assert all(p["max_logit_diff"] < 1e-4 for p in summary[f"parity_{name}"].values()), summary[f"parity_{name}"]
    notes = summary.get("onnxruntime_notes", [])
    if pad_fusion_breaks_max_pooling():
        assert len(notes) == 1 and "/1/Pad" in notes[0] and "disabled_optimizers=['Pad_Fusion']" in notes[0], notes
    else:
        assert notes == []
