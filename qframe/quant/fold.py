"""Batch-norm folding: merge an inference-mode BatchNorm into the Conv, ConvTranspose or Linear that feeds it.

``y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta`` becomes a conv with
``w' = w * gamma / sqrt(var + eps)`` and ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``,
which is what TensorRT does at engine build time; quantizing ``w'`` is what deploys.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qframe.errors import QFrameError, first_line
from qframe.utils.batches import call_model
from qframe.utils.modules import copy_model, eager_module, eval_mode, is_parametrized, set_submodule, unparametrized

log = logging.getLogger(__name__)


TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)  # weight [in, out / groups, *kernel]
PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) + TRANSPOSED  # matched with isinstance
NORM = nn.modules.batchnorm._BatchNorm  # BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses
FROZEN_EPS = 1e-5  # what transformers' frozen norms add to the variance in their forward (torchvision's keep .eps)
_VIEWS = ("flatten", "view", "reshape")
# modules that pass their input on unchanged in eval (folding is for inference; QAT folds only Conv2d + BN2d pairs)
_EVAL_IDENTITY = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout)  # between a Linear and its BatchNorm1d (tokens flattened into the batch)


def _producer_base(module: nn.Module, overridden: bool = False) -> type | None:
    """The PRODUCERS type ``module`` computes as (its forward not overridden), else None. ``overridden``:
    also a subclass that overrides forward (timm's Conv2dSame pads, then convolves with its own weight), for
    callers that check the folded model's outputs: such a forward may use its weight in other ways."""
    for base in PRODUCERS:
        if isinstance(module, base) and (overridden or type(module).forward is base.forward):
            return base
    return None


def _overrides_forward(module: nn.Module) -> bool:
    return _producer_base(module, True) is not None and _producer_base(module) is None


_SHAPE_READERS = ("size", "dim", "numel")  # methods that read a tensor's shape, not its values
_SHAPE_ARGS = ("reshape_as", "view_as", "expand_as")  # methods whose argument lends its shape alone


def _value_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users of ``node`` that read its values (not those reading only its shape: LeViT's
    ``bn(x.flatten(0, 1)).reshape_as(x)``, ``x.size(0)``, ``x.shape``)."""
    def shape_only(user):
        if user.op == "call_method":
            return user.target in _SHAPE_READERS or (user.target in _SHAPE_ARGS and user.args[0] is not node)
        return user.op == "call_function" and user.target is getattr and user.args[1:] in (("shape",), ("dtype",),
                                                                                              ("device",))
    return [u for u in node.users if not shape_only(u)]


def is_frozen_norm(module: nn.Module) -> bool:
    """A frozen BatchNorm: fixed statistics and affine parameters held as buffers, not a torch.nn BatchNorm
    (the backbones of transformers' detectors: DetrFrozenBatchNorm2d, RTDetrFrozenBatchNorm2d, DFine...,
    Deimv2..., and torchvision's and timm's FrozenBatchNorm2d). It folds as a BatchNorm2d after a 2-d
    convolution; :func:`fold_bn` checks the folded model's outputs where it has an example input."""
    return (not isinstance(module, NORM) and "FrozenBatchNorm" in type(module).__name__
            and all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 1
                    for n in ("weight", "bias", "running_mean", "running_var")))


def is_norm(module: nn.Module) -> bool:
    """A BatchNorm qframe folds: torch.nn's (and subclasses), or a frozen one (:func:`is_frozen_norm`)."""
    return isinstance(module, NORM) or is_frozen_norm(module)


