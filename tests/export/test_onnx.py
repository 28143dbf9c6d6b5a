"""ONNX export with Q/DQ: graph form, 4-bit levels in int8 initializers, onnxruntime parity at two levels."""

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.export.lint import lint_tensorrt
from qframe.export.onnx import export_onnx
from qframe.export.ort import ort_parity, ort_session
from qframe.train import TrainConfig, fit

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = qframe.build_model("compact_cnn", data.num_classes, 1, 16)
    fit(model, data, TrainConfig(epochs=3, batch_size=64), seed=0)
    return data, model.eval()


def _weight_codes(model) -> list:
    """The integer codes of every weight: the int8 initializers DequantizeLinear nodes read."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [values[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in values]


def test_w8a8_exports_qdq_that_onnxruntime_agrees_with(trained, tmp_path):
    data, model = trained
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 4)
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # a dynamic batch axis by default
    producers = {out: node for node in graph.node for out in node.output}
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert convs
    for node in convs:  # data and weight inputs both arrive through DequantizeLinear
        assert producers[node.input[0]].op_type == "DequantizeLinear", node.name
        assert producers[node.input[1]].op_type == "DequantizeLinear", node.name
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [consts[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(zero_points) >= len(convs)
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)  # symmetric int8, as TensorRT wants
    assert lint_tensorrt(onnx.load(str(path))) == []  # the layout TensorRT's explicit quantization wants
    parity = ort_parity(path, qmodel, data.loader("test", 128))
    assert set(parity) == {"basic", "all"} and parity["all"]["level"] == "ORT_ENABLE_ALL"
    for p in parity.values():
        assert p["images"] == len(data.test)
        assert p["agreement"] >= 99.0 and p["max_logit_diff"] < 0.5, parity


@pytest.mark.parametrize("quantized", [False, True])
def test_a_zero_pad_before_max_pooling_computes_in_onnxruntime_what_it_does_in_pytorch(quantized, tmp_path):
    """A ConstantPad2d(0) before a MaxPool2d (BiT's stem) over maps of mostly negative values: the padding's 0
    is the maximum of many border windows. onnxruntime before 1.32 folds such a Pad into the pooling, whose
    own padding is -inf. qframe's sessions give PyTorch's output at every level; a session with onnxruntime's
    defaults gets it wrong exactly where pad_fusion_breaks_max_pooling says this onnxruntime does."""
    import onnxruntime as ort

    from qframe.export.ort import LEVELS, pad_fusion_breaks_max_pooling, zero_pads_before_max_pooling

    torch.manual_seed(torch.seed() % 2**31)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-3.0)
    x = torch.randn(4, 3, 9, 9)
    if quantized:
        model = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    with torch.no_grad():
        ref = model(x).numpy()
    assert (ref == 0).mean() > 0.1
    path = export_onnx(model, x[:1], tmp_path / "m.onnx")
    assert len(zero_pads_before_max_pooling(onnx.load(str(path)))) == 1
    for level in LEVELS:
        session = ort_session(path, level=level)
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], ref, atol=1e-5, err_msg=level)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert (not np.allclose(plain, ref, atol=1e-5)) == bool(pad_fusion_breaks_max_pooling())
    # padded with -inf, or into a convolution, the pair computes the same fused or not
    for other in (nn.Sequential(nn.ConstantPad2d(1, -float("inf")), nn.MaxPool2d(3, 2)),
                  nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.Conv2d(3, 4, 3))):
        assert zero_pads_before_max_pooling(onnx.load(str(export_onnx(other, x[:1], tmp_path / "o.onnx")))) == []


def test_4bit_weights_export_as_int8_holding_4bit_levels(trained, tmp_path):
    data, model = trained
    qmodel = qframe.ptq(model, qframe.preset("w4a8"), data.loader("train", 64, shuffle=True), 2)
    path = export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "w4.onnx")
    codes = _weight_codes(onnx.load(str(path)))
    assert all(c.dtype == np.int8 for c in codes)
    assert len(codes) == 5
    four_bit = [c for c in codes if c.min() >= -8 and c.max() <= 7]
    assert len(four_bit) == 3  # first and last layer stay 8-bit in the w4a8 preset
    assert lint_tensorrt(onnx.load(str(path))) == []
    assert all(c.max() > 7 or c.min() < -8 for c in codes if not (c.min() >= -8 and c.max() <= 7))
    assert all(p["agreement"] >= 97.0 for p in ort_parity(path, qmodel, data.loader("test", 128)).values())


def test_fp32_export_matches_torch(trained, tmp_path):
    data, model = trained
    path = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path / "fp32.onnx")
    for parity in ort_parity(path, model, data.loader("test", 128)).values():
        assert parity["agreement"] == 100.0 and parity["max_logit_diff"] < 1e-4


def test_per_group_linear_weights_export_as_opset21_int4_blocks(tmp_path):
    from torch import nn

    from qframe.export.tensorrt import strip_qdq

    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=8, channels=1, seed=1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 72), nn.ReLU(), nn.Linear(72, 10))
    qmodel = qframe.ptq(mlp.eval(), qframe.preset("w4a16"), data.loader("train", 64, shuffle=True), 2)
    with pytest.raises(QFrameError, match="block quantization from opset 21 on; export with opset=21"):
        export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp_path / "g17.onnx")
    path = export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp_path / "g.onnx", opset=21)
    model = onnx.load(str(path))
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 3 and all({(a.name, a.i) for a in n.attribute} == {("axis", 1), ("block_size", 32)} for n in dqs)
    types = {t.name: t.data_type for t in model.graph.initializer}
    # the w4a16 preset keeps the first and last layer at 8 bits; 80 inputs = two blocks of 32 and one of 16
    assert [types[n.input[0]] for n in dqs].count(onnx.TensorProto.INT4) == 1
    assert onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "3.weight_scale")).shape == (72, 3)
    assert lint_tensorrt(model) == []  # weight-only: the Gemm input stays float
    for parity in ort_parity(path, qmodel, data.loader("test", 128)).values():
        assert parity["agreement"] == 100.0 and parity["max_logit_diff"] < 1e-5  # the same values, exactly stored
    stripped, scales = strip_qdq(model)  # the DLA / implicit path folds the blocks back into float weights
    assert scales == {} and not any(n.op_type == "DequantizeLinear" for n in stripped.graph.node)


def test_opset_21_from_an_exporter_that_writes_20_is_stamped_21_and_runs(tmp_path, monkeypatch):
    """A torch whose exporter knows no opset above 20 (torch 2.4): the graph is written at 20 and declared 21,
    int4 blocks added; a newer opset than it knows is one line."""
    from torch import nn
    from torch.onnx import _constants

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    data = qframe.build_data("digits", image_size=8, channels=1, seed=1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 80), nn.ReLU(), nn.Linear(80, 72), nn.ReLU(), nn.Linear(72, 10))
    qmodel = qframe.ptq(mlp.eval(), qframe.preset("w4a16"), data.loader("train", 64, shuffle=True), 2)
    monkeypatch.setattr(_constants, "ONNX_MAX_OPSET", 20)
    path = export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp_path / "g.onnx", opset=21)
    model = onnx.load(str(path))
    assert {e.version for e in model.opset_import if e.domain in ("", "ai.onnx")} == {21}
    onnx.checker.check_model(model, full_check=True)
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert [{a.name for a in n.attribute} for n in dqs] == [{"axis", "block_size"}] * 3
    for parity in ort_parity(path, qmodel, data.loader("test", 128)).values():
        assert parity["agreement"] == 100.0 and parity["max_logit_diff"] < 1e-5
    with pytest.raises(QFrameError, match="writes opsets up to 20; got opset=22"):
        export_onnx(qmodel, torch.randn(1, 1, 8, 8), tmp_path / "h.onnx", opset=22)
    assert not (tmp_path / "h.onnx").exists()


def test_per_group_and_uncalibrated_models_are_refused(trained, tmp_path):
    data, model = trained
    qmodel = qframe.ptq(model, qframe.preset("w4a16"), data.loader("train", 64, shuffle=True), 1)
    with pytest.raises(QFrameError, match="per-group weight scales; ONNX block quantization .* Linear"):
        export_onnx(qmodel, torch.randn(1, 1, 16, 16), tmp_path / "g.onnx", opset=21)
    from qframe.methods.qat import QATConfig, prepare_qat

    dynamic = prepare_qat(model, qframe.preset("w8a8"), data.loader("train", 64, shuffle=True), 1, QATConfig())
    for q in dynamic.modules():
        if getattr(q, "observing", None) is not None and hasattr(q, "dynamic"):
            q.observing = True
            break
    with pytest.raises(QFrameError, match="fixed quantization ranges"):
        export_onnx(dynamic, torch.randn(1, 1, 16, 16), tmp_path / "d.onnx")
    assert not (tmp_path / "g.onnx").exists()


def test_module_path_names_the_pytorch_module_of_each_exported_and_fused_node(trained, tmp_path):
    from qframe.export.qdq import module_path

    data, model = trained
    modules = dict(model.named_modules())
    path = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path / "fp32.onnx")
    layers = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("Conv", "Gemm")]
    assert layers
    for node in layers:
        name = module_path(node.name)
        assert isinstance(modules.get(name), (torch.nn.Conv2d, torch.nn.Linear)), (node.name, name)
        # onnxruntime keeps the scope when it fuses or re-lays a node out
        assert module_path(node.name + "_token_7") == module_path(node.name + "_output_0_nchwc") == name
    assert module_path("/features/features.2/conv/conv.0/conv.0.0/Conv") == "features.2.conv.0.0"
    assert module_path("Transpose_token_195") == ""


def test_profile_onnx_times_every_node_onnxruntime_runs(trained, tmp_path):
    from qframe.export.ort import ort_session, profile_onnx, with_dynamic_batch
    from qframe.export.qdq import module_path

    data, model = trained
    path = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path / "fp32.onnx")
    profiles = profile_onnx({"a": path, "b": path}, (1, 16, 16), 8, rounds=2, runs=3, warmup=2)
    ort_session(with_dynamic_batch(path), 2, optimized_path=tmp_path / "optimized.onnx")
    optimized = {n.name: n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    modules = dict(model.named_modules())
    for profile in profiles.values():
        assert {node: t["op"] for node, t in profile.items()} == optimized
        assert all(t["median_ms"] > 0 for t in profile.values())
        convs = [node for node, t in profile.items() if t["op"] in ("Conv", "FusedConv")]
        assert convs and all(module_path(node) in modules for node in convs)


class _FixedBatch(torch.nn.Module):
    """Flattens with the batch size as a Python int: PyTorch runs any batch, the traced graph keeps batch 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(int(x.shape[0]), 4 * 16 * 16))


