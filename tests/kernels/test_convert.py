"""qframe.convert: PTQ models with integer weights predict what the fake-quant models predict.

A compact CNN is trained briefly on the shared digits bundle, quantized with the bundled recipes
and converted; the converted model must agree with the fake-quant model on the test images, store
a fraction of the FP32 bytes, and its integer layers must accumulate exactly what the reference
does on real activations.
"""

import subprocess
import sys

import pytest
import torch

import qframe
from qframe.errors import QFrameError
from qframe.kernels import reference
from qframe.kernels.convert import IntConv2d, IntLinear, _im2col_nhwc
from qframe.kernels.ops import int8_mm_i32
from qframe.kernels.packing import unpack_int4
from qframe.models import build_model
from qframe.quant.modules import QuantConv2d, QuantLinear
from qframe.train import TrainConfig, fit

# recipe -> (largest state_dict share of the FP32 model's, integer op some layer must run)
RECIPES = {"w8a8": (0.30, "int8_mm"), "w4a8": (0.16, "w4a8_mm"), "w4a16": (0.16, "w4a16_mm")}


def state_dict_bytes(model):
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small layers: one thread is as fast, and immune to a busy co-tenant stalling a thread team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(digits, one_thread):
    torch.manual_seed(7)
    model = build_model("compact_cnn", digits.num_classes, digits.channels, digits.image_size)
    fit(model, digits, TrainConfig(epochs=2, batch_size=64), seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def quantized(trained, digits):
    """recipe name -> (fake-quant model, converted model), built once per module."""
    out = {}
    for name in RECIPES:
        fake = qframe.ptq(trained, qframe.preset(name), digits.loader("train", 64, shuffle=True, seed=1), 4)
        out[name] = fake, qframe.convert(fake)
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_model_predicts_like_fake_quant(quantized, digits, recipe):
    fake, converted = quantized[recipe]
    images = digits.test.tensors[0]
    with torch.no_grad():
        yf, yc = fake(images), converted(images)
    agreement = (yf.argmax(1) == yc.argmax(1)).double().mean().item()
    assert agreement >= 0.999, f"{recipe}: converted agrees on {100 * agreement:.2f}% of {len(images)} test images"
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-3


@pytest.mark.parametrize("recipe", RECIPES)
def test_converted_model_is_small_and_runs_integer_ops(quantized, trained, recipe):
    fake, converted = quantized[recipe]
    share, op = RECIPES[recipe]
    assert state_dict_bytes(converted) <= share * state_dict_bytes(trained)
    paths = {m.path for m in converted.modules() if isinstance(m, (IntConv2d, IntLinear))}
    assert op in paths, paths
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in converted.modules())
    assert any(isinstance(m, QuantConv2d) for m in fake.modules()), "convert changed the model it copied"


@pytest.mark.parametrize("recipe", RECIPES)
def test_single_images_take_the_small_m_paths(quantized, digits, recipe):
    """One image at a time: few output positions, so the w4a16 convolutions run the GEMM op too."""
    fake, converted = quantized[recipe]
    for image in digits.test.tensors[0][:4]:
        with torch.no_grad():
            yf, yc = fake(image[None]), converted(image[None])
        assert ((yf - yc).norm() / yf.norm()).item() < 1e-3