def _scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gamma / sqrt(var + eps), beta - mean * gamma / sqrt(var + eps))`` in float64: what the norm computes
    in eval, ``x * scale + shift`` per channel."""
    inv_std = torch.rsqrt(bn.running_var.double() + getattr(bn, "eps", FROZEN_EPS))
    affine = getattr(bn, "affine", True)
    gamma = bn.weight.double() if affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if affine else torch.zeros_like(inv_std)
    return gamma * inv_std, beta - gamma * inv_std * bn.running_mean.double()


def _fused(bn: nn.Module) -> bool:
    """A norm module that does more than batch-normalise (e.g. also applies its activation)."""
    if is_frozen_norm(bn):
        return any(True for _ in bn.children())  # timm's FrozenBatchNormAct2d holds its activation
    return type(bn).forward is not NORM.forward and type(bn).forward not in (nn.BatchNorm1d.forward,
                                                                            nn.SyncBatchNorm.forward)


def out_channels(layer: nn.Module) -> int:
    """Output channels (features) of a Conv, ConvTranspose or Linear."""
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def has_statistics(bn: nn.Module) -> bool:
    """Whether ``bn`` keeps running statistics (``track_running_stats=False`` normalises every batch by its own:
    no weight can hold that)."""
    return isinstance(bn.running_mean, torch.Tensor) and isinstance(bn.running_var, torch.Tensor)


def _channels_match(producer: nn.Module, bn: nn.Module) -> bool:
    if not has_statistics(bn) or bn.running_mean.numel() != out_channels(producer):
        return False
    if is_frozen_norm(bn):  # written for [N, C, H, W] maps
        return isinstance(producer, (nn.Conv2d, nn.ConvTranspose2d))
    if isinstance(producer, nn.Linear):
        return isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm))
    return not isinstance(bn, nn.BatchNorm1d) or isinstance(producer, (nn.Conv1d, nn.ConvTranspose1d))


class _Tracer(torch.fx.Tracer):
    """Keeps every Conv/Linear/BatchNorm (subclasses of torch.nn's, from any package) one graph node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PRODUCERS) or is_norm(m) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs_fx(model: nn.Module, overridden: bool = False) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not is_norm(modules.get(node.target)):
            continue
        src = node.args[0]
        while (isinstance(src, torch.fx.Node) and src.op == "call_method" and src.target in _VIEWS
               and len(_value_users(src)) == 1):  # a Linear's tokens flattened into the batch for BatchNorm1d
            src = src.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and _producer_base(modules.get(src.target), overridden) is not None
            and (src is node.args[0] or isinstance(modules[src.target], nn.Linear))
            and _channels_match(modules[src.target], modules[node.target])
            and len(_value_users(src)) == 1  # the conv output feeds nothing but this BN
            and calls[src.target] == 1 == calls[node.target]  # neither module is shared
        ):
            pairs.append((src.target, node.target))
        elif len(node.users) == 1 and calls[node.target] == 1 and not _fused(modules[node.target]):
            user, src = next(iter(node.users)), node
            while (user.op == "call_module" and isinstance(modules.get(user.target), _EVAL_IDENTITY)
                   and len(user.users) == 1):  # LeViT's NormLinear: BN -> Dropout -> Linear
                user, src = next(iter(user.users)), user
            layer = modules.get(user.target) if user.op == "call_module" else None
            if (layer is not None and calls[user.target] == 1 and user.args[:1] == (src,)
                    and _takes_norm_before(layer, modules[node.target], overridden)):
                pairs.append((node.target, user.target))  # BatchNorm -> Linear / Conv, in data-flow order
    return pairs


_CONV_NORM = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def _takes_norm_before(layer: nn.Module, bn: nn.Module, overridden: bool = False) -> bool:
    """Whether ``bn``, whose output ``layer`` reads, folds into ``layer``: a BatchNorm1d into a Linear over its
    features, or a BatchNorm into a convolution of its dimension that pads nothing (padding would add zeros
    where the normalised input had the BN's shift), with matching channels."""
    base = _producer_base(layer, overridden)
    if base is nn.Linear:
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.in_features
    if base in _CONV_NORM:
        no_padding = layer.padding == "valid" or (not isinstance(layer.padding, str) and not any(layer.padding))
        return isinstance(bn, _CONV_NORM[base]) and bn.num_features == layer.in_channels and no_padding
    return False


