"""QAT: TensorRT-compatible quantizers, BN folded the way deployment folds it, LSQ, freezing."""

import copy

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.methods.qat import QATConfig, fold_qat, prepare_qat, qat
from qframe.models import build_model
from qframe.quant.compat import check_tensorrt
from qframe.quant.conv_bn import fuse_conv_bn
from qframe.quant.modules import QuantConv2d, QuantConvBn2d, QuantLinear, QuantResidualAdd, quantizers
from qframe.train import TrainConfig


def _calib(channels=3, size=16, n=2):
    return [torch.randn(16, channels, size, size) for _ in range(n)]


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_tensorrt_mode_weights_symmetric_per_output_channel(name, randomise_bn):
    model = build_model(name, 5, 3, 16, width_mult=0.25).eval()
    randomise_bn(model)
    recipe = qframe.preset("w8a8")
    check_tensorrt(recipe)  # the default preset is TensorRT-compatible: no error
    qmodel = prepare_qat(model, recipe, _calib(), 2, QATConfig())
    layers = [m for m in qmodel.modules() if isinstance(m, (QuantConv2d, QuantConvBn2d, QuantLinear))]
    assert layers and any(isinstance(m, QuantConvBn2d) for m in layers)
    fold_qat(qmodel)
    for m in qmodel.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            wq, iq = m.weight_quantizer, m.input_quantizer
            assert wq.spec.symmetric and wq.spec.signed and wq.spec.granularity == "per_channel" and wq.spec.axis == 0
            assert wq.scale.shape == (m.weight.shape[0],) and torch.all(wq.zero_point == 0)
            codes = torch.round(m.weight / wq.scale.view(-1, *([1] * (m.weight.dim() - 1))))
            assert codes.min() >= -128 and codes.max() <= 127
            assert iq.spec.granularity == "per_tensor" and iq.scale.dim() == 0 and int(iq.zero_point) == 0
    adds = [m for m in qmodel.modules() if isinstance(m, QuantResidualAdd)]
    assert adds and all(a.skip_quantizer.calibrated and a.skip_quantizer.spec.symmetric for a in adds)


def test_folding_before_quantization_keeps_outputs(normalise_bn):
    """A QuantConvBn2d (eval / frozen BN) and its folded QuantConv2d compute the same thing."""
    calib = _calib()
    model = normalise_bn(build_model("mobilenet_v2", 5, 3, 16, width_mult=0.25), torch.cat(calib)).eval()
    qmodel = prepare_qat(model, qframe.preset("w8a8"), calib, 2, QATConfig())
    for q in [m.weight_quantizer for m in qmodel.modules() if isinstance(m, QuantConvBn2d)]:
        assert q.dynamic
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = qmodel.eval()(x)
        fold_qat(qmodel)
        after = qmodel(x)
    assert not any(isinstance(m, QuantConvBn2d) for m in qmodel.modules())
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_convbn_training_uses_batch_statistics_until_frozen(randomise_bn):
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    randomise_bn(nn.Sequential(bn))
    model = fuse_conv_bn_model(conv, bn)
    qframe.quantize_(model, qframe.QuantRecipe(name="w8", weight=qframe.QuantizerConfig(granularity="per_channel"),
                                               input=None))
    layer = model[0]
    layer.weight_quantizer.dynamic = True
    x = torch.randn(8, 3, 10, 10) * 3 + 1
    layer.train()
    mean_before = bn.running_mean.clone()
    y = layer(x)
    # batch statistics: each output channel is normalised to (beta, gamma) over the batch
    torch.testing.assert_close(y.mean((0, 2, 3)), bn.bias.detach(), rtol=1e-3, atol=1e-3)
    assert not torch.equal(bn.running_mean, mean_before)
    layer.freeze_bn()
    frozen_mean = bn.running_mean.clone()
    w, b = layer.folded()
    expected = nn.functional.conv2d(x, layer.weight_quantizer(w), b)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(bn.running_mean, frozen_mean)


def fuse_conv_bn_model(conv, bn):
    model = nn.Sequential(conv, bn)
    assert fuse_conv_bn(model) == [("0", "1")]
    return model


