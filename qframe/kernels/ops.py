"""The qframe low-bit GEMM ops, registered with ``torch.library`` in the ``qframe`` namespace.

Each op is a ``torch.library`` op (so ``torch.ops.qframe.<name>`` and ``torch.compile`` see one
opaque node) with a fake implementation for meta / fake tensors. Its real implementation checks the inputs
here, in one place, then runs whichever backend :mod:`qframe.kernels.dispatch` resolves.

Weights use nn.Linear's layout ``[N, K]``; int4 weights are packed by :func:`pack_int4`. Weight
scales are float32 ``[N]`` (per-channel, ``group_size`` 0 or None) or ``[N, ceil(K / group_size)]``
(per-group, the last group may be shorter). int8 activations carry a float32 scale per row.
"""

import operator
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from qframe.errors import QFrameError
from qframe.kernels import dispatch
from qframe.kernels.packing import pack_int4, packed_cols
from qframe.quant.functional import SCALE_EPS, block_view, compute_qparams, param_shape, quantize
from qframe.quant.spec import QuantSpec

FLOAT_ACTIVATIONS = (torch.bfloat16, torch.float16, torch.float32)
INT8_QMAX = 127

# ---------------------------------------------------------------------------------------------
# Input checks: the only place the ops validate what they are given.


def _describe(t) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}"


def _need(op: str, name: str, t, dtypes: Sequence[torch.dtype], ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor) or t.dim() != ndim or t.dtype not in dtypes:
        kinds = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise QFrameError(f"{op}: {name} must be a {ndim}-D {kinds} tensor {layout}, got {_describe(t)}")


