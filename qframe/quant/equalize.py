"""Cross-layer equalization with high-bias absorption (Nagel et al., "Data-Free Quantization", 2019).

Between a layer and the next one, any operation that is positively homogeneous per channel
(``f(x / s) = f(x) / s`` for ``s > 0``: ReLU, max and average pooling, dropout at inference,
flatten) lets the output channel ``i`` of the first layer be divided by ``s_i`` and the matching
input channel of the second be multiplied by ``s_i`` without changing the function. Choosing
``s_i = sqrt(r1_i / r2_i)`` (``r1``: the range of the producer's output row, ``r2``: the range of
the consumer's input column) gives both the same range, so one per-tensor grid fits every channel.
ReLU6 clips at 6, which is not homogeneous: it becomes a :class:`ChannelClip` whose per-channel
upper bound is divided by ``s_i`` too, so the function stays exactly the same.

High-bias absorption then moves a constant ``c_i`` out of the producer's bias into the consumer's
(``relu(x - c) = relu(x) - c`` where ``x >= c``), narrowing the activation range that has to be
quantized. ``c_i = max(0, beta_i - 3 gamma_i)`` from the BatchNorm statistics that fed the channel,
which holds for all but ~0.1 % of a Gaussian pre-activation; consumers with zero padding would see
``-c`` at the border, so only unpadded consumers (1x1 convs, Linear) absorb.

Chains are found in a torch.fx trace; a model that does not trace falls back to adjacent children
of ``nn.Sequential`` containers (with a warning). The maths are pure functions of weight tensors
(:func:`equalization_scales`, :func:`scale_pair`, :func:`absorb_pair`); :func:`equalize` applies them.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.quant.fold import find_conv_bn_pairs, fold_bn, fold_conv_bn, is_norm
from qframe.utils.modules import bake_hook_made_weights, bake_parametrizations, set_submodule

log = logging.getLogger(__name__)

LAYERS = (nn.Conv2d, nn.Linear)
# modules that commute with a positive per-channel scale (ReLU6 becomes a ChannelClip first)
HOMOGENEOUS = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool2d, nn.Flatten)
ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_FUNCTIONS = {torch.flatten: "flatten", torch.relu: "relu", nn.functional.relu: "relu"}
_METHODS = {"flatten": "flatten", "relu": "relu", "view": "flatten", "reshape": "flatten"}
FUNCTIONAL_RELU = "<relu>"  # Chain.activation of a torch.relu / F.relu call (no module to name)
SCALE_RANGE = (1e-4, 1e4)  # clamp on one step's per-channel scale: dead channels must not explode


class ChannelClip(nn.Module):
    """``clamp(x, 0, upper_c)`` per channel (dim 1): ReLU6 after equalization scaled its channels."""

    def __init__(self, upper: torch.Tensor):
        super().__init__()
        self.register_buffer("upper", upper.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.minimum(torch.relu(x), self.upper.view(shape).to(x.dtype))

    def extra_repr(self) -> str:
        return f"channels={self.upper.numel()}"


@dataclass
class Chain:
    """A producer layer feeding exactly one consumer layer through per-channel homogeneous ops.

    ``activation`` names the ReLU / ReLU6 / ChannelClip module between them (None: linear chain);
    ``spatial`` is how many consumer inputs each channel became through a flatten (Linear consumers).
    """

    producer: str
    consumer: str
    activation: str | None = None
    spatial: int = 1
    between: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- pure maths


def _consumer_view(weight: torch.Tensor, groups: int, spatial: int) -> torch.Tensor:
    """The consumer weight as ``[groups, out_per_group, in_per_group, taps]``: input channel
    ``g * in_per_group + j`` is ``[g, :, j]``; for a Linear after a flatten, taps are the ``spatial``
    inputs each channel became."""
    out = weight.shape[0]
    if weight.dim() == 2:  # Linear: in_features = channels * spatial
        return weight.reshape(1, out, weight.shape[1] // spatial, spatial)
    return weight.reshape(groups, out // groups, weight.shape[1], -1)


def producer_ranges(weight: torch.Tensor) -> torch.Tensor:
    """Max |w| of each output channel (row) of a producer layer: ``(out,)``."""
    return weight.detach().abs().reshape(weight.shape[0], -1).amax(1)


def consumer_ranges(weight: torch.Tensor, groups: int = 1, spatial: int = 1) -> torch.Tensor:
    """Max |w| over everything that multiplies each input channel of a consumer layer: ``(in,)``."""
    view = _consumer_view(weight.detach().abs(), groups, spatial)
    return view.amax(dim=(1, 3)).reshape(-1)


def equalization_scales(r1: torch.Tensor, r2: torch.Tensor) -> torch.Tensor:
    """``s = sqrt(r1 / r2)``: dividing the producer's rows and multiplying the consumer's columns by
    ``s`` leaves both with range ``sqrt(r1 * r2)``. Channels with a zero range keep ``s = 1``."""
    s = torch.sqrt(r1 / r2)
    s = torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(*SCALE_RANGE)


@torch.no_grad()
def scale_pair(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, s: torch.Tensor, *, groups: int = 1,
               spatial: int = 1) -> None:
    """In place: producer row ``i`` (and bias) divided by ``s_i``, consumer input channel ``i`` times ``s_i``."""
    w1.div_(s.to(w1.dtype).view(-1, *([1] * (w1.dim() - 1))))
    if b1 is not None:
        b1.div_(s.to(b1.dtype))
    view = _consumer_view(w2, groups, spatial)  # a view: scaling it scales w2
    g, _, per_group, _ = view.shape
    view.mul_(s.to(w2.dtype).view(g, 1, per_group, 1))


@torch.no_grad()
def absorb_pair(b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, c: torch.Tensor, *, groups: int = 1,
                spatial: int = 1) -> None:
    """In place: ``c`` moves from the producer's bias into the consumer's (``b2 += W2 c``, summed
    over every tap of each input channel). Exact for a linear or ReLU-type link wherever the
    pre-activation stays ``>= c`` and the consumer has no zero padding."""
    b1.sub_(c.to(b1.dtype))
    view = _consumer_view(w2.double(), groups, spatial).sum(3)  # [groups, out_per_group, in_per_group]
    g, _, per_group = view.shape
    shift = torch.einsum("goi,gi->go", view, c.double().view(g, per_group)).reshape(-1)
    b2.add_(shift.to(b2.dtype))


# ------------------------------------------------------------------------------- finding chains


def _out_channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _link(producer: nn.Module, consumer: nn.Module, flattened: bool) -> int | None:
    """How many consumer inputs each producer channel feeds (1, or the spatial size a flatten made);
    None where the two do not line up channel for channel."""
    channels = _out_channels(producer)
    if type(consumer) is nn.Conv2d:
        ok = isinstance(producer, nn.Conv2d) and not flattened and consumer.in_channels == channels
        return 1 if ok else None
    if isinstance(producer, nn.Linear):  # channels last: a flatten of [B, L, C] interleaves them, never in blocks
        return 1 if consumer.in_features == channels else None
    if not flattened:
        return None  # a Linear on a feature map acts on its last (spatial) dim, not on channels
    return consumer.in_features // channels if consumer.in_features % channels == 0 else None


def _flattens_channels(node) -> bool | None:
    """For a flatten / view / reshape call in a traced graph: True where it flattens from dim 1 on (``[B, C, ...]``
    -> ``[B, C * ...]``, each channel a block), False where it reshapes otherwise (the chain ends), None where the
    node is no reshape."""
    def arg(i, name, default):
        return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)

    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        return arg(1, "start_dim", 0) == 1 and arg(2, "end_dim", -1) in (-1, 3)  # 3: the last of [B, C, H, W]
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:] if len(node.args) > 2 or not isinstance(arg(1, "shape", None), (tuple, list)) \
            else tuple(arg(1, "shape", ()))
        return len(shape) == 2 and -1 in shape  # x.view(x.size(0), -1), x.view(-1, C * H * W)
    return None


def _data_users(node) -> list:
    """The nodes that read ``node``'s values (not its size: ``x.view(x.size(0), -1)`` reads it twice)."""
    return [u for u in node.users if not (u.op == "call_method" and u.target in ("size", "dim"))
            and not (u.op == "call_function" and u.target is getattr)]


