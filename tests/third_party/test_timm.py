"""Real third-party architectures: `timm` vision models, random init from timm's own configs (``pretrained=False``,
nothing downloaded), 10 classes at 64x64 (tests/third_party/timm_models.py).

The checks of test_transformers.py, per model at w8a8 PTQ: every Conv and Linear is quantized or listed as
float with a reason; every BatchNorm is folded (timm's BatchNormAct2d, a BatchNorm2d that applies its
activation in forward, included); the quantized model computes what the float one does up to 8-bit rounding;
an INT8 ONNX export has no BatchNormalization node, passes the TensorRT lint with warnings only for layers the
recipe chose to keep float, and its coverage report lists every compute layer as INT8 or chosen float;
onnxruntime agrees with the PyTorch model at batch 8; ``qframe.convert`` converts every quantized layer or
names it, and computes what the fake-quant model does; a QAT step from a fresh init stays finite, with
Conv + BN pairs (BatchNormAct2d's too) training folded.

Reparameterizable models (RepVGG, MobileOne, FastViT, EfficientViT-M, LeViT) are deployed as timm prescribes,
branches merged by ``timm.utils.reparameterize_model``; as built, qframe merges RepVGG's and MobileOne's summed
branches itself and names every BatchNorm it cannot fold (FastViT's RepMixer subtracts a branch that normalises
the block's input). The TF-ported EfficientNet's Conv2dSame pads by the input size
in its forward: qframe lists it float with the reason, and the tests quantize it through a twin registered
as a user would.

Random-init models sit close to rounding ties: the fake-quant model itself moves by 1-2.5 % (relative, logits)
when its input is scaled by 1 + 1e-6 (measured on MobileNetV4, ViT, DLA), so the onnxruntime and convert
checks compare logits and the top-1 of images whose top-2 margin is not a coin flip, instead of asking the
99 % top-1 agreement of test_transformers.py's shallower models.
"""

import contextlib
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
try:
    import timm  # noqa: F401
except Exception as exc:  # noqa: BLE001 (timm needs torchvision, whose CUDA builds fail to import beside a CPU torch)
    pytest.skip(f"timm does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                "these tests need timm and torchvision", allow_module_level=True)

import qframe  # noqa: E402
from qframe.methods.qat import QATConfig, prepare_qat  # noqa: E402
from qframe.quant.modules import QUANT_LAYERS, QuantConvBn2d  # noqa: E402

from timm_models import MODELS, build, deployable, reparameterizable, twins  # noqa: E402 (tests/third_party)
from vision_checks import images, loss, randomise_bn, top1  # noqa: E402

NORM = nn.modules.batchnorm._BatchNorm
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@contextlib.contextmanager
def _registered(name):
    pairs = twins(name)
    for float_type, twin in pairs:
        qframe.register_module(float_type, twin)
    try:
        yield
    finally:
        for float_type, _ in pairs:
            qframe.unregister_module(float_type)


def _rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _clear(ref):
    """Images whose top-1 is no coin flip: the top-2 margin above 10 % of the logits' standard deviation
    (the disagreements measured sat at 0.6-2.8 % of it; EfficientViT-B0's random logits leave 14 % of images)."""
    top2 = ref.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > 0.1 * ref.std()


def _ptq(model, name):
    with _registered(name):
        return qframe.ptq(model, qframe.preset("w8a8"), [(images(8, s), None) for s in range(2)], num_batches=2)


@pytest.fixture(scope="module", params=list(MODELS))
def built(request):
    torch.manual_seed(0)
    model = deployable(request.param)
    return request.param, model, _ptq(model, request.param)


def test_every_layer_is_quantized_or_listed_with_a_reason(built):
    name, model, qmodel = built
    floats = qmodel.qframe_float_layers
    for layer_name, module in qmodel.named_modules():
        if isinstance(module, LAYERS) and not isinstance(module, QUANT_LAYERS):
            assert floats.get(layer_name), f"{name}: {layer_name} is float without a reason"
    assert sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) >= 10
    assert not [n for n, why in floats.items() if "overrides" in why], f"{name}: {floats}"  # twins registered


