"""Where activation quantizers go beyond the inputs of Conv / Linear: placement read from the model's own graph.

TensorRT runs a layer in INT8 only where Q/DQ reach its inputs, so a user's model needs quantizers
at places no module swap finds: both inputs of a matmul / bmm / mm, or of the matmul in an addmm / baddbmm
/ addbmm (transformers' Conv1D layers), that reads an activation (attention,
``F.scaled_dot_product_attention`` included, and a two-operand ``torch.einsum``, which then runs as a
matmul: TensorRT has no INT8 Einsum; an operand that is a weight itself, or operands made from
constants alone, stay float with the reason; ``x @ W`` with ``W`` a 2-d parameter quantizes ``W`` as a
weight), the residual branch of every add however it is
written (``x + y``, ``out += identity``, ``torch.add``), one shared scale for the inputs of a
concat, the input of functional average pooling. Which of these a runtime needs is data, per
target (:data:`TARGET_RULES`), and one setting, ``target``, picks the row. An ``F.linear`` or
``F.conv*`` called outside an ``nn.Linear`` / convolution module (a custom layer's own weight, D-FINE's
distribution integral) is never placed; where it reads an activation it is named float with the reason, as
are the products no INT8 form is made for (``torch.tensordot``, ``mv``, ``inner``, ``dot``, ``outer``,
``linalg.multi_dot``, ``linalg.vecdot``).

The graph is read by running the model once on an example batch under a
``TorchFunctionMode`` that sees every torch function call: the call sites of those ops, the
module that runs each (the innermost one), and whether each operand is an activation (a floating-point
tensor computed from the input: what integer token ids select from an embedding table is one, angles
computed from integer positions are not) or a constant (a parameter, a buffer, something computed from
them). torch.fx
would be the textbook tool, but it traces the root of 1 of the 8 transformers vision models in
qframe's test suite (control flow on shapes and flags) and not the attention modules of ViT or
MobileViT, the places that need quantizers most; running the model covers every model that runs.
A model that does not run on the example keeps its module-level quantizers, with a warning.

Each module that runs such an op gets a ``qframe_sites`` child (:class:`SiteQuantizers`) holding
the quantizers of its call sites, in call order; its forward hooks count the calls while the
module runs, and the same mode applies the quantizers at the placed sites. The quantizers are
ordinary :class:`TensorQuantizer` modules: calibration, QAT, export (as Q/DQ) and ``deepcopy`` see
them like any other.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from qframe.errors import one_of
from qframe.quant.einsum import einsum_matmul as _einsum_matmul
from qframe.quant.einsum import einsum_operands as _einsum_operands
from qframe.quant.einsum import einsum_plan as _einsum_plan
from qframe.utils.modules import eval_mode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlacementRules:
    """What a runtime needs quantized besides the inputs of Conv / Linear layers."""

    matmul: bool  # both inputs of an activation x activation matmul / bmm / scaled dot-product attention
    residual: str  # "skip": the add's input that the conv did not just produce (TensorRT fuses conv + add); "both"; "none"
    concat: bool  # one quantizer (one scale) shared by every input of a concat
    pool: bool  # the input of functional average pooling
    # residual adds are those with an input a layer of these kinds just produced: TensorRT fuses Conv + Add;
    # a transformer's Linear + residual add it fuses without Q/DQ, and 8-bit residual streams lose the small
    # tokens (a ViT's class token sits at 1 % of the patch tokens' range: output error 1 % -> 20 % when quantized)
    residual_after: tuple = ("conv",)


# One row per deployment target; ``target`` (quantize_ / ptq) picks it.
TARGET_RULES = {
    "tensorrt": PlacementRules(matmul=True, residual="skip", concat=True, pool=True),
    # the DLA's INT8 element-wise layers want both inputs quantized (with equal scales)
    "dla": PlacementRules(matmul=True, residual="both", concat=True, pool=True),
    # onnxruntime's QLinearAdd / QLinearConcat / QLinearAveragePool take 8-bit inputs on every operand
    "onnxruntime": PlacementRules(matmul=True, residual="both", concat=True, pool=True),
}
TARGETS = tuple(TARGET_RULES)


def deployment_target(runtime: str, dla: bool = False, export_target: str = "tensorrt") -> str:
    """The placement target of a run, decided here alone: the DLA when the run deploys to one, else the
    runtime the exported graph is made for (``export.target``), TensorRT by default."""
    if dla:
        return "dla"
    return "onnxruntime" if export_target == "onnxruntime" and runtime != "tensorrt" else "tensorrt"

_T = torch.Tensor
KINDS = {
    torch.matmul: "matmul", torch.bmm: "matmul", _T.matmul: "matmul", _T.__matmul__: "matmul", _T.bmm: "matmul",
    torch.mm: "matmul", _T.mm: "matmul",
    # a matmul plus a tensor: add(input, mat1 @ mat2); transformers' Conv1D is torch.addmm(bias, x, weight)
    torch.addmm: "addmm", _T.addmm: "addmm", torch.baddbmm: "addmm", _T.baddbmm: "addmm",
    torch.addbmm: "addmm", _T.addbmm: "addmm",
    F.scaled_dot_product_attention: "sdpa", torch.einsum: "einsum",
    torch.add: "add", _T.add: "add", _T.__add__: "add", _T.__radd__: "add", _T.__iadd__: "add", _T.add_: "add",
    torch.cat: "cat", torch.concat: "cat",
    F.avg_pool1d: "pool", F.avg_pool2d: "pool", F.avg_pool3d: "pool", F.adaptive_avg_pool1d: "pool",
    F.adaptive_avg_pool2d: "pool", F.adaptive_avg_pool3d: "pool",
}
INPLACE = (_T.__iadd__, _T.add_)
_CONVS = nn.modules.conv._ConvNd
# layers called as functions: never placed; where one reads an activation outside its module type (a custom
# layer's own weight, a weight computed in forward), it is named float with the reason. name, module, owners
FUNCTIONAL_LAYERS = {
    F.linear: ("F.linear", "Linear", (nn.Linear, nn.MultiheadAttention)),
    F.conv1d: ("F.conv1d", "Conv1d", _CONVS), F.conv2d: ("F.conv2d", "Conv2d", _CONVS),
    F.conv3d: ("F.conv3d", "Conv3d", _CONVS), F.conv_transpose1d: ("F.conv_transpose1d", "ConvTranspose1d", _CONVS),
    F.conv_transpose2d: ("F.conv_transpose2d", "ConvTranspose2d", _CONVS),
    F.conv_transpose3d: ("F.conv_transpose3d", "ConvTranspose3d", _CONVS),
}
# products of an activation that are never placed (no INT8 form is made for them): named float with the reason
UNPLACED = {torch.tensordot: "torch.tensordot", torch.mv: "torch.mv", _T.mv: "Tensor.mv", torch.inner: "torch.inner",
            _T.inner: "Tensor.inner", torch.dot: "torch.dot", _T.dot: "Tensor.dot", torch.outer: "torch.outer",
            _T.outer: "Tensor.outer", torch.linalg.multi_dot: "torch.linalg.multi_dot",
            torch.linalg.vecdot: "torch.linalg.vecdot", torch.chain_matmul: "torch.chain_matmul"}
# the role of a matmul's right operand that is a 2-d parameter (``x @ W``, SwiftFormer's ``w_g``): a weight,
# quantized per output channel (the columns of ``[K, N]``) by a quantizer ``make(kind, WEIGHT_B)`` builds
WEIGHT_B = "weight_b"

_STATE = threading.local()
# ops that read an integer tensor as indices into a float table: what token ids select is an activation; other
# float results of integers made from the input (positions turned into angles, masks into biases) are not
INDEX_OPS = {F.embedding, torch.embedding, F.embedding_bag, torch.index_select, _T.index_select, torch.gather,
             _T.gather, torch.take, _T.take, _T.__getitem__}
# the keywords of an operand given by name, by (kind, position): matmul(input, other), mm / bmm(input, mat2),
# addmm(input, mat1, mat2), baddbmm / addbmm(input, batch1, batch2)
_KEYWORDS = {("matmul", 0): ("input",), ("matmul", 1): ("other", "mat2"), ("addmm", 1): ("mat1", "batch1"),
             ("addmm", 2): ("mat2", "batch2"), ("add", 0): ("input",), ("add", 1): ("other",)}


def _active() -> list:
    """The running modules, innermost last, while a module with placed sites runs: ``(holder, call counts)``
    for such a module, None for any other (whose own ops are not placed: a quantizer, a layer's bias maths)."""
    if not hasattr(_STATE, "stack"):
        _STATE.stack, _STATE.mode = [], None
    return _STATE.stack


class _ApplyMode(TorchFunctionMode):
    """Hands each placed op to the innermost running module's :class:`SiteQuantizers`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = KINDS.get(func)
        stack = _active()
        if kind is None or not stack or stack[-1] is None:
            return func(*args, **kwargs)
        holder, counts = stack[-1]
        return holder.apply(counts, kind, func, args, kwargs)


def _global_pre(module, _args):
    holder = module._modules.get("qframe_sites")
    stack = _active()
    if holder is not None:
        if not stack:
            _STATE.mode = _ApplyMode()
            _STATE.mode.__enter__()
        stack.append((holder, {}))
    elif stack:
        stack.append(None)


def _global_post(module, _args, _output):
    stack = _active()
    if not stack:
        return
    if module._modules.get("qframe_sites") is not None or stack[-1] is None:
        stack.pop()
    if not stack and _STATE.mode is not None:
        mode, _STATE.mode = _STATE.mode, None
        mode.__exit__(None, None, None)


@contextlib.contextmanager
def restored_after_tracing():
    """For a tracer that may abandon a model's forward midway without running its forward hooks (torch.export,
    failing on a data-dependent guard): afterwards the running-module stack and the torch function mode stack
    are as they were before, so a placed model that runs next in this process applies its sites again."""
    from torch.overrides import _get_current_function_mode_stack

    depth = len(_get_current_function_mode_stack())
    stack, mode = list(_active()), _STATE.mode
    try:
        yield
    finally:
        while len(_get_current_function_mode_stack()) > depth:  # modes whose exits never ran, or popped others
            torch._C._pop_torch_function_stack()
        _STATE.stack[:], _STATE.mode = stack, mode


_HOOKED = []


def _install_global_hooks() -> None:
    """Once per process: every module call tells the placement which module runs (a dict lookup when
    no placed model runs). The same innermost-module rule as when the sites were found keeps the call
    counts aligned."""
    if not _HOOKED:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        _HOOKED.append(register_module_forward_pre_hook(_global_pre))
        _HOOKED.append(register_module_forward_hook(_global_post, always_call=True))


class SiteQuantizers(nn.Module):
    """The quantizers of one module's placed call sites; ``sites[kind][index]`` names the roles quantized."""

    def __init__(self, sites: dict[str, dict[int, tuple[str, ...]]], make, forms: dict | None = None,
                 weights: dict | None = None):
        super().__init__()
        self.sites = sites
        # the ranks of each placed call's tensors as the graph was read: a call that comes otherwise (a site
        # the model does not reach this time, so that the next call of its kind takes its index) is left alone
        self.forms = forms or {}
        # the parameter (its name in the model) each weight quantizer of an ``x @ W`` site quantizes, by quantizer key
        self.weights = weights or {}
        self.quantizers = nn.ModuleDict()
        for kind, by_index in sites.items():
            for index, roles in by_index.items():
                for role in roles:
                    self.quantizers[f"{kind}{index}_{role}"] = make(kind, role)

    def __setstate__(self, state):
        super().__setstate__(state)
        _install_global_hooks()  # a model unpickled in a new process (torch.load of a whole model) applies its sites

    def _q(self, kind: str, index: int, role: str):
        return self.quantizers[f"{kind}{index}_{role}"]

    def apply(self, counts, kind, func, args, kwargs):
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        roles = self.sites.get(kind, {}).get(index)
        form = self.forms.get(kind, {}).get(index)
        if not roles or (form is not None and form != call_form(kind, args)):
            return func(*args, **kwargs)
        if kind == "sdpa":
            return _sdpa_math(*args, **kwargs, quantize=lambda role, t: self._q(kind, index, role)(t),
                              training=self.training)
        if kind == "einsum":
            equation, (a, b) = _einsum_operands(args, kwargs)
            return _einsum_matmul(equation, a, b, self._q(kind, index, "a"), self._q(kind, index, "b"))
        if kind == "cat":
            q = self._q(kind, index, "inputs")  # one scale for every input
            tensors = args[0] if args else kwargs.pop("tensors")
            return func([q(t) for t in tensors], *args[1:], **kwargs)
        args = list(args)
        for role in roles:
            position = {"a": 0, "b": 1, "input": 0, WEIGHT_B: 1}[role] + (kind == "addmm")
            if position < len(args):
                args[position] = self._q(kind, index, role)(args[position])
            elif (key := next((k for k in _KEYWORDS.get((kind, position), ()) if k in kwargs), None)) is not None:
                kwargs = {**kwargs, key: self._q(kind, index, role)(kwargs[key])}  # torch.mm(x, mat2=w) and the like
        return func(*args, **kwargs)

    def extra_repr(self) -> str:
        return ", ".join(f"{kind} x{len(v)}" for kind, v in self.sites.items() if v)


