"""RCT on integer kernels: no float weight in a step, exact integer GEMMs, ranges that adapt, measured peaks."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qframe.kernels import dispatch
from qframe.measure.memory import allocated_bytes, step_peak_memory
from qframe.methods.rct import RCTConfig, RCTOptimizer, prepare_rct, rct_layers
from qframe.methods.rct import gemm
from qframe.methods.rct.storage import RCTConv2d, RCTLinear, shift_round
from qframe.models import build_model
from qframe.quant.recipe import preset


class _Shapes(TorchDispatchMode):
    """Records dtype and shape of every tensor any ATen op produces (forward, backward, update)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


def _rct_model(name, batch=5, size=16, cfg=None):
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    model = build_model(name, 10, 3, size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    cfg = cfg or RCTConfig()
    rmodel = prepare_rct(model, preset("w8a8"), [(x, y)], 1, cfg)
    return rmodel, RCTOptimizer(rmodel, 0.05, cfg), x, y


def _weight_shapes(model):
    """Each weight's shape, and its flattened ``[N, K]`` and transposed ``[K, N]`` GEMM forms."""
    shapes = set()
    for _, layer in rct_layers(model):
        n, k = layer.codes.shape[0], layer.codes[0].numel()
        shapes |= {tuple(layer.codes.shape), (n, k), (k, n)}
    return shapes


def _step(model, optimizer, x, y):
    model.train()
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_no_float_tensor_of_a_weight_shape_exists_in_a_training_step(name):
    model, optimizer, x, y = _rct_model(name)
    shapes = _weight_shapes(model)
    _step(model, optimizer, x, y)  # momentum state exists from here on
    with _Shapes() as mode, dispatch.record() as ran:
        _step(model, optimizer, x, y)
    assert len(mode.seen) > 1000 and any(op == "int8_mm_i32" for op, _ in ran)  # through the dispatch
    floats = [(op, shape) for op, dtype, shape in mode.seen if dtype.is_floating_point and shape in shapes]
    assert floats == []
    # the premise: weight shapes do occur, as integer tensors (codes, accumulators, momentum)
    ints = {shape for _, dtype, shape in mode.seen if not dtype.is_floating_point and shape in shapes}
    assert len(ints) >= len({tuple(layer.codes.shape) for _, layer in rct_layers(model)})


def test_the_shape_recorder_catches_the_float_path():
    """The check above can fail: the dequantizing path (integer_gemm off) makes float weights."""
    model, optimizer, x, y = _rct_model("resnet18", cfg=RCTConfig(integer_gemm=False))
    shapes = _weight_shapes(model)
    with _Shapes() as mode:
        _step(model, optimizer, x, y)
    assert any(dtype.is_floating_point and shape in shapes for _, dtype, shape in mode.seen)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_a_steps_integer_gemms_equal_a_float64_reference_exactly(name):
    model, optimizer, x, y = _rct_model(name)
    with gemm.record_gemms() as rows:
        _step(model, optimizer, x, y)
    kinds = {kind for kind, *_ in rows}
    assert "mm" in kinds and (name == "resnet18" or "depthwise" in kinds)
    assert len(rows) >= 3 * len(rct_layers(model)) - 2  # forward, input grad (not of the stem), weight grad
    for kind, a, w, out in rows:
        assert not out.is_floating_point()
        if kind == "mm":
            ref = torch.matmul(a.double(), w.double().t())
        else:
            other, (stride, padding, dilation) = w
            args = (stride, padding, dilation, a.shape[1])
            if kind == "depthwise":
                ref = F.conv2d(a.double(), other.double(), None, *args)
            elif kind == "depthwise_input_grad":
                shape = (a.shape[0], a.shape[1], *out.shape[2:])
                ref = torch.nn.grad.conv2d_input(shape, other.double(), a.double(), *args)
            else:
                shape = (a.shape[1], 1, *[int(v ** 0.5) for v in [out.shape[1]] * 2])
                ref = torch.nn.grad.conv2d_weight(other.double(), shape, a.double(), *args).flatten(1)
        assert torch.equal(out.double(), ref), kind


def _float_reference(layer, x):
    """The layer's maths in float64 with a dequantized weight: output, input grad, weight grad."""
    w = (layer.codes.double() * layer.scale.double().view(-1, *[1] * (layer.codes.dim() - 1))).requires_grad_()
    x = x.double().requires_grad_()
    if isinstance(layer, RCTConv2d):
        y = F.conv2d(x, w, layer.bias.double(), layer.stride, layer.padding, layer.dilation, layer.groups)
    else:
        y = F.linear(x, w, layer.bias.double())
    return y, x, w


@pytest.mark.parametrize("kind", ["linear", "conv", "depthwise", "grouped"])
def test_integer_gradients_match_float64_up_to_quantization_noise(kind):
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    if kind == "linear":
        layer = RCTLinear(nn.Linear(96, 40), 8)
        x = torch.randn(64, 96)
    else:
        groups = {"conv": 1, "depthwise": 32, "grouped": 4}[kind]
        layer = RCTConv2d(nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=groups), 8)
        x = torch.randn(8, 32, 12, 12)
    layer.integer_gemm = True
    layer.generator = torch.Generator().manual_seed(1)
    grads = []
    layer.updater = lambda lay, acc, s: grads.append(acc.double() * s.double())
    x_scale = x.abs().amax() / 127
    xq = torch.round(x / x_scale) * x_scale  # on the input grid, so the forward is exact
    xi = xq.clone().requires_grad_()
    run = gemm.linear if kind == "linear" else gemm.conv2d
    y = run(layer.train(), xi, x_scale, layer.bias)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref, x_ref, w_ref = _float_reference(layer, xq)
    y_ref.backward(g.double())
    assert torch.allclose(y.double(), y_ref, rtol=1e-5, atol=1e-5)

    def sqnr(got, ref):
        return 10 * torch.log10(ref.pow(2).sum() / (got - ref).pow(2).sum())

    assert sqnr(xi.grad.double(), x_ref.grad) > 25  # 8-bit stochastic rounding of the errors: ~30 dB
    assert sqnr(grads[0].reshape(w_ref.shape), w_ref.grad) > 25


