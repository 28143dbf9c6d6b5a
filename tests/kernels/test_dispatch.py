"""Backend choice: names, availability reasons, the auto rule, preferences, and a lazy import."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import qframe.kernels as qk
from qframe.errors import QFrameError
from qframe.kernels import dispatch


@pytest.fixture(autouse=True)
def restore_preference():
    yield
    dispatch.set_backend("auto")


def int8_inputs(m=2, n=3, k=5):
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    return a, w


def test_unknown_backend_names_list_the_valid_ones():
    valid = r"unknown kernel backend 'tpu'; valid: .*triton.*cuda.*cpu.*reference"
    with pytest.raises(QFrameError, match=valid):
        qk.set_backend("tpu")
    with pytest.raises(QFrameError, match=valid), qk.use_backend("tpu"):
        pass
    with pytest.raises(QFrameError, match=valid):
        qk.available("tpu")
    assert qk.get_backend() == "auto"


def test_explicit_triton_on_cpu_tensors_is_refused_with_the_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = dispatch.available("triton", "cpu")
    assert not ok and reason in ("triton not installed", "needs a CUDA tensor (or TRITON_INTERPRET=1)")
    a, w = int8_inputs()
    with qk.use_backend("triton"), pytest.raises(QFrameError, match=re.escape(reason)):
        qk.int8_mm_i32(a, w)


def test_explicit_cuda_backend_on_cpu_tensors_is_refused():
    a, w = int8_inputs()
    refusal = "'cuda' cannot run int8_mm_i32 on cpu tensors: needs a CUDA"
    with qk.use_backend("cuda"), pytest.raises(QFrameError, match=refusal):
        qk.int8_mm_i32(a, w)


def test_explicit_cpu_backend_runs_or_says_why_not():
    ok, reason = dispatch.available("cpu", "cpu")
    a, w = int8_inputs()
    with qk.use_backend("cpu"):
        if ok:
            assert torch.equal(qk.int8_mm_i32(a, w), (a.long() @ w.long().T).int())
        else:
            assert reason, "an unavailable backend must say why"
            with pytest.raises(QFrameError, match=re.escape(reason)):
                qk.int8_mm_i32(a, w)


def test_auto_on_cpu_tensors_picks_the_cpu_extension_or_the_reference(monkeypatch):
    expected = "cpu" if dispatch.available("cpu", "cpu")[0] else "reference"
    for interpret in ("0", "1"):  # the interpreter is for tests, never an automatic choice
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
        for op in dispatch.OPS:
            assert dispatch.auto_backend(op, torch.device("cpu"), 1, 64, 64) == expected


@pytest.mark.parametrize(
    "ready, m, expected",
    [
        ({"triton", "cuda"}, 9, "triton"),  # a tile-sized M: Triton's tensor-core tiles first
        ({"triton", "cuda"}, 8, "cuda"),  # decode-sized M: the CUDA extension's GEMV first
        ({"triton", "cuda"}, 1, "cuda"),
        ({"triton"}, 1, "triton"),
        ({"cuda"}, 64, "cuda"),
        (set(), 1, "reference"),
        (set(), 64, "reference"),
    ],
)
def test_auto_order_on_cuda_tensors_with_a_decode_rule(monkeypatch, ready, m, expected):
    monkeypatch.setattr(dispatch, "AUTO_RULES", (("cuda", 8, ("cuda", "triton", "reference")),))
    monkeypatch.setattr(dispatch, "available", lambda b, device=None: (b in ready or b == "reference", "test"))
    for backend in ("triton", "cuda"):
        monkeypatch.setitem(dispatch.REGISTRY["int8_mm"], backend, lambda *args: None)
    assert dispatch.auto_backend("int8_mm", "cuda", m, 64, 64) == expected


def test_auto_order_on_cuda_tensors_without_rules_ignores_m(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_RULES", ())
    monkeypatch.setattr(dispatch, "available", lambda b, device=None: (True, "test"))
    for backend in ("triton", "cuda"):
        monkeypatch.setitem(dispatch.REGISTRY["int8_mm"], backend, lambda *args: None)
    assert {dispatch.auto_backend("int8_mm", "cuda", m, 64, 64) for m in (1, 8, 9, 4096)} == {"triton"}


def test_record_collects_the_backends_that_ran():
    a = torch.randint(-128, 128, (3, 40), dtype=torch.int8)
    w = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    with qk.use_backend("reference"), dispatch.record() as ran:
        qk.int8_mm_i32(a, w)
    qk.int8_mm_i32(a, w)  # outside the block: not recorded
    assert ran == {("int8_mm_i32", "reference")}


def test_auto_skips_a_backend_that_lacks_the_op(monkeypatch):
    monkeypatch.setattr(dispatch, "available", lambda b, device=None: (True, "test"))
    monkeypatch.setitem(dispatch.REGISTRY["w4a16_mm"], "triton", lambda *args: None)
    monkeypatch.delitem(dispatch.REGISTRY["w4a16_mm"], "cuda", raising=False)
    monkeypatch.setitem(dispatch._load_errors, "cuda", None)
    assert dispatch.auto_backend("w4a16_mm", "cuda", 8, 64, 64) == "triton"
    monkeypatch.delitem(dispatch.REGISTRY["w4a16_mm"], "triton")
    assert dispatch.auto_backend("w4a16_mm", "cuda", 8, 64, 64) == "reference"
    dispatch.set_backend("cuda")
    with pytest.raises(QFrameError, match="'cuda' does not implement w4a16_mm"):
        dispatch.resolve("w4a16_mm", "cuda", 8, 64, 64)


def test_use_backend_restores_the_previous_preference_even_after_an_error():
    dispatch.set_backend("reference")
    with qk.use_backend("auto"):
        assert qk.get_backend() == "auto"
        with qk.use_backend("cpu"):
            assert qk.get_backend() == "cpu"
        assert qk.get_backend() == "auto"
    assert qk.get_backend() == "reference"
    with pytest.raises(RuntimeError), qk.use_backend("triton"):
        raise RuntimeError("boom")
    assert qk.get_backend() == "reference"


def test_ops_run_what_the_table_holds(monkeypatch):
    calls = []

    def spy(a, w):
        calls.append((a.shape, w.shape))
        return torch.zeros(a.shape[0], w.shape[0], dtype=torch.int32)

    dispatch._load("reference")
    monkeypatch.setitem(dispatch.REGISTRY["int8_mm_i32"], "reference", spy)
    a, w = int8_inputs(3, 4, 5)
    with qk.use_backend("reference"):
        qk.int8_mm_i32(a, w)
    assert calls == [((3, 5), (4, 5))]


def test_register_rejects_unknown_ops_and_backends():
    with pytest.raises(QFrameError, match="unknown kernel op 'fp8_mm'"):
        dispatch.register("fp8_mm", "reference", lambda: None)
    with pytest.raises(QFrameError, match="unknown kernel backend 'auto'"):
        dispatch.register("int8_mm", "auto", lambda: None)


def test_table_gives_a_reason_for_every_backend():
    table = dispatch.table("cpu")
    assert set(table) == {"triton", "cuda", "cpu", "reference"}
    assert table["reference"][0] is True
    assert all(isinstance(ok, bool) and reason for ok, reason in table.values())


def test_import_is_lazy_and_quick():
    code = textwrap.dedent(
        """
        import json, sys, time, torch
        start = time.perf_counter()
        import qframe.kernels
        took = time.perf_counter() - start
        lazy = ("triton", "qframe.kernels.triton", "qframe.kernels.cpu", "qframe.kernels.cuda")
        print(json.dumps({"took": took, "cuda_initialised": torch.cuda.is_initialized(),
                          "imported": [m for m in lazy if m in sys.modules],
                          "registered": hasattr(torch.ops.qframe, "w4a16_mm")}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported"] == [] and not report["cuda_initialised"] and report["registered"], report
    assert report["took"] < 1.0, f"import qframe.kernels took {report['took']:.2f} s after torch"