def test_a_graph_that_fixes_its_batch_size_gets_a_clear_error(trained, tmp_path):
    data, _ = trained
    model = _FixedBatch().eval()
    path = export_onnx(model, torch.randn(1, 1, 16, 16), tmp_path / "fixed.onnx")
    one = [(x[:1], y[:1]) for x, y in data.loader("test", 8)][:2]
    assert ort_parity(path, model, one)["all"]["agreement"] == 100.0  # it runs at batch 1
    with pytest.raises(QFrameError, match=r"^fixed.onnx fixes its batch size: onnxruntime runs it at batch 1 but "
                                          r"not at batch 8 \(.*\); make the model's reshapes keep the batch axis"):
        ort_parity(path, model, data.loader("test", 8))


class _Attention(nn.Module):
    """Two inputs (tokens and a per-token scale), nn.MultiheadAttention, two named outputs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, tokens, weights):
        t = self.proj(tokens) * weights.unsqueeze(-1)
        a, _ = self.mha(t, t, t)
        return {"logits": self.head(a.mean(1)), "features": a}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_multihead_attention_and_several_named_inputs_and_outputs_export(tmp_path, exporter):
    from qframe.export.coverage import chosen_float_layers
    from qframe.export.dynamo import supported
    from qframe.export.lint import errors

    if exporter == "dynamo" and supported():
        pytest.skip(supported())

    torch.manual_seed(0)
    model = _Attention().eval()
    g = torch.Generator().manual_seed(1)
    calib = [{"tokens": torch.randn(4, 5, 8, generator=g), "weights": torch.rand(4, 5, generator=g)} for _ in range(2)]
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, 2, input_fn=lambda batch: batch)  # dict: model(**batch)
    for name, m in (("fp32", model), ("int8", qmodel)):
        path = export_onnx(m, (torch.randn(1, 5, 8), torch.rand(1, 5)), tmp_path / f"{name}.onnx", exporter=exporter)
        graph = onnx.load(str(path))
        assert [i.name for i in graph.graph.input] == ["tokens", "weights"]  # the forward's own names
        assert [o.name for o in graph.graph.output] == ["logits", "features"]  # the dict's keys
        session = ort_session(str(path))  # at ORT_ENABLE_ALL: integer kernels
        x, w = torch.randn(3, 5, 8), torch.rand(3, 5)  # batch 3: the batch axis of both inputs is symbolic
        out = session.run(["logits"], {"tokens": x.numpy(), "weights": w.numpy()})[0]
        with torch.no_grad():
            ref = m(x, w)["logits"].numpy()
        assert np.abs(out - ref).max() < 1e-4 * (1 + np.abs(ref).max()), name
        if name == "int8":  # the attention's projections and matmuls in INT8 too
            assert type(m.mha).__name__ == "QuantMultiheadAttention" and not chosen_float_layers(m)
            assert errors(lint_tensorrt(graph, {})) == []


def test_a_failed_export_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    class Breaks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.conv(x)
            if torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
                raise RuntimeError("this layer has no ONNX form")  # as an exporter failing half-way
            return y

    model = Breaks().eval()
    old = tmp_path / "m.onnx"
    good = export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 8, 8), old)
    before = good.read_bytes()
    with pytest.raises(Exception):
        export_onnx(model, torch.randn(1, 1, 8, 8), old)
    assert old.read_bytes() == before and onnx.load(str(old)).graph.node
    with pytest.raises(Exception):
        export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "new.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no partial file, no scratch folder

    # a failure after the exporter has written its file (here: while rewriting it to the standard form)
    def interrupted(graph, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("qframe.export.qdq.standard_form", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3)).eval(), torch.randn(1, 1, 8, 8), tmp_path / "late.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


class _FoldNet(nn.Module):
    """Overlapping patches taken apart and summed back with F.unfold / F.fold: ONNX Col2Im, opset 18."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        patches = nn.functional.unfold(self.conv(x), 3, padding=1)
        return self.head(nn.functional.fold(patches, (8, 8), 3, padding=1).relu().mean((2, 3)))


