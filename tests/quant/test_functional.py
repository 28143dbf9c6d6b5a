"""quantize / dequantize / fake_quantize against float64 references on fresh random inputs."""

import math

import pytest
import torch

from qframe.errors import QFrameError
from qframe.quant import functional as QF
from qframe.quant.spec import QuantSpec

SPECS = [
    QuantSpec(bits=8),
    QuantSpec(bits=8, symmetric=False, signed=False),
    QuantSpec(bits=4, granularity="per_channel", axis=0),
    QuantSpec(bits=3, granularity="per_channel", axis=1, symmetric=False, signed=False),
    QuantSpec(bits=5, granularity="per_channel", axis=-1, narrow_range=True),
    QuantSpec(bits=4, granularity="per_group", group_size=8),
    QuantSpec(bits=2, granularity="per_group", group_size=5, symmetric=False),  # rows not a multiple of 5
    QuantSpec(bits=6, granularity="per_group", axis=1, group_size=4),
]


def _minmax(x, spec):
    rows = QF.block_view(x, spec)
    shape = QF.param_shape(x.shape, spec)
    return rows.amin(1).reshape(shape), rows.amax(1).reshape(shape)


def _reference_scale(x, spec):
    """Per-element scale and zero point built with plain float64 loops over the param grid."""
    x64 = x.double()
    scale, zp = QF.compute_qparams(*_minmax(x, spec), spec)
    s_full, z_full = torch.empty_like(x64), torch.empty_like(x64)
    moved_s, moved_z = s_full.movedim(spec.axis, 0), z_full.movedim(spec.axis, 0)
    if spec.granularity == "per_tensor":
        s_full[:], z_full[:] = scale.item(), zp.item()
    elif spec.granularity == "per_channel":
        for c in range(scale.shape[0]):
            moved_s[c], moved_z[c] = scale[c].item(), zp[c].item()
    else:
        flat_s, flat_z = moved_s.reshape(moved_s.shape[0], -1), moved_z.reshape(moved_z.shape[0], -1)
        for c in range(scale.shape[0]):
            for j in range(flat_s.shape[1]):
                g = j // spec.group_size
                flat_s[c, j], flat_z[c, j] = scale[c, g].item(), zp[c, g].item()
        s_full = flat_s.reshape(moved_s.shape).movedim(0, spec.axis)
        z_full = flat_z.reshape(moved_z.shape).movedim(0, spec.axis)
    return scale, zp, s_full, z_full


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + f"/ax{s.axis}")
def test_round_trip_error_within_half_step(spec):
    x = torch.randn(6, 10, 3) * torch.rand(1) * 5 + torch.randn(1)
    scale, zp, s_full, z_full = _reference_scale(x, spec)
    q = QF.quantize(x, scale, zp, spec)
    assert q.dtype == (torch.int8 if spec.signed else torch.uint8)
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    ref_q = torch.clamp(torch.round(x.double() / s_full) + z_full, spec.qmin, spec.qmax)
    assert torch.equal(q.double(), ref_q), "integer codes differ from the float64 reference"
    deq = QF.dequantize(q, scale, zp, spec)
    err = (deq.double() - x.double()).abs()
    # every value is inside the calibrated range, so the error is at most half a step
    assert bool((err <= s_full / 2 * (1 + 1e-5) + 1e-7).all()), float((err / s_full).max())
    fq = QF.fake_quantize(x, scale, zp, spec)
    torch.testing.assert_close(fq, deq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_param_shapes(spec):
    x = torch.randn(6, 10, 3)
    shape = QF.param_shape(x.shape, spec)
    axis_len = x.shape[spec.axis]
    if spec.granularity == "per_tensor":
        assert shape == ()
    elif spec.granularity == "per_channel":
        assert shape == (axis_len,)
    else:
        assert shape == (axis_len, math.ceil(x.numel() // axis_len / spec.group_size))
    assert QF.block_view(x, spec).shape[0] == math.prod(shape)


def test_wrong_scale_shape_is_one_clear_error():
    spec = QuantSpec(granularity="per_channel")
    with pytest.raises(QFrameError, match=r"scale shape \(3,\).*expected \(6,\)") as err:
        QF.quantize(torch.randn(6, 4), torch.ones(3), torch.zeros(3, dtype=torch.int32), spec)
    assert "\n" not in str(err.value)


def test_symmetric_zero_point_is_zero_and_zero_is_exact():
    spec = QuantSpec(bits=4, granularity="per_channel")
    x = torch.randn(5, 9)
    scale, zp = QF.compute_qparams(*_minmax(x, spec), spec)
    assert torch.all(zp == 0)
    asym = QuantSpec(bits=4, symmetric=False, signed=False, granularity="per_channel")
    x[:, 0] = 0.0
    s, z = QF.compute_qparams(*_minmax(x, asym), asym)
    assert torch.all(QF.dequantize(QF.quantize(x, s, z, asym), s, z, asym)[:, 0] == 0)


def test_ste_gradient_passes_inside_range_and_stops_outside():
    spec = QuantSpec(bits=4)
    scale, zp = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    x = (torch.rand(1000) * 2 - 1).requires_grad_()  # range [-1, 1], grid covers [-0.8, 0.7]
    upstream = torch.randn(1000)
    (QF.fake_quantize(x, scale, zp, spec) * upstream).sum().backward()
    code = torch.round(x.detach() / 0.1)
    inside = (code >= spec.qmin) & (code <= spec.qmax)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))


def test_lsq_scale_gradient_matches_float64_formula():
    spec = QuantSpec(bits=3)
    x = torch.randn(300).double()
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    QF.fake_quantize(x, scale, torch.tensor(0, dtype=torch.int32), spec).sum().backward()
    v = x / 0.3
    expected = torch.where(v.round() < spec.qmin, float(spec.qmin),
                           torch.where(v.round() > spec.qmax, float(spec.qmax), v.round() - v)).sum()
    torch.testing.assert_close(scale.grad, expected)


def test_stochastic_round_is_unbiased():
    x = torch.rand(200_000) * 0.2 + 3.0  # fractions in [0, 0.2): plain rounding always gives 3
    rounded = QF.stochastic_round(x)
    assert set(torch.unique(rounded).tolist()) <= {3.0, 4.0}
    assert abs(rounded.mean().item() - x.mean().item()) < 5e-3
    assert torch.round(x).mean().item() == 3.0


def test_nan_range_is_rejected():
    with pytest.raises(QFrameError, match="NaN"):
        QF.compute_qparams(torch.tensor(float("nan")), torch.tensor(1.0), QuantSpec())


def test_quantize_bias_rounds_to_the_accumulator_grid_and_passes_gradients():
    step = torch.rand(64) * 1e-3 + 1e-5
    bias = (torch.randn(64) * 0.2).requires_grad_()
    out = QF.quantize_bias(bias, step)
    codes64 = torch.round(bias.detach().double() / step.double())
    # float64 reference: a whole number of steps, the nearest one
    torch.testing.assert_close(out.detach().double(), codes64 * step.double(), rtol=1e-6, atol=0)
    assert ((out.detach().double() - bias.detach().double()).abs() <= step.double() / 2 * (1 + 1e-6)).all()
    upstream = torch.randn(64)
    (out * upstream).sum().backward()
    torch.testing.assert_close(bias.grad, upstream)  # straight through


def test_quantize_bias_keeps_a_bias_int32_cannot_hold_on_its_grid():
    bias = torch.tensor([0.5, 0.25, -3.0])
    step = torch.tensor([1e-3, 1e-12, 1e-12])  # 2.5e11 and -3e12 steps are beyond int32
    out = QF.quantize_bias(bias, step)
    assert out[0] == 0.5 and out[1] == 0.25 and out[2] == -3.0
    assert QF.quantize_bias(torch.tensor([0.12345]), torch.tensor([0.01]))[0] == pytest.approx(0.12)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_dla_and_gpu_rounding_differ_exactly_on_ties_and_nowhere_else(granularity):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    # power-of-two scales and 1/256 steps of x / scale: every value and every x / scale exact in float32
    exponents = torch.randint(3, 9, () if granularity == "per_tensor" else (6,), generator=g)
    scale = torch.pow(2.0, -exponents.float())
    codes = torch.randint(-120, 120, (6, 50), generator=g).float()
    frac = torch.randint(0, 256, (6, 50), generator=g).float() / 256
    tie = torch.rand(6, 50, generator=g) < 0.3
    frac[tie] = 0.5
    s = scale if scale.dim() == 0 else scale[:, None]
    x = (codes + frac) * s
    even, away = (QuantSpec(granularity=granularity, rounding=r) for r in ("half_even", "half_away"))
    zp = torch.zeros_like(scale, dtype=torch.int32)
    q_even = QF.quantize(x, scale, zp, even)
    q_away = QF.quantize(x, scale, zp, away)
    differs = q_even != q_away
    v = x / s
    expected = (frac == 0.5) & (torch.floor(v.abs()) % 2 == 0)  # a tie whose even neighbour is towards zero
    assert torch.equal(differs, expected) and differs.any()
    assert ((q_away.double() - q_even.double()).abs() <= 1).all()
    assert torch.equal(torch.sign(q_away[differs].double() - q_even[differs].double()), torch.sign(v[differs]))
    # fake-quant rounds the same way
    fq_even, fq_away = QF.fake_quantize(x, scale, zp, even), QF.fake_quantize(x, scale, zp, away)
    assert torch.equal(fq_even != fq_away, expected)


def test_set_rounding_changes_activation_quantizers_only():
    from torch import nn

    import qframe
    from qframe.quant.modules import quantizers, set_rounding

    model = qframe.quantize_(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), qframe.preset("w8a8"))
    assert set_rounding(model, "half_away") == 2
    kinds = {name.rsplit(".", 1)[-1]: q.spec.rounding for name, q in quantizers(model)}
    assert kinds == {"input_quantizer": "half_away", "weight_quantizer": "half_even"}
    with pytest.raises(QFrameError, match="unknown rounding 'up'"):
        QuantSpec(rounding="up")


