"""The CPU kernels built on first use when the prebuilt ``qframe._C`` is missing.

The decision logic runs with the compiler stubbed (fast); one slow test builds the real library
into a temporary cache in a child process and a second child process reuses it.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from qframe.errors import QFrameError
from qframe.kernels import cpu, dispatch
from qframe.kernels.cpu import build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QFRAME_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QFRAME_JIT_BUILD", raising=False)
    monkeypatch.setattr(build, "missing_tool", lambda: None)
    return tmp_path / "cache"


@pytest.fixture
def compiler(monkeypatch):
    """A stub compiler that writes the library file and records its calls; ``fail`` makes it raise."""

    class Stub:
        calls: list = []
        loads: list = []
        fail = ""

        def compile(self, sources, folder):
            self.calls.append((sources, folder))
            if self.fail:
                raise RuntimeError(self.fail)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{build.NAME}.so").write_bytes(b"library")
            return folder / f"{build.NAME}.so"

    stub = Stub()
    stub.calls, stub.loads = [], []
    monkeypatch.setattr(build, "compile_library", stub.compile)
    monkeypatch.setattr(build, "load_library", stub.loads.append)
    return stub


def _records(caplog, level):
    return [r for r in caplog.records if r.name == build.__name__ and r.levelno == level]


def test_checkout_sources_are_found():
    folder = build.source_dir()
    assert folder is not None and (folder / "ops.cpp").is_file() and (folder / "kernels.h").is_file()


def test_first_use_builds_once_into_a_keyed_folder_and_later_uses_load_it(cache, compiler, caplog):
    caplog.set_level(logging.DEBUG)
    assert build.load_or_build() == ""
    folder = cache / f"cpu-{build.build_key(build.source_dir())}"
    assert compiler.calls == [(build.source_dir(), folder)]
    (info,) = _records(caplog, logging.INFO)
    assert "building the CPU kernels" in info.getMessage() and str(folder) in info.getMessage()
    assert not _records(caplog, logging.WARNING)

    caplog.clear()
    assert build.load_or_build() == ""  # as a second process would: load, do not compile
    assert len(compiler.calls) == 1 and compiler.loads == [folder / f"{build.NAME}.so"]
    assert not _records(caplog, logging.INFO)


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_opt_out_builds_nothing_and_says_so(cache, compiler, monkeypatch, caplog, value):
    monkeypatch.setenv("QFRAME_JIT_BUILD", value)
    reason = build.load_or_build()
    assert "QFRAME_JIT_BUILD=0" in reason
    assert compiler.calls == [] and compiler.loads == [] and not cache.exists()
    assert not _records(caplog, logging.WARNING)


def test_no_compiler_is_one_warning_saying_what_runs_instead(tmp_path, compiler, monkeypatch, caplog):
    monkeypatch.setenv("QFRAME_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QFRAME_JIT_BUILD", raising=False)
    monkeypatch.setenv("CXX", "qframe-no-such-compiler")
    reason = build.load_or_build()
    assert "no C++ compiler ('qframe-no-such-compiler')" in reason and compiler.calls == []
    (warning,) = _records(caplog, logging.WARNING)
    assert "\n" not in warning.getMessage() and "reference kernels instead" in warning.getMessage()


def test_missing_ninja_is_named(tmp_path, compiler, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setenv("QFRAME_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("QFRAME_JIT_BUILD", raising=False)
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    if build.missing_tool() is not None and "compiler" in build.missing_tool():
        pytest.skip("no C++ compiler here, which is reported before ninja")
    assert "ninja" in build.load_or_build() and compiler.calls == []


def test_missing_sources_are_named(cache, compiler, monkeypatch, caplog):
    monkeypatch.setattr(build, "source_dir", lambda: None)
    assert "sources are not installed" in build.load_or_build()
    assert compiler.calls == [] and len(_records(caplog, logging.WARNING)) == 1


def test_failed_build_is_one_line_and_not_retried_until_its_folder_goes(cache, compiler, caplog):
    compiler.fail = ("Error building extension 'qframe_cpu_kernels': [1/7] c++ -O3 -c ops.cpp\n"
                     "ops.cpp:1:1: error: expected unqualified-id\nninja: build stopped: subcommand failed.")
    reason = build.load_or_build()
    assert "ops.cpp:1:1: error: expected unqualified-id" in reason and "\n" not in reason
    (warning,) = _records(caplog, logging.WARNING)
    assert "reference kernels instead" in warning.getMessage()
    folder = compiler.calls[0][1]
    assert "[1/7] c++ -O3 -c ops.cpp" in (folder / "failed.txt").read_text()

    assert "earlier build" in build.load_or_build() and len(compiler.calls) == 1
    shutil.rmtree(folder)
    compiler.fail = ""
    assert build.load_or_build() == "" and len(compiler.calls) == 2


def test_a_failure_without_a_compiler_error_line_reports_its_first_line(cache, compiler):
    compiler.fail = "Permission denied: the cache folder\nmore"
    assert "(RuntimeError: Permission denied: the cache folder; log:" in build.load_or_build()


def test_an_unloadable_cached_library_is_rebuilt(cache, compiler, monkeypatch):
    folder = cache / f"cpu-{build.build_key(build.source_dir())}"
    folder.mkdir(parents=True)
    (folder / f"{build.NAME}.so").write_bytes(b"not a shared library")
    monkeypatch.setattr(build, "load_library", lambda path: torch.ops.load_library(str(path)))
    assert build.load_or_build() == "" and compiler.calls == [(build.source_dir(), folder)]


@contextlib.contextmanager
def _build_in_progress(folder):
    """torch's build lock as the running torch takes it: the file's existence (FileBaton, torch <= 2.13), or an OS
    lock held on it (filelock, torch 2.14)."""
    from torch.utils import cpp_extension

    lock = folder / "lock"
    lock.touch()
    if hasattr(cpp_extension, "FileBaton"):
        yield
        return
    fcntl = pytest.importorskip("fcntl")
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def test_a_library_being_built_by_another_process_is_not_loaded_early(cache, compiler):
    folder = cache / f"cpu-{build.build_key(build.source_dir())}"
    folder.mkdir(parents=True)
    (folder / f"{build.NAME}.so").write_bytes(b"half written")
    with _build_in_progress(folder):  # compile_library waits for it
        assert build.load_or_build() == "" and compiler.loads == [] and len(compiler.calls) == 1


def test_a_stale_build_lock_is_removed_a_fresh_one_kept(cache, compiler):
    folder = cache / f"cpu-{build.build_key(build.source_dir())}"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    build.load_or_build()
    assert lock.exists(), "a build in progress keeps its lock"
    shutil.rmtree(folder)
    folder.mkdir()
    lock.touch()
    old = time.time() - build.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert build.load_or_build() == "" and not lock.exists() and len(compiler.calls) == 2


def test_build_key_follows_sources_and_torch(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(build.source_dir(), a)
    shutil.copytree(build.source_dir(), b)
    assert build.build_key(a) == build.build_key(b) == build.build_key(build.source_dir())
    (b / "kernels.h").write_text((b / "kernels.h").read_text() + "\n// changed\n")
    assert build.build_key(b) != build.build_key(a)
    key = build.build_key(a)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert build.build_key(a) != key


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("QFRAME_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "qframe"
    monkeypatch.setenv("QFRAME_CACHE_DIR", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"


def test_backend_without_the_extension_reports_the_reason_and_dispatch_falls_back(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "qframe._C", None)  # the prebuilt extension is missing
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(build, "load_or_build", lambda: calls.append(1) or "no compiler here")
    assert cpu.available() == (False, "no compiler here")
    assert dispatch.available("cpu", "cpu") == (False, "no compiler here")
    assert dispatch.auto_backend("w4a8_mm", "cpu", 4, 8, 16) == "reference"
    with pytest.raises(QFrameError, match="no compiler here"):
        cpu.w4a8_mm(torch.zeros(1, 2, dtype=torch.int8), torch.ones(1), torch.zeros(1, 1, dtype=torch.uint8),
                    torch.ones(1), 0)
    assert calls == [1], "the build is attempted once per process, not per call"


def test_importing_qframe_builds_and_loads_nothing(tmp_path):
    code = textwrap.dedent(
        """
        import sys
        sys.modules["qframe._C"] = None
        import qframe, qframe.kernels
        print(sorted(m for m in ("qframe.kernels.cpu", "qframe.kernels.cpu.build", "torch.utils.cpp_extension")
                     if m in sys.modules))
        """
    )
    env = {**os.environ, "QFRAME_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]" and not any(tmp_path.iterdir())


# --- the real build, in child processes (the test process already holds qframe._C) -------------

CHILD = textwrap.dedent(
    """
    import json, logging, sys, time
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.modules["qframe._C"] = None  # an install without the prebuilt extension
    import torch
    from qframe.kernels import dispatch, int8_mm, quantize_rows, quantize_weight_int4, quantize_weight_int8, reference, w4a8_mm

    start = time.perf_counter()
    ok, reason = dispatch.table("cpu")["cpu"]
    took = time.perf_counter() - start
    x, w, bias = torch.randn(9, 320), torch.randn(24, 320), torch.randn(24)
    a, a_scale = quantize_rows(x)
    w8, s8 = quantize_weight_int8(w)
    w4, s4 = quantize_weight_int4(w, group_size=64)
    def err(out, ref):
        return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(json.dumps({
        "ok": ok, "reason": reason, "took": took,
        "backends": [dispatch.resolve(op, "cpu", 9, 24, 320)[0] for op in ("int8_mm", "w4a8_mm")],
        "int8_err": err(int8_mm(a, a_scale, w8, s8, bias), reference.int8_mm(a, a_scale, w8, s8, bias)),
        "w4a8_err": err(w4a8_mm(a, a_scale, w4, s4, 64, bias), reference.w4a8_mm(a, a_scale, w4, s4, 64, bias)),
    }))
    """
)


def _child(cache_dir):
    env = {**os.environ, "QFRAME_CACHE_DIR": str(cache_dir)}
    env.pop("QFRAME_JIT_BUILD", None)
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_first_use_builds_the_real_kernels_and_a_second_process_reuses_them(tmp_path):
    if build.missing_tool() is not None:
        pytest.skip(f"cannot build here: {build.missing_tool()}")
    first, log_first = _child(tmp_path)
    assert first["ok"], first["reason"]
    assert first["backends"] == ["cpu", "cpu"] and "qframe CPU extension" in first["reason"]
    assert first["int8_err"] < 1e-6 and first["w4a8_err"] < 1e-5, first
    assert log_first.count("building the CPU kernels") == 1, log_first
    (library,) = tmp_path.glob(f"cpu-*/{build.NAME}.so")
    built = library.stat().st_mtime_ns

    second, log_second = _child(tmp_path)
    assert second["ok"] and second["backends"] == ["cpu", "cpu"], second
    assert second["int8_err"] < 1e-6 and second["w4a8_err"] < 1e-5, second
    assert "building" not in log_second and library.stat().st_mtime_ns == built, log_second
    print(f"first use (build) {first['took']:.1f} s, second process {second['took']:.2f} s")


def test_a_lock_file_means_a_build_only_where_torch_locks_by_existence_or_the_lock_is_held(tmp_path, monkeypatch):
    """torch 2.14 builds under an OS lock (filelock) and leaves the lock file behind: taking the file alone for
    a running build made every later process rebuild (measured: 'building the CPU kernels' in each process)."""
    fcntl = pytest.importorskip("fcntl")
    from torch.utils import cpp_extension

    assert not build._building(tmp_path)
    (tmp_path / "lock").write_text("")
    monkeypatch.setattr(cpp_extension, "FileBaton", object(), raising=False)  # torch <= 2.13: existence locks
    assert build._building(tmp_path)
    monkeypatch.delattr(cpp_extension, "FileBaton")  # torch >= 2.14: only a held lock does
    assert not build._building(tmp_path)
    with open(tmp_path / "lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code = f"from pathlib import Path; from qframe.kernels.cpu import build; print(build._building(Path({str(tmp_path)!r})))"
        child = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension as c; c.__dict__.pop('FileBaton', None); "
                                + code], capture_output=True, text=True, timeout=120)
        assert child.stdout.strip() == "True", child.stderr[-2000:]