def test_an_op_of_a_newer_opset_exports_at_that_opset_with_a_warning(tmp_path, caplog):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qframe.export.ort import ort_session

    torch.manual_seed(0)
    qmodel = qframe.ptq(_FoldNet().eval(), qframe.preset("w8a8"), [torch.randn(8, 3, 8, 8)], 1)
    with caplog.at_level("WARNING", logger="qframe"):
        path = export_onnx(qmodel, torch.randn(1, 3, 8, 8), tmp_path / "fold.onnx")
    assert "exported at opset 18 instead of 17" in caplog.text and "col2im" in caplog.text
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [18]
    assert any(n.op_type == "Col2Im" for n in graph.graph.node)
    assert [v.message for v in lint_tensorrt(graph) if v.severity == "error"] == []
    x = torch.randn(6, 3, 8, 8)
    session = ort_session(str(path), level="basic")
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert np.abs(session.run(None, {"input": x.numpy()})[0] - ref).max() < 1e-4 * np.abs(ref).max() + 1e-6


class _DynamicFoldNet(_FoldNet):
    """Overlapping F.fold to a size read from the input: no TorchScript ONNX form at any opset."""

    def __init__(self, patch: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.patch, self.stride, self.padding = patch, stride, padding

    def forward(self, x):
        y = self.conv(x)
        patches = nn.functional.unfold(y, self.patch, stride=self.stride, padding=self.padding)
        folded = nn.functional.fold(patches, tuple(y.shape[-2:]), self.patch, stride=self.stride, padding=self.padding)
        return self.head(folded.relu().mean((2, 3)))


@pytest.mark.parametrize("patch", [2, (2, 4)])
def test_non_overlapping_patches_folded_to_a_size_read_from_shapes_export_without_col2im(tmp_path, patch):
    """MobileViTV2's pattern: F.fold of non-overlapping patches (kernel == stride) to the feature map's own
    size exports as a reshape and a transpose at opset 17, batch dynamic, and computes the same."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from qframe.export.ort import ort_session

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    model = _DynamicFoldNet(patch, patch, 0).eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(8, 3, 8, 16)], 1)
    path = export_onnx(qmodel, torch.randn(1, 3, 8, 16), tmp_path / "fold.onnx")
    graph = onnx.load(str(path))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not any(n.op_type == "Col2Im" for n in graph.graph.node)
    assert nn.functional.fold is torch.nn.functional.fold and nn.functional.fold.__module__ == "torch.nn.functional"
    x = torch.randn(6, 3, 8, 16)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    got = ort_session(str(path), level="basic").run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() + 1e-6


def _exports_computing_the_same(model: nn.Module, size: tuple, folder, levels=("basic",)) -> dict:
    """``model`` and its w8a8 PTQ model exported at one input ``size``; each computes in onnxruntime (at each of
    ``levels``) what it computes in PyTorch, on other inputs at batch 5. Returns the graphs by name."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(8, 3, *size)], 1)
    x, graphs = torch.randn(5, 3, *size), {}
    for net, name in ((model, "fp32"), (qmodel, "w8a8")):
        path = export_onnx(net, torch.randn(1, 3, *size), folder / f"{name}.onnx")
        with torch.no_grad():
            ref = net(x).double().numpy()
        for level in levels:
            got = ort_session(str(path), level=level).run(None, {"input": x.numpy()})[0]
            assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max() + 1e-6, (name, level)
        graphs[name] = onnx.load(str(path)).graph
    return graphs


class _PyramidPool(nn.Module):
    """UperNet's / PSPNet's pyramid pooling: adaptive average pools to sizes that need not divide the input's, as
    modules (quantized as QuantPool) and as functional calls (quantized at placed sites)."""

    def __init__(self, modules=(1, 3), functional=(2, 6)):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in modules)
        self.functional = functional
        self.convs = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in modules + functional)
        self.head = nn.Conv2d(8 + 4 * len(self.convs), 5, 1)

    def forward(self, x):
        y = self.stem(x).relu()
        pooled = [pool(y) for pool in self.pools] + [nn.functional.adaptive_avg_pool2d(y, s) for s in self.functional]
        up = [nn.functional.interpolate(conv(p), size=y.shape[-2:], mode="bilinear") for conv, p in zip(self.convs, pooled)]
        return self.head(torch.cat([y, *up], 1))


