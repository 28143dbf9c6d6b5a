"""Parallel convolution branches that are summed, merged into one convolution (structural reparameterization).

RepVGG-style blocks (transformers' TextNet and PP-LCNetV3, the backbone of PP-OCRv5's detector; timm's
RepVGG and MobileOne bring their own ``reparameterize_model``) train several convolutions side by side on
the same input, a k x k, a 1 x 1, a k x 1 and a 1 x k, often beside a BatchNorm of the input itself (the
identity branch), and sum them. Deployed as written, each branch runs, each is quantized on its own and the
sum of their rounding errors reaches the next layer; merged, one convolution runs and is quantized once.

With BatchNorms folded (:func:`qframe.quant.fold.fold_bn`) each branch is a convolution (or that identity
BatchNorm: a per-channel scale and shift, the centre tap of the merged kernel), and their sum is one
convolution whose kernel is the sum of the branch kernels, each padded to the largest and centred. The
branches are found by running the model once on an example batch: module hooks give each convolution's
input and output, a torch function mode the adds (``a + b``, ``torch.add``, and ``a += b`` as a new sum) and
every other read of a branch output. A sum merges
where every branch reads the same tensor, has the same stride, dilation, groups and output channels, a
kernel centred in the largest one's, and an output read by the add alone. The model is then run again:
a merge that changes the output is undone, unless the change is the sum's rounding alone, which a head
that amplifies rounding (a detector's top-k) turns into other outputs (:func:`_checked`). The branches
merged away return :class:`NoBranch`, which an add passes over (nothing is computed or exported for it).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from qframe.quant.fold import NORM, _producer_base, _run, _tensors, call_example, run_with, same_function
from qframe.utils.modules import set_submodule

log = logging.getLogger(__name__)

_T = torch.Tensor
_ADDS = (torch.add, _T.add, _T.__add__, _T.__radd__)
# `x += branch(x)` (timm's RepVGG and MobileOne) reaches a torch function mode as `add_`; Python rebinds x to what
# it returns. Finding sums, qframe follows it as a new sum; an explicit `x.add_(y)`, whose return is dropped, then
# leaves x as it was, so later reads count against x's branch and its group does not merge.
_IADD = (_T.add_, _T.__iadd__)
_ANY_ADD = _ADDS + _IADD  # what a merged-away branch passes over
_METADATA = ("size", "dim", "numel", "__get__", "__len__")  # reads of a tensor's shape, not its values
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class NoBranch(torch.Tensor):
    """What a merged-away branch returns: an add with it gives the other operand; any other use is an error."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _ANY_ADD and len(args) == 2 and not kwargs:
            a, b = args
            return b if isinstance(a, NoBranch) else a
        raise RuntimeError(f"a merged convolution branch's output was used by {getattr(func, '__name__', func)}, "
                           "not only added")


class _PassOverMarks(TorchFunctionMode):
    """:class:`NoBranch` for a tracer that cannot make tensor subclasses (torch.export's fake tensors): a
    merged-away branch returns a plain tensor this mode holds (``marks``), and an add with it gives the other
    operand; nothing is computed or traced for it."""

    def __init__(self):
        super().__init__()
        self.marks: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _ANY_ADD and len(args) == 2 and not kwargs:
            a, b = args
            if any(a is m for m in self.marks):
                return b
            if any(b is m for m in self.marks):
                return a
        return func(*args, **(kwargs or {}))


_TRACING: list[_PassOverMarks] = []


@contextlib.contextmanager
def branches_as_marks():
    """Within the block, merged-away branches pass over adds by :class:`_PassOverMarks`, not :class:`NoBranch`."""
    mode = _PassOverMarks()
    _TRACING.append(mode)
    try:
        with mode:
            yield
    finally:
        _TRACING.remove(mode)


class MergedBranch(nn.Module):
    """A branch whose computation moved into the convolution ``into``, with which it was summed."""

    def __init__(self, into: str):
        super().__init__()
        self.into = into

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _TRACING:
            _TRACING[-1].marks.append(mark := x.new_zeros(()))
            return mark
        return torch.Tensor._make_subclass(NoBranch, x.new_zeros(()))

    def extra_repr(self) -> str:
        return f"into={self.into!r}"


