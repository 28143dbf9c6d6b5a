"""Export of models that are not one float32 tensor in: float16 / bfloat16 models, a forward with defaulted
arguments, a model of two inputs; each file runs in onnxruntime as the quantized model runs in PyTorch."""

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.export.onnx import export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qframe.export.ort import ort_parity  # noqa: E402


def _seed():
    torch.manual_seed(torch.seed() % 2**31)


def _labels(n):
    return torch.zeros(n, dtype=torch.long)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("opset", [17, 21])
def test_a_half_precision_model_exports_as_float32_and_runs_as_it_does(dtype, tol, opset, tmp_path, caplog):
    """The file had float16 / bfloat16 inputs to QuantizeLinear beside float32 scales: onnxruntime refused it
    (INVALID_GRAPH at opset 17, a type clash at 21), and export said nothing."""
    _seed()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval().to(dtype)
    calib = torch.randn(8, 3, 8, 8, dtype=dtype)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [calib], 1)
    with caplog.at_level("INFO", logger="qframe"):
        path = export_onnx(qmodel, calib[:1], tmp_path / "m.onnx", opset=opset)
    assert f"the {str(dtype)[6:]} weights and inputs of Sequential are exported as float32" in caplog.text
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = torch.randn(8, 3, 8, 8, dtype=dtype)
    parity = ort_parity(path, qmodel, [(x, _labels(8))], levels=("basic",))["basic"]
    with torch.no_grad():
        scale = float(qmodel(x).float().abs().max())
    assert parity["max_logit_diff"] <= tol * scale  # the PyTorch model rounds each layer to its dtype
    assert next(qmodel.parameters()).dtype == dtype, "the model exported is left as it was"


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, scale: float = 3.0, shift=None):
        y = self.conv(x).mean((2, 3)) * scale
        return y if shift is None else y + shift


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_defaulted_forward_arguments_are_constants_of_the_graph(exporter, tmp_path):
    """``scale: float = 3.0`` became a second, required graph input (a double), and ort_parity then failed
    on onnxruntime's missing-input error; the dynamo route keeps its symbolic batch."""
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    _seed()
    model = _Scaled().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(4, 3, 8, 8)], 1)
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter=exporter)
    inputs = onnx.load(str(path)).graph.input
    assert [i.name for i in inputs] == ["input"]
    assert inputs[0].type.tensor_type.shape.dim[0].dim_param, "the batch stays symbolic"
    x = torch.randn(6, 3, 8, 8)
    parity = ort_parity(path, qmodel, [(x, _labels(6))], levels=("basic",))["basic"]
    with torch.no_grad():
        assert parity["max_logit_diff"] <= 1e-5 * float(qmodel(x).abs().max()) + 1e-7
    assert "forward" not in vars(qmodel), "the model keeps its own forward"


class _Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return (self.a(x) + self.b(y)).mean((2, 3))


def test_ort_parity_feeds_a_model_of_two_inputs_and_names_a_batch_that_lacks_one(tmp_path):
    _seed()
    data = [((torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)), _labels(4)) for _ in range(2)]
    qmodel = qframe.ptq(_Two().eval(), qframe.preset("w8a8"), data, 2, input_fn=lambda batch: batch[0])
    path = export_onnx(qmodel, (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)), tmp_path / "two.onnx")
    fresh = [((torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)), _labels(5))]
    parity = ort_parity(path, qmodel, fresh, levels=("basic",))["basic"]
    with torch.no_grad():
        assert parity["images"] == 5
        assert parity["max_logit_diff"] <= 1e-5 * float(qmodel(*fresh[0][0]).abs().max()) + 1e-7
    with pytest.raises(QFrameError, match=r"a batch gives 1 inputs, the graph takes 2 \(x, y\)"):
        ort_parity(path, qmodel, [(torch.randn(5, 3, 8, 8), _labels(5))], levels=("basic",))


def test_an_example_the_model_does_not_take_is_one_line_and_writes_nothing(tmp_path):
    """A 9x9 example for a model whose Linear reads 8x8 maps raised torch's raw matmul error from the tracer."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(2, 3, 8, 8)], 1)
    with pytest.raises(QFrameError, match=r"export_onnx's example \(shape \(1, 3, 9, 9\)\) does not fit Sequential") as err:
        export_onnx(qmodel, torch.randn(1, 3, 9, 9), tmp_path / "m.onnx")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 4, 3, padding="same", dilation=2),
                                  nn.Conv1d(3, 4, 3, padding="same", dilation=3),
                                  nn.Conv2d(3, 4, 4, padding="same")], ids=["2d_dilated", "1d_dilated", "2d_uneven"])
def test_a_same_padded_dilated_conv_exports_a_graph_onnxruntime_runs(conv, tmp_path):
    """padding='same' exported as auto_pad=SAME_UPPER, which onnxruntime refuses beside a dilation."""
    _seed()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(1)).eval()
    x = torch.randn(4, 3, 10) if isinstance(conv, nn.Conv1d) else torch.randn(4, 3, 10, 10)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    path = export_onnx(qmodel, x[:1], tmp_path / "m.onnx")
    fresh = torch.randn_like(x)
    parity = ort_parity(path, qmodel, [(fresh, _labels(4))], levels=("basic",))["basic"]
    with torch.no_grad():
        assert parity["max_logit_diff"] <= 1e-5 * float(qmodel(fresh).abs().max()) + 1e-7
    assert qmodel[0].padding == "same", "the model exported keeps its own padding"


class _Branchy(nn.Module):
    """A forward that picks a layer by the input's values: the trace keeps the branch the example takes."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        return self.a(x) if x.mean() > 0 else self.b(x)


@torch.jit.script_if_tracing
def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.matmul(q, k.transpose(-1, -2))


class _ScriptedMatmul(nn.Module):
    """An attention whose matmul runs inside a script_if_tracing function: eager placement quantizes it, the
    trace records the function."""

    def __init__(self):
        super().__init__()
        self.qk, self.head = nn.Linear(8, 16), nn.Linear(5, 2)

    def forward(self, x):  # x [B, 5, 8]
        q, k = self.qk(x).chunk(2, -1)
        return self.head(_scores(q, k).softmax(-1)).mean(1)


@pytest.mark.parametrize("make, shape, missed", [
    (_Branchy, (4, 8), "b.weight_quantizer, b.input_quantizer"),
    (_ScriptedMatmul, (4, 5, 8), "qframe_sites.quantizers.matmul0_a"),
], ids=["branch", "script_if_tracing"])
def test_quantizers_the_trace_never_ran_are_named_in_a_warning(make, shape, missed, tmp_path, caplog):
    """The file computed another branch, or the matmul without its Q/DQ, and the export said nothing."""
    torch.manual_seed(0)
    calib = [torch.randn(*shape) + 1, torch.randn(*shape) - 1]
    qmodel = qframe.ptq(make().eval(), qframe.preset("w8a8"), calib, 2)
    with caplog.at_level("WARNING", logger="qframe.export.traced"):
        export_onnx(qmodel, torch.randn(*shape) + 1, tmp_path / "m.onnx")
    assert "calibrated quantizers never ran while the example was traced" in caplog.text
    assert missed in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qframe.export.traced"):  # every quantizer in the file: no warning
        export_onnx(qframe.ptq(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval(),
                               qframe.preset("w8a8"), [torch.randn(4, 8)], 1), torch.randn(1, 8), tmp_path / "s.onnx")
    assert caplog.text == ""
