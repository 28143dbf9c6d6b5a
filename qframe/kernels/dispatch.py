"""Which implementation runs each qframe kernel op: backend choice as data, in one place.

* ``BACKENDS`` names the choices; ``auto`` resolves per call through :func:`auto_backend`.
* ``_MODULES`` says where each concrete backend lives. A backend module exposes one function per
  op in ``OPS``, named after the op or listed in a ``KERNELS = {op: function}`` dict (same
  signature as the op; inputs already validated and contiguous; ``group_size`` an int, 0 meaning
  per-channel), and optionally ``available() -> (bool, reason)``. Modules are imported on first use, so
  importing ``qframe.kernels`` never imports triton, never initialises CUDA and never compiles.
* :func:`available` is the only place that decides whether a backend can run, and why not.
* An explicitly chosen backend that cannot run raises :class:`QFrameError` with the reason; only
  ``auto`` falls back, and always along the order in ``AUTO_ORDER``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
import sys
from typing import Callable, Dict, Iterator, Optional, Tuple, Union

import torch

from qframe.errors import QFrameError, one_of

log = logging.getLogger(__name__)

OPS = ("int8_mm_i32", "int8_mm", "w4a8_mm", "w4a16_mm")
BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_MODULES = {
    "triton": "qframe.kernels.triton",
    "cuda": "qframe.kernels.cuda",
    "cpu": "qframe.kernels.cpu",
    "reference": "qframe.kernels.reference",
}

# What ``auto`` tries, in order, for tensors on each device type; "reference" runs anywhere.
AUTO_ORDER = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}

# Shape classes that take another order: (device type, largest M, order), first match wins. None is
# set yet: the candidate is ("cuda", 8, ("cuda", "triton", "reference")), the CUDA extension's
# decode GEMV kernels (one warp per output column, 16-byte loads) ahead of a Triton tensor-core
# tile that is 15/16 padding at M = 1. It goes in once benchmarks/gpu/run.sh has shown on a GPU
# that those kernels match the reference and beat Triton there.
AUTO_RULES: tuple = ()

_NOT_BUILT = {
    "cpu": "qframe CPU extension not built: run `pip install --no-build-isolation -e .`",
    "cuda": "CUDA extension not built: build qframe with a CUDA torch and `pip install --no-build-isolation -e .`",
}

# {op_name: {backend: implementation}}, filled as backend modules load (or by register()).
REGISTRY: Dict[str, Dict[str, Callable]] = {op: {} for op in OPS}
_load_errors: Dict[str, Optional[str]] = {}
_preference = "auto"
_logged = set()  # (op, backend, device type) triples resolved so far
_recorders: list = []  # sets that record() is filling

DeviceLike = Union[torch.device, str, None]


def _check_name(name: str, valid=BACKENDS) -> str:
    if name not in valid:
        raise one_of("kernel backend", name, valid)
    return name


def register(op: str, backend: str, fn: Callable) -> None:
    """Put ``fn`` in the table as ``backend``'s implementation of ``op`` (replacing any earlier one)."""
    REGISTRY[_check_op(op)][_check_name(backend, BACKENDS[1:])] = fn


def _load(backend: str) -> Optional[str]:
    """Import ``backend``'s module once and register its ops; the import error as text, or None."""
    if backend not in _load_errors:
        try:
            module = importlib.import_module(_MODULES[backend])
        except ImportError as exc:
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a broken backend must not take the others down with it
            log.warning("qframe.kernels: backend %r failed to import: %s: %s", backend, type(exc).__name__, exc)
            _load_errors[backend] = f"{type(exc).__name__}: {exc}"
        else:
            _load_errors[backend] = None
            kernels = getattr(module, "KERNELS", None) or {op: getattr(module, op, None) for op in OPS}
            for op, fn in kernels.items():
                if op in REGISTRY and callable(fn):
                    REGISTRY[op].setdefault(backend, fn)
    return _load_errors[backend]


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _device_type(device: DeviceLike) -> Optional[str]:
    """The device type of ``device`` (a torch.device, a string such as "cuda:0", an accelerator index), None for
    None; a QFrameError for what torch cannot make a device of ("gpu")."""
    if device is None or isinstance(device, torch.device):
        return None if device is None else device.type
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise one_of("device", device, ("None", "a torch.device", "'cpu'", "'cuda'", "'cuda:<index>'")) from None


def _check_op(op: str) -> str:
    if op not in OPS:
        raise one_of("kernel op", op, OPS)
    return op


