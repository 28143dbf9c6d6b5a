"""The Triton kernels against the reference: under triton's interpreter on CPU, and on CUDA where present.

``TRITON_INTERPRET`` is read when a kernel is decorated, so the interpreter cases run in one child
process started with ``TRITON_INTERPRET=1`` (this file run as a script); each case is then its own
test here. The environment of this process is never changed, so other test files (and the CUDA
cases below, which need compiled kernels) see triton as it normally is.
"""

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

ROOT = Path(__file__).resolve().parents[2]
SEED = int.from_bytes(os.urandom(4), "little")
GEN = torch.Generator().manual_seed(SEED)

SMALL = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}  # several tiles and K steps per case


def case(op, m, n, k, group_size=0, dtype="float32", bias=True, config=None, via="launcher"):
    """One kernel run: ``via`` 'launcher' calls the Triton function; 'op' goes through torch.ops and dispatch."""
    parts = [op, f"{m}x{n}x{k}", f"g{group_size}", dtype, "bias" if bias else "nobias", via]
    if config:
        parts.append("k{BLOCK_K}m{BLOCK_M}n{BLOCK_N}".format(**config))
    return {"id": "-".join(parts), "op": op, "m": m, "n": n, "k": k, "group_size": group_size, "dtype": dtype,
            "bias": bias, "config": config, "via": via}  # fmt: skip


CASES = [
    case("int8_mm_i32", 1, 7, 33, bias=False),
    case("int8_mm_i32", 3, 37, 100, bias=False),
    case("int8_mm_i32", 20, 70, 130, bias=False, config=SMALL),
    case("int8_mm", 1, 7, 33),
    case("int8_mm", 3, 37, 100, bias=False),
    case("int8_mm", 20, 70, 130, config=SMALL),
    case("int8_mm", 3, 37, 100, via="op"),
    # per-channel, aligned groups, a ragged last group (100 = 3 x 32 + 4), odd K, two blocks per
    # group (BLOCK_K 32 < 64), and groups that do not line up with BLOCK_K (per-element scales)
    case("w4a8_mm", 1, 7, 33, 0),
    case("w4a8_mm", 3, 37, 100, 32),
    case("w4a8_mm", 3, 16, 257, 64, bias=False),
    case("w4a8_mm", 20, 70, 130, 64, config=SMALL),
    case("w4a8_mm", 5, 40, 100, 24),
    case("w4a8_mm", 5, 40, 100, 48),
    case("w4a8_mm", 5, 40, 100, 32, config={**SMALL, "BLOCK_K": 64}),
    case("w4a8_mm", 3, 37, 100, 32, via="op"),
    case("w4a16_mm", 1, 7, 33, 0, "float32"),
    case("w4a16_mm", 3, 37, 100, 32, "bfloat16"),
    case("w4a16_mm", 3, 37, 100, 32, "float16", bias=False),
    case("w4a16_mm", 3, 16, 257, 64, "float32"),
    case("w4a16_mm", 20, 70, 130, 0, "bfloat16", config=SMALL),
    case("w4a16_mm", 20, 70, 130, 64, "float16", config=SMALL),
    case("w4a16_mm", 5, 40, 100, 24, "bfloat16"),
    case("w4a16_mm", 5, 40, 100, 32, "float32", config={**SMALL, "BLOCK_K": 64}),
    case("w4a16_mm", 3, 37, 100, 32, "bfloat16", via="op"),
]

# Realistic sizes for a GPU (autotuned, no fixed config): decode-sized and prefill-sized M.
GPU_CASES = [
    case("int8_mm_i32", 1, 4096, 4096, bias=False),
    case("int8_mm", 512, 1024, 4096),
    case("w4a8_mm", 1, 4096, 4096, 128),
    case("w4a8_mm", 256, 1024, 4096, 0),
    case("w4a8_mm", 64, 1000, 1000, 96),
    case("w4a16_mm", 1, 4096, 4096, 128, "bfloat16"),
    case("w4a16_mm", 256, 1024, 4096, 64, "float16"),
    case("w4a16_mm", 33, 1000, 1000, 100, "bfloat16"),
]


def run_case(spec: dict, device: str) -> dict:
    """Run one case on ``device`` and compare with the reference; never raises."""
    try:
        return _check(spec, device)
    except Exception:
        return {"ok": False, "detail": f"seed {SEED}: {traceback.format_exc(limit=6)}"}


