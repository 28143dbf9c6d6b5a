"""TensorRT version paths: the plan per version, and build_engines.sh run against a stand-in trtexec.

The expectations are the facts of NVIDIA's documentation, checked command by command:
- TensorRT 8.5/8.6: explicit quantization with --int8 (--fp16 for the float layers); no --stronglyTyped.
- TensorRT 10.x: trtexec has --stronglyTyped, and a strongly typed build takes no precision flag;
  implicit INT8 with --calib is deprecated (10.1) but is the DLA's INT8 path on JetPack 6.
- TensorRT 11.x: --fp16, --int8, --best and --calib are removed; every network is strongly typed
  (--stronglyTyped is no longer needed); no DLA before 11.4.1; from 11.4.1 the DLA builds strongly
  typed networks, GPU fallback as in 10.x.
"""

import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

import qframe
from qframe.errors import QFrameError
from qframe.export import trt_plan as P

onnx = pytest.importorskip("onnx")

REMOVED_IN_11 = ("--int8", "--fp16", "--best", "--calib", "--bf16", "--fp8", "--int4")


def test_parse_version_forms():
    assert P.parse_version("10.3.0") == (10, 3, 0)
    assert P.parse_version("8.5.2.2") == (8, 5, 2)
    assert P.parse_version(8502) == (8, 5, 2)
    assert P.parse_version("100300") == (10, 3, 0)
    assert P.parse_version("&&&& RUNNING TensorRT.trtexec [TensorRT v110401] # trtexec") == (11, 4, 1)
    assert P.version_code("11.4.1") == 110401 and P.version_code(8601) == 80601
    with pytest.raises(QFrameError, match="'ten' is not understood; valid"):
        P.parse_version("ten")
    with pytest.raises(QFrameError, match="too old"):
        P.family("7.1.3")


@pytest.mark.parametrize("version,fam", [("8.5.2", "trt8"), ("8.6.1", "trt8"), ("10.0.1", "trt10"), ("10.3.0", "trt10"),
                                         ("10.16.1", "trt10"), ("11.0.0", "trt11"), ("11.4.0", "trt11"),
                                         ("11.4.1", "trt11_dla"), ("11.5.0", "trt11_dla")])
def test_family_boundaries(version, fam):
    assert P.family(version) == fam


def _flags(builds):
    return {b.engine: b for b in builds}


def test_plan_per_version_follows_the_documentation():
    v8, v10, v11, v114 = (_flags(P.engine_builds(v)) for v in ("8.5.2", "10.3.0", "11.2.0", "11.4.1"))
    # 8.x: explicit Q/DQ with the weak-typing flags; --stronglyTyped does not exist yet
    assert v8["gpu_int8"].flags == ("--int8", "--fp16") and v8["gpu_int8"].onnx == "model_int8.onnx"
    # 10.x: strongly typed GPU INT8 from the Q/DQ graph, no precision flag beside it
    assert v10["gpu_int8"].flags == ("--stronglyTyped",)
    for plan in (v8, v10):  # DLA INT8 on JetPack's TensorRT: Q/DQ-free graph + calibration cache
        dla = plan["dla_int8"]
        assert dla.onnx == "model_int8_noqdq.onnx" and "--calib=model_int8_noqdq.calib" in dla.flags
        assert {"--useDLACore=0", "--allowGPUFallback", "--int8"} <= set(dla.flags)
    # 11.x: no removed flag anywhere, no --stronglyTyped (always on), FP16 from an FP16 ONNX
    for plan in (v11, v114):
        for b in plan.values():
            assert not [f for f in b.flags if f.split("=")[0] in REMOVED_IN_11 + ("--stronglyTyped",)], b
        assert plan["gpu_int8"].onnx == "model_int8.onnx"
        assert plan["gpu_fp16"].onnx == "model_fp16.onnx" and "modelopt.onnx.autocast" in plan["gpu_fp16"].prepare
    assert "dla_int8" not in v11 and "dla_fp16" not in v11 and P.dla_unavailable_reason("11.2.0")
    # >= 11.4.1: the DLA takes the same Q/DQ file as the GPU, with GPU fallback
    assert v114["dla_int8"].onnx == "model_int8.onnx"
    assert v114["dla_int8"].flags == ("--useDLACore=0", "--allowGPUFallback")
    assert "--target_dla" in v114["dla_fp16"].prepare
    assert not P.dla_unavailable_reason("11.4.1") and not P.dla_unavailable_reason("10.3.0")
    # the same exported files serve every version
    shipped = {"model_int8.onnx", "model_fp32.onnx", "model_int8_noqdq.onnx"}
    for plan in (v8, v10, v11, v114):
        assert {b.onnx for b in plan.values() if not b.prepare} <= shipped
    no_fb = _flags(P.engine_builds("10.3.0", gpu_fallback=False, dla_core=1))
    assert "--allowGPUFallback" not in no_fb["dla_int8"].flags and no_fb["dla_int8"].load_flags == ("--useDLACore=1",)


