"""ONNX files in and out: every export tool takes a path or a ModelProto, and a missing, unreadable or
unwritable file is one line naming it."""

from pathlib import Path

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.export.onnx import export_onnx
from qframe.utils.io import atomic_write_text

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qframe.export.dla import dla_report  # noqa: E402
from qframe.export.lint import check_tensorrt  # noqa: E402
from qframe.export.ort import ort_parity  # noqa: E402
from qframe.export.ort_form import onnxruntime_form  # noqa: E402
from qframe.export.ov_form import openvino_form  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    path = export_onnx(qmodel, x[:1], tmp_path_factory.mktemp("onnx") / "model.onnx")
    return qmodel, x, Path(path)


def test_each_tool_reads_a_path_as_it_reads_the_model(exported):
    qmodel, x, path = exported
    proto = onnx.load(str(path))
    assert check_tensorrt(path) == check_tensorrt(proto)
    assert dla_report(path).to_markdown() == dla_report(proto).to_markdown()
    assert onnxruntime_form(path) == onnxruntime_form(proto)
    assert openvino_form(path) == openvino_form(proto)
    assert ort_parity(path, qmodel, [(x, torch.zeros(len(x), dtype=torch.long))])["basic"]["agreement"] == 100.0


@pytest.mark.parametrize("tool", [check_tensorrt, dla_report, onnxruntime_form, openvino_form,
                                  lambda p: ort_parity(p, nn.Identity(), [])],
                         ids=["check_tensorrt", "dla_report", "onnxruntime_form", "openvino_form", "ort_parity"])
def test_a_missing_folder_or_foreign_file_is_one_line(tool, tmp_path):
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a graph")
    for given, message in [(tmp_path / "missing.onnx", "missing.onnx' does not exist"),
                           (tmp_path, "is a folder"), (not_onnx, "notes.onnx' is not an ONNX model"),
                           (3, r"needs an ONNX model \(a path or an onnx.ModelProto\), got int")]:
        with pytest.raises(QFrameError, match=message) as err:
            tool(given)
        assert "\n" not in str(err.value)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where nobody may create files")
def test_a_folder_the_file_system_refuses_is_one_line_and_leaves_nothing(exported):
    qmodel, x, _ = exported
    for write in (lambda: export_onnx(qmodel, x[:1], "/sys/model.onnx"), lambda: atomic_write_text("x", "/sys/a.md")):
        with pytest.raises(QFrameError, match="cannot write '/sys/.*': .*; valid: a path in a folder you can write to"):
            write()
    assert not Path("/sys/model.onnx").exists()


@pytest.mark.parametrize("opset", [12, "17", 13.0, None])
def test_an_opset_without_per_channel_qdq_or_not_an_integer_is_one_line_and_prints_nothing(exported, opset, tmp_path, capsys):
    qmodel, x, _ = exported
    with pytest.raises(QFrameError, match=rf"opset={opset!r} is invalid; valid: an integer 13\.\.\d+"):
        export_onnx(qmodel, x[:1], tmp_path / "m.onnx", opset=opset)
    assert capsys.readouterr().out == "" and not list(tmp_path.iterdir())
