"""TensorRT hand-off: Q/DQ stripping for the DLA, calibration cache, trtexec build script."""

import re
import shlex
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import qframe
from qframe.errors import QFrameError
from qframe.export import tensorrt as T
from qframe.export.onnx import export_onnx
from qframe.quant.modules import quantizers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("trt")
    data = qframe.build_data("digits", image_size=16, channels=1)
    model = qframe.build_model("compact_cnn", 10, 1, 16).eval()
    q = qframe.ptq(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 2)
    path = export_onnx(q, torch.randn(1, 1, 16, 16), tmp / "m.onnx")
    fp32 = export_onnx(model, torch.randn(1, 1, 16, 16), tmp / "fp32.onnx")
    return q.eval(), path, fp32, tmp


def _run(model_proto, x):
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]  # exported with a dynamic batch axis


def test_strip_qdq_is_the_model_with_dequantized_weights(exported):
    q, path, _, _ = exported
    stripped, scales = T.strip_qdq(onnx.load(str(path)))
    assert not [n for n in stripped.graph.node if n.op_type in T.QDQ_OPS]
    x = torch.randn(8, 1, 16, 16)
    inputs = [m for name, m in quantizers(q) if name.endswith("input_quantizer")]
    for m in inputs:
        m.enabled = False  # activations unquantized: what the stripped graph computes
    try:
        with torch.no_grad():
            ref = q(x).numpy()
    finally:
        for m in inputs:
            m.enabled = True
    np.testing.assert_allclose(_run(stripped, x.numpy()), ref, atol=1e-4, rtol=0)
    # one scale per activation Q, keyed by the tensor the stripped graph keeps, equal to PyTorch's; the
    # quantized Conv outputs (in front of ReLU / pooling) carry the scale of the quantizer after them
    assert set(scales.values()) == {float(m.scale) for m in inputs}
    assert len(scales) > len(inputs)
    names = {t for n in stripped.graph.node for t in (*n.input, *n.output)} | {i.name for i in stripped.graph.input}
    assert set(scales) <= names and "input" in scales


def test_calibration_cache_round_trips_bit_exact(exported, tmp_path):
    _, path, _, _ = exported
    stripped, scales = T.strip_qdq(onnx.load(str(path)))
    cache = T.write_calibration_cache(T.propagate_scales(stripped, scales), tmp_path / "c.calib")
    header, back = T.read_calibration_cache(cache)
    assert header == "TRT-8601-EntropyCalibration2"
    for name, scale in scales.items():  # float32 bits survive exactly
        assert struct.pack(">f", back[name]) == struct.pack(">f", scale)
    lines = cache.read_text().splitlines()[1:]
    assert lines and all(re.fullmatch(r".+: [0-9a-f]{8}", line) for line in lines)
    # known pattern: 1/127 -> 0x3c010204 (big-endian bits of the float32)
    T.write_calibration_cache({"t": 1 / 127}, tmp_path / "one.calib")
    assert (tmp_path / "one.calib").read_text().splitlines()[1] == "t: 3c010204"