def _layer_inputs(model, digits):
    """{layer name: its input} for every converted layer over a batch of test images."""
    seen, hooks = {}, []

    def keep(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0]  # returns None: the layer's output stays as it is

        return hook

    for name, m in model.named_modules():
        if isinstance(m, (IntConv2d, IntLinear)):
            hooks.append(m.register_forward_hook(keep(name)))
    with torch.no_grad():
        model(digits.test.tensors[0][:16])
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_int32_accumulation_equals_reference(quantized, digits, recipe):
    """On real activations, each integer layer's int32 product is the reference's, bit for bit."""
    converted = quantized[recipe][1]
    inputs = _layer_inputs(converted, digits)
    checked = 0
    for name, layer in converted.named_modules():
        if getattr(layer, "path", None) not in ("int8_mm", "w4a8_mm"):
            continue
        x = inputs[name]
        if isinstance(layer, IntConv2d):
            assert layer.nhwc  # per-channel weights: K in (kh, kw, C) order
            codes = _im2col_nhwc(layer.quantize_input(x), layer.kernel_size, layer.stride, layer.padding,
                                 layer.dilation)
        else:
            codes = layer.quantize_input(x.reshape(-1, x.shape[-1]))
        weight = unpack_int4(layer.weight_int, layer.k) if layer.packed else layer.weight_int
        acc = int8_mm_i32(codes, weight)
        assert torch.equal(acc, reference.int8_mm_i32(codes, weight)), name
        assert torch.equal(acc.long(), codes.long() @ weight.long().t()), name
        a_scale = layer.input_scale.expand(codes.shape[0]).contiguous()
        if layer.packed:
            ref = reference.w4a8_mm(codes, a_scale, layer.weight_int, layer.weight_scale, layer.group_size, layer.bias)
        else:
            ref = reference.int8_mm(codes, a_scale, layer.weight_int, layer.weight_scale, layer.bias)
        out = layer._gemm_codes(codes)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-6, name
        checked += 1
    assert checked >= 3


def test_weight_only_int8_layers_match_fake_quant(trained, digits):
    """8-bit weights with float inputs have no integer op: stored int8, dequantized for a float layer."""
    recipe = qframe.QuantRecipe(name="w8", weight=qframe.QuantizerConfig(bits=8, granularity="per_channel"),
                                input=None)
    fake = qframe.ptq(trained, recipe, [digits.test.tensors[0][:32]], 1)
    converted = qframe.convert(fake)
    assert {m.path for m in converted.modules() if isinstance(m, (IntConv2d, IntLinear))} == {"dequantize"}
    images = digits.test.tensors[0]
    with torch.no_grad():
        yf, yc = fake(images), converted(images)
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-5
    assert state_dict_bytes(converted) <= 0.30 * state_dict_bytes(trained)


def test_narrow_range_inputs_keep_their_grid(trained, digits):
    recipe = qframe.QuantRecipe(name="w8a8n", weight=qframe.QuantizerConfig(bits=8, granularity="per_channel"),
                                input=qframe.QuantizerConfig(bits=8, narrow_range=True))
    fake = qframe.ptq(trained, recipe, [digits.test.tensors[0][:64]], 1)
    converted = qframe.convert(fake)
    assert {m.input_qmin for m in converted.modules() if isinstance(m, (IntConv2d, IntLinear))} == {-127}
    images = digits.test.tensors[0]
    with torch.no_grad():
        yf, yc = fake(images), converted(images)
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-3


@pytest.mark.parametrize("recipe, kind", [("w4a4", "4-bit per-tensor symmetric"),
                                          ("uint8", "8-bit per-tensor asymmetric")])
