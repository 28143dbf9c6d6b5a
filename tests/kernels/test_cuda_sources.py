"""The CUDA kernel sources compile on their own with nvcc, for sm_87 (Jetson AGX Orin) and sm_90 (H100).

No GPU and no CUDA torch needed: the .cu files include only the launcher and helper headers, never
torch. Where nvcc is absent the compile tests skip and say so (.ci/check_cuda.sh is the same check
as a script).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = ("87", "90")
TORCH_HEADERS = re.compile(r"^(torch|ATen|c10|pybind11)/|^Python\.h$")


def find_nvcc():
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), *(os.path.join(h, "bin", "nvcc") for h in homes if h)):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


NVCC = find_nvcc()


def test_the_kernel_sources_are_there():
    assert {p.name for p in SOURCES} >= {"int8_mm.cu", "w4a8_mm.cu", "w4a16_gemv.cu"}


@pytest.mark.parametrize("src", SOURCES + [CUDA_DIR / "launchers.h", CUDA_DIR / "common.cuh"], ids=lambda p: p.name)
def test_no_torch_header_in_kernel_sources(src):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', src.read_text(), flags=re.M)
    assert includes, f"{src.name} includes nothing?"
    bad = [h for h in includes if TORCH_HEADERS.search(h)]
    assert not bad, f"{src.name} includes {bad}: kernel sources must build with plain nvcc (torch goes in bindings.cpp)"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH, CUDA_HOME or NVCC): "
                                         "the CUDA sources are not compile-checked here")
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_compiles_with_nvcc_for_orin_and_h100(src, tmp_path):
    obj = tmp_path / f"{src.stem}.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", "-std=c++17", "-O3", "-Werror", "all-warnings", *gencode, "-o", str(obj), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    assert obj.stat().st_size > 0


def test_cuda_backend_says_why_it_cannot_run():
    """The loader of the CUDA extension imports anywhere; without the extension or a GPU it says why."""
    import torch

    from qframe.errors import QFrameError
    from qframe.kernels import cuda, dispatch

    ok, reason = cuda.available()
    if ok:
        pytest.skip("the CUDA extension is built and a GPU is present")
    assert reason and "\n" not in reason
    ok, reason = dispatch.available("cuda", "cuda")
    assert not ok and reason
    if cuda._load()[0] is None:
        assert "not built" in reason
        with pytest.raises(QFrameError, match="CUDA backend unavailable"):
            cuda.int8_mm_i32(torch.zeros(2, 4, dtype=torch.int8), torch.zeros(3, 4, dtype=torch.int8))
