"""quantize_ on a user's own module: swap, name filters, first/last rules, presets, errors."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.quant.modules import QuantConv2d, QuantLinear, TensorQuantizer, quantizers


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_swap_keeps_names_weights_and_function_before_calibration():
    model = UserNet()
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    weight = model.body[0].weight
    qframe.quantize_(model, qframe.preset("w8a8"))
    assert isinstance(model.stem, QuantConv2d) and isinstance(model.head, QuantLinear)
    assert model.body[0].weight is weight  # same parameter object, no copy
    torch.testing.assert_close(model(x), ref)  # uncalibrated quantizers pass through


def test_rules_first_last_and_patterns():
    recipe = qframe.QuantRecipe(
        name="mixed",
        weight=qframe.QuantizerConfig(bits=4, granularity="per_channel"),
        input=qframe.QuantizerConfig(bits=8),
        rules=[qframe.LayerRule(":first", keep_float=True), qframe.LayerRule(":last", weight_bits=8),
               qframe.LayerRule("body.*", input_bits=6)],
    )
    model = qframe.quantize_(UserNet(), recipe)
    assert type(model.stem) is nn.Conv2d
    assert model.head.weight_quantizer.spec.bits == 8 and model.head.input_quantizer.spec.bits == 8
    assert model.body[0].weight_quantizer.spec.bits == 4 and model.body[0].input_quantizer.spec.bits == 6
    assert model.body[2].weight_quantizer.spec.granularity == "per_channel"


def test_weight_only_preset_has_no_input_quantizers():
    model = qframe.quantize_(UserNet(), qframe.preset("w4a16"))
    assert model.body[0].input_quantizer is None
    assert model.body[0].weight_quantizer.spec.granularity == "per_group"
    assert model.stem.weight_quantizer.spec.bits == 8  # first layer kept at 8 bits by the preset


def test_ptq_on_user_model_quantizes_close_to_float():
    torch.manual_seed(torch.seed())
    model = UserNet().eval()
    data = [(torch.randn(16, 3, 8, 8), None) for _ in range(3)]
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), data, num_batches=3)
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert not torch.equal(ref, out)
    assert (out - ref).norm() / ref.norm() < 0.05
    qs = [q for _, q in quantizers(qmodel)]
    assert qs and all(q.calibrated for q in qs)
    assert all(isinstance(q, TensorQuantizer) for q in qs)
    # the size accounting sees 8-bit weights: about a quarter of the float model
    assert qframe.model_size_bytes(qmodel) < 0.45 * qframe.model_size_bytes(model)


def test_state_dict_round_trip_of_a_calibrated_model():
    model = qframe.ptq(UserNet().eval(), qframe.preset("w4a8"), [torch.randn(8, 3, 8, 8)], num_batches=1)
    fresh = qframe.quantize_(UserNet().eval(), qframe.preset("w4a8"))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: qframe.quantize_(nn.Sequential(nn.ReLU()), qframe.preset("w8a8")), "has no layer qframe can quantize"),
        (lambda: qframe.quantize_(UserNet(), qframe.preset("w8a8", rules=[{"pattern": "nope*"}])),
         "pattern 'nope\\*' matches no"),
        (lambda: qframe.preset("w9a9"), "unknown quant preset 'w9a9'"),
        (lambda: qframe.QuantizerConfig(bits=9), "bits=9"),
        (lambda: qframe.QuantizerConfig(observer="magic"), "unknown observer 'magic'"),
        # an observer's options and a weight axis are checked when the recipe is made / the model is known,
        # not when calibration (after training, on the command line) first uses them
        (lambda: qframe.QuantizerConfig(observer="percentile", observer_args={"foo": 1}),
         "unknown option 'foo' for the 'percentile' observer; valid: percentile, num_bins"),
        (lambda: qframe.QuantizerConfig(observer_args=None), "observer_args=None is invalid; valid: a mapping"),
        (lambda: qframe.quantize_(UserNet(), qframe.preset("w8a8", weight={"axis": 3})),
         r"quant.weight.axis=3 is out of range for layer '.*' \(weight of shape \(.*\), recipe w8a8\); valid: 0..1"),
        (lambda: qframe.LayerRule(":first", weight_bits=12),
         "quant rule ':first': weight_bits=12 is out of range; valid: integers 2..8, or null"),
        (lambda: qframe.preset("w8a8", rules=[{"pattern": "head", "input_bits": 1}]), "input_bits=1 is out of range"),
        (lambda: qframe.LayerRule(""), "pattern='' is invalid; valid: an fnmatch pattern"),
        (lambda: qframe.preset("w8a8", input={"granularity": "per_channel"}),  # axis 0: the batch
         r"input granularity=per_channel with axis=0 has one scale per image .* valid: axis=1"),
        # the verbs given something other than a model or a recipe
        (lambda: qframe.ptq("resnet18", qframe.preset("w8a8"), []), "qframe.ptq needs a model .*got str 'resnet18'"),
        (lambda: qframe.ptq(UserNet(), "w8a8", []), r"needs a QuantRecipe, got str 'w8a8'; valid: qframe.preset\('w8a8'\)"),
        (lambda: qframe.quantize_(UserNet().state_dict(), qframe.preset("w8a8")), "quantize_ needs a model .*got OrderedDict"),
        (lambda: qframe.fold_bn(None), "qframe.fold_bn needs a model .*got NoneType"),
        (lambda: qframe.evaluate([UserNet()], []), "qframe.evaluate needs a model .*got list"),
        (lambda: qframe.ptq(UserNet(), qframe.preset("w8a8"), [torch.randn(2, 3, 8, 8)], num_batches=0),
         r"num_batches=0 \(calibration batches\) is invalid; valid: an integer >= 1"),
        (lambda: qframe.ptq(UserNet(), qframe.preset("w8a8"), [torch.randn(2, 1, 8, 8)], num_batches=1),
         r"calibration batch 0 \(shape \(2, 1, 8, 8\)\) does not fit the model: .*to have 3 channels.*; valid: batches"),
    ],
)
def test_errors_are_one_line(make, message):
    with pytest.raises(QFrameError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_calibration_data_is_rejected(bad):
    x = torch.randn(4, 3, 8, 8)
    x[1, 0, 2, 2] = bad
    with pytest.raises(QFrameError, match="calibration batch 0 contains NaN or Inf"):
        qframe.ptq(UserNet().eval(), qframe.preset("w8a8"), [x], num_batches=1)


def test_num_batches_takes_any_integer_type_and_memory_errors_pass_through(monkeypatch):
    qmodel = qframe.ptq(UserNet().eval(), qframe.preset("w8a8"), [torch.randn(2, 3, 8, 8)] * 3, num_batches=np.int64(2))
    assert sum(isinstance(m, (QuantConv2d, QuantLinear)) for m in qmodel.modules()) >= 1
    import qframe.utils.batches as batches_module  # where run_batch calls the model

    def out_of_memory(model, x):
        raise torch.OutOfMemoryError("out of memory while allocating 1.00 GiB")

    monkeypatch.setattr(batches_module, "call_model", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not reworded as a batch that does not fit the model
        qframe.ptq(UserNet().eval(), qframe.preset("w8a8"), [torch.randn(2, 3, 8, 8)], num_batches=1)


def test_empty_calibration_set_is_rejected():
    with pytest.raises(QFrameError, match="calibration set is empty"):
        qframe.ptq(UserNet().eval(), qframe.preset("w8a8"), [], num_batches=4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.empty(0, 3, 8, 8)), batch_size=4)
    with pytest.raises(QFrameError, match="calibration set is empty"):
        qframe.ptq(UserNet().eval(), qframe.preset("w8a8"), loader, num_batches=4)


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        from qframe.models.ops import ResidualAdd

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.add = ResidualAdd()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        return self.head(self.pool(torch.relu(self.add(self.branch(x), x))).flatten(1))


def test_w8a8_quantizes_both_residual_inputs_and_the_pooled_features():
    """The standard layout: the branch of a residual add and the features before global pooling are quantized
    too (the convs before them then have 8-bit outputs); residual_inputs=skip / quantize_pool=false leave them."""
    from qframe.quant.modules import QuantPool, QuantResidualAdd

    torch.manual_seed(torch.seed() % 2**31)
    data = [(torch.randn(16, 3, 8, 8), None) for _ in range(2)]
    skip = qframe.ptq(ResidualNet().eval(), qframe.preset("w8a8", residual_inputs="skip", quantize_pool=False), data, 2)
    assert skip.add.input_quantizer is None and type(skip.pool) is nn.AdaptiveAvgPool2d
    model = qframe.ptq(ResidualNet().eval(), qframe.preset("w8a8"), data, 2)
    assert isinstance(model.add, QuantResidualAdd) and isinstance(model.pool, QuantPool)
    assert model.add.input_quantizer.calibrated and model.pool.input_quantizer.calibrated
    assert model.pool.input_quantizer.spec.signed and model.pool.input_quantizer.spec.symmetric
    a, b = torch.randn(4, 8, 8, 8), torch.randn(4, 8, 8, 8)

    def grid(q, t):  # reference of one symmetric int8 quantizer: round half to even, clamp, in float64
        ratio = (t / q.scale).double()  # the float32 division QuantizeLinear and qframe do: same ties
        return torch.clamp(torch.round(ratio), -128, 127) * q.scale.double()

    with torch.no_grad():
        out = model.add(a, b).double()
        ref = grid(model.add.input_quantizer, a) + grid(model.add.skip_quantizer, b)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
        pooled = model.pool(a).double()
        torch.testing.assert_close(pooled, grid(model.pool.input_quantizer, a).mean((2, 3), keepdim=True),
                                   rtol=0, atol=1e-6)
        assert not torch.allclose(pooled, a.double().mean((2, 3), keepdim=True), atol=1e-6)


def test_residual_inputs_must_be_skip_or_both():
    with pytest.raises(QFrameError, match="residual_inputs 'all'") as err:
        qframe.preset("w8a8", residual_inputs="all")
    assert "skip" in str(err.value) and "both" in str(err.value)


def test_tensorrt_check_takes_the_standard_layout_and_refuses_uint8_activations():
    from qframe.quant.compat import check_tensorrt

    assert not any("residual" in w for w in check_tensorrt(qframe.preset("w8a8")))
    assert any("quantize_residual=false" in w for w in check_tensorrt(qframe.preset("w8a8", quantize_residual=False)))
    with pytest.raises(QFrameError, match="w8a8' cannot run on tensorrt: input.symmetric=false"):
        check_tensorrt(qframe.preset("w8a8", input={"signed": False, "symmetric": False}))

class _Unreached(nn.Module):
    """A layer built but never called (DPT's first fusion unit), and a branch the inputs never take."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.unused = nn.Conv2d(8, 8, 3, padding=1)
        self.rare = nn.Linear(8, 4)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        feats = self.stem(x).relu().mean((2, 3))
        return self.rare(feats) if x.shape[0] == 1 else self.head(feats)


def test_layers_that_never_run_during_calibration_stay_float_and_are_listed(caplog):
    torch.manual_seed(0)
    model = _Unreached().eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with caplog.at_level("WARNING", logger="qframe"):
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, num_batches=2)
    assert type(qmodel.unused) is nn.Conv2d and type(qmodel.rare) is nn.Linear
    assert qmodel.unused.weight is not model.unused.weight and torch.equal(qmodel.unused.weight, model.unused.weight)
    assert isinstance(qmodel.stem, QuantConv2d) and isinstance(qmodel.head, QuantLinear)
    assert "did not run on the calibration batches" in qmodel.qframe_float_layers["unused"]
    assert "did not run on the calibration batches" in qmodel.qframe_float_layers["rare"]
    assert "unused" in caplog.text and "rare" in caplog.text
    x = torch.randn(1, 3, 16, 16)  # the rare branch runs float, the quantized stem in front of it
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    assert (out - ref).norm() / ref.norm() < 0.05


