"""python -m qframe.deploy fed trtexec logs in the TensorRT 8.5/10.3/11.4 formats and a Jetson AGX Orin INA3221
sysfs tree: rows with accuracy, latency and energy for the GPU and DLA engines, added to the run's report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qframe.deploy import engines as D
from qframe.deploy.trtexec import banner_version, parse_performance
from qframe.errors import QFrameError
from qframe.export.testset import load_test_set
from qframe.measure.energy import Ina3221Meter

pytest.importorskip("onnxruntime")
from qframe.export.ort import ort_session  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
ORIN = Path(__file__).parents[1] / "measure" / "fixtures" / "jetson_agx_orin"
REMOVED_IN_11 = ("--int8", "--fp16", "--best", "--calib", "--stronglyTyped")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def _rails(root: Path):
    """(voltage file, current file) of each connected INA3221 rail, read without qframe's code."""
    out = []
    for label in sorted(root.glob("sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in[123]_label")):
        n = label.name[2]
        if label.read_text().strip() != "NC":
            out.append((label.parent / f"in{n}_input", label.parent / f"curr{n}_input"))
    return out


def _watts(root: Path) -> float:
    return sum(float(v.read_text()) * float(c.read_text()) / 1e6 for v, c in _rails(root))


class FakeDevice:
    """Stands in for trtexec on a Jetson: prints the banner of ``banner``, writes the engines it is asked to
    build, and for a timing run doubles every rail's current (the load), lets ``seconds`` pass on the
    meter's clock and prints the recorded log of that engine's device."""

    def __init__(self, banner: str, logs: dict, root: Path, clock: Clock, meter, seconds: float = 10.0):
        self.banner, self.logs, self.root, self.clock, self.meter, self.seconds = banner, logs, root, clock, meter, seconds
        self.idle = {c: c.read_text() for _, c in _rails(root)}
        self.calls = []

    def _set(self, load: bool):
        for c, text in self.idle.items():
            c.write_text(f"{int(text) * (2 if load else 1)}\n")

    def __call__(self, args, cwd):
        self.calls.append(list(args))
        if args == ["--help"]:
            return 0, f"&&&& RUNNING TensorRT.trtexec [TensorRT v{self.banner}] # trtexec --help\n=== Model Options ===\n"
        self._set(load=False)
        save = next((a.split("=", 1)[1] for a in args if a.startswith("--saveEngine=")), None)
        if save:
            (Path(cwd) / save).write_bytes(b"engine for " + " ".join(args).encode())
            return 0, f"&&&& PASSED TensorRT.trtexec [TensorRT v{self.banner}] # trtexec {' '.join(args)}\n"
        self._set(load=True)
        if self.meter is not None:
            self.meter.sample()  # the load starts now
        self.clock.sleep(self.seconds)
        return 0, self.logs["dla" if any(a.startswith("--useDLACore") for a in args) else "gpu"]


def onnxruntime_infer(engine_path, build, folder):
    """The engine's accuracy path with onnxruntime on the ONNX file the engine was built from."""
    session = ort_session(Path(folder) / build.onnx)
    return lambda images: np.concatenate([session.run(None, {"input": images[i:i + 1]})[0] for i in range(len(images))])