def test_lsq_scales_learn_and_observers_freeze(tmp_path):
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)
    model = build_model("compact_cnn", data.num_classes, 1, 16).eval()
    calib = data.loader("train", 64, shuffle=True)
    lsq = prepare_qat(model, qframe.preset("w4a8"), calib, 2, QATConfig(lsq=True))
    scales = {n: q.scale.detach().clone() for n, q in quantizers(lsq)}
    assert all(q.learned for _, q in quantizers(lsq))
    qat_model = qat(model, qframe.preset("w4a8"), data, QATConfig(epochs=1, lsq=True), TrainConfig(batch_size=128),
                    calib_batches=calib, num_batches=2)
    moved = [n for n, q in quantizers(qat_model) if not torch.equal(q.scale.detach(), scales[n])]
    assert len(moved) == len(scales), "every learned step size received gradient updates"

    # activation ranges track for observer_steps steps, then stay fixed
    cfg = QATConfig(epochs=1, observer_steps=3, freeze_bn_epoch=0)
    qmodel = qat(model, qframe.preset("w8a8"), data, cfg, TrainConfig(batch_size=128, epochs=1),
                 calib_batches=calib, num_batches=2)
    acts = [q for n, q in quantizers(qmodel) if "input" in n]
    assert acts and not any(q.observing for q in acts)
    assert all(q.observer_name == "percentile" and q.observer.__class__.__name__ == "MovingAverageMinMaxObserver"
               for q in acts)
    before = [q.scale.clone() for q in acts]
    qmodel.train()
    qmodel(data.test.tensors[0][:32])
    assert all(torch.equal(a.scale, b) for a, b in zip(acts, before))
    assert all(m.bn_frozen for m in qmodel.modules() if isinstance(m, QuantConvBn2d))


def test_qat_recovers_low_bit_accuracy_lost_by_ptq():
    torch.manual_seed(0)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=2)
    model = build_model("compact_cnn", data.num_classes, 1, 16, width_mult=0.5)
    qframe.train.fit(model, data, TrainConfig(epochs=4, batch_size=64), seed=0)
    model.eval()
    test = data.loader("test", 256)
    # every layer at 3 bits with plain min/max ranges: PTQ suffers, training through it recovers
    recipe = qframe.QuantRecipe(name="w3a3", weight=qframe.QuantizerConfig(bits=3, granularity="per_channel"),
                                input=qframe.QuantizerConfig(bits=3))
    calib = data.loader("train", 64, shuffle=True)
    fp32 = qframe.evaluate(model, test)["accuracy"]
    ptq_acc = qframe.evaluate(qframe.ptq(model, recipe, calib, 4), test)["accuracy"]
    qat_acc = qframe.evaluate(qat(model, recipe, data, QATConfig(epochs=3, lr=1e-3), TrainConfig(batch_size=64),
                                  calib_batches=calib, num_batches=4), test)["accuracy"]
    assert qat_acc > ptq_acc + 5 and qat_acc > fp32 - 5, (fp32, ptq_acc, qat_acc)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"weight": {"symmetric": False}}, "weight.symmetric=false"),
        ({"input": {"granularity": "per_channel", "axis": 1}}, "per-tensor activation scales only"),
        ({"weight": {"granularity": "per_group", "group_size": 16}}, "weight.granularity=per_group"),
        ({"input": {"signed": False}}, "input.signed=false"),
    ],
)
def test_tensorrt_rejects_what_it_cannot_run(change, message):
    with pytest.raises(QFrameError, match=message) as err:
        check_tensorrt(qframe.preset("w8a8", **change), "orin")
    assert "\n" not in str(err.value) and "cannot run on orin" in str(err.value)


def test_tensorrt_warns_about_sub_8_bit():
    warnings = check_tensorrt(qframe.preset("w4a4"))
    assert any("weight bits=4" in w for w in warnings) and any("input bits=4" in w for w in warnings)
    assert check_tensorrt(qframe.preset("w8a8")) == []


def test_qat_for_tensorrt_warns_before_training_about_a_recipe_tensorrt_cannot_run(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    calib = [torch.randn(4, 3, 8, 8)]
    asymmetric = qframe.preset("w8a8", weight={"symmetric": False}, input={"signed": False, "symmetric": False})
    for target, recipe, warned in [("tensorrt", asymmetric, True), ("dla", asymmetric, True),
                                   ("onnxruntime", asymmetric, False), ("tensorrt", qframe.preset("w4a4"), False)]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="qframe"):
            prepare_qat(model, recipe, calib, 1, QATConfig(), target=target)
        said = [r.getMessage() for r in caplog.records if "cannot run on TensorRT" in r.getMessage()]
        assert bool(said) is warned, (target, recipe.name, said)
        if warned:
            assert "weight.symmetric=false" in said[0] and "input.signed=false" in said[0]
            assert "target='onnxruntime'" in said[0]


class _Kill(Exception):
    pass


