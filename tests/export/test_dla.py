"""DLA placement report: each DLA rule sends its node to the GPU with a reason; run counting."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from qframe.export.dla import dla_report  # noqa: E402


def _model(nodes, inits=(), shape=(1, 16, 16, 16)):
    """Graph from ``nodes`` reading input "x" and writing the last node's output."""
    out = nodes[-1].output[0]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _w(name, *shape):
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def _conv(k=3, cout=16, **attrs):
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="n", **attrs)], [_w("w", cout, 16, k, k)],
                  shape=(1, 16, 40, 40))


def _single(op, inputs=("x",), inits=(), shape=(1, 16, 16, 16), **attrs):
    return _model([helper.make_node(op, list(inputs), ["y"], name="n", **attrs)], inits, shape)


def _resize(scales, **attrs):
    s = numpy_helper.from_array(np.array(scales, np.float32), "s")
    return _single("Resize", ["x", "", "s"], [s], shape=(1, 16, 4, 4)[:len(scales)], **attrs)


NEAREST = dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")  # torch's export
BILINEAR = dict(mode="linear", coordinate_transformation_mode="half_pixel")  # align_corners=False
VOLUME = (1, 16, 4, 16, 16)  # N, C, D, H, W


CASES = {
    "kernel 33": (lambda: _conv(k=33), "kernel"),
    "stride 9": (lambda: _conv(strides=[9, 9]), "stride"),
    "dilation 33": (lambda: _conv(dilations=[33, 33]), "dilation"),
    "9000 channels": (lambda: _conv(cout=9000), "output channels"),
    "pad >= kernel": (lambda: _conv(k=3, pads=[3, 3, 3, 3]), "padding not smaller than kernel"),
    "pool window 9": (lambda: _single("MaxPool", kernel_shape=[9, 9]), "pool window"),
    "hardswish": (lambda: _single("HardSwish"), "HardSwish"),
    "concat axis 2": (lambda: _single("Concat", ["x", "x"], axis=2), "Concat on axis 2"),
    "softmax axis 3": (lambda: _single("Softmax", axis=3), "Softmax on axis 3"),
    "gather": (lambda: _single("Gather", ["x", "i"], [numpy_helper.from_array(np.array([0], np.int64), "i")]),
               "Gather"),
    "resize 1.5": (lambda: _single("Resize", ["x", "", "s"], [numpy_helper.from_array(
        np.array([1, 1, 1.5, 1.5], np.float32), "s")]), "not integers"),
    "deconv groups": (lambda: _model([helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="n", group=2)],
                                     [_w("w", 16, 8, 2, 2)]), "grouped deconvolution"),
    "clip min": (lambda: _single("Clip", ["x", "lo"], [numpy_helper.from_array(np.array(-1, np.float32), "lo")]),
                 "Clip min"),
    "reshape": (lambda: _single("Flatten"), "not a DLA layer"),
    # DLA Convolution, Activation, ElementWise and Pooling are 2-D only
    "conv 3-d": (lambda: _model([helper.make_node("Conv", ["x", "w"], ["y"], name="n")], [_w("w", 16, 16, 3, 3, 3)],
                                VOLUME), "3-D convolution"),
    "max pool 3-d": (lambda: _single("MaxPool", kernel_shape=[1, 2, 2], shape=VOLUME), "3-D pooling"),
    "global pool 3-d": (lambda: _single("GlobalAveragePool", shape=VOLUME), "3-D pooling"),
    "relu rank 5": (lambda: _single("Relu", shape=VOLUME), "rank-5"),
    "add rank 5": (lambda: _single("Add", ["x", "x"], shape=VOLUME), "rank-5"),
    # Resize: integer scales in [1, 32] (nearest) / [1, 4] (linear), on H and W only; half-pixel bilinear
    "nearest x64": (lambda: _resize([1, 1, 64, 64], **NEAREST), "nearest Resize scale [64, 64] outside [1, 32]"),
    "bilinear x8": (lambda: _resize([1, 1, 8, 8], **BILINEAR), "linear Resize scale [8, 8] outside [1, 4]"),
    "bilinear align_corners": (lambda: _resize([1, 1, 2, 2], mode="linear", coordinate_transformation_mode="align_corners"),
                               "coordinate_transformation_mode 'align_corners'"),
    "nearest align_corners": (lambda: _resize([1, 1, 2, 2], mode="nearest", coordinate_transformation_mode="align_corners"),
                              "coordinate_transformation_mode 'align_corners'"),
    "resize channels": (lambda: _resize([1, 2, 2, 2], **NEAREST), "[1, 1, height, width]"),
    "resize 3-d": (lambda: _resize([1, 1, 2, 2, 2], **NEAREST), "[1, 1, height, width]"),
    # Concat: the DLA reads the last three dims as C, H, W, so tokens [B, T, D] concatenate on T off the channel
    "concat class token": (lambda: _single("Concat", ["x", "x"], shape=(1, 197, 384), axis=1),
                           "Concat on axis 1 of a rank-3 tensor, not the channel axis 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_sends_node_to_gpu(case):
    build, text = CASES[case]
    row = dla_report(build()).row("n")
    assert row.placement == "GPU" and text in row.reason, row


@pytest.mark.parametrize("build", [
    lambda: _resize([1, 1, 32, 32], **NEAREST), lambda: _resize([1, 1, 2, 2]),  # ONNX defaults: half_pixel, round
    lambda: _resize([1, 1, 4, 4], **BILINEAR), lambda: _resize([1, 1, 2, 2], mode="linear",
                                                               coordinate_transformation_mode="pytorch_half_pixel"),
    lambda: _single("Concat", ["x", "x"], axis=1), lambda: _single("Concat", ["x", "x"], axis=-3),
    lambda: _model([helper.make_node("Conv", ["x", "w"], ["y"], name="n")], [_w("w", 16, 16, 3)], (1, 16, 32)),
], ids=["nearest x32", "resize defaults", "bilinear x4", "pytorch_half_pixel", "concat channels", "concat axis -3",
        "conv 1-d"])
def test_rule_keeps_node_on_dla(build):
    row = dla_report(build()).row("n")
    assert row.placement == "DLA" and row.reason == "", row


def test_torch_3d_layers_and_large_resizes_go_to_gpu(tmp_path):
    """The layers as PyTorch exports them: a Conv3d, a 3-d max pool, a x8 bilinear, a corner-aligned bilinear and a
    x64 nearest upsampling run on the GPU; the 2-d convolution and the x2 nearest upsampling stay on the DLA."""
    torch = pytest.importorskip("torch")
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.conv3d = nn.Conv2d(3, 1, 3, padding=1), nn.Conv3d(1, 1, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            y = self.conv3d(y.unsqueeze(1)).squeeze(1)
            y = F.max_pool3d(y.unsqueeze(1), (1, 2, 2)).squeeze(1)
            y = F.interpolate(y, scale_factor=2, mode="nearest")
            return (F.interpolate(y, scale_factor=8, mode="bilinear"),
                    F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=True),
                    F.interpolate(y, scale_factor=64, mode="nearest"))

    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), opset_version=17, dynamo=False)
    rows = [r for r in dla_report(str(path), precision="fp16").rows if r.op in ("Conv", "MaxPool", "Resize")]
    assert [(r.op, r.placement) for r in rows] == [("Conv", "DLA"), ("Conv", "GPU"), ("MaxPool", "GPU"),
                                                   ("Resize", "DLA"), ("Resize", "GPU"), ("Resize", "GPU"),
                                                   ("Resize", "GPU")], rows
    assert all("2-D only" in r.reason for r in rows[1:3])
    reasons = [r.reason for r in rows[4:]]
    assert all(text in why for text, why in zip(("outside [1, 4]", "'align_corners'", "outside [1, 32]"), reasons)), reasons