@pytest.mark.parametrize("size", [(8, 8), (7, 10)])
def test_adaptive_pooling_to_a_size_that_does_not_divide_the_input_exports_and_computes_the_same(tmp_path, size):
    """The TorchScript exporter has no ONNX form for it ("output size that are not factor of input size")."""
    model = _PyramidPool().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(8, 3, *size)], 1)
    assert qmodel.qframe_placed.get("pool") == 2 and qmodel.qframe_float_layers == {}
    _exports_computing_the_same(model, size, tmp_path)


class _TokensToMap(nn.Module):
    """BEiT's segmentation head: a ViT's tokens back to a feature map whose side is read from the input's shape
    (so the traced graph computes it), then pyramid pooling to sizes that divide it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, stride=4)
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in (1, 2, 4))
        self.head = nn.Conv2d(8 * 3, 5, 1)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # [B, N, C]
        h, w = x.shape[-2] // 4, x.shape[-1] // 4
        f = tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)
        return self.head(torch.cat([nn.functional.interpolate(pool(f), size=(h, w)) for pool in self.pools], 1))


def test_adaptive_pooling_of_a_map_whose_size_the_graph_computes_exports_and_computes_the_same(tmp_path):
    """The TorchScript exporter writes an AveragePool only where it sees the input's size ("input size not
    accessible" otherwise: BEiT's and Data2Vec's segmentation heads did not export)."""
    for name, graph in _exports_computing_the_same(_TokensToMap().eval(), (32, 32), tmp_path).items():
        assert sorted(n.op_type for n in graph.node if "Pool" in n.op_type) == ["AveragePool", "AveragePool",
                                                                               "GlobalAveragePool"], name


