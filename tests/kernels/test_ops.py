"""The torch.ops.qframe ops on CPU tensors: every available backend against the reference, input
checks, fake (meta) tensors and torch.compile."""

import math

import numpy as np
import pytest
import torch

import qframe.kernels as qk
from qframe.errors import QFrameError
from qframe.kernels import dispatch, reference

from kernel_inputs import GEN, SEED, positive, randint, rel_err  # tests/kernels/kernel_inputs.py

# Every backend the dispatch table can run on CPU tensors here (reference always; the CPU extension
# once built; triton only when the whole run has TRITON_INTERPRET=1).
CPU_BACKENDS = [b for b in dispatch.BACKENDS[1:] if dispatch.available(b, "cpu")[0]]
SHAPES = [(1, 7, 33), (3, 16, 64), (3, 37, 100), (17, 9, 257)]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with qk.use_backend(request.param):
        yield request.param


def w4_inputs(n, k, group_size):
    w = randint(-8, 8, n, k)
    scale = positive(n, math.ceil(k / group_size)) if group_size else positive(n)
    return qk.pack_int4(w), scale


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_mm_i32_is_bit_exact(backend, m, n, k):
    a, w = randint(-128, 128, m, k), randint(-128, 128, n, k)
    out = qk.int8_mm_i32(a, w)
    assert out.dtype == torch.int32 and torch.equal(out, (a.long() @ w.long().T).int()), f"{backend}, seed {SEED}"


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_mm(backend, m, n, k, with_bias):
    a, a_scale = qk.quantize_rows(torch.randn(m, k, generator=GEN))
    w, w_scale = qk.quantize_weight_int8(torch.randn(n, k, generator=GEN))
    bias = torch.randn(n, generator=GEN) if with_bias else None
    out = qk.int8_mm(a, a_scale, w, w_scale, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, reference.int8_mm(a, a_scale, w, w_scale, bias)) < 1e-3, f"{backend}, seed {SEED}"


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_w4a8_mm(backend, m, n, k, group_size):
    a, a_scale = randint(-128, 128, m, k), positive(m)
    w_packed, w_scale = w4_inputs(n, k, group_size)
    bias = torch.randn(n, generator=GEN)
    out = qk.w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias)
    ref = reference.w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias)
    assert out.dtype == torch.float32 and rel_err(out, ref) < 1e-3, f"{backend}, seed {SEED}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k,group_size", [(1, 7, 33, None), (3, 37, 100, 32), (5, 16, 129, 64)])
def test_w4a16_mm(backend, dtype, m, n, k, group_size):
    a = torch.randn(m, k, generator=GEN).to(dtype)
    w_packed, w_scale = w4_inputs(n, k, group_size)
    bias = torch.randn(n, generator=GEN).to(dtype)  # a bias may come in the activation dtype
    out = qk.w4a16_mm(a, w_packed, w_scale, group_size, bias)
    # the exact product, rounded to the output dtype like the op's own result
    ref = reference.w4a16_mm(a.double(), w_packed, w_scale, group_size, bias).to(dtype)
    assert out.dtype == dtype and rel_err(out, ref) < 1e-3, f"{backend}, seed {SEED}"


def test_non_contiguous_inputs_and_empty_batches(backend):
    a = randint(-128, 128, 40, 6).T  # [6, 40], column-major
    w = randint(-128, 128, 5, 40)
    assert not a.is_contiguous()
    assert torch.equal(qk.int8_mm_i32(a, w), (a.long() @ w.long().T).int())
    empty = qk.int8_mm(randint(-128, 128, 0, 40), positive(0), w, positive(5))
    assert empty.shape == (0, 5) and empty.dtype == torch.float32