def _shape(op: str, name: str, t: Tensor, expected: tuple, why: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise QFrameError(f"{op}: {name} has shape {tuple(t.shape)}; expected {tuple(expected)} ({why})")


def _same_device(op: str, a: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != a.device:
            raise QFrameError(f"{op}: {name} is on {t.device} but a is on {a.device}; put all inputs on one device")


def _group_size(op: str, group_size) -> int:
    """``group_size`` as an int, 0 for per-channel (None); numpy integers and integer 0-d tensors become ints. A
    QFrameError for a bool, a float (even 64.0), a string or a negative value."""
    if group_size is None:
        return 0
    if not isinstance(group_size, (bool, torch.SymInt)) and not (isinstance(group_size, Tensor) and
                                                                 group_size.is_floating_point()):
        try:
            group_size = operator.index(group_size)
        except TypeError:
            pass
    if isinstance(group_size, bool) or not isinstance(group_size, (int, torch.SymInt)) or group_size < 0:
        raise QFrameError(
            f"{op}: group_size={group_size!r} is invalid; use 0 or None for per-channel scales or a positive int"
        )
    return group_size


def _check_w_scale(op: str, w_scale: Tensor, n: int, k: int, group_size: int) -> None:
    if group_size == 0:
        _need(op, "w_scale", w_scale, (torch.float32,), 1, "[N] (per-channel, group_size=0)")
        _shape(op, "w_scale", w_scale, (n,), "one scale per output channel")
    else:
        groups = (k + group_size - 1) // group_size
        layout = f"[N, ceil(K/group_size)] (per-group, group_size={group_size})"
        _need(op, "w_scale", w_scale, (torch.float32,), 2, layout)
        _shape(op, "w_scale", w_scale, (n, groups), f"N={n} rows of ceil(K={k} / group_size={group_size}) groups")


def _check_bias(op: str, bias: Optional[Tensor], n: int, dtypes=(torch.float32,)) -> None:
    if bias is not None:
        _need(op, "bias", bias, dtypes, 1, "[N]")
        _shape(op, "bias", bias, (n,), "one value per output channel")


def _check_int8_activation(op: str, a: Tensor, a_scale: Tensor) -> Tuple[int, int]:
    _need(op, "a", a, (torch.int8,), 2, "[M, K]")
    m, k = a.shape
    _need(op, "a_scale", a_scale, (torch.float32,), 1, "[M] (one scale per row of a)")
    _shape(op, "a_scale", a_scale, (m,), "one scale per row of a")
    return m, k


def _check_packed(op: str, w_packed: Tensor, k: int) -> int:
    _need(op, "w_packed", w_packed, (torch.uint8,), 2, "[N, ceil(K/2)] (pack_int4 of an [N, K] weight)")
    if w_packed.shape[1] != packed_cols(k):
        raise QFrameError(
            f"{op}: w_packed has {w_packed.shape[1]} bytes per row; expected ceil(K/2)={packed_cols(k)} "
            f"for K={k} (a.shape[1])"
        )
    return w_packed.shape[0]


def check_int8_mm_i32(a: Tensor, w: Tensor, op: str = "int8_mm_i32") -> Tuple[int, int, int]:
    """Validate ``int8_mm_i32`` inputs; returns ``(M, N, K)``."""
    _need(op, "a", a, (torch.int8,), 2, "[M, K]")
    _need(op, "w", w, (torch.int8,), 2, "[N, K] (nn.Linear layout)")
    if w.shape[1] != a.shape[1]:
        raise QFrameError(f"{op}: w has K={w.shape[1]} columns but a has K={a.shape[1]}; w must be [N, K]")
    _same_device(op, a, w=w)
    return a.shape[0], w.shape[0], a.shape[1]


def check_int8_mm(a, a_scale, w, w_scale, bias, op: str = "int8_mm") -> Tuple[int, int, int]:
    """Validate ``int8_mm`` inputs; returns ``(M, N, K)``."""
    m, k = _check_int8_activation(op, a, a_scale)
    _, n, _ = check_int8_mm_i32(a, w, op)
    _check_w_scale(op, w_scale, n, k, 0)
    _check_bias(op, bias, n)
    _same_device(op, a, a_scale=a_scale, w=w, w_scale=w_scale, bias=bias)
    return m, n, k


def check_w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias, op: str = "w4a8_mm") -> Tuple[int, int, int, int]:
    """Validate ``w4a8_mm`` inputs; returns ``(M, N, K, group_size)`` with 0 meaning per-channel."""
    m, k = _check_int8_activation(op, a, a_scale)
    n = _check_packed(op, w_packed, k)
    group_size = _group_size(op, group_size)
    _check_w_scale(op, w_scale, n, k, group_size)
    _check_bias(op, bias, n)
    _same_device(op, a, a_scale=a_scale, w_packed=w_packed, w_scale=w_scale, bias=bias)
    return m, n, k, group_size


def check_w4a16_mm(a, w_packed, w_scale, group_size, bias, op: str = "w4a16_mm") -> Tuple[int, int, int, int]:
    """Validate ``w4a16_mm`` inputs; returns ``(M, N, K, group_size)`` with 0 meaning per-channel."""
    _need(op, "a", a, FLOAT_ACTIVATIONS, 2, "[M, K]")
    m, k = a.shape
    n = _check_packed(op, w_packed, k)
    group_size = _group_size(op, group_size)
    _check_w_scale(op, w_scale, n, k, group_size)
    _check_bias(op, bias, n, dtypes=tuple(dict.fromkeys((torch.float32, a.dtype))))
    _same_device(op, a, w_packed=w_packed, w_scale=w_scale, bias=bias)
    return m, n, k, group_size


# ---------------------------------------------------------------------------------------------
# The custom ops.


def _run(op: str, a: Tensor, m: int, n: int, k: int, out_dtype: torch.dtype, *args) -> Tensor:
    _, fn = dispatch.resolve(op, a.device, m, n, k)
    if m == 0:  # an empty batch: nothing to launch, but an unavailable backend has still raised
        return a.new_empty((0, n), dtype=out_dtype)
    return fn(*(x.contiguous() if isinstance(x, Tensor) else x for x in args))


# The ops are defined on a torch.library fragment with one CompositeExplicitAutograd kernel each
# (the dispatcher calls it for every device) and a fake implementation: the same op surface as
# torch.library.custom_op, at about a tenth of its per-call cost (~2 us instead of ~25 us here),
# which matters for M = 1 products and small layers. The ops have no autograd formula.
_LIB = torch.library.Library("qframe", "FRAGMENT")


def _define(schema: str, fake):
    """Define ``qframe::<schema>`` with the decorated function as its kernel and ``fake`` as its fake impl."""

    def register(kernel):
        name = schema.split("(", 1)[0]
        _LIB.define(schema)
        _LIB.impl(name, kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(f"qframe::{name}", fake, lib=_LIB)
        return kernel

    return register


def _fake_int8_mm_i32(a, w):
    m, n, _ = check_int8_mm_i32(a, w)
    return a.new_empty((m, n), dtype=torch.int32)


def _fake_int8_mm(a, a_scale, w, w_scale, bias=None):
    m, n, _ = check_int8_mm(a, a_scale, w, w_scale, bias)
    return a.new_empty((m, n), dtype=torch.float32)


def _fake_w4a8_mm(a, a_scale, w_packed, w_scale, group_size=None, bias=None):
    m, n, _, _ = check_w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias)
    return a.new_empty((m, n), dtype=torch.float32)


def _fake_w4a16_mm(a, w_packed, w_scale, group_size=None, bias=None):
    m, n, _, _ = check_w4a16_mm(a, w_packed, w_scale, group_size, bias)
    return a.new_empty((m, n), dtype=a.dtype)


@_define("int8_mm_i32(Tensor a, Tensor w) -> Tensor", _fake_int8_mm_i32)
def _int8_mm_i32(a: Tensor, w: Tensor) -> Tensor:
    m, n, k = check_int8_mm_i32(a, w)
    return _run("int8_mm_i32", a, m, n, k, torch.int32, a, w)


@_define("int8_mm(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor", _fake_int8_mm)
def _int8_mm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    m, n, k = check_int8_mm(a, a_scale, w, w_scale, bias)
    return _run("int8_mm", a, m, n, k, torch.float32, a, a_scale, w, w_scale, bias)


@_define("w4a8_mm(Tensor a, Tensor a_scale, Tensor w_packed, Tensor w_scale, SymInt? group_size=None, "
         "Tensor? bias=None) -> Tensor", _fake_w4a8_mm)
def _w4a8_mm(
    a: Tensor,
    a_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    group_size: Optional[int] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    m, n, k, gs = check_w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias)
    return _run("w4a8_mm", a, m, n, k, torch.float32, a, a_scale, w_packed, w_scale, gs, bias)


@_define("w4a16_mm(Tensor a, Tensor w_packed, Tensor w_scale, SymInt? group_size=None, Tensor? bias=None) -> Tensor",
         _fake_w4a16_mm)
def _w4a16_mm(
    a: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: Optional[int] = None, bias: Optional[Tensor] = None
) -> Tensor:
    m, n, k, gs = check_w4a16_mm(a, w_packed, w_scale, group_size, bias)
    return _run("w4a16_mm", a, m, n, k, a.dtype, a, w_packed, w_scale, gs, bias)


# ---------------------------------------------------------------------------------------------
# Public, documented entry points (thin: the op does the work, torch.compile traces through).


def int8_mm_i32(a: Tensor, w: Tensor) -> Tensor:
    """Exact integer product ``a @ w.T``: ``a: int8 [M, K]``, ``w: int8 [N, K]`` -> ``int32 [M, N]``."""
    return torch.ops.qframe.int8_mm_i32(a, w)


def int8_mm(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """W8A8 linear: ``(a @ w.T in int32) * a_scale[:, None] * w_scale[None, :] + bias`` -> ``float32 [M, N]``.

    ``a: int8 [M, K]`` with ``a_scale: float32 [M]``; ``w: int8 [N, K]`` with ``w_scale: float32 [N]``;
    ``bias: float32 [N]`` or None.
    """
    return torch.ops.qframe.int8_mm(a, a_scale, w, w_scale, bias)


def w4a8_mm(
    a: Tensor,
    a_scale: Tensor,
    w_packed: Tensor,
    w_scale: Tensor,
    group_size: Optional[int] = None,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """W4A8 linear with packed int4 weights -> ``float32 [M, N]``.

    ``a: int8 [M, K]``, ``a_scale: float32 [M]``, ``w_packed: uint8 [N, ceil(K/2)]``
    (:func:`pack_int4`), ``w_scale: float32 [N]`` when ``group_size`` is 0/None, else
    ``[N, ceil(K/group_size)]``; the result is ``sum_g a_scale[m] * w_scale[n, g] * dot_g``.
    """
    if group_size is not None and type(group_size) is not int:  # a float, a str: before the op's schema refuses it
        group_size = _group_size("w4a8_mm", group_size)
    return torch.ops.qframe.w4a8_mm(a, a_scale, w_packed, w_scale, group_size, bias)


def w4a16_mm(
    a: Tensor, w_packed: Tensor, w_scale: Tensor, group_size: Optional[int] = None, bias: Optional[Tensor] = None
) -> Tensor:
    """Weight-only int4 linear: ``a @ (unpack(w_packed) * scale).T + bias`` in ``a.dtype``.

    ``a`` is bfloat16, float16 or float32 ``[M, K]``; accumulation is in float32. Scales and
    ``group_size`` as in :func:`w4a8_mm`; ``bias`` is float32 or ``a.dtype`` ``[N]``.
    """
    if group_size is not None and type(group_size) is not int:  # a float, a str: before the op's schema refuses it
        group_size = _group_size("w4a16_mm", group_size)
    return torch.ops.qframe.w4a16_mm(a, w_packed, w_scale, group_size, bias)


# ---------------------------------------------------------------------------------------------
# Quantizers that produce the ops' inputs (for tests, benchmarks and module conversion).


def _need_float_2d(name: str, x, empty_rows: bool = False) -> None:
    """A QFrameError unless ``x`` is a 2-D floating-point tensor with columns (and rows, unless ``empty_rows``):
    an empty row has no range to take a scale from."""
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise QFrameError(f"{name} needs a 2-D floating-point tensor, got {_describe(x)}")
    if x.shape[1] == 0 or (x.shape[0] == 0 and not empty_rows):
        need = "at least one column" if empty_rows else "at least one row and one column"
        raise QFrameError(f"{name} needs a 2-D floating-point tensor with {need} (a scale comes from each row's "
                          f"values), got {_describe(x)}")


def quantize_rows(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric dynamic per-row int8 quantization: ``x [M, K]`` -> ``(int8 [M, K], float32 scale [M])``.

    ``scale = amax(|row|) / 127`` floored at a tiny epsilon so an all-zero row quantizes to zeros;
    rounding is half to even. Written without host synchronisation, so it is cheap per call.
    """
    _need_float_2d("quantize_rows", x, empty_rows=True)  # an empty batch: no rows, no scales
    x = x.float()
    scale = torch.clamp(x.abs().amax(dim=1) / INT8_QMAX, min=SCALE_EPS)
    q = torch.clamp(torch.round(x / scale[:, None]), -INT8_QMAX - 1, INT8_QMAX).to(torch.int8)
    return q, scale


def quantize_weight_int8(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric per-channel int8 weights: ``w [N, K]`` -> ``(int8 [N, K], float32 scale [N])``."""
    _need_float_2d("quantize_weight_int8", w)
    spec = QuantSpec(bits=8, granularity="per_channel", axis=0)
    return _quantize_weight(w, spec)


def quantize_weight_int4(w: Tensor, group_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Symmetric int4 weights, packed: ``w [N, K]`` -> ``(uint8 [N, ceil(K/2)], float32 scale)``.

    The scale is ``[N]`` per channel (``group_size`` 0/None) or ``[N, ceil(K/group_size)]`` per group.
    """
    _need_float_2d("quantize_weight_int4", w)
    group_size = _group_size("quantize_weight_int4", group_size)
    if group_size:
        spec = QuantSpec(bits=4, granularity="per_group", axis=0, group_size=group_size)
    else:
        spec = QuantSpec(bits=4, granularity="per_channel", axis=0)
    q, scale = _quantize_weight(w, spec)
    return pack_int4(q), scale


def _quantize_weight(w: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tensor]:
    blocks = block_view(w.detach().float(), spec)
    scale, zero_point = compute_qparams(blocks.amin(dim=1), blocks.amax(dim=1), spec)
    shape = param_shape(w.shape, spec)
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return quantize(w.detach(), scale, zero_point, spec), scale.float()


__all__ = [
    "int8_mm_i32",
    "int8_mm",
    "w4a8_mm",
    "w4a16_mm",
    "quantize_rows",
    "quantize_weight_int8",
    "quantize_weight_int4",
    "check_int8_mm_i32",
    "check_int8_mm",
    "check_w4a8_mm",
    "check_w4a16_mm",
]