def _module_flattens_channels(module: nn.Flatten) -> bool:
    return module.start_dim == 1 and module.end_dim == -1


def _chains_fx(model: nn.Module) -> list[Chain]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    chains = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules.get(node.target)) not in (nn.Conv2d, nn.Linear):
            continue
        if calls[node.target] != 1:
            continue
        between, activation, flattened, current = [], None, False, node
        while len(users := _data_users(current)) == 1:
            nxt = users[0]
            if not nxt.args or nxt.args[0] is not current:
                break
            if nxt.op == "call_module" and calls.get(nxt.target) == 1:
                mod = modules[nxt.target]
                if type(mod) in (nn.Conv2d, nn.Linear):
                    spatial = _link(modules[node.target], mod, flattened)
                    if spatial is not None:
                        chains.append(Chain(node.target, nxt.target, activation, spatial, between))
                    break
                if not isinstance(mod, HOMOGENEOUS + (ChannelClip,)):
                    break
                if isinstance(mod, ACTIVATIONS + (ChannelClip,)):
                    if activation is not None:
                        break  # two clipping activations in a row: leave the pair alone
                    activation = nxt.target
                if isinstance(mod, nn.Flatten):
                    if not _module_flattens_channels(mod):
                        break
                    flattened = True
                between.append(nxt.target)
            elif nxt.op == "call_function" and nxt.target in _FUNCTIONS or nxt.op == "call_method" and nxt.target in _METHODS:
                kind = _FUNCTIONS[nxt.target] if nxt.op == "call_function" else _METHODS[nxt.target]
                if kind == "relu" and activation is not None:
                    break
                if kind == "flatten":
                    if not _flattens_channels(nxt):
                        break
                    flattened = True
                activation = FUNCTIONAL_RELU if kind == "relu" else activation
            else:
                break
            current = nxt
    return chains


