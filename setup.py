"""Native extensions of qframe, built against the torch that is already installed.

    pip install --no-build-isolation -e .

builds ``qframe._C`` (CPU kernels: int8 and packed int4 x int8 with AVX-512 VNNI, packed int4 x
bf16/fp16/fp32 with AVX-512 BF16, chosen at run time, portable C++ elsewhere) and, where torch has CUDA (or ``QFRAME_BUILD_CUDA=1``),
``qframe._C_cuda``. Both are optional: without a compiler or the CUDA toolkit the install still
succeeds, qframe runs its reference kernels, and ``qframe.kernels.cpu.available()`` says why.
Without torch at build time (pip's default build isolation) nothing compiles here and the CPU
kernels build on first use instead (qframe/kernels/cpu/build.py, from the sources shipped in the
package). Project metadata lives in pyproject.toml; see docs/building.md for options.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_namespace_packages, setup

log = logging.getLogger("qframe.setup")
ROOT = os.path.dirname(os.path.abspath(__file__))
ISOLATED_BUILD = (
    "qframe: torch is not importable in this build environment (pip's default build isolation), so no "
    "kernels are compiled now: the CPU kernels build on first use, once (~30 s, needs a C++ compiler), "
    "into ~/.cache/qframe. To build them now instead: install torch, then `pip install --no-build-isolation -e .`"
)


def _sources(folder: str, patterns: tuple[str, ...]) -> list[str]:
    # paths relative to the project root: setuptools rejects absolute source paths
    found = []
    for pattern in patterns:
        found += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", folder, pattern))]
    return sorted(found)


def _has_headers(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _nvcc_toolkit() -> str | None:
    """The toolkit that the nvcc on PATH belongs to, where torch's guess would miss it.

    torch takes CUDA_HOME, CUDA_PATH, then the folder above the nvcc on PATH. A wrapper script or
    link such as /usr/local/bin/nvcc makes that /usr/local, which has no CUDA headers, and the build
    fails on cuda_runtime.h; nvcc's own dry run names the folder it runs from.
    """
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return None
    if _has_headers(os.path.dirname(os.path.dirname(nvcc))):
        return None  # torch's own guess is right
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        candidates += [os.path.normpath(top)
                       for top in re.findall(r"^#\$ TOP=(.+?)\s*$", dry.stderr + dry.stdout, re.M)]
    except (OSError, subprocess.SubprocessError):
        pass
    return next((home for home in candidates if _has_headers(home)), None)


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", out)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def _want_cuda(torch, cuda_home) -> bool:
    flag = os.environ.get("QFRAME_BUILD_CUDA", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    if not torch.version.cuda or cuda_home is None:
        return False
    toolkit = _nvcc_version(cuda_home)
    if toolkit is not None and toolkit.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch refuses to build any extension then, the CPU one included
        log.warning("qframe: not building the CUDA kernels: the CUDA toolkit at %s is %s, torch %s was built "
                    "with CUDA %s; point CUDA_HOME at a %s.x toolkit to build them (Triton kernels still work)",
                    cuda_home, toolkit, torch.__version__, torch.version.cuda, torch.version.cuda.split(".")[0])
        return False
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # torch reads the architecture off the GPU and fails with an IndexError where there is none
        log.warning("qframe: not building the CUDA kernels: no GPU to read the architecture from; set "
                    "TORCH_CUDA_ARCH_LIST, e.g. 8.7 for a Jetson Orin or 9.0 for an H100 / H200")
        return False
    return True


def _extensions():
    """The extension modules and the build command, or nothing where torch is missing."""
    if os.environ.get("QFRAME_NO_EXTENSIONS", "").strip() in ("1", "true", "yes", "on"):
        return [], {}
    try:
        import torch

        if torch.version.cuda and (toolkit := _nvcc_toolkit()):
            os.environ["CUDA_HOME"] = toolkit  # read when torch.utils.cpp_extension is imported
            log.warning("qframe: using the CUDA toolkit at %s (the nvcc on PATH runs from there)", toolkit)
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        log.warning(ISOLATED_BUILD)
        return [], {}

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts = [CppExtension(
        "qframe._C",
        _sources("cpu", ("*.cpp",)),
        extra_compile_args={"cxx": ["-O3", "-g0", *openmp]},
        extra_link_args=openmp,
        optional=True,
    )]
    if _want_cuda(torch, CUDA_HOME):
        exts.append(CUDAExtension(
            "qframe._C_cuda",
            _sources("cuda", ("*.cpp", "*.cu")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            optional=True,
        ))

    class OptionalBuildExtension(BuildExtension):
        """Builds what it can: a failed extension logs a warning instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, toolkit mismatch, compile error
                if not getattr(ext, "optional", False):
                    raise
                log.warning("qframe: skipping optional extension %s: %s", ext.name, exc)
                self.warn(f"qframe: skipping optional extension {ext.name}: {exc}")

    return exts, {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


def _packages() -> dict:
    """qframe's packages, with two top-level folders shipped inside the package.

    * conf/ (Hydra's config tree, at the project root where users look for it) as ``qframe.conf``:
      ``python -m qframe`` and ``compose(config_module="qframe.conf")`` work from an installed wheel.
    * csrc/cpu/ (the CPU kernels' C++ sources) as ``qframe/kernels/cpu/csrc``: an install without
      the compiled ``qframe._C`` (an isolated build, a wheel built elsewhere) builds it on first use.
    """
    # namespace packages too: qframe.quant has no __init__.py
    code = find_namespace_packages(include=["qframe", "qframe.*"], exclude=["*__pycache__*"])
    groups = find_namespace_packages("conf", exclude=["*__pycache__*"])  # model/, quant/, ...
    conf = ["qframe.conf"] + [f"qframe.conf.{group}" for group in groups]
    return {
        "packages": code + conf + ["qframe.kernels.cpu.csrc"],
        "package_dir": {"qframe.conf": "conf", "qframe.kernels.cpu.csrc": "csrc/cpu"},
        "package_data": {**{name: ["*.yaml"] for name in conf}, "qframe.kernels.cpu.csrc": ["*.cpp", "*.h"]},
    }


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **_packages())
