"""CPU int8: ISA detection, every ISA kernel bit-exact in int32, and ``auto`` never slower than float.

Fresh random inputs every run; the oracle is an int64 product written here. Kernels for ISAs this
CPU lacks are asked for and must refuse with a clear error (the Arm kernel is checked by
test_arm_cross.py under qemu).
"""

import copy

import pytest
import torch

from qframe.errors import QFrameError
from qframe.kernels import cpu, dispatch, ops
from qframe.kernels.cpu import isa, select
from qframe.kernels.cpu.int8_table import TABLE

EXT, EXT_REASON = cpu._load()
needs_ext = pytest.mark.skipif(EXT is None, reason=f"CPU extension unavailable: {EXT_REASON}")

AVX2_ONLY = frozenset("fpu sse sse2 ssse3 sse4_1 sse4_2 avx fma avx2 bmi2".split())
ZEN4 = AVX2_ONLY | frozenset("avx512f avx512bw avx512vl avx512_vnni avx512_bf16".split())


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("QFRAME_CPU_ISA", "QFRAME_CPU_KERNEL", "QFRAME_INT8_TABLE"):
        monkeypatch.delenv(name, raising=False)


def exact(a, w):
    return (a.long() @ w.long().t()).int()


def codes(*shape):
    x = torch.randint(-128, 128, shape, dtype=torch.int8)
    x.view(-1)[torch.randint(0, x.numel(), (max(1, x.numel() // 50),))] = -128  # the code AVX2 must fix up
    return x


# --- detection ---------------------------------------------------------------------------------


def test_isa_detection_from_flags():
    assert isa.supported(AVX2_ONLY, "x86_64") == ("avx2", "portable")
    assert isa.supported(ZEN4, "x86_64") == ("avx512_vnni", "avx2", "portable")
    assert isa.supported(AVX2_ONLY | {"avx_vnni"}, "x86_64") == ("avx_vnni", "avx2", "portable")
    assert isa.supported(frozenset("fp asimd asimddp".split()), "aarch64") == ("arm_dotprod", "portable")
    assert isa.supported(frozenset("fp asimd".split()), "aarch64") == ("portable",)
    assert isa.supported(frozenset({"sse2"}), "x86_64") == ("portable",)


def test_forced_isa_is_checked(monkeypatch):
    monkeypatch.setenv("QFRAME_CPU_ISA", "avx3")
    with pytest.raises(QFrameError, match="QFRAME_CPU_ISA 'avx3'; valid: avx512_vnni, avx_vnni, avx2"):
        isa.current()
    missing = [i for i in isa.ISAS if i not in isa.supported()]
    monkeypatch.setenv("QFRAME_CPU_ISA", missing[0])
    with pytest.raises(QFrameError, match=f"QFRAME_CPU_ISA={missing[0]} but this CPU"):
        isa.current()
    monkeypatch.setenv("QFRAME_CPU_ISA", "portable")
    assert isa.current() == "portable"


@needs_ext
def test_extension_agrees_with_python_detection():
    f = int(EXT.features())
    assert bool(f & 1) == ("avx512_vnni" in isa.supported())
    assert bool(f & 4) == ("avx2" in isa.supported())
    assert bool(f & 8) == ("arm_dotprod" in isa.supported())


# --- kernels: bit-exact in int32 ------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("m,k,n", [(1, 5, 3), (3, 37, 9), (7, 130, 17), (8, 64, 16), (13, 333, 37), (70, 1152, 24)])
def test_every_isa_kernel_is_bit_exact_in_int32(m, k, n):
    a, w = codes(m, k), codes(n, k)
    w[:, 0] = -128
    a[:, 0] = -128  # -128 x -128 = 2**14: the largest product, which 16-bit pair sums must not saturate
    ref = exact(a, w)
    ran = []
    for name in isa.supported():
        out = EXT.int8_mm_i32(a, w, False, isa.KERNEL_CODE[name])
        assert torch.equal(out, ref), f"{name} kernel differs from the int64 product at {(m, k, n)}"
        ran.append(name)
    assert "portable" in ran


@needs_ext
def test_avx2_float_epilogue_equals_portable_bit_for_bit():
    if "avx2" not in isa.supported():
        pytest.skip("this CPU has no AVX2")
    for m in (2, 40):
        a, w = codes(m, 300), codes(50, 300)
        sa, sw, b = torch.rand(m) + 0.1, torch.rand(50) + 0.1, torch.randn(50)
        assert torch.equal(EXT.int8_mm(a, sa, w, sw, b, False, 1), EXT.int8_mm(a, sa, w, sw, b, False, 0))


@needs_ext
def test_an_isa_the_cpu_lacks_is_refused():
    lacking = [name for name in ("avx512_vnni", "avx2", "arm_dotprod") if name not in isa.supported()]
    if not lacking:
        pytest.skip("this CPU has every ISA")
    a, w = codes(2, 8), codes(3, 8)
    with pytest.raises(ValueError, match="is not supported by this CPU"):
        EXT.int8_mm_i32(a, w, False, isa.KERNEL_CODE[lacking[0]])
    with pytest.raises(ValueError, match="isa must be -1"):
        EXT.int8_mm_i32(a, w, False, 7)


def test_float_path_is_exact_in_int32_beyond_float32s_exact_range():
    a, w = codes(5, 3000), codes(7, 3000)
    a[:] = -128
    w[:] = -128  # 3000 * 2**14 > 2**24: one float32 GEMM would round
    assert torch.equal(select.float_int8_mm_i32(a, w), exact(a, w))


@pytest.mark.parametrize("forced", ["", "avx2", "portable"])
def test_ops_through_dispatch_are_exact_at_every_shape_class(monkeypatch, forced):
    if forced and forced not in isa.supported():
        pytest.skip(f"this CPU has no {forced}")
    if forced:
        monkeypatch.setenv("QFRAME_CPU_ISA", forced)
    for m in (1, 6, 50, 300, 600):
        a, w = codes(m, 200), codes(24, 200)
        with dispatch.record() as ran:
            out = ops.int8_mm_i32(a, w)
        assert ("int8_mm_i32", "cpu") in ran
        assert torch.equal(out, exact(a, w)), (forced, m, cpu.int8_path("int8_mm_i32", m, 24, 200))


# --- the measured table and auto's choice -------------------------------------------------------------


def test_table_records_the_machine_and_has_this_machines_rows():
    assert {"cpu", "arch", "isa_detected", "int8_flags", "date", "torch"} <= set(TABLE["machine"])
    assert TABLE["command"].startswith("python benchmarks/cpu_int8_table.py")
    assert "avx2" in TABLE["rows"]
    for row in TABLE["rows"].values():
        assert row["classes"][-1]["m_max"] is None  # every M falls in a class
        for cls in row["classes"]:
            for s in cls["shapes"]:
                assert s["ms"]["fp32_mm"] > 0 and s["ms"]["float"] > 0


@pytest.mark.parametrize("row_isa", sorted(TABLE["rows"]))
def test_auto_never_selects_a_path_the_table_marks_slower_than_float(monkeypatch, row_isa):
    if row_isa not in isa.supported():
        pytest.skip(f"row {row_isa} cannot be forced on this CPU")
    monkeypatch.setenv("QFRAME_CPU_ISA", row_isa)
    row = TABLE["rows"][row_isa]
    for m in (1, 2, 7, 8, 9, 33, 64, 65, 200, 512, 513, 4096):
        for n, k in ((64, 576), (10, 128), (512, 4608), (960, 160)):
            picked = select.choose("int8_mm", m, n, k, have_extension=EXT is not None)
            measured = select.shape_ratios(row, m, n * k)
            if picked != "float":
                assert max(measured[picked]) <= 1.0, (row_isa, m, n, k, picked, measured)
                cls = select._class(row, m, n * k)
                assert all(s["exact"][picked] for s in cls["shapes"]), (row_isa, m, n, k, picked)
            assert picked == next(i for i in select.ranked(row, m, n * k) if EXT is not None or i != "qframe")


def test_choice_follows_the_table_and_refuses_slower_than_float(monkeypatch, tmp_path):
    monkeypatch.setenv("QFRAME_CPU_ISA", "portable")
    shape = {"m": 4, "k": 64, "n": 64}
    table = {"machine": {}, "rows": {"portable": {"classes": [
        {"m_max": 8, "shapes": [{**shape, "ms": {"fp32_mm": 1.0, "float": 1.5, "qframe": 0.5, "torch_int_mm": 0.7}}]},
        {"m_max": 64, "shapes": [{**shape, "ms": {"fp32_mm": 1.0, "float": 1.5, "qframe": 1.2, "torch_int_mm": 0.9}}]},
        {"m_max": None, "shapes": [{**shape, "ms": {"fp32_mm": 1.0, "float": 1.5, "qframe": 1.1, "torch_int_mm": 3.0}}]},
    ]}}}
    path = tmp_path / "t.json"
    import json

    path.write_text(json.dumps(table))
    select.clear_cache()
    monkeypatch.setenv("QFRAME_INT8_TABLE", str(path))
    assert select.choose("int8_mm", 4, 64, 64, have_extension=True) == "qframe"
    assert select.choose("int8_mm", 4, 64, 64, have_extension=False) == "torch_int_mm"
    assert select.choose("int8_mm", 40, 64, 64, have_extension=True) == "torch_int_mm"
    assert select.choose("int8_mm", 4000, 64, 64, have_extension=True) == "float"  # both int8 paths slower
    no_row = copy.deepcopy(table)
    no_row["rows"] = {}
    path.write_text(json.dumps(no_row))
    select.clear_cache()
    assert select.choose("int8_mm", 4, 64, 64, have_extension=True) == "float"  # unmeasured ISA
    select.clear_cache()


def test_unreadable_table_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("QFRAME_INT8_TABLE", str(tmp_path / "missing.json"))
    with pytest.raises(QFrameError, match="QFRAME_INT8_TABLE=.*missing.json: cannot read the int8 table"):
        select.table()