class _UnbatchedPoolAndSameSizeResize(nn.Module):
    """SuperPoint's non-maximum suppression (2-d pooling of [N, H, W] scores) and DINOv2-with-registers'
    antialiased bicubic resize of its position table to the size it already has (as traced at its resolution)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.table = nn.Parameter(torch.randn(1, 4, 6, 6))

    def forward(self, x):
        table = nn.functional.interpolate(self.table, size=(x.shape[2], x.shape[3]), mode="bicubic",
                                          align_corners=False, antialias=True)
        y = self.conv(x) + table
        scores = y.mean(1)  # [N, H, W]
        peaks = scores == nn.functional.max_pool2d(scores, 3, stride=1, padding=1)
        return torch.where(peaks, scores, torch.zeros_like(scores)) + nn.functional.avg_pool2d(scores, 3, 1, 1)


def test_unbatched_2d_pooling_and_an_antialiased_resize_to_the_same_size_export_and_compute_the_same(tmp_path):
    _exports_computing_the_same(_UnbatchedPoolAndSameSizeResize().eval(), (6, 6), tmp_path)


class _CeilPools(nn.Module):
    """Average pools with ceil_mode whose last window runs past the input: transformers' EfficientNet pools its
    last map by one window larger than the map; 2x2 windows over an odd size; a 1-d pool over tokens."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.whole, self.odd = nn.AvgPool2d(8, ceil_mode=True), nn.AvgPool2d(2, ceil_mode=True)
        # with padding: the windows the ceiling adds start in the padding, where torch drops them
        self.padded, self.max = nn.AvgPool2d(2, ceil_mode=True, padding=1), nn.MaxPool2d(2, ceil_mode=True, padding=1)
        self.head = nn.Linear(8 + 8 * 9 + 8 * 3 + 2 * 8 * 9, 4)

    def forward(self, x):
        y = torch.relu(self.stem(x))  # 5 x 5
        tokens = nn.functional.avg_pool1d(y.flatten(2), 10, ceil_mode=True)  # 25 tokens -> 3
        pooled = [self.whole(y), self.odd(y), tokens, self.padded(y), self.max(y)]
        return self.head(torch.cat([p.flatten(1) for p in pooled], 1))