class _Sums(TorchFunctionMode):
    """Watches the adds of branch outputs (``terms``: output id -> (module name, or None for a sum; input id))
    and the reads."""

    def __init__(self, terms: dict, keep: dict, reads: dict):
        super().__init__()
        self.terms, self.keep, self.reads, self.sums = terms, keep, reads, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _IADD and len(args) == 2 and not kwargs and isinstance(args[0], torch.Tensor) and \
                id(args[0]) in self.terms:
            func = _T.__add__  # a branch output or a sum added to in place: a new sum, as `x += y` rebinds x to it
        out = func(*args, **kwargs)
        if getattr(func, "__name__", "") not in _METADATA:
            for t in _tensors(args) + _tensors(kwargs):
                if id(t) in self.reads:  # branch outputs and sums only: they stay alive, so their ids are theirs
                    self.reads[id(t)] += 1
        if func in _ADDS and len(args) == 2 and not kwargs and isinstance(out, torch.Tensor):
            a, b = (self.terms.get(id(t)) if isinstance(t, torch.Tensor) else None for t in args)
            if a and b and a[1] == b[1] and args[0].shape == args[1].shape == out.shape:
                self.terms[id(out)], self.keep[id(out)], self.reads[id(out)] = (None, a[1]), out, 0
                self.sums.append((id(args[0]), id(args[1]), id(out)))
            elif (a and _is_zero(args[1])) or (b and _is_zero(args[0])):  # `out = 0; out += branch(x)`: the branch
                self.terms[id(out)], self.keep[id(out)], self.reads[id(out)] = a or b, out, 0
        return out


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def find_branch_sums(model: nn.Module, example: torch.Tensor) -> list[tuple]:
    """Each summed group of branches whose every branch output is read by its add alone, in call order, as
    the tree of its adds: ``(left, right)`` pairs down to the names of the modules (convolutions and identity
    BatchNorms) summed."""
    modules = dict(model.named_modules())
    terms: dict[int, tuple[str | None, int]] = {}
    keep: dict[int, torch.Tensor] = {}  # alive until the run ends, so ids are not reused
    calls: dict[str, int] = {}
    reads: dict[int, int] = {}

    def hook(name):
        def record(_module, args, out):
            calls[name] = calls.get(name, 0) + 1
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                terms[id(out)], reads[id(out)] = (name, id(args[0])), 0
                keep[id(out)], keep[id(args[0])] = out, args[0]
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()
               if _producer_base(m) in CONVS or _plain_norm(m)]
    sums = _Sums(terms, keep, reads)
    try:
        with torch.no_grad(), sums:
            call_example(model, example)
    finally:
        for h in handles:
            h.remove()
    by_out = {out: (a, b) for a, b, out in sums.sums}
    inner = {i for a, b, _ in sums.sums for i in (a, b)}
    groups, stack = [], [out for out in by_out if out not in inner]  # the largest sums first
    while stack:
        out = stack.pop(0)
        tree = _tree(by_out, terms, out)
        if all(reads[p] == 1 for p in _parts(by_out, out)) and all(calls[n] == 1 for n in _leaves(tree)):
            groups.append(tree)
        else:  # a branch read by more than its add: the partial sums below it may still merge
            stack[:0] = [t for t in by_out[out] if t in by_out]
    return groups


def _plain_norm(module: nn.Module) -> bool:
    """A BatchNorm that computes nothing else: torch's, or one fused with an activation that is none (timm's
    ``BatchNormAct2d(apply_act=False)``, RepVGG's identity branch; the merged model's output check confirms)."""
    return isinstance(module, NORM) and module.running_var is not None and (type(module).forward is NORM.forward or all(
        isinstance(child, nn.Identity) for child in module.children()))


def _tree(by_out: dict, terms: dict, t: int):
    return tuple(_tree(by_out, terms, u) for u in by_out[t]) if t in by_out else terms[t][0]


def _leaves(tree) -> list[str]:
    return [tree] if isinstance(tree, str) else [n for t in tree for n in _leaves(t)]


def _evaluate(tree, outputs: dict) -> torch.Tensor:
    """The sum ``tree`` of the module ``outputs``, added in the model's own order (the same rounding)."""
    return outputs[tree] if isinstance(tree, str) else _evaluate(tree[0], outputs) + _evaluate(tree[1], outputs)


def _parts(by_out: dict, out: int) -> list[int]:
    """The ids of every operand under the sum ``out`` (the branch outputs and partial sums)."""
    stack, parts = [out], []
    while stack:
        for t in by_out.get(stack.pop(), ()):
            parts.append(t)
            stack.append(t)
    return parts


