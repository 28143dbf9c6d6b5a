"""The comparison report over runs: table, energy wording, plots, sweep discovery, errors."""

import json
import random

import pytest

from qframe.report import find_runs, main
from qframe.measure.profile import MeasureConfig
from qframe.errors import QFrameError

REASON = "unavailable (no RAPL/NVML/INA3221 on this machine)"


def _metrics(accuracy: float) -> dict:
    def row(method, precision, bits):
        return {"method": method, "precision": precision, "accuracy": accuracy - random.random() * (32 - bits) / 8,
                "loss": 0.1, "size_bytes": 1000 * bits, "size_kib": 1000 * bits / 1024, "delta": -0.1,
                "backend": "pytorch fake-quant / cpu", "latency_ms": random.uniform(0.5, 2), "latency_p90_ms": 2.5,
                "latency_batch": 1, "throughput": random.uniform(100, 1000), "throughput_batch": 32,
                "peak_memory_bytes": 2**20, "watts": None, "images_per_joule": None, "energy": REASON}

    return {"results": [row("fp32", "fp32", 32), row("ptq", "w8a8", 8), row("qat", "w8a8", 8), row("ptq", "w4a8", 4)],
            "data": {"name": "digits", "test": 269, "classes": 10}, "model": {"name": "mobilenet_v2"},
            "device": "cpu", "elapsed_s": 1.0, "machine": {"cpu": "test cpu", "cores": 2, "torch_threads": 2, "arch": "x86_64"},
            "versions": {"python": "3.11", "torch": "2.13.0", "qframe": "0.1.0"}, "date": "2026-01-01",
            "config": {"measure": {"batch_sizes": [1, 32], "warmup": 5, "runs": 20}}}


def _sweep(tmp_path, n=2):
    for i in range(n):
        run = tmp_path / "sweep" / f"{i}_quant=w{8 - 4 * i}a8"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics(90 + i)))
    return tmp_path / "sweep"