@pytest.mark.parametrize("lsq", [False, True])
def test_qat_resumes_after_a_kill_to_the_same_state(tmp_path, lsq):
    data = qframe.build_data("digits", image_size=16, channels=1, seed=4)
    torch.manual_seed(3)
    model = build_model("mobilenet_v2", data.num_classes, 1, 16, width_mult=0.25).eval()
    recipe, cfg = qframe.preset("w4a8"), QATConfig(epochs=2, lsq=lsq, freeze_bn_epoch=1, observer_steps=4)
    train = TrainConfig(batch_size=256)
    steps = len(data.loader("train", 256, shuffle=True, drop_last=True))

    def run(augment=None, resume=None):
        torch.manual_seed(11 if resume is None else 999)  # dropout draws: same stream unless resumed
        calib = data.loader("train", 64, shuffle=True, seed=0)
        return qat(model, recipe, data, cfg, train, calib_batches=calib, num_batches=2, seed=5,
                   checkpoint_path=tmp_path / "qat_last.pt", resume=resume, augment=augment)

    full = run()
    calls = {"n": 0}

    def dying(x, g):
        calls["n"] += 1
        if calls["n"] > steps + 1:  # inside the second epoch
            raise _Kill
        return x

    (tmp_path / "qat_last.pt").unlink()
    with pytest.raises(_Kill):
        run(augment=dying)
    resumed = run(resume=str(tmp_path / "qat_last.pt"))
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_a_qat_step_from_zero_gamma_stays_finite_and_gamma_learns():
    """Residual blocks often start with their last BN's gamma at 0: the fold factor is then 0."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    nn.init.zeros_(bn.weight[:4])  # four channels start "switched off"
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5))
    x = torch.randn(16, 3, 8, 8)
    nn.init.normal_(bn.bias, 0.3, 0.1)  # positive: the ReLU passes the switched-off channels' gradient
    labels = torch.randint(0, 5, (16,))
    reference = copy.deepcopy(model).train()
    nn.functional.cross_entropy(reference(x), labels).backward()
    ref_grad = reference[1].weight.grad[:4]
    assert (ref_grad != 0).all()
    for lsq in (False, True):
        qmodel = prepare_qat(model.eval(), qframe.preset("w8a8"), [x], 1, QATConfig(lsq=lsq))
        layer = qmodel[0]
        assert isinstance(layer, QuantConvBn2d)
        qmodel.train()
        loss = nn.functional.cross_entropy(qmodel(x), labels)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in qmodel.parameters() if p.grad is not None)
        # a zero gamma gets the gradient the float model gives it, up to 8-bit rounding
        torch.testing.assert_close(layer.bn.weight.grad[:4], ref_grad, rtol=0.1, atol=0.02 * ref_grad.abs().max().item())
        # deployed: the switched-off channels output their beta, whatever the input
        qmodel.eval()
        fold_qat(qmodel)
        with torch.no_grad():
            pre = qmodel[0](x)
        expected = layer.bn.bias[:4].detach().view(1, -1, 1, 1).expand_as(pre[:, :4])
        torch.testing.assert_close(pre[:, :4], expected, rtol=0, atol=1e-4)  # beta on its int32 grid


@pytest.mark.parametrize("make_optimizer", [lambda p: torch.optim.SGD(p, lr=1.0), lambda p: torch.optim.Adam(p, lr=0.5)],
                         ids=["sgd", "adam"])
def test_a_step_past_zero_leaves_learned_step_sizes_positive_and_able_to_recover(make_optimizer):
    """A learned per-channel scale an optimizer step takes below zero is put back at the floor, from
    where the gradient can grow it again, so export and convert never read a negative scale."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    layer = nn.Linear(16, 8)
    qmodel = prepare_qat(nn.Sequential(layer), qframe.preset("w4a8"), [torch.randn(32, 16)], 1, QATConfig(lsq=True))
    q = qmodel[0].weight_quantizer
    assert q.learned and q.scale.numel() == 8
    optimizer = make_optimizer([q.scale])  # a user's own optimizer and loop
    q.scale.grad = torch.zeros_like(q.scale)
    q.scale.grad[3] = 10.0 * q.scale.detach()[3] + 1.0  # large enough to cross zero in one step
    optimizer.step()
    assert torch.all(q.scale > 0), q.scale
    assert q.scale[3].item() == pytest.approx(1e-8)
    # at the floor every weight saturates; a loss that wants the channel back grows its scale again
    optimizer.zero_grad()
    target = layer.weight.detach()[3] * 1.0
    x = torch.eye(16)
    loss = (qmodel(x)[:, 3] - layer.bias.detach()[3] - target).pow(2).sum()
    loss.backward()
    assert q.scale.grad[3] < 0  # the gradient reaches the floored scale and says: grow