def _chains_sequential(model: nn.Module) -> list[Chain]:
    """Fallback: producer and consumer are children of one nn.Sequential, homogeneous modules between."""
    chains = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        for i, (name, mod) in enumerate(children):
            if type(mod) not in (nn.Conv2d, nn.Linear):
                continue
            between, activation, flattened = [], None, False
            for other_name, other in children[i + 1:]:
                if type(other) in (nn.Conv2d, nn.Linear):
                    spatial = _link(mod, other, flattened)
                    if spatial is not None:
                        chains.append(Chain(prefix + name, prefix + other_name, activation, spatial, between))
                    break
                if not isinstance(other, HOMOGENEOUS + (ChannelClip,)):
                    break
                if isinstance(other, ACTIVATIONS + (ChannelClip,)):
                    if activation is not None:
                        break
                    activation = prefix + other_name
                if isinstance(other, nn.Flatten):
                    if not _module_flattens_channels(other):
                        break
                    flattened = True
                between.append(prefix + other_name)
    return chains


def find_chains(model: nn.Module, example=None) -> list[Chain]:
    """Producer -> consumer pairs that equalization can rescale, from a torch.fx trace of ``model``.

    Only modules called once count (a shared module would be scaled for two different uses). A model
    that torch.fx cannot trace is run on ``example`` where one is given
    (:func:`qframe.quant.equalize_run.chains_by_running`), else its chains are adjacent children of
    ``nn.Sequential`` containers.
    """
    try:
        return _chains_fx(model)
    except Exception as exc:  # fx raises many types on data-dependent control flow
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    if example is not None:
        from qframe.quant.equalize_run import chains_by_running

        log.info("equalize: torch.fx cannot trace %s (%s); chains read from running the example batch",
                 type(model).__name__, why)
        return chains_by_running(model, example, Chain, HOMOGENEOUS + (ChannelClip,), ACTIVATIONS + (ChannelClip,),
                                 _link)
    log.warning("equalize: torch.fx cannot trace %s (%s); equalizing only layers that follow each other inside "
                "nn.Sequential containers (give an example batch to read the chains from a run)",
                type(model).__name__, why)
    return _chains_sequential(model)


# -------------------------------------------------------------------------------------- equalize