def site_weight_quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """The weight quantizers placement gave the 2-d parameters of ``x @ W`` (role :data:`WEIGHT_B`), by
    ``"<module>::<op><index>"`` (``::matmul0``, ``::addmm1``), each with the name of the parameter it quantizes:
    weights, which QAT and RCT train as weights (not activation ranges) and ``fold_qat`` fixes."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, SiteQuantizers):
            owner = name.removesuffix("qframe_sites").rstrip(".")
            for key, q in module.quantizers.items():
                if key.endswith("_" + WEIGHT_B):
                    found[f"{owner}::{key.removesuffix('_' + WEIGHT_B)}"] = (q, getattr(module, "weights", {}).get(key))
    return found


def _sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
               quantize, training):
    """``F.scaled_dot_product_attention`` as its math path with quantized matmul inputs: q, k, the
    probabilities and v (both MatMuls of attention then take Q/DQ inputs)."""
    if enable_gqa and key.size(-3) != query.size(-3):
        key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
        value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = torch.matmul(quantize("q", query), quantize("k", key).transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0 and training:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(quantize("p", probs), quantize("v", value))


def call_form(kind: str, args) -> tuple:
    """The ranks of a call's positional tensors, in order (a concat's list flattened; an attention's query, key
    and value, not its optional mask): what a placed site expects."""
    with torch._C.DisableTorchFunctionSubclass():  # a merged-away branch's marker refuses to be read otherwise
        return tuple(t.dim() for t in _tensors(list(args[:3] if kind == "sdpa" else args)))


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Discover(TorchFunctionMode):
    """Runs the model once: marks tensors computed from the input, records the placed ops' call sites."""

    def __init__(self, stack, produced, skip: tuple = (), weights: bool = False, weight_only: bool = False):
        super().__init__()
        self.stack, self.produced, self.skip, self.weights = stack, produced, skip, weights
        self.weight_only = weight_only  # activations stay float by the recipe: only weights left float are named
        self.live: dict[int, torch.Tensor] = {}  # activations, kept alive so their ids stay unique
        self.weight = None  # the parameter an ``x @ W`` call reads as its weight, while its roles are read
        self.calls: list[tuple[nn.Module, str, int, tuple]] = []
        self.counts: dict[int, dict[str, int]] = {}

    def mark(self, t):
        for x in _tensors(t):
            self.live[id(x)] = x

    def computed(self, t) -> bool:
        """Computed from the input, of any dtype (token ids, positions and masks too)."""
        return isinstance(t, torch.Tensor) and id(t) in self.live

    def act(self, t) -> bool:
        """An activation: a floating-point tensor computed from the input (an embedding of token ids is one)."""
        return self.computed(t) and t.is_floating_point()

    def _operands(self, tensors, label: str, plan: bool = True) -> tuple:
        """``(placed, why not, label)`` for the operands of a matmul, an attention or an einsum.

        Quantized where one operand at least is an activation and none is a parameter itself (a weight, or a
        view of one: per-tensor activation quantizers would lose its per-channel ranges), except ``x @ W`` with
        ``W`` a 2-d parameter where the caller quantizes weights: ``W`` then gets a weight quantizer of its own.
        Operands made from parameters (DETR's first decoder queries: an embedding table plus zeros; ViTDet's
        relative position table) are quantized with the activation they meet. Operands made from constants alone (a position
        table built from ``arange``) stay float: quantizing angles or frequencies ruins what follows.
        """
        acts = sum(self.act(t) for t in tensors)
        if self.weight_only:
            param = any(_reads_parameter(t) for t in tensors)
            return (False, "reads a parameter as an operand" if param and acts
                    else "", label)
        if label == "matmul" and self.weights and _is_weight(tensors[1]) and self.act(tensors[0]):
            self.weight = tensors[1]  # the call's weight, for its quantizer's record
            return (True, "", label, WEIGHT_B)  # x @ W: W quantized as a weight, per output channel (its columns)
        if any(_reads_parameter(t) for t in tensors):
            why = ("reads a parameter itself as an operand (a weight: qframe quantizes weights in Conv/Linear, and a "
                   "2-d parameter as the right operand of a matmul of an activation)")
        elif not acts:
            why = "reads no activation (only tensors made from constants or parameters)"
        elif not plan:
            why = "of activations is not one matmul"
        else:
            why = ""
        return (not why, why, label)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors(args) + _tensors(kwargs)
        if any(self.act(t) for t in inputs) or (any(self.computed(t) for t in inputs) and (
                func in INDEX_OPS or not any(t.is_floating_point() for t in _tensors(out)))):
            self.mark(out)  # integers stay marked as integers; a float made from them only by indexing a table
        kind = KINDS.get(func) or ("linear" if func in FUNCTIONAL_LAYERS else "unplaced" if func in UNPLACED else None)
        if kind is not None and self.stack:
            owner, frame = self.stack[-1]
            if kind == "linear" and isinstance(owner, FUNCTIONAL_LAYERS[func][2]):
                return out  # a Linear / Conv module's own call: the recipe's
            index = frame.get(kind, 0)
            frame[kind] = index + 1
            inside_skip = any(isinstance(m, self.skip) for m, _ in self.stack)  # e.g. the pool inside a QuantPool
            self.weight = None
            facts = () if inside_skip else self._roles(kind, func, args, kwargs)
            self.calls.append((owner, kind, index, facts, call_form(kind, args), self.weight))
        return out

    def _roles(self, kind, func, args, kwargs) -> tuple:
        """Operand facts for :func:`_choose`: which are activations, which a conv/linear just produced."""
        if kind == "sdpa":
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")])[:3]
            return self._operands((q, k, v), "attention")
        if kind == "cat":
            tensors = args[0] if args else kwargs.get("tensors", ())
            return (len(tensors) > 1 and all(self.act(t) for t in tensors),)
        if kind == "pool":
            return (self.act(args[0]) if args else False,)
        if kind == "linear":  # never placed, noted where it reads an activation; exported as Gemm / MatMul / Conv
            x, weight, bias = (list(args) + [kwargs.get("weight"), kwargs.get("bias")])[:3]
            name, module, _ = FUNCTIONAL_LAYERS[func]
            whose = "a parameter of its module" if isinstance(weight, nn.Parameter) else "a tensor computed in forward"
            why = (f"with {whose} as weight, not an nn.{module}: qframe quantizes the weights of Conv/Linear modules "
                   "(qframe.register_module gives a module a quantized twin)") if self.act(x) else ""
            op = ("Gemm" if x.dim() == 2 and bias is not None else "MatMul") if func is F.linear else \
                ("ConvTranspose" if "transpose" in name else "Conv")
            return (False, why, name, op)
        if kind == "unplaced":  # never placed; named where it reads an activation
            if self.weight_only:
                return self._operands(_tensors(args), UNPLACED[func]) + ("MatMul",)
            why = ("(not placed: qframe quantizes the inputs of matmul / mm / bmm / addmm and of a two-operand einsum; "
                   "written as one of those, it is quantized)") if any(self.act(t) for t in _tensors(args)) else ""
            return (False, why, UNPLACED[func], "MatMul")
        if kind == "einsum":
            equation, operands = _einsum_operands(args, kwargs)
            plan = len(operands) == 2 and _einsum_plan(equation, [t.shape for t in operands])
            return self._operands(operands, f"einsum {equation!r}", bool(plan))
        first = 1 if kind == "addmm" else 0
        a, b = (args[p] if p < len(args) else next((kwargs[k] for k in _KEYWORDS.get((kind, p), ()) if k in kwargs),
                                                   None) for p in (first, first + 1))
        if kind == "addmm":
            return self._operands((a, b), "matmul")
        if kind == "add":
            same = self.act(a) and self.act(b) and a.shape == b.shape and not kwargs.get("alpha", 1) != 1
            made = [self.produced[id(t)][0] if id(t) in self.produced else None for t in (a, b)]
            return (same, made[0], made[1], func in INPLACE)
        return self._operands((a, b), "matmul")


