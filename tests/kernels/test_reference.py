"""The pure-torch reference against literal int64 / float64 definitions, and the quantize helpers."""

import math

import pytest
import torch

from qframe.kernels import quantize_rows, quantize_weight_int4, quantize_weight_int8, reference
from qframe.kernels.packing import pack_int4, unpack_int4

from kernel_inputs import GEN, SEED, positive, randint, rel_err  # tests/kernels/kernel_inputs.py


def literal_grouped(a, a_scale, w, w_scale, group_size, bias):
    """``sum_g a_scale[m] * w_scale[n, g] * (int64 dot of group g)``, one group at a time."""
    k = a.shape[1]
    out = torch.zeros(a.shape[0], w.shape[0], dtype=torch.float64)
    for g, start in enumerate(range(0, k, group_size)):
        dot = a[:, start : start + group_size].long() @ w[:, start : start + group_size].long().T
        out += dot.double() * w_scale[:, g].double()
    out = out * a_scale.double()[:, None]
    return out + bias.double() if bias is not None else out


SHAPES = [(1, 7, 33), (3, 16, 64), (5, 9, 100), (4, 3, 257)]


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_mm_i32_is_bit_exact(m, n, k):
    a, w = randint(-128, 128, m, k), randint(-128, 128, n, k)
    a[0, :], w[0, :] = -128, -128  # the largest products, all of one sign
    out = reference.int8_mm_i32(a, w)
    assert out.dtype == torch.int32
    assert torch.equal(out, (a.long() @ w.long().T).int()), f"seed {SEED}"


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_mm_applies_row_and_channel_scales(m, n, k, with_bias):
    a, w = randint(-128, 128, m, k), randint(-128, 128, n, k)
    a_scale, w_scale = positive(m), positive(n)
    bias = torch.randn(n, generator=GEN) if with_bias else None
    expected = literal_grouped(a, a_scale, w, w_scale[:, None], k, bias)
    out = reference.int8_mm(a, a_scale, w, w_scale, bias)
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-6, f"seed {SEED}"


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group_size", [0, 32, 64, 24])
def test_w4a8_mm_matches_the_per_group_definition(m, n, k, group_size):
    a, w = randint(-128, 128, m, k), randint(-8, 8, n, k)
    groups = math.ceil(k / group_size) if group_size else 1
    a_scale, w_scale = positive(m), positive(n, groups)
    bias = torch.randn(n, generator=GEN)
    expected = literal_grouped(a, a_scale, w, w_scale, group_size or k, bias)
    out = reference.w4a8_mm(a, a_scale, pack_int4(w), w_scale if group_size else w_scale[:, 0], group_size, bias)
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-6, f"seed {SEED}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [None, 32, 40])
def test_w4a16_mm_dequantizes_then_multiplies(dtype, group_size):
    m, n, k = 3, 11, 101  # 101 = 3 full groups of 32 + a ragged 5 (or 2 of 40 + 21)
    a = torch.randn(m, k, generator=GEN).to(dtype)
    w = randint(-8, 8, n, k)
    groups = math.ceil(k / group_size) if group_size else 1
    w_scale = positive(n, groups)
    per_k = w_scale[:, torch.arange(k) // (group_size or k)]  # the group each k belongs to
    expected = a.double() @ (w.double() * per_k.double()).T
    out = reference.w4a16_mm(a, pack_int4(w), w_scale if group_size else w_scale[:, 0], group_size)
    assert out.dtype == dtype
    # the result is the float32 sum rounded once to the activation dtype: within one unit in the last
    # place of the exact product (rounding the exact value to the dtype as well would allow two ulps at
    # a near-tie), plus the float32 accumulation error, which is bounded by the sum of |terms|
    magnitude = a.double().abs() @ (w.double() * per_k.double()).abs().T
    bound = torch.finfo(dtype).eps * expected.abs() + 1e-6 * magnitude
    assert ((out.double() - expected).abs() <= bound).all(), f"seed {SEED}"
    assert rel_err(out, expected) < 4 * torch.finfo(dtype).eps, f"seed {SEED}"


def test_quantize_rows_is_symmetric_per_row_with_round_half_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 127.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (2,)
    assert scale[0] == 1.0  # amax 127 -> scale exactly 1
    assert q[0].tolist() == [0, 2, 2, 0, -2, 127]
    assert q[1].tolist() == [0] * 6 and scale[1] > 0 and torch.isfinite(scale[1])


def test_quantize_rows_error_is_within_half_a_step():
    x = torch.randn(6, 77, generator=GEN) * torch.rand(6, 1, generator=GEN) * 10
    q, scale = quantize_rows(x.bfloat16())
    assert q.abs().amax(dim=1).tolist() == [127] * 6
    err = (q.float() * scale[:, None] - x.bfloat16().float()).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6), f"seed {SEED}"


def test_quantize_weight_int8_per_channel():
    w = torch.randn(9, 40, generator=GEN)
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (9,)
    assert torch.allclose(scale, w.abs().amax(dim=1) / 127)
    assert rel_err(q.float() * scale[:, None], w) < 0.01, f"seed {SEED}"


@pytest.mark.parametrize("group_size", [None, 32, 24])
def test_quantize_weight_int4_packs_codes_and_group_scales(group_size):
    n, k = 7, 77
    w = torch.randn(n, k, generator=GEN)
    packed, scale = quantize_weight_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (n, 39)
    assert scale.shape == ((n,) if group_size is None else (n, math.ceil(k / group_size)))
    codes = unpack_int4(packed, k)
    assert codes.min() >= -8 and codes.max() <= 7
    per_k = reference.expand_group_scale(scale, group_size, k)
    assert torch.all((codes.float() * per_k - w).abs() <= per_k / 2 + 1e-6), f"seed {SEED}"