def _conv_bn_pairs_by_execution(model: nn.Module, example, overridden: bool = False) -> list[tuple[str, str]]:
    """Pairs seen by running ``model`` once: a BN whose input is a Conv/Linear output (or a flattening
    view of a Linear output), each module called once. Whether the output also feeds other layers
    cannot be seen this way: :func:`fold_bn` checks the folded model's outputs against the original's."""
    produced: dict[int, tuple[str, torch.Tensor]] = {}
    calls: dict[str, int] = {}
    seen: list[tuple[str, str]] = []

    def after_producer(name):
        def hook(_module, _inputs, out):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)  # the tensor is kept, so its id stays unique
        return hook

    norm_out: dict[int, tuple[str, torch.Tensor]] = {}

    def after_norm(name):
        def hook(_module, _inputs, out):
            if isinstance(out, torch.Tensor):
                norm_out[id(out)] = (name, out)
        return hook

    def before_layer(name):
        def hook(_module, inputs):
            x = inputs[0] if inputs else None
            if isinstance(x, torch.Tensor) and id(x) in norm_out:
                seen.append((norm_out[id(x)][0], name))  # BatchNorm -> Linear / Conv, in data-flow order
        return hook

    def before_norm(name):
        def hook(_module, inputs):
            calls[name] = calls.get(name, 0) + 1
            x = inputs[0] if inputs else None
            if not isinstance(x, torch.Tensor):
                return
            src = produced.get(id(x))
            if src is None and x._base is not None and x.dim() == 2:
                src = produced.get(id(x._base))  # Linear tokens flattened into the batch
                if src is not None and src[1].shape[-1] != x.shape[-1]:
                    src = None
            if src is not None:
                seen.append((src[0], name))
        return hook

    modules = dict(model.named_modules())
    handles = []
    for name, module in modules.items():
        if _producer_base(module, overridden) is not None:
            handles.append(module.register_forward_hook(after_producer(name)))
            handles.append(module.register_forward_pre_hook(before_layer(name)))
        elif is_norm(module):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
            if not _fused(module):
                handles.append(module.register_forward_hook(after_norm(name)))
    try:
        with torch.no_grad():
            call_example(model, example)
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(a, b) for a, b in seen if calls.get(a) == 1 == calls.get(b) and _foldable(modules[a], modules[b], overridden)]
    # one pair per norm: into the layer before it where it has one (a norm between two convs), else the first after
    kept, taken = [], {b for a, b in pairs if not is_norm(modules[a])}
    for a, b in pairs:
        if is_norm(modules[a]):
            if a in taken:
                continue
            taken.add(a)
        kept.append((a, b))
    return kept


def _foldable(first: nn.Module, second: nn.Module, overridden: bool = False) -> bool:
    """A BN after a layer with matching channels, or a BN before a Linear / unpadded conv (:func:`_takes_norm_before`)."""
    if is_norm(first):
        return has_statistics(first) and _takes_norm_before(second, first, overridden)
    return _channels_match(first, second)


def _conv_bn_pairs_sequential(model: nn.Module, overridden: bool = False) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if _producer_base(a, overridden) is not None and is_norm(b) and _channels_match(a, b):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module, example=None, *, overridden: bool = False) -> list[tuple[str, str]]:
    """Names of (Conv/Linear, BatchNorm) pairs where the BN consumes the producer's output alone.

    Producers are Conv1d/2d/3d, ConvTranspose1d/2d/3d and Linear (and subclasses that keep their forward),
    norms every BatchNorm1d/2d/3d and SyncBatchNorm (and subclasses, e.g. a norm fused with its activation)
    and the frozen BatchNorms of detector backbones (:func:`is_frozen_norm`, after a 2-d convolution).
    Uses a torch.fx trace of the forward pass; models that do not trace (most third-party ones)
    are run once on ``example`` with hooks on every producer and norm; without an example, adjacent
    children of ``nn.Sequential`` containers. ``overridden``: also producers whose forward is overridden
    (folding into them is right only where the folded model's outputs are checked, as :func:`fold_bn` does).
    """
    try:
        return _conv_bn_pairs_fx(model, overridden)
    except Exception as exc:  # fx raises many types on untraceable control flow
        if example is not None:
            log.debug("fx trace failed (%s); finding Conv/BatchNorm pairs by running the model", exc)
            return _conv_bn_pairs_by_execution(model, example, overridden)
        log.warning("%s does not trace with torch.fx (%s) and no example input was given: only adjacent "
                    "Conv/BatchNorm children of nn.Sequential containers are folded", type(model).__name__,
                    str(exc).splitlines()[0][:120])
        return _conv_bn_pairs_sequential(model, overridden)