def _bad_calls():
    a, s3 = randint(-128, 128, 3, 10), positive(3)
    w, s4 = randint(-128, 128, 4, 10), positive(4)
    packed, gscale = w4_inputs(4, 10, 4)  # 3 groups: 4 + 4 + 2
    x = torch.randn(3, 10)
    return [
        ("float weights", lambda: qk.int8_mm(a, s3, w.float(), s4), r"w must be a 2-D int8 tensor .*got float32"),
        ("1-D a", lambda: qk.int8_mm_i32(a[0], w), r"a must be a 2-D int8 tensor .*got int8 of shape \(10,\)"),
        ("K mismatch", lambda: qk.int8_mm_i32(a, w[:, :9]), "w has K=9 columns but a has K=10"),
        ("a_scale length", lambda: qk.int8_mm(a, s4, w, s4), r"a_scale has shape \(4,\); expected \(3,\)"),
        ("a_scale dtype", lambda: qk.int8_mm(a, s3.double(), w, s4), "a_scale must be a 1-D float32 tensor"),
        ("w_scale length", lambda: qk.int8_mm(a, s3, w, s3), r"w_scale has shape \(3,\); expected \(4,\)"),
        ("bias length", lambda: qk.int8_mm(a, s3, w, s4, s3), r"bias has shape \(3,\); expected \(4,\)"),
        ("device", lambda: qk.int8_mm(a, s3, w.to("meta"), s4), "w is on meta but a is on cpu"),
        ("packed width", lambda: qk.w4a8_mm(a, s3, packed[:, :4], gscale, 4), r"expected ceil\(K/2\)=5 for K=10"),
        ("unpacked weights", lambda: qk.w4a8_mm(a, s3, w, s4), "w_packed must be a 2-D uint8 tensor"),
        ("group count", lambda: qk.w4a8_mm(a, s3, packed, gscale, 5), r"expected \(4, 2\) .*group_size=5"),
        ("grouped scale, no group", lambda: qk.w4a8_mm(a, s3, packed, gscale), r"w_scale must be a 1-D .*per-channel"),
        ("negative group", lambda: qk.w4a16_mm(x, packed, gscale, -4), "group_size=-4 is invalid"),
        ("int activations", lambda: qk.w4a16_mm(a, packed, gscale, 4), "a must be a 2-D bfloat16/float16/float32"),
        ("float64 activations", lambda: qk.w4a16_mm(x.double(), packed, gscale, 4), "got float64"),
        ("float group", lambda: qk.w4a16_mm(x, packed, gscale, 4.0), r"w4a16_mm: group_size=4.0 is invalid; use 0 or "
                                                                     r"None for per-channel scales or a positive int"),
        ("float tensor group", lambda: qk.w4a8_mm(a, s3, packed, gscale, torch.tensor(4.0)),
         r"w4a8_mm: group_size=tensor\(4.\) is invalid"),
        ("str group", lambda: qk.w4a8_mm(a, s3, packed, gscale, "4"), "w4a8_mm: group_size='4' is invalid"),
        ("rows without columns", lambda: qk.quantize_rows(torch.randn(3, 0)),
         r"quantize_rows needs a 2-D floating-point tensor with at least one column .*got float32 of shape \(3, 0\)"),
        ("int8 weight without rows", lambda: qk.quantize_weight_int8(torch.randn(0, 4)),
         r"quantize_weight_int8 needs .* at least one row and one column .*got float32 of shape \(0, 4\)"),
        ("int8 weight without columns", lambda: qk.quantize_weight_int8(torch.randn(4, 0)), r"shape \(4, 0\)"),
        ("int4 weight without rows", lambda: qk.quantize_weight_int4(torch.randn(0, 4), 2),
         r"quantize_weight_int4 needs .* at least one row and one column .*got float32 of shape \(0, 4\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())), ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise_one_line_errors(case):
    _, call, message = _bad_calls()[case]
    with pytest.raises(QFrameError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", [lambda: dispatch.table("gpu"), lambda: dispatch.available("cpu", "gpu"),
                                  lambda: dispatch.auto_backend("int8_mm", "gpu", 1, 4, 8),
                                  lambda: dispatch.resolve("int8_mm", "gpu", 1, 4, 8),
                                  lambda: dispatch.available("reference", "cuda:x")],
                         ids=["table", "available", "auto_backend", "resolve", "bad index"])
def test_an_unknown_device_is_named_with_what_is_valid(call):
    with pytest.raises(QFrameError, match=r"unknown device '(gpu|cuda:x)'; valid: None, a torch.device, 'cpu', 'cuda'") \
            as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("call", [lambda: dispatch.auto_backend("int4_mm", "cpu", 1, 4, 8),
                                  lambda: dispatch.resolve("int4_mm", "cpu", 1, 4, 8)], ids=["auto_backend", "resolve"])
def test_an_unknown_op_is_named_with_what_is_valid(call):
    with pytest.raises(QFrameError, match=r"unknown kernel op 'int4_mm'; valid: int8_mm_i32, int8_mm, w4a8_mm, w4a16_mm"):
        call()


@pytest.mark.parametrize("group_size", [np.int64(32), torch.tensor(32)], ids=["numpy", "tensor"])
def test_an_integer_group_size_of_another_type_counts_as_the_int(backend, group_size):
    w = torch.randn(6, 70, generator=GEN)
    packed, scale = qk.quantize_weight_int4(w, group_size)
    assert all(torch.equal(p, q) for p, q in zip((packed, scale), qk.quantize_weight_int4(w, 32)))
    a = torch.randn(3, 70, generator=GEN)
    out = qk.w4a16_mm(a, packed, scale, group_size)
    assert rel_err(out, reference.w4a16_mm(a.double(), packed, scale, 32)) < 1e-5, f"{backend}, seed {SEED}"
    codes, a_scale = qk.quantize_rows(a)
    out = qk.w4a8_mm(codes, a_scale, packed, scale, group_size)
    assert rel_err(out, reference.w4a8_mm(codes, a_scale, packed, scale, 32)) < 1e-5, f"{backend}, seed {SEED}"


def test_an_empty_batch_quantizes_to_no_rows():
    codes, scale = qk.quantize_rows(torch.randn(0, 5))
    assert codes.shape == (0, 5) and codes.dtype == torch.int8 and scale.shape == (0,)


def test_fake_tensors_give_shapes_and_dtypes():
    m, n, k, g = 5, 6, 33, 16
    meta = dict(device="meta")
    a = torch.empty(m, k, dtype=torch.int8, **meta)
    a_scale, w_scale, gscale = torch.empty(m, **meta), torch.empty(n, **meta), torch.empty(n, 3, **meta)
    w = torch.empty(n, k, dtype=torch.int8, **meta)
    packed = torch.empty(n, 17, dtype=torch.uint8, **meta)
    x = torch.empty(m, k, dtype=torch.bfloat16, **meta)
    checks = [
        (torch.ops.qframe.int8_mm_i32(a, w), torch.int32),
        (torch.ops.qframe.int8_mm(a, a_scale, w, w_scale, None), torch.float32),
        (torch.ops.qframe.w4a8_mm(a, a_scale, packed, gscale, g, None), torch.float32),
        (torch.ops.qframe.w4a16_mm(x, packed, gscale, g, None), torch.bfloat16),
    ]
    for out, dtype in checks:
        assert out.device.type == "meta" and out.shape == (m, n) and out.dtype == dtype
    with pytest.raises(QFrameError, match="w has K=32 columns"):
        torch.ops.qframe.int8_mm(a, a_scale, w[:, :32], w_scale, None)


def test_opcheck_on_every_op():
    a, a_scale = randint(-128, 128, 3, 40), positive(3)
    w, w_scale = randint(-128, 128, 5, 40), positive(5)
    packed, gscale = w4_inputs(5, 40, 16)
    x, bias = torch.randn(3, 40).bfloat16(), torch.randn(5)
    calls = [
        (torch.ops.qframe.int8_mm_i32.default, (a, w)),
        (torch.ops.qframe.int8_mm.default, (a, a_scale, w, w_scale, bias)),
        (torch.ops.qframe.w4a8_mm.default, (a, a_scale, packed, gscale, 16, bias)),
        (torch.ops.qframe.w4a16_mm.default, (x, packed, gscale, 16, None)),
    ]
    for op, args in calls:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_traces_the_ops_as_single_nodes():
    w, w_scale = qk.quantize_weight_int8(torch.randn(12, 48, generator=GEN))
    packed, gscale = w4_inputs(12, 48, 16)

    def linear(x):
        a, a_scale = qk.quantize_rows(x)
        return qk.int8_mm(a, a_scale, w, w_scale) + qk.w4a8_mm(a, a_scale, packed, gscale, 16)

    x = torch.randn(4, 48, generator=GEN)
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(x), linear(x)), f"seed {SEED}"