class _BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a BatchNorm2d subclass that applies its activation in its own forward."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(super().forward(x))


def test_a_norm_fused_with_its_activation_trains_beside_its_conv_and_keeps_the_activation(randomise_bn):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), _BatchNormAct(8), nn.Conv2d(8, 8, 3, bias=False),
                          _BatchNormAct(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    randomise_bn(model).eval()
    calib = [(torch.randn(8, 3, 12, 12), None) for _ in range(2)]
    qmodel = prepare_qat(model, qframe.preset("w8a8"), calib, 2, QATConfig())
    pairs = [m for m in qmodel.modules() if isinstance(m, QuantConvBn2d)]
    assert len(pairs) == 2 and all(type(p.bn) is nn.BatchNorm2d for p in pairs)
    assert isinstance(qmodel[1], nn.Hardswish) and isinstance(qmodel[3], nn.Hardswish)  # the activations stay
    x = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        ref, out = model(x), qmodel.eval()(x)
    assert (out - ref).norm() / ref.norm() < 0.05  # eval: the folded layers, then the activation
    mean_before = pairs[0].bn.running_mean.clone()
    qmodel.train()
    nn.functional.cross_entropy(qmodel(x), torch.arange(16) % 4).backward()
    assert not torch.equal(pairs[0].bn.running_mean, mean_before)  # the statistics train
    assert pairs[0].bn.weight.grad is not None and torch.isfinite(pairs[0].bn.weight.grad).all()
    assert pairs[0].bn.weight is qmodel[0].bn.weight


def test_qat_and_rct_given_the_wrong_settings_are_one_line_naming_the_argument():
    from qframe.methods.rct import RCTConfig, rct

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    data = [(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))]
    recipe = qframe.preset("w8a8")
    cases = [
        (lambda: qat(model, recipe, data, {"epochs": 1}), r"qat's cfg=\{'epochs': 1\} is invalid; valid: .*QATConfig"),
        (lambda: qat(model, recipe, data, QATConfig(), {"batch_size": 4}), r"qat's train=.* valid: .*TrainConfig\(...\) or None"),
        (lambda: rct(model, recipe, data, None, epochs=1, lr=0.1), r"rct's cfg=None is invalid; valid: .*RCTConfig"),
        (lambda: rct(model, "w8a8", data, RCTConfig(), epochs=1, lr=0.1), r"qframe.rct needs a QuantRecipe, got str"),
        (lambda: rct(model, recipe, data, RCTConfig(), epochs=-1, lr=0.1), r"rct's epochs=-1 is invalid"),
        (lambda: rct(model, recipe, data, RCTConfig(), epochs=1, lr=None), r"rct's lr=None is invalid; valid: a number > 0"),
        # a generator would give calibration its first batches, which training would then never see
        (lambda: qat(model, recipe, (b for b in data * 3), QATConfig(epochs=1)),
         r"qat's data is a one-shot generator: calibration would take its first batches .* or calib_batches= apart"),
        (lambda: rct(model, recipe, iter(data * 3), RCTConfig(), epochs=1, lr=0.1), r"rct's data is a one-shot"),
    ]
    for make, message in cases:
        with pytest.raises(QFrameError, match=message) as err:
            make()
        assert "\n" not in str(err.value)


def test_every_public_name_of_qframe_resolves_to_its_module_object():
    import importlib

    import qframe as top

    for name in top.__all__:
        if name == "__version__":
            continue
        value = getattr(top, name)
        assert value is getattr(importlib.import_module(top._EXPORTS[name]), name), name
    assert top.qat is qat and top.fold_qat is fold_qat and top.QATConfig is QATConfig
    from qframe.methods.rct import RCTConfig, rct

    assert top.rct is rct and top.RCTConfig is RCTConfig


def test_qat_names_the_batchnorms_it_folds_before_training(caplog):
    """A Linear + BatchNorm1d pair is folded before training (only Conv2d pairs train beside their BN), which froze
    its statistics without a word."""
    torch.manual_seed(torch.seed() % 2**31)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).eval()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,)))]
    with caplog.at_level("INFO", logger="qframe"):
        qmodel = qat(model, qframe.preset("w8a8"), data, QATConfig(epochs=1))
    assert "1 BatchNorm layers beside layers other than Conv2d" in caplog.text and "kept as they are: 4 + 5" in caplog.text
    assert isinstance(qmodel[5], nn.Identity) and type(qmodel[0]).__name__ == "QuantConvBn2d"