def test_a_zero_initialised_layer_learns():
    torch.manual_seed(int(torch.randint(0, 1000, ())))
    target = torch.randn(8, 32)
    x = torch.randn(256, 32)
    y = x @ target.t()
    lin = nn.Linear(32, 8)
    nn.init.zeros_(lin.weight)
    model = nn.Sequential(RCTLinear(lin, 8))
    model[0].integer_gemm = True
    optimizer = RCTOptimizer(model, 0.05, RCTConfig(interval=10 ** 6))
    assert model[0].codes.abs().max() == 0
    losses = []
    for i in range(0, 50 * 32, 32):
        loss = F.mse_loss(model(x[i % 256:i % 256 + 32]), y[i % 256:i % 256 + 32])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model[0].codes.abs().max() > 16  # the weights left zero, with a range they set themselves
    assert losses[-1] < 0.1 * losses[0]


def _one_update(layer, grad, **cfg):
    optimizer = RCTOptimizer(nn.Sequential(layer), 1.0, RCTConfig(momentum=0.0, interval=10 ** 6, **cfg))
    optimizer._update_layer(layer, grad)
    return optimizer


def test_a_saturating_channel_grows_its_scale_by_a_power_of_two_without_clipping():
    layer = RCTLinear(nn.Linear(200, 3), 8)
    scale, codes = layer.scale.clone(), layer.codes.clone()
    grad = torch.zeros(3, 200)
    grad[1, 0] = -300 * scale[1]  # 300 steps up on one element of channel 1
    _one_update(layer, grad)
    assert torch.equal(layer.scale[[0, 2]], scale[[0, 2]]) and torch.equal(layer.codes[[0, 2]], codes[[0, 2]])
    ratio = (layer.scale[1] / scale[1]).item()
    need = abs(codes[1, 0].item() + 300) / 127.5
    assert ratio >= need and ratio / 2 < need and ratio in (2.0, 4.0, 8.0)  # the smallest power of two with room
    want = (codes[1, 0].item() + 300) / ratio
    assert abs(layer.codes[1, 0].item() - want) < 1  # stochastic re-rounding, not a clip at 127
    others = codes[1, 1:].float() / ratio
    assert (layer.codes[1, 1:].float() - others).abs().max() < 1