@pytest.fixture
def device_run(qat_orin_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(qat_orin_run, run)
    root = tmp_path / "sysroot"
    shutil.copytree(ORIN, root)
    clock = Clock()
    meter = Ina3221Meter(root=root, clock=clock, threaded=False)
    return run, root, clock, meter


def _logs(*names):
    texts = [(FIXTURES / n).read_text() for n in names]
    return {"gpu": texts[0], "dla": texts[-1]}


def test_parse_recorded_trtexec_logs():
    p85 = parse_performance((FIXTURES / "trt8.5_dla_int8.time.log").read_text())
    assert p85["version"] == (8, 5, 2) and p85["throughput_qps"] == 2073.85 and p85["queries"] == 20741
    assert p85["latency"] == {"min": 0.462891, "max": 1.43896, "mean": 0.478251, "median": 0.476318, "p90": 0.483887,
                              "p95": 0.487305, "p99": 0.50708}
    p10 = parse_performance((FIXTURES / "trt10.3_gpu_int8.time.log").read_text())
    assert p10["version"] == (10, 3, 0) and p10["gpu_compute"]["median"] == 0.159424 and p10["host_walltime_s"] == 10.0003
    p11 = parse_performance((FIXTURES / "trt11.4_gpu_int8.time.log").read_text())
    assert p11["version"] == (11, 4, 1) and p11["latency"]["p90"] == 0.258301
    assert banner_version("[TensorRT v8601]") == (8, 6, 1)
    with pytest.raises(QFrameError, match="no performance summary: .*Cannot find"):
        parse_performance("&&&& RUNNING TensorRT.trtexec [TensorRT v100300]\n[E] Error[3]: Cannot find binding\n"
                          "&&&& FAILED TensorRT.trtexec [TensorRT v100300]")


def test_trt10_rows_have_accuracy_latency_and_energy_for_gpu_and_dla(device_run):
    run, root, clock, meter = device_run
    p_idle = _watts(root)
    logs = _logs("trt10.3_gpu_int8.time.log", "trt10.3_dla_int8.time.log")
    fake = FakeDevice("100300", logs, root, clock, meter)
    result = D.deploy(run, runner=fake, infer=onnxruntime_infer, meter=meter, idle_seconds=3.0, sleep=clock.sleep)
    rows = {r["engine"]: r for r in result["rows"]}
    assert list(rows) == ["gpu_int8", "gpu_fp16", "gpu_fp32", "dla_int8", "dla_fp16"] and not result["skipped"]
    assert result["trt_version"] == "10.3.0" and result["idle_watts"] == pytest.approx(p_idle, rel=1e-12)
    tests = load_test_set(run / "tensorrt" / "test_set.npz")
    gpu, dla = parse_performance(logs["gpu"]), parse_performance(logs["dla"])
    for name, row in rows.items():
        perf = dla if name.startswith("dla") else gpu
        assert row["latency_ms"] == perf["latency"]["median"] and row["throughput"] == perf["throughput_qps"]
        assert row["latency_p90_ms"] == perf["latency"]["p90"]
        # the load doubled every rail's current: net power = the idle power, per image over the engine's rate
        assert row["watts"] == pytest.approx(2 * p_idle, rel=1e-9)
        assert row["joules_per_image"] == pytest.approx(p_idle / perf["throughput_qps"], rel=1e-9)
        assert 0 <= row["accuracy"] <= 100 and row["size_bytes"] > 0
    # the Q/DQ graph computes what the PyTorch model computes: onnxruntime agrees with it on the test set
    int8 = rows["gpu_int8"]
    # each INT8 engine is held against the rounding of its device: ties to even on the GPU, away on the DLA
    assert int8["reference"] == "qat_w8a8_half_even" and int8["agreement"] >= 98.0
    assert rows["dla_int8"]["reference"] == "qat_w8a8"
    assert abs(int8["accuracy"] - tests.accuracy["qat_w8a8"]) <= 2.0
    assert rows["gpu_fp32"]["agreement"] == 100.0 and rows["gpu_fp32"]["reference"] == "fp32"
    assert "DLA core 0 + GPU fallback, implicit INT8, calibration cache" in rows["dla_int8"]["backend"]
    builds = {c[1].split("/")[1]: c for c in fake.calls if any(a.startswith("--saveEngine=") for a in c)}
    assert "--stronglyTyped" in builds["gpu_int8.engine"] and "--calib=model_int8_noqdq.calib" in builds["dla_int8.engine"]
    # the rows are in the run's metrics and report, next to the rows of the run itself
    metrics = json.loads((run / "metrics.json").read_text())
    trt_rows = [r for r in metrics["results"] if r["method"] == "tensorrt"]
    assert len(trt_rows) == 5 and metrics["deploy"]["trt_version"] == "10.3.0"
    assert trt_rows[0]["delta"] == pytest.approx(trt_rows[0]["accuracy"] - metrics["results"][0]["accuracy"])
    report = (run / "report.md").read_text()
    assert "TensorRT 10.3.0 / GPU, strongly typed Q/DQ" in report and "TensorRT 10.3.0 / DLA core 0" in report
    assert f"{p_idle / gpu['throughput_qps']:.3g}" in report  # J/image in the report's table
    assert "| dla_fp16" in (run / "deploy.md").read_text()
    # a second deploy replaces the rows instead of adding to them
    D.deploy(run, runner=FakeDevice("100300", logs, root, clock, meter), infer=onnxruntime_infer, meter=meter,
             idle_seconds=1.0, sleep=clock.sleep)
    assert len([r for r in json.loads((run / "metrics.json").read_text())["results"] if r["method"] == "tensorrt"]) == 5


def test_trt85_takes_the_weakly_typed_and_calibration_cache_paths(device_run):
    run, root, clock, meter = device_run
    p_idle = _watts(root)
    fake = FakeDevice("8502", _logs("trt8.5_dla_int8.time.log"), root, clock, meter)
    result = D.deploy(run, runner=fake, infer=onnxruntime_infer, meter=meter, idle_seconds=0, sleep=clock.sleep)
    rows = {r["engine"]: r for r in result["rows"]}
    assert len(rows) == 5 and rows["dla_int8"]["latency_ms"] == 0.476318
    assert rows["gpu_int8"]["joules_per_image"] == pytest.approx(2 * p_idle / 2073.85, rel=1e-9)  # gross
    build = next(c for c in fake.calls if "--saveEngine=engines/gpu_int8.engine" in c)
    assert "--int8" in build and "--fp16" in build and "--stronglyTyped" not in build


def test_trt114_builds_the_dla_from_the_qdq_graph_without_removed_flags(device_run):
    run, root, clock, meter = device_run
    logs = _logs("trt11.4_gpu_int8.time.log")
    fake = FakeDevice("110401", logs, root, clock, meter)
    result = D.deploy(run, runner=fake, infer=onnxruntime_infer, meter=meter, idle_seconds=1.0, sleep=clock.sleep,
                      prepare=lambda build, folder: False)  # no ModelOpt AutoCast: no FP16 ONNX
    rows = {r["engine"]: r for r in result["rows"]}
    assert list(rows) == ["gpu_int8", "gpu_fp32", "dla_int8"]
    assert {s["engine"] for s in result["skipped"]} == {"gpu_fp16", "dla_fp16"}
    assert rows["dla_int8"]["onnx"] == "model_int8.onnx" and rows["dla_int8"]["agreement"] >= 98.0
    for call in fake.calls:
        assert not [a for a in call if a.split("=")[0] in REMOVED_IN_11], call
    assert "--allowGPUFallback" in next(c for c in fake.calls if "--saveEngine=engines/dla_int8.engine" in c)


def test_trt11_before_11_4_1_has_no_dla_and_no_energy_without_a_meter(device_run):
    run, root, clock, _ = device_run
    fake = FakeDevice("110200", _logs("trt11.4_gpu_int8.time.log"), root, clock, None)
    result = D.deploy(run, runner=fake, infer=onnxruntime_infer, meter=None, prepare=lambda b, f: False)
    assert [r["engine"] for r in result["rows"]] == ["gpu_int8", "gpu_fp32"]
    assert any("no DLA on Jetson" in s["reason"] for s in result["skipped"])
    assert result["rows"][0].get("joules_per_image") is None and result["meter"] is None
    assert result["rows"][0]["energy"] == "not measured (no energy meter here)"


def test_accuracy_without_a_runtime_is_reported_not_invented(device_run):
    run, root, clock, meter = device_run

    def no_runtime(engine_path, build, folder):
        raise QFrameError("the tensorrt Python package is not importable")

    fake = FakeDevice("100300", _logs("trt10.3_gpu_int8.time.log"), root, clock, meter)
    result = D.deploy(run, runner=fake, infer=no_runtime, meter=meter, dla=False, idle_seconds=0, sleep=clock.sleep)
    assert [r["engine"] for r in result["rows"]] == ["gpu_int8", "gpu_fp16", "gpu_fp32"]
    assert all(r["accuracy"] is None and "not importable" in r["accuracy_note"] for r in result["rows"])
    assert all(r["latency_ms"] == 0.265625 for r in result["rows"])


def test_without_tensorrt_the_command_says_so_in_one_line(qat_orin_run, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRTEXEC"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + "/usr/bin:/bin"
    if shutil.which("trtexec", path=env["PATH"]) or Path("/usr/src/tensorrt/bin/trtexec").exists():
        pytest.skip("trtexec is installed here")
    proc = subprocess.run([sys.executable, "-m", "qframe.deploy", str(qat_orin_run)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"qframe: {D.NO_TENSORRT}"
    proc = subprocess.run([sys.executable, "-m", "qframe.deploy", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no tensorrt/model_int8.onnx" in proc.stderr


def test_test_set_round_trips_compactly(qat_orin_run):
    path = qat_orin_run / "tensorrt" / "test_set.npz"
    tests = load_test_set(path)
    n, c, h, w = tests.images.shape
    assert n == len(tests.labels) == len(tests.predictions["qat_w8a8"]) and (c, h, w) == (1, 16, 16)
    assert path.stat().st_size < n * c * h * w  # under a byte a pixel
    metrics = json.loads((qat_orin_run / "metrics.json").read_text())
    parity = metrics["export"]["parity_qat_w8a8"]["basic"]["accuracy"]  # onnxruntime on the float test split
    assert abs(tests.accuracy["qat_w8a8"] - parity) <= 2.0  # 8-bit pixels barely move the accuracy
    # the run trained for the DLA (ties away from zero); the GPU's rounding is stored beside it
    dla, gpu = tests.predictions["qat_w8a8"], tests.predictions["qat_w8a8_half_even"]
    assert (dla == gpu).mean() >= 0.95 and "fp32_half_even" not in tests.predictions


def test_gpu_rounding_copy_leaves_the_model_alone(qat_orin_run):
    from qframe.bisect import load_run_model
    from qframe.export.testset import _with_gpu_rounding
    from qframe.quant.modules import quantizers

    model = load_run_model(qat_orin_run, "qat_w8a8")
    before = {n: q.spec.rounding for n, q in quantizers(model)}
    assert "half_away" in before.values()
    out = _with_gpu_rounding({"qat_w8a8": model})
    assert set(out) == {"qat_w8a8", "qat_w8a8_half_even"} and out["qat_w8a8"] is model
    assert {n: q.spec.rounding for n, q in quantizers(model)} == before
    assert all(q.spec.rounding == "half_even" for n, q in quantizers(out["qat_w8a8_half_even"]) if "input" in n)
