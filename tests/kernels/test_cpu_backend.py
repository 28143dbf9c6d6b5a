"""The CPU backend (qframe._C and torch._int_mm) against a float64 / int64 reference written here.

Fresh random inputs every run. Each fast-path test also runs on the portable C++ kernels
(QFRAME_CPU_KERNEL=portable), so both code paths are checked on every machine.
"""

import pytest
import torch

from qframe.errors import QFrameError
from qframe.kernels import cpu

OK, REASON = cpu.available()
pytestmark = pytest.mark.skipif(not OK, reason=f"CPU extension unavailable: {REASON}")

RTOL = 1e-3


@pytest.fixture(params=["fast", "portable"])
def impl(request, monkeypatch):
    if request.param == "portable":
        monkeypatch.setenv("QFRAME_CPU_KERNEL", "portable")
    else:
        monkeypatch.delenv("QFRAME_CPU_KERNEL", raising=False)
    return request.param


# --- reference (independent of qframe's packing and reference modules) -----------------------


def rand_int(lo, hi, shape):
    x = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    x.view(-1)[torch.randint(0, x.numel(), (1,))] = hi  # never all zeros
    return x


def pack(w: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> uint8 [N, ceil(K/2)], low nibble first."""
    u = w.to(torch.int16) & 0xF
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return (u[:, 0::2] | (u[:, 1::2] << 4)).to(torch.uint8).contiguous()


def expand_scales(w_scale, n, k, group_size):
    if group_size <= 0:
        return w_scale.double().reshape(n, 1).expand(n, k)
    return w_scale.double().repeat_interleave(group_size, dim=1)[:, :k]


def ref_w4(a, a_scale, w, w_scale, group_size, bias):
    n, k = w.shape
    out = a.double() @ (w.double() * expand_scales(w_scale, n, k, group_size)).t()
    if a_scale is not None:
        out = out * a_scale.double()[:, None]
    return out + bias.double() if bias is not None else out


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def make_w4(n, k, group_size):
    w = rand_int(-8, 7, (n, k))
    groups = 1 if group_size <= 0 else -(-k // group_size)
    shape = (n,) if group_size <= 0 else (n, groups)
    return w, pack(w), torch.rand(shape) * 0.1 + 0.01


# --- int8 x int8 -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 33, 80])
@pytest.mark.parametrize("n,k", [(7, 1), (7, 65), (16, 301)])
def test_int8_mm_i32_bit_exact(impl, m, n, k):
    a, w = rand_int(-128, 127, (m, k)), rand_int(-128, 127, (n, k))
    out = cpu.int8_mm_i32(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.long(), a.long() @ w.long().t())


@pytest.mark.parametrize("m", [1, 33, 80])  # portable, 80: torch._int_mm with the in-place epilogue
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_mm_scaled(impl, m, with_bias):
    n, k = 7, 129
    a, w = rand_int(-128, 127, (m, k)), rand_int(-128, 127, (n, k))
    a_scale, w_scale = torch.rand(m) + 0.01, torch.rand(n) + 0.01
    bias = torch.randn(n) if with_bias else None
    out = cpu.int8_mm(a, a_scale, w, w_scale, bias)
    ref = (a.long() @ w.long().t()).double() * a_scale.double()[:, None] * w_scale.double()[None, :]
    if bias is not None:
        ref = ref + bias.double()
    assert out.dtype == torch.float32 and rel_err(out, ref) <= RTOL


@pytest.mark.parametrize("m", [8, 13, 100])
@pytest.mark.parametrize("n,k", [(16, 3), (33, 130), (70, 64), (130, 301)])
def test_int8_weight_panels(impl, m, n, k):
    """From 8 rows the VNNI path repacks panels of 16, 32 or 64 channels; K % 4 != 0 pads the rows.

    Few panels and many rows also split the rows across threads.
    """
    a, w = rand_int(-128, 127, (m, k)), rand_int(-128, 127, (n, k))
    exact = a.long() @ w.long().t()
    assert torch.equal(cpu.int8_mm_i32(a, w).long(), exact)
    a_scale, w_scale, bias = torch.rand(m) + 0.01, torch.rand(n) + 0.01, torch.randn(n)
    ref = exact.double() * a_scale.double()[:, None] * w_scale.double()[None, :] + bias.double()
    assert rel_err(cpu.int8_mm(a, a_scale, w, w_scale, bias), ref) <= 1e-6


def test_int8_weight_panels_many_rows_few_channels():
    a, w = rand_int(-128, 127, (333, 40)), rand_int(-128, 127, (10, 40))
    assert torch.equal(cpu.int8_mm_i32(a, w).long(), a.long() @ w.long().t())


# --- packed int4 x int8 ----------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("k", [1, 7, 129, 301])
@pytest.mark.parametrize("group_size", [0, 32, 64, 128, 24, 6])  # 24: ragged; 6: not a multiple of 8
def test_w4a8_mm(impl, m, k, group_size):
    n = 7
    w, wp, w_scale = make_w4(n, k, group_size)
    a, a_scale = rand_int(-128, 127, (m, k)), torch.rand(m) + 0.01
    bias = torch.randn(n) if k % 2 else None
    out = cpu.w4a8_mm(a, a_scale, wp, w_scale, group_size, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, ref_w4(a, a_scale, w, w_scale, group_size, bias)) <= RTOL


@pytest.mark.parametrize("group_size", [0, 128, 256, 40])
def test_w4a8_mm_wide(impl, group_size):
    """Several 64-byte chunks per row, every register-block shape, a ragged last group."""
    m, n, k = 6, 67, 1000
    w, wp, w_scale = make_w4(n, k, group_size)
    a, a_scale = rand_int(-128, 127, (m, k)), torch.rand(m) + 0.01
    out = cpu.w4a8_mm(a, a_scale, wp, w_scale, group_size)
    assert rel_err(out, ref_w4(a, a_scale, w, w_scale, group_size, None)) <= RTOL


def test_w4a8_mm_positive_activations():
    """All-positive activations (post-ReLU) make the +8 nibble offset large; the result stays exact-ish."""
    m, n, k, gs = 4, 9, 777, 32
    w, wp, w_scale = make_w4(n, k, gs)
    a, a_scale = rand_int(100, 127, (m, k)), torch.rand(m) + 0.01
    out = cpu.w4a8_mm(a, a_scale, wp, w_scale, gs)
    assert rel_err(out, ref_w4(a, a_scale, w, w_scale, gs, None)) <= 1e-5


# --- packed int4 x float ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,k", [(1, 7), (3, 129), (33, 301), (2, 256)])
@pytest.mark.parametrize("group_size", [0, 32, 64, 128, 3])  # 3: odd group size
def test_w4a16_mm(impl, dtype, m, k, group_size):
    n = 7
    w, wp, w_scale = make_w4(n, k, group_size)
    a = torch.randn(m, k).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    out = cpu.w4a16_mm(a, wp, w_scale, group_size, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    ref = ref_w4(a, None, w, w_scale, group_size, bias)
    # the output is rounded to a.dtype: compare with the reference rounded the same way
    assert rel_err(out, ref.to(dtype).double()) <= RTOL
    if dtype == torch.float32:
        assert rel_err(out, ref) <= 1e-5  # fp32 activations keep fp32 precision (bf16 x 3 terms)


@pytest.mark.parametrize("group_size", [0, 32, 24])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w4a16_mm_fp32_many_rows_dequantizes(group_size, with_bias):
    """From W4A16_FP32_DEQUANT_MIN_M rows of fp32 activations the weight is dequantized once for torch.mm."""
    m, n, k = cpu.W4A16_FP32_DEQUANT_MIN_M + 3, 9, 100
    w, wp, w_scale = make_w4(n, k, group_size)
    a = torch.randn(m, k)
    bias = torch.randn(n) if with_bias else None
    out = cpu.w4a16_mm(a, wp, w_scale, group_size, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, ref_w4(a, None, w, w_scale, group_size, bias)) <= 1e-5


def test_w4a16_mm_wide(impl):
    m, n, k, gs = 5, 66, 1030, 64
    w, wp, w_scale = make_w4(n, k, gs)
    a = torch.randn(m, k)
    out = cpu.w4a16_mm(a, wp, w_scale, gs)
    assert rel_err(out, ref_w4(a, None, w, w_scale, gs, None)) <= 1e-5


# --- both paths agree on a realistic shape ---------------------------------------------------


def test_fast_and_portable_agree(monkeypatch):
    m, n, k, gs = 4, 64, 4096, 128
    w, wp, w_scale = make_w4(n, k, gs)
    a, a_scale = rand_int(-128, 127, (m, k)), torch.rand(m) + 0.01
    af = torch.randn(m, k, dtype=torch.bfloat16)
    fast = cpu.w4a8_mm(a, a_scale, wp, w_scale, gs), cpu.w4a16_mm(af, wp, w_scale, gs)
    monkeypatch.setenv("QFRAME_CPU_KERNEL", "portable")
    slow = cpu.w4a8_mm(a, a_scale, wp, w_scale, gs), cpu.w4a16_mm(af, wp, w_scale, gs)
    for f, s in zip(fast, slow):
        assert rel_err(f, s.double()) <= RTOL


def test_empty_batch():
    w, wp, w_scale = make_w4(5, 9, 0)
    a = torch.zeros(0, 9, dtype=torch.int8)
    assert cpu.w4a8_mm(a, torch.zeros(0), wp, w_scale, 0).shape == (0, 5)
    assert cpu.w4a16_mm(torch.zeros(0, 9), wp, w_scale, 0).shape == (0, 5)


# --- bad input -------------------------------------------------------------------------------


def _w4a8_args(m=2, n=3, k=10, gs=0):
    w, wp, w_scale = make_w4(n, k, gs)
    return dict(a=rand_int(-128, 127, (m, k)), a_scale=torch.rand(m), w_packed=wp, w_scale=w_scale, group_size=gs)


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(a=torch.randn(2, 10)), "a must be int8"),
        (dict(a=rand_int(-128, 127, (10, 2)).t()), "must be contiguous"),
        (dict(a_scale=torch.rand(3)), "a_scale must be float32 [M]"),
        (dict(w_packed=torch.zeros(3, 4, dtype=torch.uint8)), "w_packed must be uint8 [N, ceil(K / 2)]"),
        (dict(w_scale=torch.rand(4)), "per-channel w_scale"),
        (dict(group_size=4), "w_scale for group_size 4"),
    ],
)
def test_w4a8_bad_input(change, needle):
    args = {**_w4a8_args(), **change}
    with pytest.raises(QFrameError) as info:
        cpu.w4a8_mm(**args)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_w4a16_bad_input():
    args = _w4a8_args(gs=4)
    with pytest.raises(QFrameError, match="a must be bfloat16, float16 or float32"):
        cpu.w4a16_mm(args["a"], args["w_packed"], args["w_scale"], 4)
    with pytest.raises(QFrameError, match="bias must be a floating tensor"):
        cpu.w4a16_mm(torch.randn(2, 10), args["w_packed"], args["w_scale"], 4, torch.randn(5))


def test_int8_bad_input():
    a, w = rand_int(-128, 127, (2, 10)), rand_int(-128, 127, (3, 11))
    with pytest.raises(QFrameError, match="w must be int8"):
        cpu.int8_mm_i32(a, w)
    with pytest.raises(QFrameError, match="a must be an int8"):
        cpu.int8_mm_i32(a.float(), w)


def test_available_per_op():
    assert cpu.available("int8_mm")[0] and cpu.available("int8_mm_i32")[0]
    ok, reason = cpu.available()
    assert ok and "qframe CPU extension" in reason