class _RightWeight(nn.Module):
    """A 2-d parameter multiplied as x @ W (SwiftFormer's w_g): placement quantizes W as a weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(16, 6) * 0.3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.inp(x)) @ self.w)


def test_the_weight_of_x_at_w_trains_as_a_weight_in_qat_and_rct(tmp_path):
    """Its quantizer counted as an activation's: its range stayed at the PTQ value (or tracked an EMA) while W
    trained, and RCT trained W in float without listing it among the float masters."""
    from qframe.methods.qat import _activation_quantizers, _weight_quantizers
    from qframe.methods.rct import RCTConfig, prepare_rct
    from qframe.quant.placement import site_weight_quantizers

    torch.manual_seed(0)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    qmodel = prepare_qat(_RightWeight().eval(), qframe.preset("w8a8"), batches, 2, QATConfig(lsq=False))
    (name, (wq, parameter)), = site_weight_quantizers(qmodel).items()
    assert name == "::matmul0" and parameter == "w" and wq.dynamic
    assert any(q is wq for q in _weight_quantizers(qmodel)) and not any(q is wq for q in _activation_quantizers(qmodel))
    with torch.no_grad():  # a dynamic weight quantizer follows W: its grid is W's range after W moves
        qmodel.w.mul_(3.0)
        w = qmodel.w.detach().double()
        step = w.abs().amax(0) / 127  # per output channel: the columns of [K, N]
        assert torch.allclose(wq.train()(qmodel.w).double(), torch.round(w / step) * step, atol=1e-6)
    rmodel = prepare_rct(_RightWeight().eval(), qframe.preset("w8a8"), batches, 2, RCTConfig())
    assert "x @ W" in rmodel.qframe_rct_float_master["::matmul0"]
    # it deploys: fold_qat fixes its range at W's, and the file holds W's per-column grid
    from qframe.export.onnx import export_onnx
    from qframe.methods.qat import fold_qat

    folded = fold_qat(qmodel.eval())
    assert not wq.dynamic and torch.allclose(wq.scale.flatten(), qmodel.w.detach().abs().amax(0) / 127)
    assert export_onnx(folded, batches[0][0][:1], tmp_path / "right.onnx").is_file()


class _TwoRightWeights(nn.Module):
    """x @ W and addmm(b, x, W) in one module: two weight sites of the same index."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.w1, self.w2, self.b2 = nn.Parameter(torch.randn(16, 16) * 0.3), nn.Parameter(torch.randn(16, 3) * 0.3), \
            nn.Parameter(torch.zeros(3))

    def forward(self, x):
        h = torch.relu(torch.relu(self.inp(x)) @ self.w1)
        return torch.addmm(self.b2, h, self.w2)


def test_each_weight_site_of_a_module_is_its_own_weight():
    """A matmul and an addmm of the same index were one name: one of them stayed an activation's quantizer."""
    from qframe.methods.qat import _activation_quantizers, _weight_quantizers
    from qframe.quant.placement import site_weight_quantizers

    torch.manual_seed(0)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    qmodel = prepare_qat(_TwoRightWeights().eval(), qframe.preset("w8a8"), batches, 2, QATConfig(lsq=False))
    sites = site_weight_quantizers(qmodel)
    assert {n: p for n, (_, p) in sites.items()} == {"::matmul0": "w1", "::addmm0": "w2"}
    weights, activations = {id(q) for q in _weight_quantizers(qmodel)}, {id(q) for q in _activation_quantizers(qmodel)}
    assert all(id(q) in weights and id(q) not in activations and q.dynamic for q, _ in sites.values())


def test_folding_a_part_of_a_model_with_an_x_at_w_site_is_one_line():
    """The site records its weight by the whole model's name: folding a block alone raised an AttributeError."""
    import copy

    from qframe.methods.qat import fold_qat

    torch.manual_seed(0)
    batches = [(torch.randn(16, 8), torch.randint(0, 3, (16,))) for _ in range(2)]
    qmodel = prepare_qat(nn.Sequential(_RightWeight()).eval(), qframe.preset("w8a8"), batches, 2, QATConfig(lsq=False))
    with pytest.raises(QFrameError, match=r"the weight of the x @ W site ::matmul0 is not found \('0.w'\); valid: fold "
                                          "the whole model"):
        fold_qat(copy.deepcopy(qmodel)[0].eval())
    assert not fold_qat(qmodel.eval())[0].qframe_sites.quantizers["matmul0_weight_b"].dynamic