class _Listed(nn.Module):
    """Layers called through a plain list that holds them beside add_module (transformers' UperNet pooling)."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(3),
                       nn.Conv2d(8, 4, 1)]
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)
        self.layers[1].running_mean.normal_(0, 0.5)  # a fold that changes the conv's weights
        self.layers[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.flatten(1)


def test_a_model_that_calls_its_layers_through_a_plain_list_runs_the_quantized_and_folded_ones():
    from qframe.quant.modules import QuantPool

    torch.manual_seed(torch.seed() % 2**31)
    model = _Listed().eval()
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(8, 3, 12, 12) for _ in range(2)], num_batches=2)
    assert all(a is b for a, b in zip(qmodel.layers, qmodel.children(), strict=True))
    assert [type(m) for m in qmodel.layers] == [QuantConv2d, nn.Identity, nn.ReLU, QuantPool, QuantConv2d]
    assert qmodel.qframe_float_layers == {} and qmodel.qframe_unfolded_norms == {}
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
    assert (out - ref).norm() / ref.norm() < 0.05


class _Shrinking(nn.Module):
    """A second conv fed features 1e-9 the size of the first's (a random-init backbone's, a few stages deep)."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1, bias=False), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(self.a(x) * self.gain) / self.gain)


@pytest.mark.parametrize("gain", [1e-9, 1e-7, 1.0])
def test_an_activation_ranged_below_the_smallest_scale_is_named_with_the_levels_it_keeps(gain, caplog):
    """Features at 1e-9 quantize to nothing at the smallest scale qframe gives (1e-8 a step); qframe says which
    layer's input and how many of its 127 levels remain, where before the model silently computed its biases."""
    torch.manual_seed(0)
    model = _Shrinking(gain).eval()
    calib = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    with caplog.at_level("WARNING", logger="qframe"):
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, num_batches=2)
    named = [r.getMessage() for r in caplog.records if "smallest scale" in r.getMessage()]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        amax = float(model.a(calib[0]).abs().max() * gain)
        err = float((qmodel(x) - model(x)).norm() / model(x).norm())
    if gain == 1.0:
        assert not named and err < 0.05
        return
    assert len(named) == 1 and "1 activations" in named[0] and " b (" in named[0] and " c (" not in named[0], named
    levels = int(named[0].split(" b (")[1].split(": ")[1].split(" of ")[0])
    assert abs(levels - amax / 1e-8) <= 0.6 * amax / 1e-8 + 1  # the levels left, from the range seen
    assert (levels == 0) == (gain == 1e-9) and (err > 0.5) == (gain == 1e-9)