def test_a_channel_using_little_of_its_range_shrinks_its_scale_exactly():
    lin = nn.Linear(50, 2)
    layer = RCTLinear(lin, 8)
    layer.codes[0] = torch.randint(-20, 21, (50,), dtype=torch.int8)
    layer.codes[0, 0] = 20
    before = layer.codes.float() * layer.scale[:, None]
    _one_update(layer, torch.zeros(2, 50))
    assert layer.codes[0].abs().max() == 40  # x2: the largest power of two that stays within 63
    assert torch.equal(layer.codes.float() * layer.scale[:, None], before)
    off = RCTLinear(lin, 8)
    off.codes.copy_(layer.codes // 2)
    _one_update(off, torch.zeros(2, 50), adapt_range=False)
    assert off.codes[0].abs().max() == 20


def test_shift_round_is_integer_and_unbiased():
    q = torch.randint(-128, 128, (200, 500), dtype=torch.int32)
    out = torch.stack([shift_round(q, 3) for _ in range(20)]).double()
    assert (out - q.double() / 8).abs().max() < 1
    assert abs((out.mean(0) - q.double() / 8).mean()) < 0.01


@pytest.mark.skipif(allocated_bytes() is None, reason="needs glibc mallinfo2")
def test_step_peak_memory_sees_a_transient_tensor_that_rss_does_not():
    n = 4 * 2 ** 20  # 16 MiB of float32

    def work():
        a = torch.ones(n)
        b = a * 2  # 32 MiB live at once, freed before the function returns
        return float(b[0])

    work()
    peak = step_peak_memory(work)
    assert 32 * 2 ** 20 <= peak["peak_bytes"] < 40 * 2 ** 20
    assert peak["method"].startswith("allocator")


@pytest.mark.skipif(allocated_bytes() is None, reason="needs glibc mallinfo2")
def test_rct_training_memory_is_below_qat_with_the_same_optimizer(digits, small_model):
    from qframe.methods.qat import QATConfig
    from qframe.methods.rct.report import compare_training_memory
    from qframe.train import TrainConfig

    model = small_model(digits)
    batch = next(iter(digits.loader("train", 32, shuffle=True, seed=1)))
    mem = compare_training_memory(model, preset("w8a8"), batch, train=TrainConfig(), qat_cfg=QATConfig(),
                                  rct_cfg=RCTConfig(), rct_lr=0.01)
    assert mem["qat_sgd"]["optimizer_state_bytes"] < 0.6 * mem["qat_adamw"]["optimizer_state_bytes"]  # 1 vs 2 states
    assert mem["ratio_vs_qat_same_optimizer"] < 0.35
    assert mem["rct"]["step_peak_bytes"] < mem["qat_sgd"]["step_peak_bytes"]
    assert mem["peak_ratio_vs_qat_same_optimizer"] < 1


def test_executed_energy_counts_the_integer_macs_that_ran():
    from qframe.methods.rct.energy import executed_step_energy, layer_macs, mac_pj

    model, optimizer, x, y = _rct_model("resnet18", batch=3)
    forward = sum(r["macs"] for r in layer_macs(model, x))
    e = executed_step_energy(model, optimizer, x, y)
    stem = next(m for _, m in rct_layers(model))
    stem_macs = next(r["macs"] for r in layer_macs(model, x) if r["layer"] == rct_layers(model)[0][0])
    # forward + input gradient + weight gradient of every layer, except the stem's input gradient
    assert e["int8_macs"] == 3 * forward - stem_macs and e["fp32_macs"] == 0 and stem.integer_gemm
    assert e["estimate"] is True and e["gemm_uj"] == pytest.approx(e["int8_macs"] * mac_pj(8, 8) * 1e-6)