def test_build_script(exported, tmp_path):
    _, path, fp32, _ = exported
    with pytest.raises(QFrameError, match="has dynamic dims .* pass input_shape"):
        T.prepare_tensorrt(tmp_path / "run", path, fp32)
    for wrong in [(1, 3, 16, 16), (1, 1, 16), (0, 1, 16, 16)]:  # another channel count, rank, an empty batch
        with pytest.raises(QFrameError, match=rf"input_shape={re.escape(str(wrong))} does not fit ONNX input 'input' of shape "
                                               r"Nx1x16x16; valid: .* e.g. \(1, 1, 16, 16\)"):
            T.prepare_tensorrt(tmp_path / "wrong", path, fp32, input_shape=wrong)
    out = T.prepare_tensorrt(tmp_path / "run", path, fp32, input_shape=(1, 1, 16, 16))
    script = out["script"]
    assert script.name == "build_engines.sh" and script.stat().st_mode & 0o111
    text = script.read_text()
    for flag in ("trtexec", "--useDLACore=0", "--allowGPUFallback", "--calib=", "--exportLayerInfo=", "--int8",
                 "--saveEngine=", "--loadEngine=", "--exportTimes=", "--stronglyTyped", "set -euo pipefail",
                 "--onnx=", "--fp16", "--profilingVerbosity=detailed", "--memPoolSize=workspace:",
                 "--shapes=input:1x1x16x16"):
        assert flag in text, flag
    inputs = [a.split("=", 1)[1] for line in text.splitlines() if line.strip().startswith('"$TRTEXEC" --')
              for a in shlex.split(line.split("|")[0]) if a.startswith(("--onnx=", "--calib="))]
    assert {"model_int8.onnx", "model_fp32.onnx", "model_int8_noqdq.onnx", "model_int8_noqdq.calib"} <= set(inputs)
    # every file a build reads is shipped, except the FP16 ONNX TensorRT >= 11 makes with ModelOpt AutoCast
    assert all((script.parent / p).is_file() and not p.startswith("/") for p in inputs if not p.startswith("model_fp16"))
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert out["message"] == ("TensorRT is not installed here: wrote build_engines.sh with the trtexec commands for "
                              f"the GPU and DLA engines to {script.parent}")


@pytest.mark.skipif(T.tensorrt_available()[0], reason="TensorRT is installed here")
def test_without_tensorrt_building_an_engine_says_why():
    ok, reason = T.tensorrt_available()
    assert ok is False and "tensorrt" in reason
    with pytest.raises(QFrameError, match="not installed"):
        T.build_engine("m.onnx", "m.engine")


@pytest.mark.skipif(not (T.tensorrt_available()[0] and torch.cuda.is_available()),
                    reason="needs TensorRT and a CUDA GPU")
def test_build_engine_runs_the_standard_form_like_onnxruntime(exported, tmp_path):
    """Where TensorRT imports and a GPU exists: the exported Q/DQ file parses (explicit quantization), builds
    into an INT8 engine at batch 1, and that engine agrees with onnxruntime on random inputs."""
    import tensorrt as trt

    _, path, _, _ = exported
    engine_path = T.build_engine(path, tmp_path / "m.engine", input_shape=(1, 1, 16, 16))
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    x = torch.randn(16, 1, 1, 16, 16)
    ref = _run(onnx.load(str(path)), x.reshape(16, 1, 16, 16).numpy())
    out = []
    for xi in x:
        inp = xi.cuda().contiguous()
        logits = torch.empty(1, ref.shape[1], device="cuda")
        context.set_tensor_address(names[0], inp.data_ptr())
        context.set_tensor_address(names[1], logits.data_ptr())
        assert context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        out.append(logits.cpu().numpy())
    out = np.concatenate(out)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9  # TensorRT's own int8 kernels: rounding may differ
    assert np.abs(out - ref).max() < 0.5 * np.abs(ref).max()


@pytest.mark.skipif(T.torch_tensorrt_available()[0], reason="Torch-TensorRT is installed here")
def test_without_torch_tensorrt_compiling_says_why(exported):
    ok, reason = T.torch_tensorrt_available()
    assert ok is False and "torch_tensorrt" in reason
    with pytest.raises(QFrameError, match="torch_tensorrt is not installed.*build_engines.sh"):
        T.compile_torch_tensorrt(exported[0], None)


def test_errors(exported, tmp_path):
    _, path, fp32, _ = exported
    with pytest.raises(QFrameError, match="not found"):
        T.prepare_tensorrt(tmp_path, tmp_path / "missing.onnx")
    with pytest.raises(QFrameError, match="no QuantizeLinear"):
        T.strip_qdq(onnx.load(str(fp32)))
    m = onnx.load(str(path))
    for t in m.graph.initializer:  # make one activation zero point uint8
        if t.data_type == onnx.TensorProto.INT8 and not t.dims:
            t.data_type = onnx.TensorProto.UINT8
            break
    with pytest.raises(QFrameError, match="not int8"):
        T.strip_qdq(m)


