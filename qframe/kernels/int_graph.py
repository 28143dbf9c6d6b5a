"""An integer path end to end through a converted model, on torch's oneDNN int8 convolution engine.

:func:`qframe.convert` with ``engine="onednn"`` (the default on x86 CPUs with AVX-512 VNNI whose torch
carries ``torch.ops.onednn.qconv2d_pointwise``, the kernels PT2E's X86InductorQuantizer lowers to) runs
every 8-bit per-channel convolution with a static int8 input (the ``int8_mm`` and ``depthwise``
paths) as one oneDNN int8 convolution over NHWC uint8 codes (the int8 code plus 128: the same grid
as the fake-quant model's symmetric int8 one): no im2col, no float round trip inside the layer.
Then :func:`link` traces the model once (``torch.fx``, the converted layers as leaves) and, where
the graph allows it:

* **fuses ReLU / ReLU6** that follow a convolution (or a residual add) into it: the engine's
  post-op, the module replaced by ``nn.Identity``;
* **keeps activations int8 between layers**: where every consumer of a convolution's (or residual
  add's) output, after the activation and a max pooling if one follows, quantizes it with the same
  static scale (the next convolutions, a residual add's
  quantized input, the quantized pooling), the producer requantizes in its epilogue straight to
  that scale and hands over uint8 codes, which the consumers take as they are. Elsewhere it
  returns float32 (the engine's float output: ``acc * s_in * s_w + bias``, fused).

Each uint8 activation carries its scale as the tensor attribute ``_qframe_scale``; a consumer
takes codes only with the scale it expects, else it quantizes the float values itself, as the
fake-quant model does. A model that ``torch.fx`` cannot trace keeps per-layer integer convolutions
(float in, float out), logged once. Outputs equal the fake-quant model's up to one code where the
engine's requantization rounds a value at a tie the other way.
"""

from __future__ import annotations

import functools
import logging
import platform
from collections import Counter
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

ZERO = 128  # uint8 code of zero: int8 code + 128
SCALE_ATTR = "_qframe_scale"


def onednn_available() -> tuple:
    """``(ok, reason)``: whether torch's oneDNN int8 convolution runs here, exactly.

    Only with AVX-512 VNNI (the int8 ISA in force, :mod:`qframe.kernels.cpu.isa`): without VNNI
    oneDNN sums u8 x s8 pairs in int16 and saturates. Measured on this code's development machine
    with ``ONEDNN_MAX_CPU_ISA=AVX2``: up to 15 codes off on 0.1-0.5 % of a convolution's outputs
    (and ``torch._int_mm`` wrong on every shape tried)."""
    import os

    from qframe.kernels.cpu import isa

    current = isa.current()
    if current != "avx512_vnni":
        return False, (f"the int8 ISA in force is {current}: oneDNN's int8 convolution is exact only with "
                       "AVX-512 VNNI (without it int16 pair sums saturate)")
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if capped and not any(t in capped for t in ("VNNI", "AMX", "ALL", "DEFAULT")):
        return False, f"ONEDNN_MAX_CPU_ISA={capped} keeps oneDNN off VNNI (its int8 sums saturate without it)"
    return _onednn_ops()


def onednn_mode() -> tuple:
    """``(mode, reason)``: how :func:`qframe.convert`'s ``onednn`` engine runs here.

    ``"full"`` with AVX-512 VNNI (:func:`onednn_available`): every 8-bit convolution with a static int8
    input, int8 codes handed from layer to layer. ``"nonnegative"`` on other x86 CPUs (AVX2, AVX-VNNI):
    oneDNN sums u8 x s8 pairs in int16 there, which cannot saturate only while the uint8 codes stay in
    0..127 (``2 * 127 * 128 = 32512``): the convolutions whose input is a ReLU's output run on oneDNN with
    those codes (zero point 0), exactly; the others as float convolutions with the dequantized weight,
    the float model's own speed. ``None`` where oneDNN's int8 convolution does not run (or qframe's
    kernels are forced to their portable path)."""
    import os

    from qframe.kernels.cpu import isa

    ok, reason = onednn_available()
    if ok:
        return "full", reason
    if isa.current() not in ("avx512_vnni", "avx_vnni", "avx2") or \
            os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("SSE"):
        return None, reason
    ops, why = _onednn_ops()
    if not ops:
        return None, why
    return "nonnegative", reason


