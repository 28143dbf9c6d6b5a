"""qframe.convert's integer ConvTranspose2d: a GEMM over the input positions and col2im.

Each converted layer is checked against a float64 transposed convolution of what the fake-quant layer
computes with (its dequantized weight, its fake-quantized input, its int32-grid bias) on fresh random
inputs over strides, paddings, output paddings, dilations and kernel sizes; the integer accumulation
against an exact one; a model whose decoder upsamples by ConvTranspose2d + BatchNorm converts whole.
"""

import copy
import io
import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qframe
from qframe.kernels.convert import IntConvTranspose2d, _col2im, resolve_engine
from qframe.kernels.ops import int8_mm_i32
from qframe.kernels.packing import unpack_int4
from qframe.quant.modules import QuantConvTranspose2d
from qframe.quant.recipe import QuantizerConfig, QuantRecipe

# (kernel, stride, padding, output_padding, dilation): no overlap (k == s, the common 2x upsampling), overlaps,
# padding cropping the border, output padding adding a row and column, dilation, a 1x1 and a non-square kernel
GEOMETRIES = [(2, 2, 0, 0, 1), (4, 2, 1, 0, 1), (3, 2, 1, 1, 1), (3, 3, 2, 2, 2), (1, 1, 0, 0, 1), ((3, 2), (2, 1),
                                                                                                   (1, 0), (1, 0), 1)]


def _recipe(bits: int, int8_input: bool) -> QuantRecipe:
    return QuantRecipe(name=f"w{bits}", weight=QuantizerConfig(bits=bits, granularity="per_channel"),
                       input=QuantizerConfig(bits=8, observer="minmax") if int8_input else None)


def _quantized(cin, cout, geometry, bits, int8_input, bias=True, groups=1, seed=0):
    kernel, stride, padding, output_padding, dilation = geometry
    torch.manual_seed(seed)
    layer = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding, groups, bias, dilation)
    model = nn.Sequential(layer).eval()
    calib = [torch.randn(4, cin, 5, 7) for _ in range(2)]
    return qframe.ptq(model, _recipe(bits, int8_input), calib, num_batches=2)


def _float64_reference(fake: QuantConvTranspose2d, x: torch.Tensor, output_padding) -> torch.Tensor:
    """The fake-quant layer's transposed convolution, in float64."""
    with torch.no_grad():
        weight = fake.weight_quantizer(fake.weight).double()
        inp = (x if fake.input_quantizer is None else fake.input_quantizer(x)).double()
        bias = fake._quant_bias(fake.bias, fake.weight)
        return F.conv_transpose2d(inp, weight, None if bias is None else bias.double(), fake.stride, fake.padding,
                                  output_padding, fake.groups, fake.dilation)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}op{}d{}".format(*g))
@pytest.mark.parametrize("bits, int8_input, path", [(8, True, "int8_mm"), (4, True, "w4a8_mm"),
                                                     (4, False, "w4a16_mm"), (8, False, "dequantize")])
def test_integer_transposed_convolution_computes_the_fake_quant_layer(geometry, bits, int8_input, path):
    fake = _quantized(6, 5, geometry, bits, int8_input, bias=geometry[1] != 1)
    layer = qframe.convert(fake, engine="qframe")[0]
    assert isinstance(layer, IntConvTranspose2d) and layer.path == path, layer
    for batch, h, w in ((1, 3, 4), (3, 6, 5)):  # fresh inputs, not the calibration batches
        x = torch.randn(batch, 6, h, w) * 1.5
        with torch.no_grad():
            got = layer(x).double()
        ref = _float64_reference(fake[0], x, fake[0].output_padding)
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), (geometry, bits, int8_input, batch)


def test_the_integer_accumulation_is_exact_and_col2im_places_every_column():
    """The GEMM's int32 products, summed into the output by col2im, equal an exact integer transposed
    convolution of the codes (float64 holds these sums exactly)."""
    geometry = (3, 2, 1, 1, 1)
    fake = _quantized(16, 12, geometry, 8, True, bias=False)
    layer = qframe.convert(fake, engine="qframe")[0]
    x = torch.randn(2, 16, 5, 6)
    codes = layer.quantize_input(x)
    acc = int8_mm_i32(codes.permute(0, 2, 3, 1).reshape(-1, 16), layer.weight_int)  # [B * H * W, out * kh * kw]
    summed = _col2im(acc.double().reshape(2, 5, 6, 12, 3, 3), layer.stride, layer.padding, layer.dilation, (1, 1),
                     None)
    weight_codes = layer.weight_int.reshape(12, 3, 3, 16).permute(3, 0, 1, 2)  # [in, out, kh, kw]
    exact = F.conv_transpose2d(codes.double(), weight_codes.double(), None, 2, 1, 1)
    assert torch.equal(summed, exact)
    assert torch.equal(layer.dequantized_weight(), fake[0].weight_quantizer(fake[0].weight).detach())