def test_ceil_mode_pools_compute_the_same_in_onnxruntime_at_every_level(tmp_path, caplog):
    """The exporter wrote count_include_pad=1, which onnxruntime's fused QLinearAveragePool read as counting the
    windows' overhang: 20-57 % off at level all. Without padding torch never counts it, so the file says so. With
    padding, ceil_mode=1 kept a window torch drops: a file onnxruntime refused to load; it is written floored."""
    with caplog.at_level("WARNING", logger="qframe.export.onnx"):
        graphs = _exports_computing_the_same(_CeilPools().eval(), (10, 10), tmp_path, levels=("basic", "all"))
    assert "shape inference" not in caplog.text
    for name, graph in graphs.items():
        pools = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node
                 if n.op_type in ("AveragePool", "MaxPool")]
        found = sorted((p["ceil_mode"], p.get("count_include_pad", -1)) for p in pools)
        assert found == [(0, -1), (0, 1), (1, 0), (1, 0), (1, 0)], name  # the max pool, the padded one, the rest


def test_a_file_onnx_shape_inference_refuses_is_a_warning_naming_it(tmp_path, caplog, monkeypatch):
    from qframe.export import rewrites

    monkeypatch.setitem(rewrites._REWRITES, nn.functional.max_pool2d, rewrites._pool2d_batched)  # as before
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.MaxPool2d(2, ceil_mode=True, padding=1), nn.Flatten(),
                          nn.Linear(4 * 9, 2)).eval()
    with caplog.at_level("WARNING", logger="qframe.export.onnx"):
        export_onnx(model, torch.randn(1, 3, 10, 10), tmp_path / "pool.onnx")
    assert "pool.onnx fails ONNX shape inference" in caplog.text and "onnxruntime will refuse" in caplog.text
    assert "Gemm" in caplog.text  # the op where the shapes disagree
