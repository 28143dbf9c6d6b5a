"""The CPU kernels built on first use, for installs that lack the prebuilt ``qframe._C``.

pip's default, isolated build cannot import torch, so setup.py compiles nothing there, and a wheel
built elsewhere may lack the extension too. Then the first call that needs the CPU kernels
compiles the C++ sources shipped with qframe (``qframe/kernels/cpu/csrc`` in a wheel, ``csrc/cpu``
in a checkout) with ``torch.utils.cpp_extension`` into a cache folder, once (~30 s); later calls and
later processes load the cached library without compiling. The folder is named after a hash of the
sources, the flags and the torch and Python versions, so any change builds afresh and a stale
library is never loaded. Nothing here runs at import time.

``QFRAME_JIT_BUILD=0`` turns the build off; ``QFRAME_CACHE_DIR`` moves the cache (default
``$XDG_CACHE_HOME/qframe``, else ``~/.cache/qframe``). Where no compiler exists or the build fails,
one warning says so and what runs instead; a failed build is not retried until its folder is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

NAME = "qframe_cpu_kernels"
OFF = ("0", "false", "no", "off")
CFLAGS = ["-O3", "-g0", "-fopenmp"] if sys.platform.startswith("linux") else ["-O3", "-g0"]
LDFLAGS = ["-fopenmp"] if sys.platform.startswith("linux") else []
FALLBACK = "CPU tensors run qframe's pure-torch reference kernels instead"
# torch's build lock left by a killed build would make every later build wait forever; a real
# build takes well under a minute, so a lock this old is stale.
STALE_LOCK_S = 600
_HERE = Path(__file__).resolve().parent


def enabled() -> bool:
    """Whether a missing extension may be built on first use (``QFRAME_JIT_BUILD``, default on)."""
    return os.environ.get("QFRAME_JIT_BUILD", "1").strip().lower() not in OFF


def source_dir() -> Optional[Path]:
    """The C++ sources: shipped inside the package (a wheel), else the checkout's ``csrc/cpu``."""
    for folder in (_HERE / "csrc", _HERE.parents[2] / "csrc" / "cpu"):
        if any(folder.glob("*.cpp")):
            return folder
    return None


def cache_root() -> Path:
    """Where built libraries are kept: ``QFRAME_CACHE_DIR``, ``$XDG_CACHE_HOME/qframe`` or ``~/.cache/qframe``."""
    if os.environ.get("QFRAME_CACHE_DIR"):
        return Path(os.environ["QFRAME_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qframe"


def build_key(sources: Path) -> str:
    """A hash of what the library depends on: every source file, the flags, torch, Python and the platform."""
    digest = hashlib.sha256()
    for path in sorted(p for p in sources.iterdir() if p.suffix in (".cpp", ".h")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], sys.platform, platform.machine()):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


def missing_tool() -> Optional[str]:
    """Why this machine cannot build the extension (no compiler, no ninja), or None."""
    compiler = (shlex.split(os.environ.get("CXX", "")) or ["c++"])[0]
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) to build it: install g++ or clang++, or set CXX"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja, which torch needs to build it, is not on PATH (pip install ninja)"
    return None


def compile_library(sources: Path, folder: Path) -> Path:
    """Compiles the sources into ``folder`` and loads the library (registers ``torch.ops.qframe_cpu``)."""
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=NAME, sources=sorted(str(p) for p in sources.glob("*.cpp")), extra_cflags=CFLAGS,
        extra_ldflags=LDFLAGS, build_directory=str(folder), is_python_module=False, verbose=False,
    )
    return folder / f"{NAME}.so"


def load_library(path: Path) -> None:
    torch.ops.load_library(str(path))


def load_or_build() -> str:
    """Loads the cached CPU extension, building it first if needed: ``""`` once loaded, else why not."""
    if not enabled():
        reason = "qframe CPU extension not built, and QFRAME_JIT_BUILD=0 turns off building it on first use"
        log.debug("qframe: %s", reason)
        return reason
    sources = source_dir()
    if sources is None:
        return _give_up("qframe CPU extension not built, and its C++ sources are not installed")
    folder = cache_root() / f"cpu-{build_key(sources)}"
    if _load_cached(folder):
        return ""
    if (folder / "failed.txt").is_file():
        return _give_up(f"an earlier build of the qframe CPU extension failed (log: {folder / 'failed.txt'}; "
                        "delete that folder to retry)")
    tool = missing_tool()
    if tool is not None:
        return _give_up(f"qframe CPU extension not built, and {tool}")
    _clear_stale_lock(folder)
    return _build(sources, folder)


def _clear_stale_lock(folder: Path) -> None:
    lock = folder / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.info("qframe: removing a stale build lock (%.0f s old, a killed build?): %s", age, lock)
        lock.unlink(missing_ok=True)


def _building(folder: Path) -> bool:
    """Whether another process is building into ``folder``. torch up to 2.13 locks a build by the lock
    file's existence (FileBaton); torch 2.14 holds an OS lock on it (the filelock package, fcntl on POSIX)
    and leaves the file behind, so there only a held lock means a build."""
    lock = folder / "lock"
    if not lock.exists():
        return False
    from torch.utils import cpp_extension

    if hasattr(cpp_extension, "FileBaton"):
        return True
    try:
        import fcntl
    except ImportError:  # no POSIX locks (Windows): take the file for a build, as before
        return True
    try:
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except OSError:  # held by a build
        return True
    return False


def _load_cached(folder: Path) -> bool:
    library = folder / f"{NAME}.so"
    if not library.is_file() or _building(folder):  # absent, or another process is building it
        return False
    try:
        load_library(library)
    except OSError as exc:  # a truncated or foreign file: build it again
        log.debug("qframe: cached CPU extension %s does not load (%s); rebuilding", library, exc)
        library.unlink(missing_ok=True)
        return False
    log.debug("qframe: loaded the CPU extension from %s", library)
    return True


def _build(sources: Path, folder: Path) -> str:
    log.info("qframe: building the CPU kernels from %s into %s (first use, once; about 30 s)", sources, folder)
    start = time.perf_counter()
    try:
        compile_library(sources, folder)
    except Exception as exc:  # a compile or link error, an unwritable cache: report it, never crash
        text = f"{type(exc).__name__}: {exc}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "failed.txt").write_text(text + "\n")
        except OSError:
            pass
        return _give_up(f"building the qframe CPU extension failed ({_summary(text)}; log: {folder / 'failed.txt'})")
    log.debug("qframe: built the CPU kernels in %.1f s", time.perf_counter() - start)
    return ""


def _summary(text: str) -> str:
    """The line of a build log that says what went wrong: the first compiler error, else the first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(^|\s)(fatal )?error:", line)]  # gcc/clang/ld, not "RuntimeError:"
    return (errors or lines or ["no output"])[0][:300]


def _give_up(reason: str) -> str:
    log.warning("%s; %s", reason, FALLBACK)
    return reason