def _uint8_copy(path, folder):
    m = onnx.load(str(path))
    for t in m.graph.initializer:  # one activation zero point uint8: TensorRT takes signed int8 Q/DQ only
        if t.data_type == onnx.TensorProto.INT8 and not t.dims:
            t.data_type = onnx.TensorProto.UINT8
            break
    onnx.save(m, str(folder / "uint8.onnx"))
    return folder / "uint8.onnx"


def _py_file(folder):
    (folder / "model.py").write_text("print(1)\n")
    return folder / "model.py"


SHAPE = {"input_shape": (1, 1, 16, 16)}
BAD_INPUTS = {  # name: ((int8 ONNX, fp32 ONNX, folder) -> (int8 ONNX, fp32 ONNX, options), the one line expected)
    "input_shape of another channel count": (lambda p, f, d: (p, f, {"input_shape": (1, 4, 16, 16)}),
                                             r"input_shape=\(1, 4, 16, 16\) does not fit .* e\.g\. \(1, 1, 16, 16\)"),
    "no input_shape": (lambda p, f, d: (p, f, {}), r"has dynamic dims .* pass input_shape=\(1, 1, 16, 16\)"),
    "a .py file as the ONNX": (lambda p, f, d: (_py_file(d), f, SHAPE), r"int8_onnx=.*model\.py' is not a valid ONNX"),
    "a .py file as the fp32 ONNX": (lambda p, f, d: (p, _py_file(d), SHAPE), r"fp32_onnx=.*model\.py' is not a valid ONNX"),
    "a missing fp32 ONNX": (lambda p, f, d: (p, d / "missing.onnx", SHAPE), r"not found: fp32_onnx=.*missing\.onnx"),
    "a uint8 Q/DQ graph": (lambda p, f, d: (_uint8_copy(p, d), f, SHAPE), "is uint8, not int8"),
    "a negative DLA core": (lambda p, f, d: (p, f, {**SHAPE, "dla_core": -1}), r"dla_core=-1 is invalid; valid: an integer >= 0"),
    "a float iteration count": (lambda p, f, d: (p, f, {**SHAPE, "iterations": 10.5}), r"iterations=10.5 is invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(exported, tmp_path, case):
    _, path, fp32, _ = exported
    build, message = BAD_INPUTS[case]
    (tmp_path / "in").mkdir()
    int8_onnx, fp32_onnx, opts = build(path, fp32, tmp_path / "in")
    with pytest.raises(QFrameError, match=message) as err:
        T.prepare_tensorrt(tmp_path / "runs" / "trt", int8_onnx, fp32_onnx, **opts)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # not even the run folder


def test_run_dir_that_is_a_file_is_one_line(exported, tmp_path):
    _, path, fp32, _ = exported
    (tmp_path / "trt").write_text("notes")
    for run_dir in (tmp_path / "trt", tmp_path / "trt" / "sub"):
        with pytest.raises(QFrameError, match=rf"'{re.escape(str(tmp_path / 'trt'))}' is a file, not a folder; valid"):
            T.prepare_tensorrt(run_dir, path, fp32, input_shape=(1, 1, 16, 16))
    assert (tmp_path / "trt").read_text() == "notes" and sorted(tmp_path.iterdir()) == [tmp_path / "trt"]


def test_a_failed_write_removes_what_the_call_wrote(exported, tmp_path, monkeypatch):
    """A write that fails late (a full disk at the build script) takes back the files and folders this call
    made; what was in the folder before stays."""
    _, path, fp32, _ = exported
    write = T.atomic_write_text

    def full_disk_at_the_script(text, target, **kw):
        if Path(target).name == T.SCRIPT_NAME:
            raise OSError(28, "No space left on device")
        return write(text, target, **kw)

    monkeypatch.setattr(T, "atomic_write_text", full_disk_at_the_script)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("kept")
    for run_dir in (tmp_path / "new" / "trt", tmp_path / "old"):
        with pytest.raises(OSError, match="No space left"):
            T.prepare_tensorrt(run_dir, path, fp32, input_shape=(1, 1, 16, 16))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["old", "old/notes.txt"]
