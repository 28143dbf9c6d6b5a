"""The Arm dot-product int8 kernel, cross-compiled for aarch64 and, where qemu-user is installed, run.

Skips with the reason where no aarch64 cross compiler is installed (Debian: g++-aarch64-linux-gnu;
qemu-user for the run). The check program (tests/kernels/csrc/arm_int8_check.cpp) compares the
dot-product tiles with the portable ones bit for bit and with an int64 sum, on random inputs.
"""

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc" / "cpu"
CHECK = Path(__file__).resolve().parent / "csrc" / "arm_int8_check.cpp"
CXX = os.environ.get("QFRAME_AARCH64_CXX", "aarch64-linux-gnu-g++")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None,
                                reason=f"no aarch64 cross compiler ({CXX}; Debian: apt-get install g++-aarch64-linux-gnu)")


def build(tmp_path: Path, flags=()) -> Path:
    exe = tmp_path / "arm_int8_check"
    cmd = [CXX, "-std=c++17", "-O2", "-static", *flags, f"-I{CSRC}", str(CHECK), str(CSRC / "int8_arm.cpp"),
           str(CSRC / "kernels_portable.cpp"), "-o", str(exe)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return exe


def test_arm_dotprod_kernel_compiles_for_aarch64_with_sdot(tmp_path):
    # no -march flag: the kernel's target attribute alone must enable the dot-product instructions
    exe = build(tmp_path)
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump:
        text = subprocess.run([objdump, "-d", str(exe)], capture_output=True, text=True, timeout=120).stdout
        assert "sdot" in text, "the dot-product kernel compiled without SDOT instructions"


@pytest.mark.skipif(QEMU is None, reason="qemu-user (qemu-aarch64) not installed; compile-only check above")
def test_arm_dotprod_kernel_matches_portable_bit_exactly_under_qemu(tmp_path):
    exe = build(tmp_path)
    seed = random.randrange(1 << 30)
    out = subprocess.run([QEMU, "-cpu", "max", str(exe), str(seed)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"seed {seed}:\n{out.stdout}{out.stderr}"
    assert "has_arm_dotprod 1" in out.stdout  # the emulated CPU reports the extension, as a Jetson's does
    assert out.stdout.count(": ok") == 12