def _layer_params(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    groups = module.groups if isinstance(module, nn.Conv2d) else 1
    return groups, module.weight.data, None if module.bias is None else module.bias.data


def _unpadded(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return all(p == 0 for p in module.padding) if not isinstance(module.padding, str) else module.padding == "valid"


@dataclass
class EqualizeReport:
    """What :func:`equalize` did: the chains, the sweeps until the scales settled, absorbed biases."""

    chains: list[Chain]
    sweeps: int
    absorbed: int
    folded: int


@torch.no_grad()
def equalize(model: nn.Module, *, max_sweeps: int = 100, tol: float = 1e-4, absorb: bool = True,
             sigmas: float = 3.0, example=None) -> EqualizeReport:
    """Cross-layer equalization of ``model`` in place (inference form); returns what it did.

    Folds BatchNorm first (its statistics give the high-bias estimates), replaces ReLU6 links by
    :class:`ChannelClip`, then sweeps over every chain with :func:`equalization_scales` until no
    scale moves by more than ``tol`` (relative) or ``max_sweeps`` passes, and finally absorbs
    ``max(0, beta - sigmas * gamma)`` of each ReLU-linked channel's bias into unpadded consumers.
    The float function is unchanged by the scaling; absorption changes it only where a
    pre-activation falls ``sigmas`` standard deviations below its mean. A weight that
    ``torch.nn.utils.parametrizations`` or an old-style weight_norm / spectral_norm / prune hook computes
    becomes a plain parameter of its value first (logged), since the scales are written into it.
    ``example`` (a batch of the model's input): each chain is tried first with random scales and kept only
    where the model's output on it stays the same (a chain the graph reading took for one that is not: a
    reshape it cannot see through), the others named in a warning.
    """
    if model.training:
        raise QFrameError("equalize works on an inference model (BN statistics fixed): call model.eval() first")
    if isinstance(max_sweeps, bool) or not isinstance(max_sweeps, numbers.Integral) or max_sweeps < 1:
        raise QFrameError(f"equalize max_sweeps={max_sweeps!r} is invalid; valid: an integer >= 1")
    for name, value in (("tol", tol), ("sigmas", sigmas)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise QFrameError(f"equalize {name}={value!r} is invalid; valid: a number >= 0")
    baked = {**bake_parametrizations(model), **bake_hook_made_weights(model)}  # the scales are written into the
    if baked:  # weights: a parametrization or a reparametrization hook would recompute them at the next forward
        log.info("equalize: the weights of %d layers with torch.nn.utils.parametrizations, weight_norm, "
                 "spectral_norm or prune became plain weights (the value they computed): %s", len(baked),
                 ", ".join(list(baked)[:8]))
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # producer -> (mean, std) of its pre-activation
    example = tuple(example) if isinstance(example, list) else example  # inputs, as ptq's batches give them
    pairs = find_conv_bn_pairs(model, example)  # run as the model takes the example (a tensor, a tuple, a dict)
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        if is_norm(model.get_submodule(conv_name)):
            continue  # a norm before the layer it folds into (found by running): no pre-activation statistics
        gamma = bn.weight.detach().abs() if bn.affine else torch.sqrt(bn.running_var + bn.eps)
        beta = bn.bias.detach() if bn.affine else torch.zeros_like(gamma)
        stats[conv_name] = (beta.clone().double(), gamma.clone().double())
        if example is None:
            fold_conv_bn(model.get_submodule(conv_name), bn)
            set_submodule(model, bn_name, nn.Identity())
    if example is not None:  # pairs found by running too, each fold checked on the example's outputs
        folded = fold_bn(model, example, merge=False)
        stats = {conv: stats[conv] for conv, _ in folded if conv in stats}
        pairs = folded
    chains = find_chains(model, example)
    made = {}  # the ReLU6 modules this call turned into ChannelClips, by name
    for chain in chains:
        if chain.activation is not None and chain.activation != FUNCTIONAL_RELU:
            act = model.get_submodule(chain.activation)
            if isinstance(act, nn.ReLU6):
                weight = model.get_submodule(chain.producer).weight
                upper = torch.full((weight.shape[0],), 6.0, dtype=weight.dtype, device=weight.device)
                set_submodule(model, chain.activation, ChannelClip(upper))
                made[chain.activation] = act
    if example is not None and chains:
        chains = _function_keeping(model, chains, example)
        for name in made.keys() - {c.activation for c in chains}:  # a chain left alone: its ReLU6 as it was
            set_submodule(model, name, made[name])
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        moved = 0.0
        for chain in chains:
            _, w1, _ = _layer_params(model.get_submodule(chain.producer))
            groups, w2, _ = _layer_params(model.get_submodule(chain.consumer))
            s = equalization_scales(producer_ranges(w1).double(), consumer_ranges(w2, groups, chain.spatial).double())
            _scale_chain(model, chain, s)
            if chain.producer in stats:
                stats[chain.producer] = tuple(t / s for t in stats[chain.producer])
            moved = max(moved, float(s.log().abs().max()) if s.numel() else 0.0)
        if moved < tol:
            break
    absorbed = 0
    if absorb:
        for chain in chains:
            if chain.activation is None or chain.producer not in stats:
                continue
            producer, consumer = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
            if producer.bias is None or not _unpadded(consumer):
                continue
            mean, std = stats[chain.producer]
            c = (mean - sigmas * std).clamp(min=0)
            if not bool((c > 0).any()):
                continue
            if consumer.bias is None:
                consumer.bias = nn.Parameter(torch.zeros(_out_channels(consumer), dtype=consumer.weight.dtype,
                                                         device=consumer.weight.device))
            groups = consumer.groups if isinstance(consumer, nn.Conv2d) else 1
            absorb_pair(producer.bias.data, consumer.weight.data, consumer.bias.data, c, groups=groups,
                        spatial=chain.spatial)
            if chain.activation != FUNCTIONAL_RELU:
                clip = model.get_submodule(chain.activation)
                if isinstance(clip, ChannelClip):
                    clip.upper.sub_(c.to(clip.upper.dtype))
            absorbed += 1
    _check_finite(model)
    log.info("equalize: %d chains, scales settled after %d sweeps, high biases absorbed into %d layers "
             "(%d BatchNorm folded)", len(chains), sweeps, absorbed, len(pairs))
    return EqualizeReport(chains, sweeps, absorbed, len(pairs))


def _scale_chain(model: nn.Module, chain: Chain, s: torch.Tensor) -> None:
    producer, consumer = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
    _, w1, b1 = _layer_params(producer)
    groups, w2, _ = _layer_params(consumer)
    scale_pair(w1, b1, w2, s, groups=groups, spatial=chain.spatial)
    if chain.activation not in (None, FUNCTIONAL_RELU):
        clip = model.get_submodule(chain.activation)
        if isinstance(clip, ChannelClip):
            clip.upper.div_(s.to(clip.upper.dtype))


def _probe_input(example, wide: bool, count: int = 8):
    """The first ``count`` samples of a batch (a tensor, or tensors in a tuple / list / dict), floats as float64
    where ``wide``."""
    if isinstance(example, torch.Tensor):
        few = example[:count] if example.dim() else example
        return few.double() if wide and few.is_floating_point() else few
    if isinstance(example, (tuple, list)):
        return type(example)(_probe_input(e, wide, count) for e in example)
    if isinstance(example, dict):
        return {k: _probe_input(v, wide, count) for k, v in example.items()}
    return example


def _function_keeping(model: nn.Module, chains: list[Chain], example) -> list[Chain]:
    """The chains whose rescaling leaves the model's output on ``example`` as it was: each tried alone with scales
    drawn in [0.5, 2] on a float64 copy of the model (exact up to float64 rounding, whatever the model's dtype),
    on a few of the example's samples; on a copy in the model's own dtype where the model does not run in
    float64 (a forward that casts to float32). None where neither runs or the output holds no tensor to compare."""
    from qframe.quant.fold import _tensors
    from qframe.utils.batches import run_batch
    from qframe.utils.modules import copy_model

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    failure = None
    for wide in (True, False):
        probe, x = copy_model(model), _probe_input(example, wide)
        if wide:
            probe.double()
        bound = 1e-9 if wide else max(1e-4, 4 * torch.finfo(dtype).eps)
        try:
            return _checked(probe, chains, lambda: [t.detach().double() for t in _tensors(run_batch(
                probe, x, what="equalize's example batch"))], bound)
        except Exception as exc:  # noqa: BLE001 - whatever stops a model in float64 (a cast, a dtype assert)
            failure = exc
    log.warning("equalize: no chain equalized: the check of each chain on the example batch did not run (%s: %s)",
                type(failure).__name__, str(failure).splitlines()[0][:200] if str(failure) else "")
    return []


def _checked(probe: nn.Module, chains: list[Chain], outputs, bound: float) -> list[Chain]:
    reference = outputs()
    if not reference:
        raise QFrameError("the model's output holds no tensor to compare")
    generator = torch.Generator().manual_seed(0)
    kept, dropped = [], []
    for chain in chains:
        saved = {n: t.detach().clone() for n, t in probe.state_dict().items()
                 if n.rpartition(".")[0] in (chain.producer, chain.consumer, chain.activation)}
        channels = _out_channels(probe.get_submodule(chain.producer))
        s = torch.rand(channels, generator=generator, dtype=torch.float64).mul(1.5).add(0.5)
        _scale_chain(probe, chain, s)
        got = outputs()
        same = len(got) == len(reference) and all(
            a.shape == b.shape and bool(((a - b).abs() <= bound * (1 + b.abs().max())).all())
            for a, b in zip(got, reference))
        probe.load_state_dict(saved, strict=False)
        (kept if same else dropped).append(chain)
    if dropped:
        log.warning("equalize: %d chains left alone (rescaling them changed the model's output: the layers do not "
                    "line up channel for channel): %s", len(dropped),
                    ", ".join(f"{c.producer} -> {c.consumer}" for c in dropped[:8]))
    return kept


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise QFrameError(f"equalize produced non-finite values in {name}; the model's weights are degenerate")