def _reads_parameter(t) -> bool:
    """A parameter itself or a view of one."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _is_weight(t) -> bool:
    """A 2-d parameter itself (not a view of one): a matmul's ``[K, N]`` weight."""
    return isinstance(t, nn.Parameter) and t.dim() == 2 and t.is_floating_point()


def _choose(kind: str, facts: tuple, rules: PlacementRules) -> tuple[str, ...]:
    """The roles to quantize at one call site."""
    if not facts or not facts[0]:
        return ()
    if kind in ("matmul", "addmm") and rules.matmul and facts[3:] == (WEIGHT_B,):
        return ("a", WEIGHT_B)
    if kind in ("matmul", "addmm", "einsum") and rules.matmul:
        return ("a", "b")
    if kind == "sdpa" and rules.matmul:
        return ("q", "k", "p", "v")
    if kind == "cat" and rules.concat:
        return ("inputs",)
    if kind == "pool" and rules.pool:
        return ("input",)
    if kind == "add" and rules.residual != "none":
        _, a_made, b_made, inplace = facts
        a_made, b_made = a_made in rules.residual_after, b_made in rules.residual_after
        if not (a_made or b_made):
            return ()
        if rules.residual == "both" and not inplace:
            return ("a", "b")
        return ("a",) if b_made and not a_made and not inplace else ("b",)  # the skip: what the conv did not make
    return ()