def test_dynamic_batch_and_fp32_put_everything_on_gpu():
    model = _conv()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    assert "dynamic shapes" in dla_report(model).row("n").reason
    row = dla_report(_conv(), precision="fp32").row("n")
    assert row.placement == "GPU" and "precision fp32" in row.reason
    assert dla_report(_conv(), precision="fp16").row("n").placement == "DLA"


def _chain(ops):
    """x -> op0 -> op1 -> ... (unary ops named n0, n1, ...)."""
    nodes, prev = [], "x"
    for i, op in enumerate(ops):
        nodes.append(helper.make_node(op, [prev], [f"t{i}"], name=f"n{i}"))
        prev = f"t{i}"
    return _model(nodes)


def test_clean_chain_is_one_subgraph():
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="c", pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["a", "lo", "hi"], ["b"], name="r6"),
             helper.make_node("MaxPool", ["b"], ["c_"], name="p", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Add", ["c_", "c_"], ["y"], name="add")]
    inits = [_w("w", 16, 16, 3, 3), numpy_helper.from_array(np.array(0, np.float32), "lo"),
             numpy_helper.from_array(np.array(6, np.float32), "hi")]
    rep = dla_report(_model(nodes, inits))
    assert {r.placement for r in rep.rows} == {"DLA"} and all(r.reason == "" for r in rep.rows)
    assert (rep.subgraphs, rep.boundaries) == (1, 0)


def test_dla_gpu_dla_chain():
    rep = dla_report(_chain(["Relu", "HardSwish", "Relu"]))
    assert [r.placement for r in rep.rows] == ["DLA", "GPU", "DLA"]
    assert (rep.subgraphs, rep.boundaries) == (2, 2)


def test_qdq_nodes_are_folded_and_transparent():
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")]
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r1"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], name="dq"),
             helper.make_node("HardSwish", ["d"], ["y"], name="hs")]
    rep = dla_report(_model(nodes, inits))
    assert rep.row("q").placement == "folded" and rep.row("dq").placement == "folded"
    assert (rep.subgraphs, rep.boundaries) == (1, 1)


