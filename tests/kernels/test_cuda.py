"""The CUDA extension's kernels (``qframe._C_cuda``) against the reference, on a GPU.

Every op runs through qframe's dispatch with the ``cuda`` backend forced, on fresh random inputs
(the seed is printed on failure), over shapes that exercise each kernel path: the decode GEMV
(M <= 8) with vectorised rows (K % 32 == 0) and scalar rows (odd K), the tiled kernels (M > 8)
with ragged edges in M, N and K, per-channel and per-group scales (groups that are and are not a
multiple of 8 or 32, a ragged last group), with and without bias. int32 results must be
bit-exact; float results within 1e-3 relative error of a float64 evaluation. Skipped where no GPU
or no built extension is present.
"""

import math

import pytest
import torch

import qframe.kernels as qk
from qframe.errors import QFrameError
from qframe.kernels import dispatch, reference

from kernel_inputs import GEN, SEED, positive, randint, rel_err  # tests/kernels/kernel_inputs.py

READY, WHY = dispatch.available("cuda", "cuda") if torch.cuda.is_available() else (False, "needs an NVIDIA GPU")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not READY, reason=f"CUDA backend unavailable: {WHY}")]

# (M, N, K): decode rows (1, 3, 8), the first tiled M (9), ragged tiles; K odd, not a multiple of
# 16 or 32, and aligned; N not a multiple of the 4 columns a GEMV block covers or of a 64-wide tile.
SHAPES = [(1, 7, 33), (3, 37, 100), (8, 64, 256), (9, 70, 130), (17, 129, 257), (130, 65, 96), (64, 256, 1024)]
GROUPS = [0, 32, 24, 100, 64]


def _int8(*shape):
    return randint(-128, 128, *shape)


def _int4(*shape):
    return randint(-8, 8, *shape)


_scale = positive


def _cuda(*tensors):
    return tuple(t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors)


def _run(op, *args):
    with qk.use_backend("cuda"), dispatch.record() as ran:
        out = getattr(qk, op)(*_cuda(*args))
    torch.cuda.synchronize()
    assert ran == {(op, "cuda")}, f"ran on {ran}"
    return out.cpu()


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_int8_mm_i32_is_bit_exact(m, n, k):
    a, w = _int8(m, k), _int8(n, k)
    out = _run("int8_mm_i32", a, w)
    expected = (a.long() @ w.long().T).int()
    assert out.dtype == torch.int32 and torch.equal(out, expected), f"seed {SEED}: {(out != expected).sum()} differ"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_int8_mm_matches_the_reference(m, n, k, bias):
    a, w = _int8(m, k), _int8(n, k)
    a_scale, w_scale = _scale(m), _scale(n)
    b = torch.randn(n, generator=GEN) if bias else None
    out = _run("int8_mm", a, a_scale, w, w_scale, b)
    expected = reference.int8_mm(a, a_scale, w, w_scale, b)
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-3, f"seed {SEED}"


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_w4a8_mm_matches_the_reference(m, n, k, group_size):
    a, w = _int8(m, k), _int4(n, k)
    a_scale = _scale(m)
    w_scale = _scale(n, math.ceil(k / group_size)) if group_size else _scale(n)
    bias = torch.randn(n, generator=GEN)
    out = _run("w4a8_mm", a, a_scale, qk.pack_int4(w), w_scale, group_size, bias)
    expected = reference.w4a8_mm(a, a_scale, qk.pack_int4(w), w_scale, group_size, bias)
    assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-3, f"seed {SEED}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [0, 32, 24, 100])
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_w4a16_mm_matches_the_reference(m, n, k, group_size, dtype):
    x = torch.randn(m, k, generator=GEN).to(dtype)
    w = _int4(n, k)
    w_scale = _scale(n, math.ceil(k / group_size)) if group_size else _scale(n)
    bias = torch.randn(n, generator=GEN)
    out = _run("w4a16_mm", x, qk.pack_int4(w), w_scale, group_size, bias)
    expected = reference.w4a16_mm(x.double(), qk.pack_int4(w), w_scale, group_size, bias.double())
    assert out.dtype == dtype and rel_err(out, expected) < 1e-3 + torch.finfo(dtype).eps, f"seed {SEED}"


def test_a_bad_input_raises_one_line_naming_it():
    a, w = _int8(4, 64).cuda(), _int8(8, 63).cuda()
    with qk.use_backend("cuda"), pytest.raises(QFrameError) as info:
        qk.int8_mm_i32(a, w)
    assert "\n" not in str(info.value) and "63" in str(info.value)
