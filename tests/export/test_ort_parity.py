"""ort_parity on the batches and models users give it: outputs that are dicts or transformers ModelOutputs,
batches without labels or of the wrong shape, and a model it must leave as it found it."""

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.export.onnx import export_onnx

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qframe.export.ort import ort_parity, ort_session  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class _Dict(_Net):
    def forward(self, x):  # the logits second, and another tensor first, whose top-1 is never the logits'
        y = super().forward(x)
        return {"feat": -y, "logits": y}


def _quantized(model, shape=(3, 8, 8)):
    torch.manual_seed(0)
    return qframe.ptq(model.eval(), qframe.preset("w8a8"), [torch.randn(4, *shape)], 1)


def _graph_logits(path, x, output="logits"):
    """The graph's output ``output`` at ORT_ENABLE_BASIC, run here without ort_parity."""
    session = ort_session(path, level="basic")
    names = [o.name for o in session.get_outputs()]
    return torch.from_numpy(session.run(None, {"input": x.numpy()})[names.index(output)])


def test_a_dict_output_is_compared_on_its_logits_output(tmp_path):
    """A model returning a dict crashed (``dict`` has no ``.float()``); ONNX output 0 is ``feat`` here."""
    qmodel = _quantized(_Dict())
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["feat", "logits"]
    x, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    parity = ort_parity(path, qmodel, [(x, labels)], levels=("basic",))["basic"]
    graph = _graph_logits(path, x)
    with torch.no_grad():
        ref = qmodel(x)["logits"]
    assert parity["agreement"] == 100.0
    assert parity["max_logit_diff"] == pytest.approx(float((graph - ref).abs().max()), abs=1e-7)
    assert parity["max_logit_diff"] <= 1e-5 * float(ref.abs().max()) + 1e-7
    assert parity["accuracy"] == pytest.approx(100.0 * float((ref.argmax(1) == labels).float().mean()))


def test_a_transformers_model_output_is_compared_on_its_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    torch.manual_seed(0)
    qmodel = qframe.ptq(transformers.ResNetForImageClassification(config).eval(), qframe.preset("w8a8"),
                        [torch.randn(4, 3, 32, 32)], 1)
    path = export_onnx(qmodel, torch.randn(1, 3, 32, 32), tmp_path / "hf.onnx")
    x, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    parity = ort_parity(path, qmodel, [(x, labels)], levels=("basic",))["basic"]
    with torch.no_grad():
        ref = qmodel(x).logits
    graph = _graph_logits(path, x)
    assert parity["images"] == 4
    assert parity["max_logit_diff"] == pytest.approx(float((graph - ref).abs().max()), abs=1e-7)
    assert parity["max_logit_diff"] <= 1e-4 * float(ref.abs().max()) + 1e-6
    assert parity["agreement"] == pytest.approx(100.0 * float((graph.argmax(1) == ref.argmax(1)).float().mean()))


@pytest.mark.parametrize("shape, got", [((4, 3, 9, 9), r"\[4, 3, 9, 9\]"), ((4, 4, 8, 8), r"\[4, 4, 8, 8\]"),
                                        ((3, 8, 8), r"\[3, 8, 8\]")], ids=["size", "channels", "rank"])
def test_a_batch_of_another_shape_is_one_line_naming_both_shapes(shape, got, tmp_path):
    """onnxruntime's multi-line INVALID_ARGUMENT came through as it was."""
    qmodel = _quantized(_Net())
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    with pytest.raises(QFrameError, match=r"'input' takes shape \[batch, 3, 8, 8\], a batch gives " + got) as err:
        ort_parity(path, qmodel, [(torch.randn(*shape), torch.zeros(shape[0], dtype=torch.long))], levels=("basic",))
    assert "\n" not in str(err.value)


def test_batches_without_labels_are_compared_and_have_no_accuracy(tmp_path):
    """Bare tensors raised 'too many values to unpack'."""
    qmodel = _quantized(_Net())
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    a, b = torch.randn(5, 3, 8, 8), torch.randn(3, 3, 8, 8)
    parity = ort_parity(path, qmodel, [a, (b,)], levels=("basic",))["basic"]
    with torch.no_grad():
        diff = max(float((_graph_logits(path, t, "logits") - qmodel(t)).abs().max()) for t in (a, b))
    assert parity["images"] == 8
    assert parity["accuracy"] is None
    assert parity["max_logit_diff"] == pytest.approx(diff, abs=1e-7)
    with pytest.raises(QFrameError, match=r"a batch is a 3-item tuple; valid: \(inputs, labels\)"):
        ort_parity(path, qmodel, [(a, a, a)], levels=("basic",))


def test_the_model_keeps_its_modes(tmp_path):
    """ort_parity left the model in eval mode (and on the CPU)."""
    qmodel = _quantized(_Net())
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    qmodel.train()
    qmodel.conv.eval()  # modes that differ between modules come back as they were
    modes = {name: m.training for name, m in qmodel.named_modules()}
    ort_parity(path, qmodel, [(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))], levels=("basic",))
    assert {name: m.training for name, m in qmodel.named_modules()} == modes
    assert modes[""] and not modes["conv"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to come back to")
def test_a_model_on_the_gpu_comes_back_there(tmp_path):
    qmodel = _quantized(_Net())
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    qmodel.cuda()
    before = {k: v.device for k, v in qmodel.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    parity = ort_parity(path, qmodel, [x], levels=("basic",))["basic"]
    assert {k: v.device for k, v in qmodel.state_dict().items()} == before
    assert all(d.type == "cuda" for d in before.values())
    with torch.no_grad():
        ref = qmodel.cpu()(x)
    assert parity["max_logit_diff"] == pytest.approx(float(np.abs(_graph_logits(path, x).numpy() - ref.numpy()).max()),
                                                     abs=1e-7)