def test_inputs_the_integer_kernels_cannot_take_keep_their_quantization_and_are_named(trained, digits, recipe, kind,
                                                                                     caplog):
    """4-bit inputs (w4a4) or asymmetric 8-bit ones: the converted layers quantize them as the fake-quant model
    did, instead of running the weight-only path on float inputs."""
    if recipe == "uint8":
        recipe = qframe.QuantRecipe(name="w8a8u", weight=qframe.QuantizerConfig(bits=8, granularity="per_channel"),
                                    input=qframe.QuantizerConfig(bits=8, symmetric=False, signed=False))
    else:
        recipe = qframe.preset(recipe)
    fake = qframe.ptq(trained, recipe, digits.loader("train", 64, shuffle=True, seed=1), 4)
    with caplog.at_level("WARNING", logger="qframe.kernels.convert"):
        converted = qframe.convert(fake)
    specs = {n: m.input_quantizer.spec for n, m in fake.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    unfit = {n for n, s in specs.items() if s.bits != 8 or not s.symmetric}  # w4a4 keeps 8-bit first and last layers
    assert unfit and set(converted.qframe_float_input_layers) == unfit
    assert all(converted.get_submodule(n).input_fake_quant is not None for n in unfit)
    assert all(kind in why for why in converted.qframe_float_input_layers.values())
    assert f"{len(unfit)} layers keep integer weights but fake-quantize their inputs" in caplog.text
    images = digits.test.tensors[0]
    with torch.no_grad():
        yf, yc = fake(images), converted(images)
    agreement = (yf.argmax(1) == yc.argmax(1)).double().mean().item()
    assert agreement >= 0.999, f"converted agrees on {100 * agreement:.2f}% of {len(images)} test images"
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-3
    # an 8-bit symmetric recipe has no such layer
    assert qframe.convert(qframe.ptq(trained, qframe.preset("w8a8"), [images[:32]], 1)).qframe_float_input_layers == {}


def test_inplace_converts_the_model_itself(trained, digits):
    fake = qframe.ptq(trained, qframe.preset("w8a8"), [digits.test.tensors[0][:32]], 1)
    assert qframe.convert(fake, inplace=True) is fake
    assert not any(isinstance(m, QuantConv2d) for m in fake.modules())


class _PaddedNet(torch.nn.Module):
    """Paddings written as words (EfficientNet's stem is padding='valid'), and two the integer layer cannot do."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.valid, self.same = conv(1, 8, 3, padding="valid"), conv(8, 8, 3, padding="same", dilation=2)
        self.reflect, self.uneven = conv(8, 8, 3, padding=1, padding_mode="reflect"), conv(8, 8, 2, padding="same")
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.uneven(self.reflect(self.same(self.valid(x)).relu())).mean((2, 3)))


@pytest.mark.parametrize("engine", ["qframe", "auto"])
def test_word_paddings_convert_and_paddings_it_cannot_do_stay_fake_quant_by_name(digits, engine):
    torch.manual_seed(0)
    images = digits.test.tensors[0]
    fake = qframe.ptq(_PaddedNet().eval(), qframe.preset("w8a8"), [images[:64]], 1)
    converted = qframe.convert(fake, engine=engine)
    assert isinstance(converted.valid, IntConv2d) and converted.valid.padding == (0, 0)
    assert isinstance(converted.same, IntConv2d) and converted.same.padding == (2, 2)
    kept = converted.qframe_fake_quant_layers
    assert sorted(kept) == ["reflect", "uneven"] and "padding_mode='reflect'" in kept["reflect"]
    assert "padding='same'" in kept["uneven"] and isinstance(converted.uneven, QuantConv2d)
    with torch.no_grad():
        yf, yc = fake(images), converted(images)
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-3


def _asymmetric():
    return qframe.QuantRecipe(name="asym", weight=qframe.QuantizerConfig(bits=8, granularity="per_channel",
                                                                          symmetric=False))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda m, x: "not a model", "convert needs an nn.Module"),
        (lambda m, x: m, "convert found no quantized layer it has an integer form for"),
        (lambda m, x: qframe.ptq(m, _asymmetric(), [x], 1), "weights asymmetric"),
        (lambda m, x: qframe.ptq(m, qframe.preset("w8a8"), [x], 1, train_bn=True), "needs BN folded"),
        (lambda m, x: qframe.ptq(torch.nn.Sequential(torch.nn.Conv1d(16, 4, 3), torch.nn.Flatten()).eval(),
                                 qframe.preset("w8a8"), [x[:, 0]], 1), "the model's are QuantConv1d: they run as fake-quant"),
    ],
    ids=["not-a-module", "fp32-model", "asymmetric-weights", "unfolded-qat", "conv1d-only"],
)
def test_what_cannot_be_converted_gives_one_clear_error(trained, digits, make, message):
    bad = make(trained, digits.test.tensors[0][:16])
    with pytest.raises(QFrameError) as err:
        qframe.convert(bad)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_convert_is_a_top_level_verb_and_import_stays_light():
    from qframe.kernels.convert import convert

    assert qframe.convert is convert and "convert" in qframe.__all__
    code = ("import sys, torch, qframe; qframe.convert; "
            "print(sorted(m for m in ('triton', 'qframe.kernels.triton', 'qframe.kernels.cuda') if m in sys.modules), "
            "torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] False", out


class _PatchNet(torch.nn.Module):
    """A ViT-style patch embedding that casts its input to the projection's weight dtype (DeiT, DINOv2,
    BEiT do), a Conv1d token mixer qframe quantizes but has no integer layer for, and a Linear head."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(1, 16, 4, stride=4)
        self.mix = torch.nn.Conv1d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x):
        tokens = self.proj(x.to(self.proj.weight.dtype)).flatten(2)  # [B, 16, L]
        return self.head((tokens + self.mix(tokens)).mean(2))


