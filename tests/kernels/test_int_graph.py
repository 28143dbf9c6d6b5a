"""qframe.convert's integer path on oneDNN: int8 convolutions, fused activations, int8 codes between layers.

Fresh random inputs; each converted model is compared with its fake-quant original and with
qframe's own GEMM path (engine="qframe"); single layers with an int64 / float64 reference.
"""

import copy
import logging
import pickle

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.kernels import int_graph
from qframe.kernels.convert import IntConv2d
from qframe.models import build_model

OK, WHY = int_graph.onednn_available()
pytestmark = pytest.mark.skipif(not OK, reason=f"oneDNN int8 convolution unavailable: {WHY}")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def calib(channels=1, size=32, n=2):
    return [(torch.randn(32, channels, size, size), torch.zeros(32, dtype=torch.long)) for _ in range(n)]


def quantize(model, recipe="w8a8"):
    return qframe.ptq(model.eval(), qframe.preset(recipe), calib(), num_batches=2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


class OneConv(nn.Module):
    def __init__(self, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(8, 16 if groups == 1 else 8, 3, stride=2, padding=1, groups=groups)
        self.head = nn.Conv2d(16 if groups == 1 else 8, 4, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.head(self.relu(self.conv(x)))


@pytest.mark.parametrize("groups", [1, 8])
def test_onednn_conv_equals_the_integer_reference(groups):
    torch.manual_seed(torch.seed() % 1000)
    fake = qframe.ptq(OneConv(groups).eval(), qframe.preset("w8a8"),
                      [(torch.randn(16, 8, 12, 12), torch.zeros(16, dtype=torch.long))], num_batches=1)
    conv = qframe.convert(fake).conv
    assert isinstance(conv, IntConv2d) and conv.engine == "onednn"
    x = torch.randn(3, 8, 12, 12)
    codes = torch.clamp(torch.round(x / conv.input_scale), -128, 127)
    w = conv.dequantized_weight().double()
    ref = torch.nn.functional.conv2d(codes.double() * conv.input_scale.double(), w, conv.bias.double(), conv.stride,
                                     conv.padding, conv.dilation, conv.groups)
    ref = torch.relu(ref)  # the ReLU after the conv is fused into it
    assert conv.act == "relu"
    assert conv.out_scale is not None  # the head quantizes the output: int8 codes go out
    y = conv(x)
    assert y.dtype == torch.uint8 and int_graph.scale_of(y) == conv.out_scale
    want = torch.clamp(torch.round(ref / conv.out_scale), -128, 127) + 128
    off = (y.double() - want).abs()
    # a tie rounded the other way at most: 1 value of 864 on 2 of 300 seeds, none on the others
    assert off.max().item() <= 1 and (off > 0).sum().item() <= 2
    conv.out_scale = None  # float out: acc * s_in * s_w + bias, ReLU fused
    assert rel(conv(x).double(), ref) < 1e-5


class FunctionalActivations(nn.Module):
    """Convolutions joined by ReLUs written as functions and methods, one conv called twice (once on a ReLU's
    output, once on signed values), a residual block closed by F.relu."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a, self.b, self.c, self.d = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.twice = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(torch.relu(self.stem(x)))
        x = self.b(nn.functional.relu(x))
        x = self.c(nn.functional.relu6(x))
        y = self.d(x.relu())
        y = nn.functional.relu(y + x)
        return self.head(self.twice(nn.functional.relu(self.twice(y)) - 0.5))


@pytest.mark.parametrize("avx2", [False, True], ids=["native", "avx2"])
def test_activations_written_as_functions_and_a_conv_called_twice_equal_the_fake_quant_model(avx2, monkeypatch):
    """F.relu / torch.relu return a new tensor, without the codes' scale: handing codes through them made the next
    conv read codes as values (output error 3x the output). A conv called once on a ReLU's output and once on
    signed values was given input codes 0..127 for both calls under AVX2 (its signed call clamped at zero)."""
    if avx2:
        _forced_avx2(monkeypatch)
    torch.manual_seed(torch.seed() % 1000)
    fake = quantize(FunctionalActivations())
    conv = qframe.convert(fake)
    exact = qframe.convert(fake, engine="qframe")
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        want = fake(x)
        assert rel(exact(x), want) < 1e-3  # a code at a tie rounded the other way, a few layers deep
        assert rel(conv(x), want) < 0.02
    if avx2:
        assert conv.twice.engine == "float" and conv.b.engine == "onednn" and conv.b.input_zero == 0


def test_resnet_and_mobilenet_keep_int8_codes_between_layers_and_fuse_activations():
    torch.manual_seed(0)
    for name, kw in (("resnet18", {"width_mult": 0.25}), ("mobilenet_v2", {"width_mult": 0.25})):
        fake = quantize(build_model(name, 10, 1, 32, **kw))
        own = qframe.convert(fake, engine="qframe")
        conv = qframe.convert(fake)
        convs = [m for m in conv.modules() if isinstance(m, IntConv2d)]
        assert convs and all(m.engine == "onednn" for m in convs)
        assert all(m.engine == "qframe" for m in own.modules() if isinstance(m, IntConv2d))
        linked = [m for m in conv.modules() if getattr(m, "out_scale", None) is not None]
        assert len(linked) >= len(convs) - 2, f"{name}: only {len(linked)} of {len(convs)} convs hand over int8 codes"
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in conv.modules()), f"{name}: an activation left unfused"
        adds = [m for m in conv.modules() if isinstance(m, int_graph.IntResidualAdd)]
        assert adds and all(a.out_scale is not None for a in adds)
        if name == "mobilenet_v2":
            continue  # untrained, its logits are ~1e-8: numerics are checked on trained models (benchmark, test_convert)
        x = torch.randn(8, 1, 32, 32)
        with torch.no_grad():
            yf, yo, yc = fake(x), own(x), conv(x)
        assert rel(yo, yf) < 0.02  # float rounding flips a few codes on the way
        assert rel(yc, yf) < 0.05, f"{name}: integer graph off the fake-quant model by {rel(yc, yf):.3g}"


def test_relu6_capped_by_the_next_quantizer_or_fused_as_hardtanh():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.ReLU6()

        def forward(self, x):
            return self.b(self.act(self.a(x)))

    torch.manual_seed(1)
    fake = qframe.ptq(Block().eval(), qframe.preset("w8a8"), [(torch.randn(8, 3, 8, 8) * 40, None)], num_batches=1)
    conv = qframe.convert(fake)
    assert isinstance(conv.act, nn.Identity)
    x = torch.randn(4, 3, 8, 8) * 40  # large: the ReLU6 cap matters
    with torch.no_grad():
        assert rel(conv(x), fake(x)) < 0.02
    conv.a.out_scale = None  # float out: the cap has to come from the fused hardtanh
    conv.a.act = "relu6"
    with torch.no_grad():
        assert rel(conv(x), fake(x)) < 0.02


def test_a_model_fx_cannot_trace_runs_per_layer(caplog):
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            if y.sum() > 0:  # data-dependent control flow
                y = y * 1.0
            return self.b(y)

    fake = qframe.ptq(Branchy().eval(), qframe.preset("w8a8"), [(torch.randn(8, 1, 8, 8), None)], num_batches=1)
    with caplog.at_level(logging.INFO, logger="qframe"):
        conv = qframe.convert(fake)
    assert "does not trace with torch.fx" in caplog.text
    assert conv.a.engine == "onednn" and conv.a.out_scale is None
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert rel(conv(x), fake(x)) < 1e-2


def test_converted_model_copies_and_pickles_after_running():
    fake = quantize(build_model("compact_cnn", 10, 1, 32))
    conv = qframe.convert(fake)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y = conv(x)
        assert torch.equal(copy.deepcopy(conv)(x), y)
        assert torch.equal(pickle.loads(pickle.dumps(conv))(x), y)
    assert not any("engine" in k for k in conv.state_dict())


def _forced_avx2(monkeypatch):
    from qframe.kernels.cpu import isa

    if "avx2" not in isa.supported():
        pytest.skip("this CPU has no AVX2 to force")
    monkeypatch.setenv("QFRAME_CPU_ISA", "avx2")


def test_without_vnni_only_relu_fed_convs_run_on_onednn_with_codes_below_128(monkeypatch):
    """AVX2 (forced): convolutions whose input is a ReLU's output run on oneDNN with codes 0..127, the
    others as float convolutions, and the model still equals its fake-quant original."""
    _forced_avx2(monkeypatch)
    assert int_graph.onednn_mode()[0] == "nonnegative"
    torch.manual_seed(torch.seed() % 1000)
    fake = quantize(build_model("resnet18", 10, 1, 32, width_mult=0.25))
    conv = qframe.convert(fake)
    convs = {n: m for n, m in conv.named_modules() if isinstance(m, IntConv2d)}
    assert convs["conv1"].engine == "float"  # the stem reads the (signed) image
    on = [n for n, m in convs.items() if m.engine == "onednn"]
    assert len(on) == len(convs) - 1 and all(convs[n].input_zero == 0 for n in on)
    assert not any(getattr(m, "out_scale", None) is not None for m in conv.modules())  # floats between layers
    x = torch.randn(8, 1, 32, 32)
    with torch.no_grad():
        assert rel(conv(x), fake(x)) < 0.02
    with pytest.raises(QFrameError):  # engine="onednn" takes the same mode; a bad one still fails
        qframe.convert(fake, engine="tpu")


def test_nonnegative_codes_on_onednn_equal_the_integer_reference(monkeypatch):
    _forced_avx2(monkeypatch)
    torch.manual_seed(torch.seed() % 1000)
    fake = qframe.ptq(OneConv().eval(), qframe.preset("w8a8"),
                      [(torch.randn(16, 8, 12, 12), torch.zeros(16, dtype=torch.long))], num_batches=1)
    conv = qframe.convert(fake)
    assert conv.conv.engine == "float" and conv.head.engine == "onednn" and conv.head.input_zero == 0
    head = conv.head
    x = torch.relu(torch.randn(3, 16, 6, 6)) * 4 * float(head.input_scale) * 127 / 4  # up to the clamp and beyond
    codes = torch.clamp(torch.round(x / head.input_scale), -128, 127)
    ref = torch.nn.functional.conv2d(codes.double(), head.weight_int.double().reshape(4, 1, 1, 16).permute(0, 3, 1, 2))
    ref = ref * (head.input_scale.double() * head.weight_scale.double()).reshape(1, -1, 1, 1) + head.bias.double().reshape(1, -1, 1, 1)
    assert rel(head(x).double(), ref) < 1e-6


_SATURATION = r"""
import torch, sys
torch.manual_seed(int(sys.argv[1]))
w = torch.full((8, 64, 1, 1), 127, dtype=torch.int8)
ws = torch.ones(8)
for high in (127, 255):
    x = torch.randint(high - 8, high + 1, (2, 64, 4, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.onednn.qconv_prepack(w, ws, 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    y = torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, packed, ws, torch.zeros(8, dtype=torch.int64), None, [1, 1],
                                           [0, 0], [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")
    ref = torch.nn.functional.conv2d(x.double(), w.double())
    print(high, (y.double() - ref).abs().max().item())
"""


def test_oneDNN_capped_at_avx2_is_exact_for_codes_below_128_only():
    """The premise of the nonnegative mode, on oneDNN itself capped at AVX2 (a child process: the cap is read
    once): uint8 codes up to 127 give the exact int32 sums, codes up to 255 saturate int16 pair sums."""
    import subprocess
    import sys

    from qframe.kernels.cpu import isa

    if "avx2" not in isa.supported():
        pytest.skip("this CPU has no AVX2")
    env = {**__import__("os").environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _SATURATION, str(torch.seed() % 1000)], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    off = dict(zip(out[::2], map(float, out[1::2])))
    assert off["127"] == 0.0
    assert off["255"] > 1000  # saturated: the reason signed codes (+128) stay off oneDNN without VNNI


def test_bad_engine_is_one_clear_error():
    fake = quantize(build_model("compact_cnn", 10, 1, 32))
    with pytest.raises(QFrameError, match="unknown convert engine 'tpu'; valid: auto, onednn, qframe"):
        qframe.convert(fake, engine="tpu")


def test_residual_add_on_floats_quantizes_exactly_as_its_quantizers():
    """Given floats (no codes handed over), the converted add computes q1(x) + q2(skip) bit for bit as the
    fake-quant add's own quantizer modules do, also at rounding ties and beyond the clamp."""
    torch.manual_seed(torch.seed() % 1000)
    fake = quantize(build_model("resnet18", 10, 1, 32, width_mult=0.25))
    conv = qframe.convert(fake)
    add = next(m for m in conv.modules() if isinstance(m, int_graph.IntResidualAdd))
    assert all(s is not None for s in add._static)
    add.act, add.out_scale = "none", None  # as unlinked: floats out, no fused ReLU
    scale = float(add.input_quantizer.scale)
    x = torch.randn(2, 16, 8, 8) * 200 * scale
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 130.5]) * scale  # ties and a clamped value
    skip = torch.randn(2, 16, 8, 8) * 100 * float(add.skip_quantizer.scale)
    with torch.no_grad():
        want = add.input_quantizer(x) + add.skip_quantizer(skip)
        assert torch.equal(add(x, skip), want)