def out_channel_view(layer: nn.Module, per_channel: torch.Tensor) -> torch.Tensor:
    """``per_channel`` (one value per output channel of ``layer``) shaped to multiply its weight: ``[out, 1, ...]``
    for a Conv / Linear; ``[in, out / groups, 1, ...]`` for a ConvTranspose, where row ``i``, an input channel of
    group ``g``, holds the values of group ``g``'s output channels."""
    w = layer.weight
    if not isinstance(layer, TRANSPOSED):
        return per_channel.view(-1, *([1] * (w.dim() - 1)))
    groups = layer.groups
    by_group = per_channel.view(groups, 1, -1)  # [groups, 1, out / groups]
    rows = by_group.expand(groups, w.shape[0] // groups, -1).reshape(w.shape[0], -1)  # [in, out / groups]
    return rows.view(*rows.shape, *([1] * (w.dim() - 2)))


@torch.no_grad()
def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> None:
    """Fold ``bn``'s running statistics and affine parameters into ``conv`` (a Conv, ConvTranspose or Linear
    whose output ``bn`` normalises) in place."""
    factor, shift = _scale_shift(bn)
    weight = conv.weight.double() * out_channel_view(conv, factor)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    conv.weight.copy_(weight.to(conv.weight.dtype))
    new_bias = (shift + bias * factor).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def _tensors(out) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, tuple, list, dict or ModelOutput-like mapping)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def same_function(a, b, rtol: float = 1e-4) -> bool:
    """Whether two model outputs agree: every tensor within ``rtol`` relative (float64) error, or within four
    rounding steps of a float16 / bfloat16 output (whose folded weights are rounded again: 1e-4 is below them)."""
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb) or not ta:
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape:
            return False
        low = [t.dtype for t in (x, y) if t.dtype in (torch.float16, torch.bfloat16)]
        bound = max(rtol, 4 * max(torch.finfo(d).eps for d in low)) if low else rtol
        x, y = x.double(), y.double()
        if not torch.isfinite(y).all() or (x - y).norm() > bound * x.norm() + 1e-9:
            return False
    return True


def _without_norm(bn: nn.Module) -> nn.Module:
    """What stays of a norm once folded: nothing, or a fused norm's own submodules (its activation)."""
    children = list(bn.children())
    if not children:
        return nn.Identity()
    return children[0] if len(children) == 1 else nn.Sequential(*children)


def _norm_of(model: nn.Module, pair: tuple[str, str]) -> str:
    """The BatchNorm's name in a pair (pairs are in data-flow order: layer then BN, or BN then Linear)."""
    return pair[0] if is_norm(model.get_submodule(pair[0])) else pair[1]


def _fold_pair(model: nn.Module, first: str, second: str) -> None:
    a, b = model.get_submodule(first), model.get_submodule(second)
    before = is_norm(a)  # the BatchNorm feeds the layer (else it follows it)
    name, layer = (second, b) if before else (first, a)
    if is_parametrized(layer):  # a weight written into a parametrization is lost
        layer = unparametrized(layer)
        set_submodule(model, name, layer)
        a, b = (a, layer) if before else (layer, b)
    if before:
        fold_bn_into_next(a, b)
        set_submodule(model, first, _without_norm(a))
    else:
        fold_conv_bn(a, b)
        set_submodule(model, second, _without_norm(b))