def test_a_model_reading_its_layer_weights_converts_and_unconverted_layers_are_named(digits, caplog):
    torch.manual_seed(0)
    model = _PatchNet().eval()
    images = digits.test.tensors[0]
    fake = qframe.ptq(model, qframe.preset("w8a8"), [images[:64]], 1)
    with caplog.at_level("WARNING", logger="qframe"):
        converted = qframe.convert(fake)
    assert isinstance(converted.proj, IntConv2d) and isinstance(converted.head, IntLinear)
    assert converted.proj.weight.dtype == torch.float32 and converted.proj.weight.shape == fake.proj.weight.shape
    with torch.no_grad():
        deq = fake.proj.weight_quantizer(fake.proj.weight)
        assert torch.allclose(converted.proj.weight, deq, rtol=0, atol=1e-6)
        yf, yc = fake(images), converted(images)
    assert ((yf - yc).norm() / yf.norm()).item() < 1e-3
    assert list(converted.qframe_fake_quant_layers) == ["mix"]
    assert "Conv2d, ConvTranspose2d and Linear only, not QuantConv1d" in converted.qframe_fake_quant_layers["mix"]
    assert "mix (convert has integer layers" in caplog.text


def test_a_registered_twin_that_overrides_forward_stays_fake_quant_by_name():
    """A user's twin whose forward adds to QuantConv2d's / QuantLinear's (timm's Conv2dSame pads by the input
    size first, then convolves): an integer layer would drop what it adds, so it stays fake-quant, named."""
    from torch import nn

    class PadSameConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(nn.functional.pad(x, [0, x.shape[-1] % 2, 0, x.shape[-2] % 2]))

    class QuantPadSameConv(QuantConv2d):
        @classmethod
        def from_float(cls, conv, weight_quantizer=None, input_quantizer=None):
            new = QuantConv2d.from_float(conv, weight_quantizer, input_quantizer)
            new.__class__ = cls
            return new

        def forward(self, x):
            return super().forward(nn.functional.pad(x, [0, x.shape[-1] % 2, 0, x.shape[-2] % 2]))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), PadSameConv(8, 8, 2, stride=2), nn.Flatten(), nn.Linear(8 * 16, 4))
    x = torch.randn(8, 3, 9, 9)
    qframe.register_module(PadSameConv, QuantPadSameConv)
    try:
        qmodel = qframe.ptq(model.eval(), qframe.preset("w8a8"), [x], num_batches=1)
    finally:
        qframe.unregister_module(PadSameConv)
    imodel = qframe.convert(qmodel)
    assert isinstance(imodel[0], IntConv2d) and isinstance(imodel[3], IntLinear)
    assert type(imodel[1]) is QuantPadSameConv and "overrides QuantConv2d.forward" in imodel.qframe_fake_quant_layers["1"]
    with torch.no_grad():
        ref, out = qmodel(x), imodel(x)
    assert (out - ref).norm() / ref.norm() < 1e-3


@pytest.mark.parametrize("engine", ["qframe", "onednn"])
def test_a_converted_model_given_images_of_another_channel_count_says_so(quantized, digits, engine):
    fake, _ = quantized["w8a8"]
    converted = qframe.convert(fake, engine=engine)
    images = digits.test.tensors[0][:4]
    wrong = images.repeat(1, 3, 1, 1)  # 3 channels for a 1-channel model
    with pytest.raises(QFrameError, match=rf"IntConv2d of 1 input channels got input of shape \(4, 3, .*\); "
                                          r"valid: \[N, 1, H, W\]") as err:
        converted(wrong)
    assert "\n" not in str(err.value)
    assert converted(images).shape == fake(images).shape
