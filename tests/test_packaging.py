"""What a built wheel holds and that it runs outside the checkout.

The wheel is built from a copy of the project's files (nothing is written into the checkout) with
``QFRAME_NO_EXTENSIONS=1``, so no C++ compiles and the build takes seconds.
"""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md", "qframe", "conf", "csrc")


def _copy_project(dest: Path) -> Path:
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _copy_project(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "QFRAME_NO_EXTENSIONS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = out.glob("qframe-*.whl")
    return found


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(dest)
    return dest


# Python as an install of the wheel alone sees it: the unpacked wheel first on sys.path, and the
# editable install's finder (which would fill in any module the wheel lacks from the checkout) gone.
WHEEL_ONLY = ("import runpy, sys; "
              "sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith('__editable__')]; ")


def _run_outside(unpacked: Path, cwd: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    return subprocess.run([sys.executable, "-c", WHEEL_ONLY + code, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def _run_qframe(unpacked: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m qframe ARGS`` from the unpacked wheel."""
    return _run_outside(unpacked, cwd, "runpy.run_module('qframe', run_name='__main__', alter_sys=True)", *args)


@pytest.mark.slow
def test_wheel_ships_the_config_tree_and_the_cpu_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"qframe/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    sources = {f"qframe/kernels/cpu/csrc/{p.name}" for p in (ROOT / "csrc" / "cpu").iterdir()
               if p.suffix in (".cpp", ".h")}
    assert "qframe/conf/experiment/smoke.yaml" in configs and "qframe/kernels/cpu/csrc/ops.cpp" in sources
    assert configs <= names, sorted(configs - names)
    assert sources <= names, sorted(sources - names)
    assert "qframe/conf/__init__.py" in names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "qframe").rglob("*.py")}
    assert "qframe/quant/spec.py" in modules and modules <= names, sorted(modules - names)
    assert not any(n.startswith(("conf/", "csrc/")) for n in names), "top-level folders leaked into the wheel"


@pytest.mark.slow
def test_installed_wheel_finds_its_own_cpu_sources(unpacked, tmp_path):
    code = "from qframe.kernels.cpu import build; print(build.source_dir())"
    proc = _run_outside(unpacked, tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == unpacked / "qframe" / "kernels" / "cpu" / "csrc", proc.stdout


@pytest.mark.slow
def test_installed_wheel_composes_the_smoke_experiment_outside_the_checkout(unpacked, tmp_path):
    code = "import qframe, qframe.conf, qframe.quant.spec as q; print(qframe.__file__, qframe.conf.__file__, q.__file__)"
    proc = _run_outside(unpacked, tmp_path, code)
    assert proc.returncode == 0, proc.stderr
    assert all(Path(p).is_relative_to(unpacked) for p in proc.stdout.split()), proc.stdout
    proc = _run_qframe(unpacked, tmp_path, "+experiment=smoke", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "name: compact_cnn" in proc.stdout and "epochs: 1" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_installed_wheel_rejects_an_unknown_experiment_in_one_line(unpacked, tmp_path):
    proc = _run_qframe(unpacked, tmp_path, "+experiment=no_such_experiment")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "smoke" in proc.stderr, proc.stderr


def test_install_constraints_keep_what_the_installed_torch_requires_and_lock_the_rest(tmp_path):
    """The set-up's constraints: a CUDA torch's own pins (triton, setuptools) must win over the lock's."""
    import importlib.metadata as metadata
    import re

    required = {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in metadata.requires("torch") or []}
    assert "sympy" in required  # every torch since 2.0 requires it; the lock below pins it elsewhere
    lock = tmp_path / "lock.txt"
    lock.write_text("# a lock\ntorch==0.1\nsympy==0.0.1\nnot-a-torch-dependency==1.2.3\n")
    out = tmp_path / "constraints.txt"
    proc = subprocess.run([sys.executable, str(ROOT / "requirements" / "constraints.py"), str(lock), str(out)],
                          capture_output=True, text=True, check=True)
    lines = out.read_text().splitlines()
    assert lines[0] == f"torch=={metadata.version('torch')}"
    assert f"sympy=={metadata.version('sympy')}" in lines and "sympy==0.0.1" not in lines
    assert "not-a-torch-dependency==1.2.3" in lines and "torch==0.1" not in lines
    assert f"keeping sympy {metadata.version('sympy')}" in proc.stdout and "sympy==0.0.1" in proc.stdout
    # without a lock (make test-latest) only torch is pinned: pip moves the rest within torch's own requirements
    subprocess.run([sys.executable, str(ROOT / "requirements" / "constraints.py"), "-", str(out)], check=True)
    assert out.read_text().splitlines() == [f"torch=={metadata.version('torch')}"]


def _setup_functions() -> dict:
    """setup.py's helper functions, without running setup()."""
    source = (ROOT / "setup.py").read_text()
    namespace = {"__file__": str(ROOT / "setup.py"), "__name__": "qframe_setup"}
    exec(compile(source.split("\next_modules, cmdclass =")[0], "setup.py", "exec"), namespace)
    return namespace


def _fake_toolkit(home: Path, release: str, headers: bool) -> Path:
    """A folder with a bin/nvcc that reports ``release`` (and include/cuda_runtime.h if ``headers``)."""
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n"
                    f"echo '#$ TOP={home}/bin/..' >&2\n")
    nvcc.chmod(0o755)
    if headers:
        (home / "include").mkdir()
        (home / "include" / "cuda_runtime.h").write_text("")
    return home


class _FakeTorch:
    __version__ = "2.4.1+cu121"

    class version:
        cuda = "12.1"

    class cuda:
        @staticmethod
        def is_available():
            return False


def test_setup_skips_the_cuda_kernels_where_the_toolkit_and_torch_disagree(tmp_path, monkeypatch, caplog):
    """torch refuses to build any extension, the CPU one too, when the toolkit's major version differs."""
    want_cuda = _setup_functions()["_want_cuda"]
    monkeypatch.delenv("QFRAME_BUILD_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    toolkit_13 = _fake_toolkit(tmp_path / "cuda-13", "13.0", headers=True)
    toolkit_12 = _fake_toolkit(tmp_path / "cuda-12", "12.6", headers=True)
    with caplog.at_level("WARNING", logger="qframe.setup"):
        assert not want_cuda(_FakeTorch, str(toolkit_13))
    assert "13.0" in caplog.text and "CUDA 12.1" in caplog.text and "CUDA_HOME" in caplog.text
    assert want_cuda(_FakeTorch, str(toolkit_12))  # same major version: build
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")  # no GPU to read the architecture from
    with caplog.at_level("WARNING", logger="qframe.setup"):
        assert not want_cuda(_FakeTorch, str(toolkit_12))
    assert "TORCH_CUDA_ARCH_LIST" in caplog.text


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper_script(tmp_path, monkeypatch):
    """A wrapper at <prefix>/bin/nvcc makes torch guess <prefix>, which has no CUDA headers."""
    nvcc_toolkit = _setup_functions()["_nvcc_toolkit"]
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0", "13.0", headers=True)
    wrapper = tmp_path / "prefix" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    assert nvcc_toolkit() == str(toolkit)
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert nvcc_toolkit() is None  # nvcc in the toolkit itself: torch's own guess is right
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "elsewhere"))
    assert nvcc_toolkit() is None  # the user's choice stands