@torch.no_grad()
def fold_bn_into_next(bn: nn.Module, layer: nn.Module) -> None:
    """Fold a BatchNorm that feeds ``layer`` (a Linear, or a convolution that pads nothing) into it, in place:
    ``W (gamma (x - mean) / sigma + beta) + b = (W diag(gamma / sigma)) x + b + W (beta - gamma mean / sigma)``,
    each input channel's scale on its weight slice (per group for a grouped convolution), the shift summed
    over the kernel into the bias."""
    scale, shift = _scale_shift(bn)
    w = layer.weight.double()  # [out, in / groups, *kernel]
    groups = getattr(layer, "groups", 1)
    per_out = lambda v: v.reshape(groups, 1, -1).expand(groups, w.shape[0] // groups, -1).reshape(w.shape[0], -1)  # noqa: E731
    scale_w, shift_w = per_out(scale), per_out(shift)  # [out, in / groups]: the input channels each output reads
    extra = (1,) * (w.dim() - 2)
    bias = (layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)) + \
        (w * shift_w.reshape(*shift_w.shape, *extra)).flatten(1).sum(1)
    layer.weight.copy_((w * scale_w.reshape(*scale_w.shape, *extra)).to(layer.weight.dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(bias.to(layer.weight.dtype))
    else:
        layer.bias.copy_(bias.to(layer.bias.dtype))


def call_example(model: nn.Module, example):
    """The model on an example batch: ``model(*x)`` for a tuple of inputs, ``model(**x)`` for a dict, else
    ``model(x)`` (a tensor, or a list the model takes as its one input)."""
    return model(example) if isinstance(example, list) else call_model(model, example)


def _run(model: nn.Module, example):
    with torch.no_grad():
        return call_example(model, example)


def fold_bn(model: nn.Module, example=None, merge: bool = True) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm of ``model`` into the Conv/ConvTranspose/Linear before it (or the Linear,
    or the convolution that pads nothing, after it), in place; return the pairs.

    Each folded BN is replaced by ``nn.Identity`` (a norm fused with its activation by what it holds,
    e.g. the activation), so module names and name filters stay valid. Only valid for inference:
    the running statistics are what gets folded. With ``example`` (one input batch) the pairs of
    models torch.fx cannot trace are found by running the model, and the folded model's outputs
    are checked against the original's: a pair that changes them is not folded; then convolution
    branches that are summed (RepVGG-style blocks, an identity BatchNorm among them) merge into one
    convolution (:func:`qframe.quant.branches.merge_branches`) unless ``merge`` is False. Frozen BatchNorms
    (:func:`is_frozen_norm`) fold and are reported like the others. BatchNorms left
    unfolded are logged as a warning with the reason and kept in ``model.qframe_unfolded_norms``.

    The example runs in eval mode whatever mode the model is in, and each module's mode is restored
    after: in training mode a BatchNorm normalises by the batch's statistics (so no fold would keep the
    outputs) and each run would move the running statistics being folded.
    """
    model = eager_module(model, "qframe.fold_bn")
    reference = None
    if example is not None:  # run as the fold runs it: one that does not fit is one line, before any change
        try:
            with eval_mode(model):
                reference = _run(model, example)  # the output the fold must keep
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            shown = f"shape {tuple(example.shape)}" if isinstance(example, torch.Tensor) else f"a {type(example).__name__}"
            raise QFrameError(f"fold_bn's example ({shown}) does not fit the model: {first_line(exc)}; valid: one "
                              "input batch: a tensor or a list (model(x)), a tuple of inputs (model(*x)) or a "
                              "dict (model(**x))") from exc
    if example is not None and any(m.training for m in model.modules()):
        log.warning("fold_bn: %s is in training mode; its running statistics are folded and the fold is checked "
                    "in eval mode (call model.eval() before folding to silence this)", type(model).__name__)
    with eval_mode(model):
        return fold_bn_fitted(model, example, merge, reference)


def fold_bn_fitted(model: nn.Module, example, merge: bool = True, reference=None) -> list[tuple[str, str]]:
    """:func:`fold_bn` of a model in eval mode that ``example`` is known to fit (no check, no mode change);
    ``reference``: the model's output on ``example`` as it is now, when the caller has it (one run fewer)."""
    from qframe.quant.conv_bn import ConvBn2d  # which imports this module

    trained = {f"{n}.bn" for n, m in model.named_modules() if isinstance(m, ConvBn2d)}  # folded as QAT trains
    pairs = find_conv_bn_pairs(model, example, overridden=True)
    norm = {pair: _norm_of(model, pair) for pair in pairs}
    pairs = [pair for pair in pairs if norm[pair] not in trained]
    parametrized = {n for pair in pairs for n in pair if is_parametrized(model.get_submodule(n))}
    unfolded: dict[str, str] = {}
    if example is None:
        for pair in list(pairs):
            other = pair[0] if norm[pair] == pair[1] else pair[1]
            if _overrides_forward(model.get_submodule(other)):
                pairs.remove(pair)
                unfolded[norm[pair]] = (f"{other} ({type(model.get_submodule(other)).__name__}) overrides its "
                                        "base's forward: folding into it needs an example input to check")
            elif _fused(model.get_submodule(_norm_of(model, pair))):
                pairs.remove(pair)
                unfolded[_norm_of(model, pair)] = ("fused norm (its forward does more than normalise): folding it "
                                                   "needs an example input to check")
        for pair in pairs:
            _fold_pair(model, *pair)
    else:
        pairs, folded_out = _apply_checked(model, pairs, example, unfolded, norm=norm, reference=reference)
        if merge:
            from qframe.quant.branches import merge_branches

            merge_branches(model, example, folded_out)  # summed branches, identity BatchNorms among them, into one convolution
    folded = {norm[p] for p in pairs}
    plain = [n for p in pairs if (n := p[1] if p[0] == norm[p] else p[0]) in parametrized]  # the layers folded into
    if plain:
        log.info("fold_bn: the torch.nn.utils.parametrizations of %d layers a BatchNorm folded into became plain "
                 "weights (the value they computed): %s", len(plain), ", ".join(plain[:8]))
    for name, module in model.named_modules():
        if is_norm(module) and not has_statistics(module):
            unfolded[name] = ("track_running_stats=False: it normalises each batch by that batch's statistics, which "
                              "no folded weight can hold")
        elif is_norm(module) and name not in folded | trained and name not in unfolded:
            unfolded[name] = ("its input is not the output of one Conv/Linear that feeds it alone, nor its output the input "
                             "of one Linear or a convolution that pads nothing, alone")
    if example is not None and (generic := [n for n, why in unfolded.items() if why.startswith("its input is not")]):
        for name, outputs in run_with(model, example, generic)[1].items():
            if (calls := len(outputs)) > 1:  # a block the forward uses more than once: pairs are found among modules called once
                unfolded[name] = (f"a forward pass calls it {calls} times (a block used more than once); qframe folds "
                                  "a norm where it and its layer are each called once")
    model.qframe_unfolded_norms = unfolded
    log.info("folded %d BatchNorm layers into the layers before them", len(pairs))
    if unfolded:
        log.warning("%d BatchNorm layers stay unfolded: %s", len(unfolded),
                    "; ".join(f"{n} ({why})" for n, why in list(unfolded.items())[:8]) + (" ..." if len(unfolded) > 8 else ""))
    return pairs


def run_with(model: nn.Module, example, names, replace: dict | None = None):
    """Run ``model`` on ``example``; return its output and, per submodule in ``names``, what each call of it
    returned (a list), those returns replaced by ``replace[name]`` where given."""
    seen: dict[str, list] = {name: [] for name in names}

    def hook(name):
        def record(_module, _inputs, out):
            seen[name].append(out)
            return (replace or {}).get(name)
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        return _run(model, example), seen
    finally:
        for handle in handles:
            handle.remove()


def _only_rounding_changed(model: nn.Module, trial: nn.Module, last: str, example):
    """The folded ``trial``'s output where it is ``model``'s with nothing changed but the fold's rounding at the
    pair's output (submodule ``last``, run once), else ``None``.

    A head that amplifies rounding (top-k among near-ties, argmax, a value snapped to a bin: detection and
    distribution heads) makes an exact fold change the model's output; running ``model`` with the folded
    pair's output put in place of its own must then give the folded output exactly, which it does not where
    the fold changed anything else (a layer's output that other layers read too)."""
    out, seen = run_with(trial, example, [last])
    if len(seen[last]) != 1 or not isinstance(folded := seen[last][0], torch.Tensor):
        return None
    injected, seen = run_with(model, example, [last], {last: folded})
    if len(seen[last]) != 1 or not same_function(seen[last][0], folded) or not same_function(out, injected, rtol=1e-6):
        return None
    return out


def _apply_checked(model: nn.Module, pairs, example, unfolded: dict, apply=None, norm=None, reference=None):
    """Apply ``apply`` (folding) to ``pairs`` keeping the model's outputs; pairs that change them are
    undone and listed in ``unfolded`` under their BatchNorm's name (``norm[pair]``; default the second).
    ``reference``: the model's output on ``example`` before, when the caller has it. Returns the pairs
    applied and the model's output after (``None`` where it was not computed)."""
    apply = apply or _fold_pair
    reference = _run(model, example) if reference is None else reference
    original = copy_model(model)
    for pair in pairs:
        apply(model, *pair)
    if same_function(reference, out := _run(model, example)):
        return pairs, out
    for name, child in original.named_children():  # undo (folding only touched submodules), then one pair at a time
        set_submodule(model, name, child)
    kept = []
    for pair in pairs:
        trial = copy_model(model)
        apply(trial, *pair)
        if same_function(reference, _run(trial, example)):
            apply(model, *pair)
            kept.append(pair)
        elif (changed := _only_rounding_changed(model, trial, pair[1], example)) is not None:
            apply(model, *pair)
            kept.append(pair)
            reference = changed  # later pairs are checked against the model with this one folded
        else:
            bn = (norm or {}).get(pair, pair[1])
            other = pair[0] if bn == pair[1] else pair[1]
            layer = model.get_submodule(other)
            why = (f"{type(layer).__name__} overrides its base's forward and uses its weight otherwise"
                   if _overrides_forward(layer) else
                   f"{other} shares its input or output with other layers, or the norm's forward does more")
            unfolded[bn] = f"folding it into {other} changes the model's output ({why})"
    return kept, None