def _check(spec: dict, device: str) -> dict:
    import qframe.kernels as qk
    from qframe.kernels import reference

    op, m, n, k, gs = spec["op"], spec["m"], spec["n"], spec["k"], spec["group_size"]
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=GEN)
    a_scale = torch.rand(m, generator=GEN) * 0.05 + 0.001
    bias = torch.randn(n, generator=GEN) if spec["bias"] else None
    if op.startswith("int8"):
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=GEN)
        w_scale = torch.rand(n, generator=GEN) * 0.05 + 0.001
    else:
        w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=GEN)
        w_scale = torch.rand((n, math.ceil(k / gs)) if gs else (n,), generator=GEN) * 0.05 + 0.001
        w = qk.pack_int4(w)
    x = torch.randn(m, k, generator=GEN).to(getattr(torch, spec["dtype"]))
    inputs = {
        "int8_mm_i32": (a, w),
        "int8_mm": (a, a_scale, w, w_scale, bias),
        "w4a8_mm": (a, a_scale, w, w_scale, gs, bias),
        "w4a16_mm": (x, w, w_scale, gs, bias),
    }[op]
    if op == "w4a16_mm":  # the exact product, rounded to the output dtype like the kernel's own result
        expected = reference.w4a16_mm(x.double(), w, w_scale, gs, bias).to(x.dtype)
    elif op == "int8_mm_i32":
        expected = (a.long() @ w.long().T).int()
    else:
        expected = getattr(reference, op)(*inputs)

    on_device = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    if spec["via"] == "op":
        with qk.use_backend("triton"):
            out = getattr(qk, op)(*on_device)
    else:
        launcher = getattr(importlib.import_module(f"qframe.kernels.triton.{op.replace('_i32', '')}"), op)
        out = launcher(*on_device, config=spec["config"])
    out = out.cpu()
    if out.dtype != expected.dtype or out.shape != expected.shape:
        got, want = f"{out.dtype} {tuple(out.shape)}", f"{expected.dtype} {tuple(expected.shape)}"
        return {"ok": False, "detail": f"got {got}, expected {want}"}
    if op == "int8_mm_i32":
        wrong = int((out != expected).sum())
        return {"ok": wrong == 0, "detail": f"{wrong} of {out.numel()} int32 values differ (seed {SEED})"}
    err = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
    return {"ok": err < 1e-3, "detail": f"relative error {err:.2e} (limit 1e-3, seed {SEED})"}


def interpreter_unusable() -> str | None:
    """Why triton's interpreter cannot run kernels here, or None where it can (the child runs this).

    A kernel that has nothing of qframe's, a strided sum with a loop over a scalar argument, is run
    first. Seen failing: triton before 3.7 with numpy 2.4 ('only 0-dimensional arrays can be
    converted' on the loop bound; torch 2.11's CUDA build pins triton 3.6), and triton 3.0 (torch
    2.4's) with numpy 2.3 (wrong numbers, nothing raised). triton 3.0 with numpy 1.26 and triton 3.6
    with numpy 2.3 run all the cases below. Compiled kernels are not affected either way.
    """
    import numpy
    import triton

    @triton.jit
    def column_sums(x, out, n, BLOCK: tl.constexpr):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            acc += tl.load(x + i, mask=i < n, other=0.0)
        tl.store(out + tl.arange(0, BLOCK), acc)

    x, out = torch.randn(70, generator=GEN), torch.zeros(16)
    expected = torch.nn.functional.pad(x, (0, 10)).view(-1, 16).sum(0)
    versions = f"triton {triton.__version__}'s interpreter with numpy {numpy.__version__}"
    try:
        column_sums[(1,)](x, out, 70, BLOCK=16)
    except Exception as exc:
        return f"{versions} fails on a plain kernel: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    if not torch.allclose(out, expected, atol=1e-5):
        return f"{versions} gives wrong results on a plain kernel"
    return None


@pytest.fixture(scope="module")
def interpreter_results():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"interpreter run failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    if "unusable" in results:
        pytest.skip(results["unusable"] + " (the compiled kernels are not affected)")
    return results


@pytest.mark.parametrize("spec", CASES, ids=[c["id"] for c in CASES])
def test_interpreter(spec, interpreter_results):
    result = interpreter_results[spec["id"]]
    assert result["ok"], result["detail"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("spec", CASES + GPU_CASES, ids=[c["id"] for c in CASES + GPU_CASES])
def test_cuda(spec):
    result = run_case(spec, "cuda")
    assert result["ok"], result["detail"]


if __name__ == "__main__":
    # The child process of interpreter_results: run every case on CPU tensors, one JSON line out.
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (pytest does this for you)")
    import triton.language as tl  # a module global: triton 3.0 looks for it there from a jit'd function

    reason = interpreter_unusable()
    print(json.dumps({"unusable": reason} if reason else {spec["id"]: run_case(spec, "cpu") for spec in CASES}))