def _merged_kernel(model: nn.Module, names: list[str]) -> tuple[str, torch.Tensor, torch.Tensor] | str:
    """``(keeper, weight, bias)`` of the one convolution that computes the sum of ``names``, or why none does."""
    convs = {n: model.get_submodule(n) for n in names if isinstance(model.get_submodule(n), CONVS)}
    norms = [n for n in names if n not in convs]
    if not convs:
        return "no convolution among the branches"
    keeper = max(convs, key=lambda n: convs[n].weight[0, 0].numel())
    k = convs[keeper]
    big, pad = k.weight.shape[2:], k.padding
    if isinstance(pad, str) or k.padding_mode != "zeros":
        return f"{keeper} pads by {pad!r} / {k.padding_mode}"
    weight = torch.zeros(k.weight.shape, dtype=torch.float64)
    bias = torch.zeros(k.out_channels, dtype=torch.float64)
    for name, c in convs.items():
        geometry = (c.stride, c.dilation, c.groups, c.out_channels, c.in_channels, type(c))
        if geometry != (k.stride, k.dilation, k.groups, k.out_channels, k.in_channels, type(k)) or isinstance(c.padding, str):
            return f"{name} differs from {keeper} in stride, dilation, groups or channels"
        offset = [(b - s) // 2 for b, s in zip(big, c.weight.shape[2:])]
        if any((b - s) % 2 or p != q - o * d for b, s, p, q, o, d in
               zip(big, c.weight.shape[2:], c.padding, pad, offset, c.dilation)):
            return f"{name}'s kernel is not centred in {keeper}'s"
        window = tuple(slice(o, o + s) for o, s in zip(offset, c.weight.shape[2:]))
        weight[(slice(None), slice(None)) + window] += c.weight.double()
        if c.bias is not None:
            bias += c.bias.double()
    for name in norms:  # a BatchNorm of the input itself: the centre tap, channel to its own channel
        bn = model.get_submodule(name)
        if k.in_channels != k.out_channels or any(s != 1 for s in k.stride) or \
                any(p != (b // 2) * d for p, b, d in zip(pad, big, k.dilation)) or any(b % 2 == 0 for b in big):
            return f"the identity branch {name} needs a stride-1 'same' convolution with as many inputs as outputs"
        scale = torch.rsqrt(bn.running_var.double() + bn.eps) * (bn.weight.double() if bn.affine else 1.0)
        shift = (bn.bias.double() if bn.affine else 0.0) - bn.running_mean.double() * scale
        per_group = k.in_channels // k.groups
        channels = torch.arange(k.out_channels)
        weight[(channels, channels % per_group) + tuple(b // 2 for b in big)] += scale
        bias += shift
    return keeper, weight, bias


def merge_branches(model: nn.Module, example: torch.Tensor, reference=None) -> dict[str, list[str]]:
    """Merge every group of summed convolution branches of ``model`` into one of its convolutions, in place
    (inference: BatchNorms folded first, identity BatchNorms by their running statistics). Returns
    ``{keeper: [merged branch names]}``, also kept in ``model.qframe_merged_branches``; a group that does not
    merge is logged with the reason. ``reference``: the model's output on ``example``, when the caller has it."""
    merged: dict[str, list[str]] = {}
    reference = _run(model, example) if reference is None else reference
    for tree in find_branch_sums(model, example):
        names = _leaves(tree)
        found = _merged_kernel(model, names)
        if isinstance(found, str):
            log.info("branches %s stay apart: %s", ", ".join(names), found)
            continue
        keeper, weight, bias = found
        conv = copy.deepcopy(model.get_submodule(keeper))
        with torch.no_grad():
            conv.weight.copy_(weight.to(conv.weight.dtype))
            conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        before = {n: model.get_submodule(n) for n in names}
        after = {n: conv if n == keeper else MergedBranch(keeper) for n in names}
        _put(model, after)
        out = _checked(model, example, reference, tree, keeper, before, after)
        if out is not None:
            merged[keeper] = [n for n in names if n != keeper]
            reference = out
        else:
            _put(model, before)
            log.info("branches %s stay apart: merged, the model's output changes", ", ".join(names))
    model.qframe_merged_branches = merged
    if merged:
        log.info("merged %d branches into %d convolutions (%s ...)", sum(map(len, merged.values())), len(merged),
                 ", ".join(f"{k} <- {'+'.join(v)}" for k, v in list(merged.items())[:2]))
    return merged


def _put(model: nn.Module, modules: dict) -> None:
    for name, module in modules.items():
        set_submodule(model, name, module)


def _checked(model: nn.Module, example, reference, tree, keeper: str, before: dict, after: dict):
    """The merged model's output where it computes what it did before, else None. Where a head amplifies
    rounding (top-k among near-ties, boxes snapped to anchor steps: detectors), an exact merge changes the
    output; it stands if the merged model, given the branches' own sum in place of its convolution's output,
    gives the output from before exactly (nothing else changed) and that sum is its output but for rounding."""
    try:
        out = _run(model, example)
    except RuntimeError:  # a merged-away branch's output used otherwise than added
        return None
    if same_function(reference, out):
        return out
    _put(model, before)
    _, branches = run_with(model, example, _leaves(tree))
    _put(model, after)
    summed = _evaluate(tree, {name: outs[0] for name, outs in branches.items()})
    injected, own = run_with(model, example, [keeper], {keeper: summed})
    return out if same_function(reference, injected, rtol=1e-6) and same_function(summed, own[keeper][0]) else None
