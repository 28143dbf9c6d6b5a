"""The Triton kernels compiled for real NVIDIA targets (Jetson Orin sm_87, H100 / H200 sm_90) without a GPU.

The interpreter runs the kernels' arithmetic but not the GPU compiler's rules: an 8-bit dot needs
K >= 32, a tile must fit the GPU's shared memory. Here each launcher's own choice (the heuristic
tile, or every tile autotuning would try) is compiled by triton's NVIDIA backend for each target
through qframe.kernels.triton.aot, and its resources are checked.
"""

import pytest
import torch

pytest.importorskip("triton")
aot = pytest.importorskip("qframe.kernels.triton.aot")

ok, why = aot.available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

ARCHS = ["sm_87", "sm_90"]

# (op, M, N, K, group size, activation dtype): layer shapes of a converted CNN, decode-sized M, odd
# sizes, K below one tensor-core step, group sizes that do and do not tile BLOCK_K.
CASES = [
    ("int8_mm_i32", 64, 96, 9, 0, None),  # K=9 (a 3x3 conv over one channel): an int8 dot still needs K >= 32
    ("int8_mm", 1, 7, 33, 0, None),
    ("int8_mm", 512, 128, 576, 0, None),
    ("w4a8_mm", 64, 128, 576, 0, None),
    ("w4a8_mm", 64, 128, 576, 48, None),  # per-element scales: the float dot's tile must fit shared memory
    ("w4a8_mm", 16, 256, 512, 128, None),
    ("w4a16_mm", 64, 128, 576, 0, torch.bfloat16),
    ("w4a16_mm", 64, 128, 576, 48, torch.float16),
    ("w4a16_mm", 64, 128, 576, 0, torch.float32),  # float32 activations: IEEE float32 FMA dot
]


def _tensor_cores_expected(op, group_size, dtype, block_k):
    if op == "w4a16_mm" and dtype == torch.float32:
        return False
    return not group_size or group_size % block_k == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op,m,n,k,group_size,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_the_launchers_choice_compiles_fits_and_does_not_spill(arch, op, m, n, k, group_size, dtype):
    compiled = aot.compile_gemm(op, m, n, k, arch, group_size=group_size, dtype=dtype or torch.bfloat16)
    assert len(compiled) == 1  # small products take one heuristic tile
    c = compiled[0]
    assert c.fits, f"{c.tile()}: {c.shared} bytes of shared memory, {arch} has {aot.SHARED_LIMIT[arch]}"
    if c.stack is not None and k % 16 == 0:  # aligned K: everything in registers
        assert c.stack == 0, f"{c.tile()} spills {c.stack} bytes per thread on {arch}"
    assert (c.tensor_cores != "none") == _tensor_cores_expected(op, group_size, dtype, c.config["BLOCK_K"]), c


def test_every_tile_autotuning_tries_at_4096_cubed_compiles_for_hopper_with_wgmma():
    compiled = aot.compile_gemm("int8_mm", 4096, 4096, 4096, "sm_90")
    assert len(compiled) >= 8  # the autotuned path: every tile the pruner keeps for M=4096
    for c in compiled:
        assert c.fits, (c.tile(), c.shared)
        assert c.stack in (None, 0), (c.tile(), c.stack)
        assert c.tensor_cores == "wgmma", (c.tile(), c.tensor_cores)  # every kept tile has BLOCK_M >= 64


@pytest.mark.parametrize("op,group_size,dtype", [("w4a8_mm", 48, None), ("w4a16_mm", 0, torch.float32)])
def test_autotuning_a_float_dot_product_tries_only_tiles_that_fit_without_spilling(op, group_size, dtype):
    # per-element group scales / float32 activations: the float32 FMA dot, where tensor-core tiles
    # overflow shared memory (w4a8 g48: 3 of 6 on sm_90) or spill (all 6)
    compiled = aot.compile_gemm(op, 4096, 4096, 4096, "sm_90", group_size=group_size, dtype=dtype or torch.bfloat16)
    assert compiled
    for c in compiled:
        assert c.fits and c.stack in (None, 0), (c.tile(), c.shared, c.stack)


def test_compiling_leaves_triton_as_it_was_and_names_a_bad_target():
    from triton.runtime import driver

    from qframe.errors import QFrameError
    from qframe.kernels.triton.int8_mm import COMPILE_ONLY

    before = driver._active
    aot.compile_gemm("int8_mm_i32", 32, 32, 64, "sm_87")
    assert driver._active is before and COMPILE_ONLY.get() is None
    with pytest.raises(QFrameError, match=r"'sm_75' is not known here; valid: sm_80, sm_86, sm_87, sm_89, sm_90"):
        aot.compile_gemm("int8_mm_i32", 32, 32, 64, "sm_75")
    assert driver._active is before and COMPILE_ONLY.get() is None


@pytest.mark.parametrize("op,dtype", [("int8_mm", None), ("w4a8_mm", None), ("w4a16_mm", torch.bfloat16)])
def test_every_launch_fuses_the_epilogues_multiply_adds_whatever_tritons_default(op, dtype, monkeypatch):
    """Triton 3.10 turns fused multiply-adds off by default (3.9 warns where a launch leaves the option
    unset): the launchers state it, so the float epilogue rounds the same under every Triton release."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")  # Triton 3.10's default
    for m in (64, 4096):  # the heuristic tile and every tile autotuning tries
        compiled = aot.compile_gemm(op, m, 256, 512, "sm_90", dtype=dtype or torch.bfloat16)
        if compiled[0].fp_fusion is None:
            pytest.skip(f"triton {__import__('triton').__version__} does not record its compile options")
        assert all(c.fp_fusion is True for c in compiled), [(c.tile(), c.fp_fusion) for c in compiled]