def place_quantizers(model: nn.Module, example, make, target: str = "tensorrt", skip: tuple = (),
                     rules: PlacementRules | None = None, float_ops: dict | None = None,
                     weights: bool = False, weight_only: bool = False) -> dict[str, int]:
    """Read ``model``'s graph by running it on ``example`` and attach quantizers (``make(kind, role)`` builds
    one) where ``target``'s :data:`TARGET_RULES` (or ``rules``) say, in place. Modules of the types in
    ``skip`` (qframe's own quantized layers, adds and pools) are left as they are. Returns the count
    of quantized sites by kind. ``float_ops`` (a dict) receives ``{"module::Op": reason}`` for the matmuls,
    attentions and einsums that stay float where the target wants them quantized (an einsum that is not one
    matmul, an operand that is a weight, operands made from constants alone). ``weights``: a 2-d parameter
    that is the right operand of a matmul of an activation (``x @ W``) is quantized as a weight (role
    :data:`WEIGHT_B`, per output channel); without it such a matmul stays float, listed. ``weight_only`` (a recipe
    without activation quantizers): nothing is placed, and ``float_ops`` receives the ops whose weight stays float
    (a parameter read by a matmul, an einsum or another product; ``F.linear`` / ``F.conv*`` outside their modules).
    """
    if target not in TARGET_RULES:
        raise one_of("placement target", target, TARGETS)
    rules = rules or TARGET_RULES[target]
    if any(isinstance(m, SiteQuantizers) for m in model.modules()):
        return {}  # placed already
    from qframe.quant.modules import QUANT_LAYERS

    stack: list = []
    produced: dict[int, torch.Tensor] = {}
    handles = []

    def pre(module):
        def hook(_m, _args):
            stack.append((module, {}))
        return hook

    def post(module):
        def hook(_m, _args, out):
            if stack and stack[-1][0] is module:
                stack.pop()
            if isinstance(module, QUANT_LAYERS + (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                kind = "linear" if isinstance(module, nn.Linear) else "conv"
                for t in _tensors(out):
                    produced[id(t)] = (kind, t)
        return hook

    for module in model.modules():
        handles.append(module.register_forward_pre_hook(pre(module)))
        handles.append(module.register_forward_hook(post(module), always_call=True))
    discover = _Discover(stack, produced, skip, weights, weight_only)
    with eval_mode(model):
        try:
            discover.mark(list(example.values()) if isinstance(example, dict) else example)
            with torch.no_grad(), discover:
                if isinstance(example, dict):
                    model(**example)
                else:
                    model(*(example if isinstance(example, (tuple, list)) else (example,)))
        except Exception as exc:  # a model that does not run on the example keeps its module-level quantizers
            log.warning("placement: %s did not run on the example input (%s: %s); quantizers stay at Conv/Linear inputs "
                        "and qframe's own residual/pool modules only", type(model).__name__, type(exc).__name__,
                        str(exc).splitlines()[0][:160] if str(exc) else "")
            return {}
        finally:
            for h in handles:
                h.remove()
    owners: dict[int, tuple[nn.Module, dict, dict, dict]] = {}
    parameters = {id(p): n for n, p in model.named_parameters()}
    counts: dict[str, int] = {}
    float_matmuls: dict[str, dict[str, list[str]]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for owner, kind, index, facts, form, weight in discover.calls:
        entry = owners.setdefault(id(owner), (owner, {}, {}, {}))
        if isinstance(owner, skip):
            continue
        roles = _choose(kind, facts, rules)
        placed_float = kind in ("matmul", "addmm", "sdpa", "einsum") and (rules.matmul or weight_only) or kind in (
            "linear", "unplaced")
        if placed_float and not roles and facts and facts[1] and float_ops is not None:
            # keyed by the op, not its module, so the module's other layers keep their own checks
            _, why, label, *op = facts
            op = op[0] if op else "Einsum" if kind == "einsum" else "Gemm" if kind == "addmm" else "MatMul"
            labels = float_matmuls.setdefault(f"{names.get(id(owner), '')}::{op}", {})
            if label not in labels.setdefault(why, []):
                labels[why].append(label)
        if roles:
            entry[1].setdefault(kind, {})[index] = roles
            entry[2].setdefault(kind, {})[index] = form
            if WEIGHT_B in roles and id(weight) in parameters:
                entry[3][f"{kind}{index}_{WEIGHT_B}"] = parameters[id(weight)]
            counts[kind] = counts.get(kind, 0) + 1
    for key, reasons in float_matmuls.items():
        float_ops[key] = "; ".join(f"{', '.join(labels)} {why}" for why, labels in reasons.items()) + \
            (": its weight stays float (the recipe quantizes the weights of Conv/Linear modules)" if weight_only else
             ": it runs float (" + ("TensorRT has no INT8 Einsum" if key.endswith("::Einsum") else
                                    f"TensorRT runs a {key.rpartition('::')[2]} in INT8 where its inputs are quantized") + ")")
    for owner, sites, forms, weights in owners.values():
        if sites:
            owner.qframe_sites = SiteQuantizers(sites, make, forms, weights).train(owner.training)  # its owner's mode
    if counts:
        _install_global_hooks()
    return counts