def available(backend: str, device: DeviceLike = None) -> Tuple[bool, str]:
    """Whether ``backend`` can run on tensors on ``device`` here, and a one-line reason.

    With ``device=None`` the question is whether it can run on any device of this machine. This is
    the only place availability is decided; it imports the backend module when needed.
    """
    _check_name(backend, BACKENDS[1:])
    kind = _device_type(device)
    if backend == "reference":
        return True, "pure torch, runs on any device"
    if backend == "triton":
        if not _triton_installed():
            return False, "triton not installed"
        if kind == "cuda" or (kind is None and torch.cuda.is_available()):
            return _module_available(backend)
        if kind in (None, "cpu") and _interpret():
            kernels = sys.modules.get("qframe.kernels.triton.int8_mm")
            if kernels is not None and not kernels.INTERPRET:
                return False, "triton kernels were loaded before TRITON_INTERPRET=1 was set; set it before first use"
            return _module_available(backend)
        return False, "needs a CUDA tensor (or TRITON_INTERPRET=1)"
    wanted = "cpu" if backend == "cpu" else "cuda"
    if kind is not None and kind != wanted:
        return False, f"needs a {wanted.upper()} tensor, got one on {kind}"
    if backend == "cuda" and kind is None and not torch.cuda.is_available():
        return False, "no CUDA device"
    return _module_available(backend)


def _module_available(backend: str) -> Tuple[bool, str]:
    error = _load(backend)
    if error is not None:
        return False, _NOT_BUILT.get(backend, error) + (f" ({error})" if backend in _NOT_BUILT else "")
    module = importlib.import_module(_MODULES[backend])
    check = getattr(module, "available", None)
    if check is None:
        return True, "ready"
    try:
        ok, reason = check()
    except Exception as exc:  # a backend's own probe failing means the backend is unusable, not a crash
        return False, f"{backend} availability check failed: {type(exc).__name__}: {exc}"
    return bool(ok), str(reason)


def auto_backend(op: str, device: DeviceLike, m: int, n: int, k: int) -> str:
    """The backend ``auto`` picks for ``op`` on ``device`` with an ``[m, k] x [k, n]`` product.

    The first backend in ``AUTO_ORDER[device type]`` that is available and implements ``op``: on CUDA
    tensors triton, then the CUDA extension, then reference; on CPU tensors the CPU extension, then
    reference. ``TRITON_INTERPRET=1`` never makes ``auto`` pick triton for CPU tensors (the
    interpreter is a correctness tool, far slower than the reference). ``AUTO_RULES`` give other
    orders for shape classes (none yet; see its comment).
    """
    _check_op(op)
    kind = _device_type(device)
    order = AUTO_ORDER.get(kind, ("reference",))
    for rule_kind, max_m, rule_order in AUTO_RULES:
        if rule_kind == kind and m <= max_m:
            order = rule_order
            break
    for backend in order:
        if available(backend, device)[0] and backend in REGISTRY[op]:
            return backend
    return "reference"


def set_backend(name: str) -> None:
    """Use backend ``name`` for every op from now on (``auto`` restores the automatic choice)."""
    global _preference
    _preference = _check_name(name)


def get_backend() -> str:
    """The backend preference in force (``auto`` unless set)."""
    return _preference


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Use backend ``name`` inside a ``with`` block; the previous preference comes back on exit."""
    previous = get_backend()
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def resolve(op: str, device: DeviceLike, m: int, n: int, k: int) -> Tuple[str, Callable]:
    """The backend name and implementation that run ``op`` for tensors on ``device`` now.

    Raises :class:`QFrameError` when the preferred backend is unavailable for these tensors or does
    not implement ``op``; only ``auto`` chooses among backends.
    """
    name = _preference
    _check_op(op)
    if name == "auto":
        name = auto_backend(op, device, m, n, k)
    else:
        ok, reason = available(name, device)
        if not ok:
            raise QFrameError(
                f"kernel backend {name!r} cannot run {op} on {_device_type(device)} tensors: {reason}; "
                f"choose another with qframe.kernels.set_backend() (valid: {', '.join(BACKENDS)})"
            )
    _load(name)
    fn = REGISTRY[op].get(name)
    if fn is None:
        have = [b for b in BACKENDS[1:] if b in REGISTRY[op]]
        raise QFrameError(f"kernel backend {name!r} does not implement {op}; backends that do: {', '.join(have)}")
    for ran in _recorders:
        ran.add((op, name))
    if (op, name, _device_type(device)) not in _logged:
        _logged.add((op, name, _device_type(device)))
        log.debug("qframe.kernels: %s on %s tensors runs on backend %r", op, _device_type(device), name)
    return name, fn


@contextlib.contextmanager
def record() -> Iterator[set]:
    """Collect the ``(op, backend)`` pairs that run inside a ``with`` block (e.g. to say in a report what ran)."""
    ran: set = set()
    _recorders.append(ran)
    try:
        yield ran
    finally:
        _recorders.remove(ran)


def table(device: DeviceLike = None) -> Dict[str, Tuple[bool, str]]:
    """``{backend: (available, reason)}`` for every concrete backend, e.g. for a startup log line."""
    return {b: available(b, device) for b in BACKENDS[1:]}