FAKE_TRTEXEC = """#!/usr/bin/env bash
# stands in for trtexec: prints its banner, records its arguments, writes the engine it is asked for
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v$FAKE_TRT] # trtexec $*"
printf '%s\\n' "$*" >> "$FAKE_LOG"
for a in "$@"; do case "$a" in --saveEngine=*) mkdir -p "$(dirname "${a#--saveEngine=}")"; echo engine > "${a#--saveEngine=}";; esac; done
echo "&&&& PASSED TensorRT.trtexec [TensorRT v$FAKE_TRT] # trtexec $*"
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    from qframe.export.onnx import export_onnx
    from qframe.export.tensorrt import prepare_tensorrt

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("plan")
    data = qframe.build_data("digits", image_size=16, channels=1)
    model = qframe.build_model("compact_cnn", 10, 1, 16).eval()
    q = qframe.ptq(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    qpath = export_onnx(q, torch.randn(1, 1, 16, 16), tmp / "q.onnx")
    fpath = export_onnx(model, torch.randn(1, 1, 16, 16), tmp / "f.onnx")
    return prepare_tensorrt(tmp / "trt", qpath, fpath, input_shape=(1, 1, 16, 16))["script"]


def _run_script(script: Path, tmp_path: Path, banner: str, **env):
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    log = tmp_path / "calls.txt"
    log.write_text("")
    e = {**os.environ, "TRTEXEC": str(fake), "FAKE_TRT": banner, "FAKE_LOG": str(log), "PATH": os.environ["PATH"],
         **env}
    proc = subprocess.run(["bash", str(script)], env=e, capture_output=True, text=True, timeout=60)
    calls = [shlex.split(line) for line in log.read_text().splitlines() if line and line != "--help"]
    return proc, calls


@pytest.mark.parametrize("banner,fam", [("8502", "trt8"), ("100300", "trt10"), ("110200", "trt11"),
                                        ("110401", "trt11_dla")])
def test_build_script_runs_the_documented_commands_for_each_version(script, tmp_path, banner, fam):
    """build_engines.sh reads trtexec's banner and sends exactly the plan's commands for that version."""
    proc, calls = _run_script(script, tmp_path, banner)
    assert proc.returncode == 0, proc.stderr
    assert f"build path {fam}" in proc.stdout
    builds = [c for c in calls if any(a.startswith("--saveEngine=") for a in c)]
    times = [c for c in calls if any(a.startswith("--loadEngine=") for a in c)]
    plan = [b for b in P.engine_builds(P.parse_version(banner)) if not b.prepare]  # no ModelOpt here
    assert [next(a for a in c if a.startswith("--saveEngine=")) for c in builds] == \
        [f"--saveEngine=engines/{b.engine}.engine" for b in plan]
    for c, b in zip(builds, plan):
        assert f"--onnx={b.onnx}" in c and set(b.flags) <= set(c)
        assert (script.parent / b.onnx).is_file()  # a shipped file, relative to the script
        if fam.startswith("trt11"):
            assert not [a for a in c if a.split("=")[0] in REMOVED_IN_11 + ("--stronglyTyped",)], c
    assert len(times) == len(builds)
    for c, b in zip(times, plan):
        assert f"--loadEngine=engines/{b.engine}.engine" in c and set(b.load_flags) <= set(c)
        assert "--iterations=1000" in c and "--duration=10" in c
    engines = {b.engine for b in plan}
    assert ("dla_int8" in engines) == (fam != "trt11")
    if fam.startswith("trt11"):
        assert "gpu_fp16 skipped" in proc.stdout  # no FP16 ONNX and no ModelOpt AutoCast on this machine
    if fam == "trt11":
        assert "no DLA on Jetson" in proc.stdout


def test_build_script_overrides_and_refusals(script, tmp_path):
    proc, calls = _run_script(script, tmp_path, "100300", DLA="0", TRT_VERSION="8.6.1", ITERATIONS="7")
    assert proc.returncode == 0 and "TensorRT 8.6.1: build path trt8" in proc.stdout  # the override wins
    assert not [c for c in calls if any(a.startswith("--useDLACore") for a in c)]  # DLA=0: GPU engines only
    assert any("--iterations=7" in c for c in calls)
    proc, calls = _run_script(script, tmp_path, "7103")
    assert proc.returncode == 2 and "older than 8.5" in proc.stderr and not calls


def test_bash_and_python_read_versions_alike(script):
    """The script's trt_code and trt_plan.version_code give the same number for every form."""
    text = script.read_text()
    func = text[text.index("trt_code() {"):text.index('\nTRT_VERSION="')]
    for v in ("8502", "8601", "100300", "101600", "110401", "10.3.0", "8.5.2.2", "11.4.1"):
        out = subprocess.run(["bash", "-c", func + f"\ntrt_code {v}"], capture_output=True, text=True).stdout.strip()
        assert int(out) == P.version_code(v), v