@functools.lru_cache(maxsize=1)
def _onednn_ops() -> tuple:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"oneDNN int8 convolution is used on x86 only (this is {platform.machine()})"
    onednn = getattr(torch.ops, "onednn", None)
    try:
        onednn.qconv2d_pointwise.default  # noqa: B018  (resolves the op or raises)
        onednn.qconv_prepack.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False, "this torch has no torch.ops.onednn.qconv2d_pointwise"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch was built without oneDNN (mkldnn)"
    return True, "torch.ops.onednn.qconv2d_pointwise"


def scale_of(x) -> Optional[float]:
    """The scale uint8 codes ``x`` carry, or None for a float tensor."""
    return getattr(x, SCALE_ATTR, None) if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 else None


def to_codes(x: torch.Tensor, scale: float, qmin: int = -128) -> torch.Tensor:
    """float ``x`` -> uint8 codes ``clamp(round(x / scale), qmin, 127) + 128`` (ties to even), NHWC."""
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    q = torch.div(x.float(), scale).round_().clamp_(qmin, 127).add_(ZERO).to(torch.uint8)
    setattr(q, SCALE_ATTR, float(scale))
    return q


def nonnegative_codes(x: torch.Tensor, scale: float) -> torch.Tensor:
    """float ``x >= 0`` -> uint8 codes ``clamp(round(x / scale), 0, 127)`` (ties to even, zero point 0), NHWC:
    the codes of the symmetric int8 quantizer, which are never negative for such ``x``."""
    if scale_of(x) is not None:
        x = from_codes(x)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.div(x.float(), scale).round_().clamp_(0, 127).to(torch.uint8)


def fake_quantize(x: torch.Tensor, scale, qmin: int) -> torch.Tensor:
    """``clamp(round(x / scale), qmin, 127) * scale`` in float32 (ties to even): a static symmetric int8
    quantizer's values, in four passes over a new tensor."""
    return torch.div(x.float(), scale).round_().clamp_(qmin, 127).mul_(scale)