def test_four_bit_weights_are_stored_packed():
    fake = _quantized(7, 4, (2, 2, 0, 0, 1), 4, True)
    layer = qframe.convert(fake)[0]
    assert layer.packed and layer.weight_int.dtype == torch.uint8
    codes = unpack_int4(layer.weight_int, layer.k).reshape(4, 2, 2, 7).permute(3, 0, 1, 2)
    assert codes.abs().max() <= 8 and codes.shape == fake[0].weight.shape


@pytest.mark.parametrize("engine", ["qframe", "auto"])
def test_output_size_chooses_the_output_padding_as_the_float_layer_does(engine):
    fake = _quantized(4, 3, (3, 2, 1, 0, 1), 8, True)
    layer = qframe.convert(fake, engine=engine)[0]
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        for size in ([9, 11], [10, 12]):
            got, want = layer(x, output_size=size), fake[0](x, output_size=size)
            assert got.shape[-2:] == tuple(size)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_grouped_layers_keep_integer_codes_and_run_a_float_transposed_convolution():
    fake = _quantized(6, 4, (4, 2, 1, 0, 1), 8, True, groups=2)
    layer = qframe.convert(fake, engine="qframe")[0]
    assert layer.path == "dequantize" and layer.weight_int.dtype == torch.int8
    x = torch.randn(2, 6, 4, 5)
    with torch.no_grad():
        got = layer(x).double()
    ref = _float64_reference(fake[0], x, fake[0].output_padding)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_per_group_weights_stay_fake_quant_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 4, 2, 2)).eval()
    recipe = QuantRecipe(name="g", weight=QuantizerConfig(bits=4, granularity="per_group", group_size=8), input=None)
    fake = qframe.ptq(model, recipe, [torch.randn(4, 3, 8, 8)], num_batches=1)
    converted = qframe.convert(fake)
    assert list(converted.qframe_fake_quant_layers) == ["1"]
    assert "per_group on a QuantConvTranspose2d" in converted.qframe_fake_quant_layers["1"]


class _Decoder(nn.Module):
    """An encoder-decoder whose upsampling is ConvTranspose2d + BatchNorm (segmentation and depth heads)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, 2), nn.BatchNorm2d(16), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(16, 8, 4, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(self.up2(self.up1(self.enc(x))))


@pytest.mark.parametrize("engine", ["qframe", "auto"])
def test_a_decoder_with_transposed_convolutions_converts_whole(engine, tmp_path):
    torch.manual_seed(0)
    model = _Decoder()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # statistics a trained model would have, not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    calib = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    fake = qframe.ptq(model.eval(), qframe.preset("w8a8"), calib, num_batches=2)
    assert not fake.qframe_unfolded_norms
    converted = qframe.convert(fake, engine=engine)
    assert converted.qframe_fake_quant_layers == {}
    assert all(isinstance(converted.get_submodule(n), IntConvTranspose2d) for n in ("up1.0", "up2.0"))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        want, got = fake(x), converted(x)
    assert ((got - want).norm() / want.norm()).item() < 1e-4
    buffer = io.BytesIO()  # a converted model saves and loads (the float engine's kept weight is not saved)
    torch.save(copy.deepcopy(converted), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), got)
    # on oneDNN (auto on x86) they run as float transposed convolutions, measured faster there than the GEMM
    expected = "float" if resolve_engine(engine)[0] == "onednn" else "qframe"
    assert {m.engine for m in converted.modules() if isinstance(m, IntConvTranspose2d)} == {expected}
    assert ("float transposed conv" in repr(converted.up1[0])) == (expected == "float")


def test_col2im_sums_what_fold_sums():
    """The strided adds equal torch's col2im (F.fold) for every geometry."""
    for (k, s, p, op, d), (h, w) in itertools.product([g for g in GEOMETRIES if isinstance(g[0], int)],
                                                      [(3, 4), (5, 5)]):
        cols = torch.randn(2, h, w, 3, k, k, dtype=torch.float64)
        got = _col2im(cols, (s, s), (p, p), (d, d), (op, op), None)
        size = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n in (h, w)]
        want = F.fold(cols.reshape(2, h * w, -1).transpose(1, 2), size, k, d, p, s)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("geometry", GEOMETRIES[:4], ids=lambda g: "k{}s{}p{}op{}d{}".format(*g))
@pytest.mark.parametrize("bits, int8_input", [(8, True), (4, True), (4, False)])
def test_the_converted_layer_on_a_gpu_computes_the_fake_quant_layer(geometry, bits, int8_input):
    """On CUDA the GEMM runs on the GPU backends (Triton / CUDA extension) and col2im on the GPU. int8 inputs:
    exact int32 sums, scaled; float inputs (w4a16) may multiply in TF32 on the GPU, hence 1e-3 there."""
    fake = _quantized(24, 20, geometry, bits, int8_input)
    layer = qframe.convert(fake, engine="qframe")[0].to("cuda")
    x = torch.randn(3, 24, 9, 7)
    with torch.no_grad():
        got = layer(x.to("cuda")).double().cpu()
    ref = _float64_reference(fake[0], x, fake[0].output_padding)
    assert (got - ref).abs().max() <= (1e-5 if int8_input else 1e-3) * ref.abs().max(), (geometry, bits, int8_input)