def test_report_over_a_sweep_writes_table_json_and_plots(tmp_path, capsys):
    sweep = _sweep(tmp_path)
    assert len(find_runs([sweep])) == 2
    out = tmp_path / "report"
    assert main([str(sweep), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert text.count("| ptq ") == 4 and text.count("| qat ") == 2
    assert text.count(REASON) == 8  # every row says why there is no energy figure
    assert "medians of 20 timed runs after 5 warm-up runs, batch sizes [1, 32]" in text and "test cpu" in text
    report = json.loads((out / "report.json").read_text())
    assert len(report["rows"]) == 8 and report["rows"][0]["ipj_cell"] == "n/a"
    assert set(report["plots"]) == {"accuracy_vs_size.png", "throughput_vs_bits.png"}
    for name in report["plots"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "written to" in capsys.readouterr().out


def test_measured_energy_fills_the_columns(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    m = _metrics(95)
    m["results"][0].update(watts=12.5, images_per_joule=40.0, energy="INA3221: total of 4 rails")
    (run / "metrics.json").write_text(json.dumps(m))
    assert main([str(run)]) == 0
    first_row = (run / "report.md").read_text().splitlines()[4]
    assert "12.50" in first_row and "40.00" in first_row and REASON not in first_row


def test_export_parity_and_onnxruntime_notes_reach_the_report(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    m = _metrics(95)
    note = "model_ptq_u8.onnx agrees with the PyTorch model on 90.00% of 269 test images at ORT_ENABLE_ALL: no VNNI"
    pad = "/1/Pad pad(s) with zeros into a MaxPool: onnxruntime 1.31.1 folds a zero Pad into the MaxPool after it"
    m["export"] = {"parity_notes": [note], "onnxruntime_notes": [pad]}
    (run / "metrics.json").write_text(json.dumps(m))
    assert main([str(run)]) == 0
    lines = (run / "report.md").read_text().splitlines()
    assert f"Note: {note}." in lines and f"Note: {pad}." in lines
    m["export"] = None  # an export stage that did not run: no notes, no error
    (run / "metrics.json").write_text(json.dumps(m))
    assert main([str(run)]) == 0 and "Note:" not in (run / "report.md").read_text()


@pytest.mark.parametrize("setup, message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "no metrics.json in or under"),
])
def test_bad_run_dirs_are_one_line(tmp_path, capsys, setup, message):
    assert main([str(setup(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qframe: error:") and message in err and "\n" not in err
    with pytest.raises(QFrameError):
        find_runs([setup(tmp_path)])


@pytest.mark.parametrize("kwargs", [{"batch_sizes": []}, {"batch_sizes": [0]}, {"runs": 0}, {"warmup": -1}])
def test_measure_config_is_validated(kwargs):
    with pytest.raises(QFrameError, match="measure."):
        MeasureConfig(**kwargs)


def test_rct_bit_width_trajectory_is_plotted_when_present(tmp_path):
    run = tmp_path / "rct"
    run.mkdir()
    m = _metrics(93)
    m["rct"] = {"bit_history": {"features.0.0": [8, 8, 7, 6, 6], "classifier.1": [8, 9, 10, 10, 10]}}
    (run / "metrics.json").write_text(json.dumps(m))
    assert main([str(run)]) == 0
    report = json.loads((run / "report.json").read_text())
    assert "rct_bits.png" in report["plots"] and (run / "rct_bits.png").stat().st_size > 5000


@pytest.mark.parametrize("label, bits", [("fp32", 32), ("w8a8", 8), ("w4a16", 4), ("qat_w8a8", 8), ("ptq_w3a3", 3)])
def test_weight_bits_of_precision_labels(label, bits):
    from qframe.report import _bits

    assert _bits(label) == bits


def test_rows_lacking_a_value_are_left_out_of_the_plots_only(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    placed = []  # (x, y) of every point the plots draw
    scatter = Axes.scatter
    monkeypatch.setattr(Axes, "scatter", lambda self, x, y, **kw: (placed.extend(zip(x, y)), scatter(self, x, y, **kw))[1])
    run = tmp_path / "run"
    run.mkdir()
    m = _metrics(95)
    m["results"][1]["size_kib"] = None  # e.g. a row whose size could not be measured
    m["results"][2]["throughput"] = None
    m["results"][3]["size_kib"] = "n/a"
    (run / "metrics.json").write_text(json.dumps(m))
    assert main([str(run)]) == 0
    rows = m["results"]
    sizes = {(r["size_kib"], r["accuracy"]) for r in (rows[0], rows[2])}
    speeds = {(32 if r["precision"] == "fp32" else int(r["precision"][1]), r["throughput"]) for r in (rows[0], rows[1], rows[3])}
    assert set(placed) == sizes | speeds and len(placed) == 5
    report = json.loads((run / "report.json").read_text())
    assert len(report["rows"]) == 4 and set(report["plots"]) == {"accuracy_vs_size.png", "throughput_vs_bits.png"}
    table = (run / "report.md").read_text().splitlines()
    assert table[5].split("|")[6].strip() == "n/a"  # the table still lists the row, its size n/a


def test_a_report_that_fails_part_way_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import qframe.report

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(_metrics(95)))
    assert main([str(run)]) == 0
    before = {name: (run / name).read_bytes() for name in ("report.md", "report.json")}
    m = _metrics(80)
    (run / "metrics.json").write_text(json.dumps(m))

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(qframe.report, "plot", broken)
    with pytest.raises(OSError):
        main([str(run)])
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("content, fault", [
    ({"model": {"name": "m"}, "data": {"name": "d"}}, "has no 'results'"),
    ([1, 2], "holds a JSON array, not an object"),
    ({**_metrics(90), "results": []}, "'results' is an empty list"),
    ({**_metrics(90), "results": {"fp32": 90}}, "'results' is a JSON object"),
    ({**_metrics(90), "results": [None]}, "results[0] is a JSON null, not an object"),
    ({**_metrics(90), "model": None}, "'model' is not an object with a name"),
    ({k: v for k, v in _metrics(90).items() if k != "data"}, "'data' is missing"),
    ({**_metrics(90), "config": [1]}, "'config' is a JSON array, not an object"),
    ("{not json", "is not JSON"),
])
def test_a_metrics_file_the_report_cannot_read_is_one_line(tmp_path, capsys, content, fault):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "metrics.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main([str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"qframe: error: {path}: {fault}") and "; valid: a metrics.json written by python -m qframe" in err
    assert "\n" not in err and not (run / "report.md").exists() and not (run / "report.json").exists()