def test_loadable_limit():
    rep = dla_report(_chain(["Relu", "HardSwish"] * 18))
    relus = [r for r in rep.rows if r.op == "Relu"]
    assert [r.placement for r in relus[:16]] == ["DLA"] * 16
    assert all(r.placement == "GPU" and "loadables" in r.reason for r in relus[16:])
    assert rep.subgraphs == 16


@pytest.mark.parametrize("name, kwargs", [("mobilenet_v2", dict(width_mult=0.5)), ("resnet18", {})])
def test_zoo_models(tmp_path, name, kwargs):
    torch = pytest.importorskip("torch")
    from qframe.models import build_model

    model = build_model(name, 10, 3, 64, **kwargs).eval()
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), opset_version=17, dynamo=False)
    onnx_model = onnx.load(str(path))
    rep = dla_report(onnx_model, precision="fp16")
    convs = [r for r in rep.rows if r.op == "Conv"]
    assert convs and all(r.placement in ("DLA", "GPU") for r in convs)
    assert len(rep.rows) == len(onnx_model.graph.node)
    table = [ln for ln in rep.to_markdown().splitlines() if ln.startswith("|")][2:]
    grouped = [int(ln.split(" nodes)")[0].split("(")[1]) for ln in table if ln.startswith("| (")]
    assert len(table) - len(grouped) + sum(grouped) == len(onnx_model.graph.node)  # every node, trivial ones by group
    trivial = {(r.op, r.placement, r.reason, r.note) for r in rep.rows if r.placement == "folded" or r.op == "Identity"}
    assert len(grouped) == len(trivial) and len(grouped) < 10  # one row per kind, not one per node
    assert rep.to_dict()["subgraphs"] == rep.subgraphs >= 1