def _clamp_blocking_at_bounds(x, min=None, max=None):
    """torch 2.14's clamp gradient: none where x sits exactly on a (scalar) bound; torch 2.13 passed it there."""
    y = _TORCH_CLAMP(x, min, max)
    at = torch.zeros_like(x, dtype=torch.bool)
    for bound in (min, max):
        if bound is not None:
            at = at | (x.detach() == bound)
    return torch.where(at, y.detach(), y)


_TORCH_CLAMP = torch.clamp


def test_ste_and_lsq_gradients_hold_at_the_grid_ends_whatever_torch_clamp_does_there(monkeypatch):
    """The codes at qmin / qmax are a quantizer's most frequent: their gradients (STE 1, LSQ round(v) - v)
    must not hang on clamp's gradient at its bounds, which torch 2.14 changed (0 there, 1 before)."""
    monkeypatch.setattr(torch, "clamp", _clamp_blocking_at_bounds)
    spec = QuantSpec(bits=4)
    x = (torch.rand(1000, dtype=torch.float64) * 2 - 1).requires_grad_()
    scale = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(1000, dtype=torch.float64)
    (QF.fake_quantize(x, scale, torch.tensor(0, dtype=torch.int32), spec) * upstream).sum().backward()
    v = x.detach() / 0.1
    code = torch.round(v)
    inside = (code >= spec.qmin) & (code <= spec.qmax)
    assert ((code == spec.qmax) | (code == spec.qmin)).sum() > 50  # many codes on the grid's ends
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    lsq = torch.where(code < spec.qmin, float(spec.qmin), torch.where(code > spec.qmax, float(spec.qmax), code - v))
    torch.testing.assert_close(scale.grad, (lsq * upstream).sum())