def test_every_batchnorm_is_folded(built):
    name, model, qmodel = built
    left = [n for n, m in qmodel.named_modules() if isinstance(m, NORM)]
    assert not left, f"{name}: {len(left)} BatchNorms unfolded: {qmodel.qframe_unfolded_norms}"
    fused = [n for n, m in model.named_modules() if isinstance(m, NORM) and type(m).forward is not nn.BatchNorm2d.forward]
    for n in fused:  # BatchNormAct2d: its activation stays where the norm was
        act = model.get_submodule(n).act
        if not isinstance(act, nn.Identity):
            assert type(act) in {type(m) for m in qmodel.get_submodule(n).modules()}, f"{name}: {n} lost {act}"


def test_the_quantized_model_computes_what_the_float_one_does(built):
    name, model, qmodel = built
    x = images(16, 7)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 0.15, name  # measured <= 0.127 (MobileNetV4), the rest <= 0.036


@pytest.fixture(scope="module")
def exported(built, tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx

    name, model, qmodel = built
    path = export_onnx(qmodel, images(1, 5), tmp_path_factory.mktemp(name) / f"{name}_w8a8.onnx")
    graph = onnx.load(str(path))
    chosen = chosen_float_layers(qmodel)
    return name, qmodel, path, graph, chosen, lint_tensorrt(graph, chosen), tensorrt_coverage(graph, chosen)


def test_the_int8_onnx_has_no_batchnorm_and_passes_the_lint_with_warnings_only_for_chosen_float(exported):
    name, qmodel, _, graph, chosen, found, _ = exported
    assert not [n.name for n in graph.graph.node if n.op_type == "BatchNormalization"], name
    assert [v.message for v in found if v.severity == "error"] == [], name
    for v in found:
        assert any(why in v.message for why in chosen.values()), v.message


def test_the_coverage_report_lists_every_compute_layer_int8_or_chosen(exported):
    name, qmodel, _, graph, chosen, _, report = exported
    compute = [n.name for n in graph.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert [r.name for r in report.rows] == compute and compute, name
    assert report.fallbacks(chosen=False) == [], [(r.name, r.reason) for r in report.fallbacks(chosen=False)]
    layers = {n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    assert layers <= {r.module for r in report.rows if r.precision == "INT8"}, name
    placed = getattr(qmodel, "qframe_placed", {})
    attention = sum(r.op == "MatMul" and r.module not in layers for r in report.rows)
    assert attention == placed.get("matmul", 0) + placed.get("einsum", 0) + 2 * placed.get("sdpa", 0), name


def test_onnxruntime_agrees_with_pytorch_at_batch_8(exported):
    from qframe.export.ort import ort_session

    name, qmodel, path, *_ = exported
    session = ort_session(str(path), level="basic")
    x = images(64, 21)
    out = torch.cat([torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x[i:i + 8].numpy()})[0])
                     for i in range(0, 64, 8)])
    with torch.no_grad():
        ref = torch.cat([qmodel(x[i:i + 8]) for i in range(0, 64, 8)])
    assert _rel(out, ref) < 0.05, name  # measured <= 0.023 (DLA-34, DeiT)
    clear = _clear(ref)
    assert (top1(out) == top1(ref))[clear].all(), name
    assert (top1(out) == top1(ref)).float().mean() >= 0.9, name