def from_codes(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes -> the float values they stand for."""
    return q.float().sub_(ZERO).mul_(scale_of(q))


def codes_for(x: torch.Tensor, scale: float, qmin: int) -> torch.Tensor:
    """``x`` as uint8 codes at ``scale``: as it is when it already carries that scale, else quantized."""
    s = scale_of(x)
    if s is not None and s == float(scale):
        return x
    return to_codes(from_codes(x) if s is not None else x, scale, qmin)


class OneDnnConv:
    """A converted conv's integer weight prepacked for oneDNN (built on first use; not in the state_dict)."""

    def __init__(self, layer):
        codes = layer.weight_int
        if layer.nhwc:
            codes = codes.reshape(layer.out_channels, *layer.kernel_size, -1).permute(0, 3, 1, 2)
        else:
            codes = codes.reshape(layer.out_channels, -1, *layer.kernel_size)
        self.x_scale, self.x_zero = float(layer.input_scale), layer.input_zero
        self.w_scale = layer.weight_scale.float().contiguous()
        self.w_zero = torch.zeros(layer.out_channels, dtype=torch.int64)
        self.geometry = (list(layer.stride), list(layer.padding), list(layer.dilation), layer.groups)
        stride, padding, dilation, groups = self.geometry
        self.packed = torch.ops.onednn.qconv_prepack(codes.contiguous(), self.w_scale, self.x_scale, self.x_zero,
                                                    stride, padding, dilation, groups, None)

    def __call__(self, q: torch.Tensor, bias, out_scale: Optional[float], act: str) -> torch.Tensor:
        stride, padding, dilation, groups = self.geometry
        attr, scalars = {"none": ("none", []), "relu": ("relu", []), "relu6": ("hardtanh", [0.0, 6.0])}[act]
        if out_scale is None:  # float32 out: acc * s_in * s_w + bias, activation fused
            return torch.ops.onednn.qconv2d_pointwise(q, self.x_scale, self.x_zero, self.packed, self.w_scale,
                                                      self.w_zero, bias, stride, padding, dilation, groups, 1.0, 0, torch.float32,
                                                      attr, scalars, "")
        y = torch.ops.onednn.qconv2d_pointwise(q, self.x_scale, self.x_zero, self.packed, self.w_scale, self.w_zero, bias,
                                               stride, padding, dilation, groups, float(out_scale), ZERO, None, attr,
                                               scalars, "")
        setattr(y, SCALE_ATTR, float(out_scale))
        return y


def _activation(y: torch.Tensor, act: str) -> torch.Tensor:
    return F.relu(y) if act == "relu" else F.hardtanh(y, 0.0, 6.0) if act == "relu6" else y


def _lean(q) -> Optional[tuple]:
    """``(scale, qmin)`` of a static symmetric int8 quantizer rounding half to even, else None."""
    static = _static(q)
    return static if static is not None and q.spec.rounding == "half_even" else None


class IntResidualAdd(nn.Module):
    """:class:`~qframe.quant.modules.QuantResidualAdd` in a converted model: ``q1(x) + q2(skip)``
    that takes either input as uint8 codes at its quantizer's scale, with an optional fused ReLU
    and, when :func:`link` says so, output codes at the next layers' scale."""

    def __init__(self, add):
        super().__init__()
        self.skip_quantizer, self.input_quantizer = add.skip_quantizer, add.input_quantizer
        self.act, self.out_scale, self.out_qmin = "none", None, -128
        self._static = (_lean(self.input_quantizer), _lean(self.skip_quantizer))

    @staticmethod
    def _value(x, quantizer, static):
        s = scale_of(x)
        if s is not None:
            return from_codes(x)
        if static is not None:  # the quantizer's own maths, without its module call
            return fake_quantize(x, *static)
        return quantizer(x) if quantizer is not None else x

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        y = self._value(x, self.input_quantizer, self._static[0])
        other = self._value(skip, self.skip_quantizer, self._static[1])
        y = y.add_(other) if scale_of(x) is not None else y + other  # in place only on our own dequantized copy
        if self.act == "relu":
            y = y.clamp_min_(0) if scale_of(x) is not None else F.relu(y)
        elif self.act == "relu6":
            y = F.hardtanh(y, 0.0, 6.0)
        return y if self.out_scale is None else to_codes(y, self.out_scale, self.out_qmin)

    def extra_repr(self) -> str:
        return f"act={self.act}, out={'int8 codes' if self.out_scale is not None else 'float'}"


class IntPool(nn.Module):
    """:class:`~qframe.quant.modules.QuantPool` in a converted model: pools the quantized features,
    taken as uint8 codes where the producer hands them over."""

    def __init__(self, qpool):
        super().__init__()
        self.pool, self.input_quantizer = qpool.pool, qpool.input_quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(from_codes(x) if scale_of(x) is not None else self.input_quantizer(x))


class CodesMaxPool(nn.Module):
    """A max pooling that passes uint8 codes on with their scale (max commutes with rounding and clamping,
    so pooling codes equals quantizing the pooled floats)."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = scale_of(x)
        if s is None:
            return self.pool(x)
        # torch 2.13's uint8 max_pool2d refuses inputs of more than 255 values per image: pool int32
        y = self.pool(x.to(torch.int32)).to(torch.uint8)
        setattr(y, SCALE_ATTR, s)
        return y


# --- linking -------------------------------------------------------------------------------------------

_RELUS = {nn.ReLU: "relu", nn.ReLU6: "relu6", F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


def _static(q) -> Optional[tuple]:
    from qframe.kernels.convert import _static_input_scale

    scale, qmin = _static_input_scale(q)
    return None if scale is None else (float(scale), qmin)


def _relu_kind(node, modules) -> Optional[str]:
    if node.op == "call_module":
        return _RELUS.get(type(modules[node.target]))
    if node.op == "call_function":
        return _RELUS.get(node.target)
    return None


_TRANSPARENT = (nn.Identity, nn.Dropout)


def _through(node, modules):
    """Follows a node's single user through modules that return their input (Identity, eval Dropout)."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if user.op != "call_module" or not isinstance(modules[user.target], _TRANSPARENT) or len(user.args) != 1:
            break
        if isinstance(modules[user.target], nn.Dropout) and modules[user.target].training:
            break
        node = user
    return node


def _wanted(consumer, src, modules) -> Optional[tuple]:
    """``(scale, qmin)`` consumer ``consumer`` quantizes ``src``'s output to, or None (it wants floats)."""
    from qframe.kernels.convert import IntConv2d

    if consumer.op != "call_module" or consumer.kwargs:
        return None
    mod = modules[consumer.target]
    positions = [i for i, a in enumerate(consumer.args) if a is src]
    if len(positions) != 1:
        return None
    if isinstance(mod, IntConv2d) and mod.engine == "onednn":
        return float(mod.input_scale), mod.input_qmin
    if isinstance(mod, IntResidualAdd):
        q = mod.input_quantizer if positions[0] == 0 else mod.skip_quantizer
        return _static(q)
    if isinstance(mod, IntPool):
        return _static(mod.input_quantizer)
    return None


def trace(model: nn.Module):
    """The model's ``torch.fx`` graph with the converted and quantized layers as leaves; None (logged once)
    when it does not trace."""
    from torch import fx

    from qframe.kernels.convert import IntConv2d, IntConvTranspose2d, IntLinear
    from qframe.quant.modules import QuantConv2d, QuantLinear, TensorQuantizer

    leaves = (IntConv2d, IntConvTranspose2d, IntLinear, IntResidualAdd, IntPool, TensorQuantizer, QuantConv2d,
              QuantLinear)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    try:
        return Tracer().trace(model)
    except Exception as exc:  # data-dependent control flow and the like: per-layer integer convs still run
        log.info("convert: the model does not trace with torch.fx (%s: %s); integer convolutions run per layer "
                 "(float in, float out)", type(exc).__name__, str(exc).splitlines()[0][:200])
        return None


_KEEPS_SIGN = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout)