def test_a_learned_scale_held_at_the_floor_still_gets_its_gradient(monkeypatch):
    from qframe.quant.modules import TensorQuantizer

    monkeypatch.setattr(torch, "clamp", _clamp_blocking_at_bounds)
    monkeypatch.setattr(torch.Tensor, "clamp", lambda self, min=None, max=None: _clamp_blocking_at_bounds(self, min, max))
    q = TensorQuantizer(QuantSpec(bits=8))
    q.calibrate_from(torch.randn(64))
    q.learn_scale()
    with torch.no_grad():
        q.scale.fill_(QF.SCALE_EPS)  # where the optimizer step hook puts a scale stepped below zero
    q.train()
    q(torch.randn(64) * 1e-6).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


@pytest.mark.parametrize("rounding", ["half_even", "half_away"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + f"/ax{s.axis}")
def test_fake_quantize_without_autograd_gives_the_values_of_the_autograd_form_bit_for_bit(spec, rounding):
    """Inference takes a short path (no STE terms); its values must be those training and export see, ties too."""
    import dataclasses

    spec = dataclasses.replace(spec, rounding=rounding)
    x = torch.randn(6, 10, 7) * 3
    scale, zp, s_full, z_full = _reference_scale(x * 0.6, spec)  # ranges that clip the largest values
    ties = (torch.arange(x.numel()) % 5 == 0).reshape(x.shape)  # every fifth value half-way between two codes
    x = torch.where(ties, (torch.randint(-6, 6, x.shape) + 0.5) * s_full.float(), x)
    graph = QF.fake_quantize(x.clone().requires_grad_(True), scale, zp, spec).detach()
    with torch.no_grad():
        short = QF.fake_quantize(x, scale, zp, spec)
    assert torch.equal(short, graph)
    # and both are the float64 reference of clamp(round(x / s) + z) - z) * s, from the same float32 quotient
    codes = QF.round_half((x / s_full.float()).double(), rounding) + z_full
    expected = (codes.clamp(spec.qmin, spec.qmax) - z_full) * s_full
    assert (short.double() - expected).abs().max() <= 1e-6 * expected.abs().max()  # float32 rounding of the product


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + f"/ax{s.axis}")
def test_ste_and_lsq_gradients_of_every_granularity_match_the_float64_formula(spec):
    """The gradients are written out (one autograd node): STE for x, LSQ for each per-tensor, per-channel and
    per-group scale, summed over its block, against the formula evaluated per element in float64."""
    x = (torch.randn(6, 10, 7, dtype=torch.float64) * 3).requires_grad_()
    scale, zp, s_full, z_full = _reference_scale(x.detach() * 0.6, spec)  # ranges that clip the largest values
    scale = scale.double().requires_grad_()
    upstream = torch.randn(x.shape, dtype=torch.float64)
    (QF.fake_quantize(x, scale, zp, spec) * upstream).sum().backward()
    v = x.detach() / s_full
    code = QF.round_half(v, spec.rounding) + z_full
    inside = (code >= spec.qmin) & (code <= spec.qmax)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    per_element = upstream * torch.where(inside, code - z_full - v, code.clamp(spec.qmin, spec.qmax) - z_full)
    expected = QF.block_view(per_element, spec).sum(1).reshape(scale.shape)
    torch.testing.assert_close(scale.grad, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short() + f"/ax{s.axis}")