@pytest.mark.parametrize("remedy", ["correct_biases", "adaround", "reconstruct_blocks"])
def test_a_remedy_given_bad_images_says_so_and_leaves_the_model_as_it_was(remedy):
    model = UserNet().eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = qframe.ptq(model, qframe.preset("w4a8"), [x], num_batches=1)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    run = getattr(qframe, remedy)
    nan = x.clone()
    nan[3, 1, 2, 2] = float("nan")
    cases = [((qmodel, model, nan), "contain NaN or Inf"), ((qmodel, model, [x]), "as one tensor, got list .*torch.cat"),
             ((qmodel, model, x[:0]), r"shape \(0, 3, 8, 8\) hold no image"),
             ((qmodel, None, x), r"reference, the float model\) needs a model")]
    if remedy != "correct_biases":
        cases.append(((qmodel, model, x, {"iterations": 2}), "AdaRound config dict .* valid: qframe.AdaRoundConfig"))
    for args, message in cases:
        with pytest.raises(QFrameError, match=message) as err:
            run(*args)
        assert "\n" not in str(err.value)
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_wrong_model_or_data_for_a_step_is_one_line_naming_it(tmp_path):
    from qframe.export.onnx import export_onnx
    from qframe.methods.ptq import calibrate

    model = UserNet().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    recipe = qframe.preset("w8a8")
    qmodel = qframe.ptq(model, recipe, [x], num_batches=1)
    converted = qframe.convert(qmodel)
    uncalibrated = qframe.quantize_(UserNet().eval(), recipe)
    onnx_path = tmp_path / "m.onnx"
    cases = [
        (lambda: qframe.ptq(qmodel, recipe, [x]), r"UserNet is quantized already \(QuantConv2d 'stem'\); valid: the float"),
        (lambda: qframe.ptq(converted, recipe, [x]), r"quantized already \(qframe.convert's integer layers\)"),
        (lambda: qframe.ptq(model, recipe, [{"pixels": x}]),
         r"batch 0 \(a dict with keys 'pixels', called as model\(\*\*batch\)\) does not fit .*input_fn=lambda b: b\['pixels'\]"),
        (lambda: qframe.ptq(model, recipe, [(x[0], 0)]), r"batch 0 \(shape \(3, 8, 8\)\) does not fit the model"),
        (lambda: qframe.ptq(model, recipe, x), r"calib_batches is one tensor of shape \(4, 3, 8, 8\); valid: .*\[images\]"),
        (lambda: qframe.ptq(model, recipe, None), "calib_batches is NoneType, not an iterable of batches"),
        (lambda: qframe.ptq(model, recipe, [x], input_fn="pixels"), "input_fn='pixels' is not callable"),
        (lambda: calibrate(UserNet(), [x], 1), "UserNet has no quantizer to calibrate"),
        (lambda: qframe.convert(converted), r"qframe.convert \(the model is converted already\) takes the fake-quant"),
        (lambda: qframe.sensitivity(converted, [x]), "qframe.sensitivity takes the fake-quant model"),
        (lambda: qframe.sensitivity(qmodel, [x], output_fn=lambda o: "x"), "output_fn gave a str"),
        (lambda: qframe.sensitivity(qmodel, [x * float("nan")]), "batch 0 contains NaN or Inf"),
        (lambda: export_onnx(converted, x[:1], onnx_path), "export_onnx takes the fake-quant model"),
        (lambda: export_onnx(uncalibrated, x[:1], onnx_path), "none of UserNet's 8 quantizers is calibrated"),
        (lambda: export_onnx(qmodel, None, onnx_path), "example is NoneType; valid: an input batch"),
        (lambda: export_onnx(qmodel, x[:1], ""), "path='' is not a file name"),
        (lambda: export_onnx(qmodel, x[:1], tmp_path), "is not a file name"),
    ]
    for make, message in cases:
        with pytest.raises(QFrameError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
    assert not onnx_path.exists() and list(tmp_path.iterdir()) == []
    assert qframe.sensitivity(qmodel, [x], num_batches=np.int64(1)).batches == 1  # numpy integers, as ptq takes


@pytest.mark.parametrize("make, message", [
    (lambda: qframe.preset("w8a8", bogus=1), r"preset\('w8a8', bogus=1\): Key 'bogus' not in 'QuantRecipe'; valid fields: name"),
    (lambda: qframe.preset("w8a8", fold_bn="maybe"), r"fold_bn='maybe'\): Value 'maybe' is not a valid bool"),
    (lambda: qframe.preset("w8a8", rules=[{"weight_bits": 4}]), "LayerRule` has missing mandatory value: pattern"),
    (lambda: qframe.QuantRecipe(weight={"bits": 4}), r"weight=\{'bits': 4\} is invalid; valid: a qframe.QuantizerConfig"),
    (lambda: qframe.QuantRecipe(input=qframe.QuantSpec(bits=4)), "input=QuantSpec.* is invalid"),
    (lambda: qframe.QuantRecipe(weight=qframe.QuantizerConfig(), rules=[("head", 8)]),
     r"rules holds \('head', 8\); valid: a list of qframe.LayerRule"),
    (lambda: qframe.QuantRecipe(weight=qframe.QuantizerConfig(), rules=qframe.LayerRule("head")), "rules holds LayerRule"),
])
def test_a_recipe_of_the_wrong_parts_is_one_line_when_made(make, message):
    with pytest.raises(QFrameError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_register_module_takes_layer_classes_and_a_twin_must_make_a_module():
    from qframe.quant.registry import unregister_module

    class MyLinear(nn.Linear):
        pass

    class NoTwin(nn.Module):
        @classmethod
        def from_float(cls, module, weight_quantizer, input_quantizer):
            return "not a module"

    with pytest.raises(QFrameError, match="float_type=.*Module'> is not a layer class; valid: a subclass of nn.Module"):
        qframe.register_module(nn.Module, QuantLinear)
    with pytest.raises(QFrameError, match="quant_type=.* is not a valid twin; valid: an nn.Module class"):
        qframe.register_module(MyLinear, type("Plain", (), {"from_float": classmethod(lambda c, *a: None)}))
    qframe.register_module(MyLinear, NoTwin)
    try:
        with pytest.raises(QFrameError, match="NoTwin.from_float returned a str for layer '1'; valid: the quantized twin"):
            qframe.quantize_(nn.Sequential(nn.Flatten(), MyLinear(12, 3)), qframe.preset("w8a8"))
    finally:
        unregister_module(MyLinear)


@pytest.mark.parametrize("remedy", ["correct_biases", "adaround", "reconstruct_blocks"])
def test_a_remedy_refuses_a_reference_whose_norms_the_quantized_model_folded(remedy):
    import copy

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    qmodel = qframe.ptq(model, qframe.preset("w4a8"), [x], num_batches=1)
    with pytest.raises(QFrameError, match="the reference keeps BatchNorm '1', which the quantized model folded"):
        getattr(qframe, remedy)(qmodel, model, x)
    folded = copy.deepcopy(model)
    qframe.fold_bn(folded, x)
    args = () if remedy == "correct_biases" else (qframe.AdaRoundConfig(iterations=5),)
    assert getattr(qframe, remedy)(qmodel, folded, x, *args)  # the folded float model is the right reference


@pytest.mark.parametrize("make, message", [
    (lambda: qframe.quantize_(UserNet(), qframe.preset("w8a8"), target="trt"), "unknown placement target 'trt'; valid: tensorrt"),
    (lambda: qframe.quantize_(UserNet(), qframe.preset("w8a8"), example=torch.randn(1, 1, 8, 8)),
     r"example batch 0 \(shape \(1, 1, 8, 8\)\) does not fit the model: .*3 channels"),
    (lambda: qframe.AdaRoundConfig(beta_start=1, beta_end=20), "valid: beta_start >= beta_end > 0"),
    (lambda: qframe.equalize(UserNet().eval(), max_sweeps=0), "equalize max_sweeps=0 is invalid"),
    (lambda: qframe.equalize(UserNet().eval(), tol=-1.0), "equalize tol=-1.0 is invalid; valid: a number >= 0"),
])
def test_settings_that_contradict_or_fall_outside_their_range_are_one_line(make, message):
    with pytest.raises(QFrameError, match=message) as err:
        make()
    assert "\n" not in str(err.value)


def test_a_quantize_that_refuses_its_input_leaves_the_model_as_it_was():
    model = UserNet()
    before = [type(m) for m in model.modules()]
    with pytest.raises(QFrameError):
        qframe.quantize_(model, qframe.preset("w8a8"), example=torch.randn(1, 1, 8, 8))
    assert [type(m) for m in model.modules()] == before


def test_fold_bn_and_ptq_name_an_example_or_batch_of_the_wrong_form():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    for call, message in [
        (lambda: qframe.fold_bn(model, torch.randn(2, 1, 8, 8)), r"fold_bn's example \(shape \(2, 1, 8, 8\)\) does not fit"),
        (lambda: qframe.fold_bn(model, (x, 1)), r"fold_bn's example \(a tuple\) does not fit the model: .*a tuple of inputs \(model\(\*x\)\)"),
        (lambda: qframe.ptq(model, qframe.preset("w8a8"), (x, torch.zeros(2))),
         r"calib_batches is one batch \(tensors of shapes \(2, 3, 8, 8\), \(2,\)\); valid: .*\[\(images, labels\)\]"),
    ]:
        with pytest.raises(QFrameError, match=message):
            call()
    assert isinstance(model[1], nn.BatchNorm2d)  # nothing folded by the refused calls


def test_a_rule_that_earlier_rules_shadow_is_named_in_a_warning(caplog):
    recipe = qframe.preset("w4a4")
    recipe.rules.append(qframe.LayerRule("stem", keep_float=True))  # :first already sets the stem
    with caplog.at_level(logging.WARNING, logger="qframe.quant.recipe"):
        qmodel = qframe.quantize_(UserNet(), recipe)
    assert "quant rule 'stem' (recipe w4a4) never applies: earlier rules already set stem" in caplog.text
    assert isinstance(qmodel.stem, QuantConv2d) and qmodel.stem.weight_quantizer.spec.bits == 8


def test_what_users_pass_beside_plain_python_values_still_works(caplog):
    from omegaconf import OmegaConf

    from qframe.methods.qat import QATConfig, qat
    from qframe.utils.modules import set_submodule

    # numpy and 0-d tensor scalars, 0 / 1 for a bool, OmegaConf nodes of a schema (a Hydra app's config)
    assert qframe.QuantizerConfig(signed=np.bool_(True), axis=np.int64(0)).signed
    assert QATConfig(lr=torch.tensor(1e-3), lsq=np.bool_(False), epochs=1).epochs == 1
    assert qframe.QuantRecipe(weight=qframe.QuantizerConfig(), fold_bn=0).fold_bn == 0
    model = UserNet().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    trained = qat(model, qframe.preset("w8a8"), [(x, torch.zeros(4, dtype=torch.long))],
                  OmegaConf.structured(QATConfig(epochs=1)), num_batches=1)
    assert any(isinstance(m, QuantConv2d) for m in trained.modules())
    # a lazy layer has no weight shape before its first batch: the axis check passes it by
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    assert isinstance(qframe.quantize_(lazy, qframe.preset("w8a8"), example=x)[0], QuantConv2d)
    # a rule that keeps float and sets bits: the bits do not apply, and a warning says so
    with caplog.at_level(logging.WARNING, logger="qframe.quant.recipe"):
        rule = qframe.LayerRule("head", weight_bits=4, keep_float=True)
    assert rule.keep_float and "keeps its layers float, so its weight_bits=4" in caplog.text
    # fold_bn runs the example as model(example): a model of one list input folds with it
    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, images):
            return self.bn(self.conv(torch.stack(images)))

    stacked = Stacked().eval()
    assert qframe.fold_bn(stacked, [x[0], x[1]]) == [("conv", "bn")]
    # a replacement that adopts a child of the old module leaves that child in its own mode
    frozen = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    holder = nn.Sequential(frozen).train()
    frozen[1].eval()
    set_submodule(holder, "0", nn.Sequential(nn.Identity(), frozen[1]))
    assert holder[0].training and holder[0][0].training and not holder[0][1].training


def test_a_model_quantized_in_part_is_refused_too():
    recipe = qframe.preset("w8a8")
    recipe.rules.append(qframe.LayerRule("head", keep_float=True))
    x = torch.randn(4, 3, 8, 8)
    partly = qframe.ptq(UserNet().eval(), recipe, [x], num_batches=1)
    assert not isinstance(partly.head, QuantLinear)  # a float layer is left to quantize
    for again in (lambda: qframe.ptq(partly, qframe.preset("w8a8"), [x]),
                  lambda: qframe.quantize_(partly, qframe.preset("w8a8")),
                  lambda: qframe.ptq(qframe.convert(partly), qframe.preset("w8a8"), [x])):
        with pytest.raises(QFrameError, match="UserNet is quantized already"):
            again()


def test_numpy_and_tensor_numbers_in_configs_become_python_values():
    """A sweep over np.arange or a tensor's .max() hands numpy / 0-d tensor numbers to the configs."""
    from qframe.export.stage import ExportConfig
    from qframe.measure.profile import MeasureConfig
    from qframe.methods.qat import QATConfig
    from qframe.methods.rct import RCTConfig
    from qframe.quant.adaround import AdaRoundConfig
    from qframe.train import TrainConfig

    made = [
        (QATConfig(epochs=np.int64(2), observer_steps=torch.tensor(3)), {"epochs": 2, "observer_steps": 3}),
        (AdaRoundConfig(iterations=np.int32(20), max_rows=np.int64(64)), {"iterations": 20, "max_rows": 64}),
        (RCTConfig(interval=np.int64(5), bits_init=np.int64(6)), {"interval": 5, "bits_init": 6}),
        (TrainConfig(epochs=np.int64(2), batch_size=np.int16(8), lr=np.float32(0.5), bf16=np.bool_(False)),
         {"epochs": 2, "batch_size": 8, "lr": 0.5, "bf16": False}),
        (qframe.QuantSpec(bits=np.int64(4)), {"bits": 4}),
        (qframe.QuantizerConfig(bits=np.int8(6), group_size=None), {"bits": 6}),
        (ExportConfig(opset=np.int64(17), threads=np.int64(1), lint=1), {"opset": 17, "threads": 1, "lint": True}),
        (MeasureConfig(runs=np.int64(3), energy_seconds=np.float64(1.5), batch_sizes=list(np.arange(1, 3))),
         {"runs": 3, "energy_seconds": 1.5, "batch_sizes": [1, 2]}),
        (qframe.Budget(size_bytes=np.int64(1000), widths=(np.int64(4), torch.tensor(8)), probes=np.int32(3)),
         {"size_bytes": 1000, "widths": [4, 8], "probes": 3}),
    ]
    for config, expected in made:
        for name, value in expected.items():
            got = getattr(config, name)
            assert got == value and type(got) is type(value), (type(config).__name__, name, got, type(got))
            assert all(type(v) is int for v in got) if isinstance(got, list) else True
    # what is not a number of the field's kind is still refused, by the same checks as before
    for bad, message in [(lambda: QATConfig(epochs=np.float64(2.5)), "epochs"),
                         (lambda: TrainConfig(epochs="2"), "train.epochs='2' is invalid"),
                         (lambda: qframe.QuantSpec(bits=np.float32(4)), "bits"),
                         (lambda: ExportConfig(threads=np.float64(2)), "export.threads"),
                         (lambda: MeasureConfig(batch_sizes=[np.bool_(True)]), "measure.batch_sizes"),
                         (lambda: MeasureConfig(batch_sizes=[np.float64(2.0)]), "measure.batch_sizes"),
                         (lambda: qframe.Budget(size_ratio="0.2"), "quant.budget.size_ratio='0.2' is invalid"),
                         (lambda: qframe.Budget(size_ratio=0.2, widths=[np.int64(9)]), "quant.budget.widths")]:
        with pytest.raises(QFrameError, match=message):
            bad()


def test_a_float_tensor_for_an_integer_setting_is_one_line():
    from qframe.methods.qat import QATConfig
    from qframe.train import TrainConfig

    for make, name in [(lambda: TrainConfig(epochs=torch.tensor(2.0)), "train.epochs"),
                       (lambda: QATConfig(epochs=torch.tensor(2.5)), "epochs"),
                       (lambda: qframe.QuantSpec(bits=torch.tensor(4.0)), "bits")]:
        with pytest.raises(QFrameError, match=name):
            make()
    assert TrainConfig(epochs=torch.tensor(2)).epochs == 2