def nonnegative_inputs(model: nn.Module, graph) -> set:
    """Names of the modules whose (first) input is never negative in ``graph`` (:func:`trace` of ``model``):
    the output of a ReLU / ReLU6 (module or function), directly or through poolings, Identity and Dropout."""
    modules = dict(model.named_modules())
    nonneg, names, signed = set(), set(), set()
    for node in graph.nodes:
        first = node.args[0] if node.args else None
        if _relu_kind(node, modules):
            nonneg.add(node)
        elif node.op == "call_module" and first in nonneg:
            if isinstance(modules[node.target], _KEEPS_SIGN + (IntPool,)):
                nonneg.add(node)
            names.add(node.target)
        elif node.op == "call_module":
            signed.add(node.target)  # a module called twice, once on a signed input: its codes stay signed
    return names - signed


def link(model: nn.Module, hand_over: bool = True, graph=None) -> int:
    """Fuse activations into the integer convolutions / residual adds and keep int8 codes between
    them where every consumer quantizes with one scale (see the module docstring; ``hand_over=False``:
    fuse only, every layer returns floats). ``graph``: the model's :func:`trace`, traced here when not
    given. Returns how many producers hand over int8 codes; 0 with a log line when the model cannot be
    traced."""
    from qframe.kernels.convert import IntConv2d

    graph = trace(model) if graph is None else graph
    if graph is None:
        return 0
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    linked = 0
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        prod = modules[node.target]
        if not ((isinstance(prod, IntConv2d) and prod.engine == "onednn") or isinstance(prod, IntResidualAdd)):
            continue
        if calls[node.target] != 1:
            continue  # a module called twice would need two settings
        out, act, relu_node = _through(node, modules), "none", None
        users = list(out.users)
        if len(users) == 1:
            kind = _relu_kind(users[0], modules)
            if kind and (users[0].op == "call_function" or calls[users[0].target] == 1):
                act, relu_node = kind, users[0]
                out = _through(relu_node, modules)
        pool_node = None
        if len(out.users) == 1:
            user = next(iter(out.users))
            if (user.op == "call_module" and type(modules[user.target]) is nn.MaxPool2d and calls[user.target] == 1
                    and not modules[user.target].return_indices and len(user.args) == 1):
                pool_node, out = user, _through(user, modules)
        wants = [_wanted(c, out, modules) for c in out.users]
        target = wants[0] if hand_over and wants and all(w is not None and w == wants[0] for w in wants) else None
        if isinstance(prod, IntConv2d) and target is not None and target[1] != -128:
            target = None  # the engine's uint8 output clamps at code -128, a narrow-range consumer at -127
        if act == "relu6" and target is not None and 127 * target[0] <= 6.0:
            act_in_producer = "relu"  # the consumers' clamp at 127 * scale <= 6 already caps at 6
        else:
            act_in_producer = act
        prod.act = act_in_producer
        if relu_node is not None:
            if relu_node.op == "call_module":
                _set(model, relu_node.target, nn.Identity())
            else:  # F.relu / torch.relu return a new tensor without the codes' scale (its consumers then read the
                target = None  # codes as values), F.relu6 would clamp them at code 6: floats go through it
        if target is not None:
            prod.out_scale, prod.out_qmin = target
            linked += 1
            if pool_node is not None:
                _set(model, pool_node.target, CodesMaxPool(modules[pool_node.target]))
    return linked


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    from qframe.utils.modules import set_submodule

    set_submodule(model, name, module)