def test_half_precision_fake_quantization_gives_the_codes_of_the_integer_form(spec, dtype):
    """A float16 / bfloat16 model's fake quantization rounds to the codes quantize() gives its integer form:
    computed in the half dtype, v / s is 1/256 off, and 8-bit codes from 64 up came one step off."""
    x = (torch.randn(6, 10, 7) * 3).to(dtype)
    scale, zp, s_full, z_full = _reference_scale(x.float() * 0.8, spec)
    # the reference: codes of the float32 quotient (as quantize() rounds), rounded and clamped in float64
    codes = (QF.round_half((x.float() / s_full.float()).double(), spec.rounding) + z_full).clamp(spec.qmin, spec.qmax)
    assert torch.equal(QF.quantize(x, scale, zp, spec).double(), codes)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = QF.fake_quantize(x.clone().requires_grad_(grad), scale, zp, spec)
        assert got.dtype == dtype
        got_codes = (got.detach().double() / s_full + z_full).round()
        assert torch.equal(got_codes, codes), (got_codes != codes).float().mean()


def test_a_quantized_model_cast_to_float16_stays_finite_with_a_pruned_channel():
    """.half() casts the scales too: a pruned filter's floor scale (1e-8) became 0 and its codes 0 / 0 = NaN."""
    import copy

    import qframe
    from torch import nn

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                          nn.Linear(128, 4)).eval()
    with torch.no_grad():
        model[0].weight[2], model[0].bias[2] = 0, 0
    x = torch.randn(4, 3, 4, 4)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    with torch.no_grad():
        want = qmodel(x).double()
        got = copy.deepcopy(qmodel).half()(x.half()).double()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # float16 rounding of the values, not of codes