def test_convert_runs_integer_layers_that_agree_with_the_fake_quant_model(built):
    from qframe.kernels.convert import IntConv2d, IntConvTranspose2d, IntLinear

    name, model, qmodel = built
    imodel = qframe.convert(qmodel)
    layers = {n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS)}
    converted = {n for n, m in imodel.named_modules() if isinstance(m, (IntConv2d, IntConvTranspose2d, IntLinear))}
    assert converted | set(imodel.qframe_fake_quant_layers) == layers and converted, name
    assert len(converted) >= 0.9 * len(layers), imodel.qframe_fake_quant_layers
    x = images(16, 8)
    with torch.no_grad():
        fp, ref, out = model(x), qmodel(x), imodel(x)
    # each integer layer computes its fake-quant layer's output to float rounding (tests/kernels/test_convert.py);
    # end to end, rounding-tie flips add up: measured <= 0.069 (MobileNetV4), ~1e-7 where none flips
    assert _rel(out, ref) < 0.1, name
    assert _rel(out, fp) <= 1.5 * _rel(ref, fp) + 0.01, name  # as close to the float model as the fake-quant one
    assert (top1(out) == top1(ref)).float().mean() >= 0.85, name  # measured >= 0.9375 (MobileNetV4, DLA-34)


def test_a_qat_step_from_a_fresh_init_stays_finite(built):
    name = built[0]
    torch.manual_seed(0)
    fresh = build(name, train=True)  # as built: reparameterizable branches train unmerged
    for i, m in enumerate(m for m in fresh.modules() if isinstance(m, NORM)):
        if i % 2:
            nn.init.zeros_(m.weight)
    with _registered(name):
        qmodel = prepare_qat(fresh.eval(), qframe.preset("w8a8"), [(images(8, 3), None)], 1, QATConfig())
    qmodel.train()
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for step in range(2):
        value = loss(qmodel(images(8, 10 + step)), step)
        opt.zero_grad()
        value.backward()
        opt.step()
        assert torch.isfinite(value), f"{name}: loss {value.item()} at step {step}"
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())
    if any(isinstance(m, nn.BatchNorm2d) for m in fresh.modules()):
        assert any(isinstance(m, QuantConvBn2d) for m in qmodel.modules()), f"{name}: no Conv2d/BN pair trains folded"


REPARAMETERIZABLE = [n for n in ("repvgg_a0", "mobileone_s0", "fastvit_t8", "efficientvit_m0", "levit_128s") if n in MODELS]
# as built, the BatchNorms that normalise a block's input in a branch of its own (no conv produces it) and that
# qframe's branch merge cannot take: FastViT's RepMixer subtracts theirs, mixer(x) - norm(x) (a merge takes sums)
BRANCH_INPUT_NORMS = {"repvgg_a0": 0, "mobileone_s0": 0, "fastvit_t8": 10, "efficientvit_m0": 0, "levit_128s": 0}


@pytest.mark.parametrize("name", REPARAMETERIZABLE)
def test_as_built_every_batchnorm_folds_but_branch_input_norms_which_qframe_names(name):
    """Without timm's reparameterization (the training form), RepVGG / MobileOne / FastViT normalise the block
    input in a branch of its own: no conv produces it. Where the block sums that branch with its convs (in place,
    ``out += identity``) qframe merges them into one convolution; FastViT's RepMixer subtracts it, so qframe lists
    those norms with the reason. Every other norm folds: LeViT's and EfficientViT-M's Conv / Linear + BN pairs
    (LinearNorm reads its Linear's output shape again, ``bn(x.flatten(0, 1)).reshape_as(x)``) included."""
    torch.manual_seed(0)
    model = randomise_bn(build(name).eval())
    assert reparameterizable(model)
    qmodel = _ptq(model, name)
    left = {n for n, m in qmodel.named_modules() if isinstance(m, NORM)}
    assert set(qmodel.qframe_unfolded_norms) == left and len(left) == BRANCH_INPUT_NORMS[name], name
    assert all("not the output of one Conv/Linear" in why for why in qmodel.qframe_unfolded_norms.values())
    x = images(8, 4)
    with torch.no_grad():
        assert _rel(qmodel(x), model(x)) < 0.15
