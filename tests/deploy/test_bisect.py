"""python -m qframe.bisect: a planted fault is named as the first bad layer; a clean export has none."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import qframe
from qframe import bisect as B
from qframe.errors import QFrameError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


def _bisect_cli(*args):
    return subprocess.run([sys.executable, "-m", "qframe.bisect", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def plant_dq_scale(src, dst, tensor: str, factor: float = 4.0):
    """Multiply the scale of the DequantizeLinear writing ``tensor`` by ``factor`` (its Q keeps the old one)."""
    m = onnx.load(str(src))
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor)
    scale = next(t for t in m.graph.initializer if t.name == dq.input[1])
    m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name + "_planted"))
    dq.input[1] = scale.name + "_planted"
    onnx.save(m, str(dst))
    return dst


def test_clean_export_has_no_layer_over_tolerance(qat_orin_run):
    proc = _bisect_cli(qat_orin_run)
    assert proc.returncode == 0, proc.stderr
    assert "no layer over tolerance" in proc.stdout and "features.0.0" in proc.stdout and "classifier.1" in proc.stdout


@pytest.mark.parametrize("tensor,layer", [("features.1.0.input", "features.1.0"), ("features.3.0.input", "features.3.0")])
def test_planted_dq_scale_is_named_first(qat_orin_run, tmp_path, tensor, layer):
    """One activation DequantizeLinear scale in the middle of the graph x4: that layer, not a later one."""
    planted = plant_dq_scale(qat_orin_run / "model_qat_w8a8.onnx", tmp_path / "planted.onnx", tensor)
    proc = _bisect_cli(qat_orin_run, "--onnx", planted)
    assert proc.returncode == 1, proc.stderr
    verdict = proc.stdout.strip().splitlines()[-1]
    assert verdict.startswith(f"first layer over tolerance: {layer} (Conv"), verdict


def test_perturbed_weight_is_named_first(qat_orin_run):
    """A weight code of the classifier flipped in sign: the layers before it stay clean."""
    model = B.load_run_model(qat_orin_run, "qat_w8a8")
    proto = onnx.load(str(qat_orin_run / "model_qat_w8a8.onnx"))
    w = next(t for t in proto.graph.initializer if t.name == "features.2.0.weight_quantized")
    codes = numpy_helper.to_array(w).copy()
    idx = np.unravel_index(np.abs(codes.astype(np.int32)).argmax(), codes.shape)
    codes[idx[0]] = -codes[idx[0]]  # one output channel's weights negated
    w.CopyFrom(numpy_helper.from_array(codes, w.name))
    result = B.bisect(model, proto, B.run_images(qat_orin_run, 32))
    assert result.first_bad is not None and result.first_bad.module == "features.2.0"
    before = [d for d in result.layers if d.index < result.first_bad.index]
    assert before and all(d.sqnr_db > 60 for d in before)


def test_residual_network_compares_the_quantized_adds(tmp_path):
    """A ResNet (quantized residual Add) exported by qframe: every compared layer agrees, the Adds included;
    a planted scale on one block's input is found there."""
    from qframe.export.onnx import export_onnx

    torch.manual_seed(0)
    model = qframe.build_model("resnet18", 10, 3, 16, width_mult=0.25).eval()
    calib = [(torch.randn(16, 3, 16, 16), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    q = qframe.ptq(model, qframe.preset("w8a8"), calib, 2)
    path = export_onnx(q, torch.randn(1, 3, 16, 16), tmp_path / "model_ptq_w8a8.onnx")
    x = torch.randn(24, 3, 16, 16)
    clean = B.bisect(q, path, x)
    ops = {d.op for d in clean.layers}
    assert clean.first_bad is None and {"Conv", "Add", "Gemm"} <= ops, clean.table()
    dq_inputs = [n.output[0] for n in onnx.load(str(path)).graph.node
                 if n.op_type == "DequantizeLinear" and n.output[0].startswith("layer3.0.conv1.input")]
    planted = plant_dq_scale(path, tmp_path / "planted.onnx", dq_inputs[0])
    bad = B.bisect(q, planted, x).first_bad
    assert bad is not None and bad.module == "layer3.0.conv1", bad


def test_bad_input_is_one_line(qat_orin_run, tmp_path):
    proc = _bisect_cli(tmp_path / "nowhere")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    proc = _bisect_cli(qat_orin_run, "--model", "qat_w2a2")
    assert proc.returncode == 2 and "checkpoint" in proc.stderr and "valid model names here" in proc.stderr
    with pytest.raises(QFrameError, match="tolerance_db='x' is invalid"):
        B.bisect(torch.nn.Linear(2, 2), qat_orin_run / "model_qat_w8a8.onnx", np.zeros((1, 2)), tolerance_db="x")
    # a file that is no ONNX model: one line and exit 2 (usage), not a DecodeError traceback and exit 1 (divergence)
    (tmp_path / "model.py").write_text("import torch\n")
    proc = _bisect_cli(qat_orin_run, "--onnx", tmp_path / "model.py", "--tensorrt", "no")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("qframe: error: bisect: ") and "model.py' is not an ONNX model" in proc.stderr


def test_sqnr_against_a_float64_reference():
    rng = np.random.default_rng()
    ref = rng.standard_normal(10_000)
    noise = rng.standard_normal(10_000) * 0.01
    expected = 10 * np.log10(np.sum(ref ** 2) / np.sum(noise ** 2))
    assert abs(B.sqnr_db(ref.astype(np.float32), (ref + noise).astype(np.float32)) - expected) < 0.01
    assert B.sqnr_db(ref, ref) == float("inf")


@pytest.mark.skipif(not B._tensorrt_here(), reason="needs TensorRT and a CUDA GPU")
def test_tensorrt_engine_layers_match_and_a_planted_fault_is_found(qat_orin_run, tmp_path):
    """Where TensorRT runs: the engine built from the exposed graph agrees with PyTorch layer by layer (INT8
    kernels round their own way: a looser bar), and the planted scale is named there too."""
    model = B.load_run_model(qat_orin_run, "qat_w8a8")
    images = B.run_images(qat_orin_run, 16)
    clean = B.bisect(model, qat_orin_run / "model_qat_w8a8.onnx", images, runtime="tensorrt", tolerance_db=20)
    assert clean.first_bad is None, clean.table()
    planted = plant_dq_scale(qat_orin_run / "model_qat_w8a8.onnx", tmp_path / "p.onnx", "features.2.0.input")
    bad = B.bisect(model, planted, images, runtime="tensorrt", tolerance_db=20).first_bad
    assert bad is not None and bad.module == "features.2.0"
