"""Mixed precision under a budget: per-layer weight widths on the Pareto front of error against cost.

1. **Sensitivity.** The model is quantized at the widest candidate width and calibrated. For every
   layer ``l`` and candidate width ``b``, the change its weights make to the layer output,
   ``dy = conv(x, q_b(W)) - conv(x, q_max(W))``, is carried to the model output to first order,
   ``||J_l dy||^2`` with ``J_l`` the Jacobian of the output with respect to that layer's output,
   estimated without forming ``J_l`` as ``E_v[(v^T J_l dy)^2]`` over random probes ``v ~ N(0, I)``
   (one backward pass per probe gives ``J_l^T v`` at every layer at once). This is the output noise
   power layer ``l`` adds at width ``b``; noise from different layers adds up.
2. **Search.** Minimising the summed noise under the budget (model bytes, or bit operations) is a
   multiple-choice knapsack; dynamic programming over the cost, discretised with costs rounded up
   (so a configuration the search calls feasible is feasible), gives the whole Pareto front at once.
3. **Recipe.** The point of the front at the budget becomes an ordinary :class:`QuantRecipe` with
   one :class:`LayerRule` per layer, which PTQ, QAT, export and convert take like any other. The
   output SQNR of a few front points and of the uniform widths is measured, for the plot.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qframe.errors import QFrameError
from qframe.utils.io import atomic_savefig
from qframe.measure.size import model_size_bytes
from qframe.methods.ptq import calibrate, calibrate_weights
from qframe.quant.capture import calibration_images, run_hooked
from qframe.quant.fold import TRANSPOSED, fold_bn, out_channels
from qframe.quant.modules import QUANT_LAYERS
from qframe.quant.recipe import LayerRule, QuantRecipe, quantize_, rules_by_layer
from qframe.quant.frozen import frozen_weights
from qframe.utils.batches import logits_of
from qframe.utils.modules import bake_hook_made_weights, copy_model

log = logging.getLogger(__name__)

LAYERS = (nn.modules.conv._ConvNd, nn.Linear)  # float layers whose multiply-accumulates count (transposed convs too)

BUCKETS = 4000  # resolution of the cost axis in the knapsack
CHUNK = 64  # images per forward / backward pass while measuring sensitivities
MEASURED_POINTS = 6  # front points whose output SQNR is measured for the plot


@dataclass
class FrontPoint:
    """One configuration on the front: its cost (a fraction of FP32's), estimated and measured SQNR (dB)."""

    cost: float
    sqnr_estimated: float
    widths: list[int]
    sqnr_measured: float | None = None


@dataclass
class MixedResult:
    """What :func:`search` found: the recipe, the per-layer table it was chosen from, and the front."""

    recipe: QuantRecipe
    kind: str  # size or bitops
    layers: list[str]
    widths: list[int]
    noise: np.ndarray  # [layers, widths] output noise power each layer adds at each width
    cost: np.ndarray  # [layers, widths] bytes or bit operations
    fixed: float  # cost of everything the search does not choose
    reference: float  # FP32's cost
    limit: float  # the budget, in the same unit
    signal: float  # output power of the float model
    base_noise: float  # measured output noise power with every layer at the widest width
    front: list[FrontPoint] = field(default_factory=list)
    chosen: FrontPoint | None = None
    uniform: dict[int, FrontPoint] = field(default_factory=dict)
    input_bits: dict[str, int] = field(default_factory=dict)  # searched layers whose rule set their input width

    def summary(self) -> dict:
        """JSON-ready: budget, choice, per-layer widths and sensitivities, the front."""
        return {
            "kind": self.kind, "limit": self.limit, "reference": self.reference, "fixed": self.fixed,
            "limit_ratio": self.limit / self.reference, "recipe": self.recipe.name,
            "chosen": dataclasses.asdict(self.chosen) if self.chosen else None,
            "layers": [{"name": n, "bits": self.chosen.widths[i] if self.chosen else None,
                        "noise_db": {str(b): _db(self.signal, self.noise[i, j]) for j, b in enumerate(self.widths)},
                        "cost": {str(b): float(self.cost[i, j]) for j, b in enumerate(self.widths)}}
                       for i, n in enumerate(self.layers)],
            "front": [dataclasses.asdict(p) | {"widths": None} for p in self.front],
            "uniform": {str(b): dataclasses.asdict(p) | {"widths": None} for b, p in self.uniform.items()},
            "signal": self.signal, "base_noise": self.base_noise,
        }


def _db(signal: float, noise: float) -> float:
    return float(10 * math.log10(signal / noise)) if noise > 0 else float("inf")


# ------------------------------------------------------------------------------ costs


def _macs(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each named Conv, ConvTranspose or Linear."""
    macs: dict[str, int] = {}

    def hook(name, mod, args, out):
        if isinstance(mod, TRANSPOSED):  # each input value reaches out/groups x kernel outputs
            macs[name] = args[0][0].numel() * mod.weight[0].numel()
        else:
            macs[name] = out[0].numel() * mod.weight[0].numel()  # inputs per output value (in/groups x kernel)

    run_hooked(model, example, [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(n, m, a, o))
                                for n in names])
    return macs


def _prepared(model: nn.Module, recipe: QuantRecipe, images: torch.Tensor, device, equalize: bool = False):
    """``(widths, float model as quantized, quantized model at the widest width, searched layer names, rules by
    layer)``: the float model copied, BN folded (or equalized), quantized and calibrated on ``images``."""
    widths = sorted(set(recipe.budget.widths))
    fmodel = copy_model(model).eval().to(device)
    bake_hook_made_weights(fmodel)  # weight_norm / prune hooks: equalization and quantize_ take plain weights
    if equalize:
        from qframe.quant.equalize import equalize as equalize_

        equalize_(fmodel, example=images[:CHUNK])
    elif recipe.fold_bn:
        fold_bn(fmodel, images[:1], recipe.merge_branches)
    base = dataclasses.replace(recipe, budget=None, weight=dataclasses.replace(recipe.weight, bits=widths[-1]))
    qmodel = quantize_(copy_model(fmodel), base, example=images[:1])  # :first / :last: the first and last layers run
    calibrate_weights(qmodel)
    calibrate(qmodel, images.split(CHUNK), math.ceil(images.shape[0] / CHUNK), device)
    fixed_rules = rules_by_layer(fmodel, recipe.rules, images[:1])
    names = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS) and m.weight_quantizer is not None
             and not (fixed_rules.get(n) and fixed_rules[n].weight_bits is not None)]
    if not names:
        raise QFrameError(f"quant recipe {recipe.name!r}: every quantized layer has a fixed width; nothing to search")
    return widths, fmodel, qmodel, names, fixed_rules


def _limit(budget, reference: float) -> float:
    """The budget in the unit of its kind's costs."""
    return {"size_ratio": lambda: budget.size_ratio * reference, "size_bytes": lambda: float(budget.size_bytes),
            "bitops_ratio": lambda: budget.bitops_ratio * reference}[
        next(k for k in ("size_ratio", "size_bytes", "bitops_ratio") if getattr(budget, k) is not None)]()


def _below_cheapest(limit: float, fixed: float, cost, reference: float, kind: str, widths) -> QFrameError:
    cheapest = (fixed + cost.min(1).sum()) / reference
    return QFrameError(f"quant budget {limit / reference:.4f} of FP32's {kind} is below the cheapest configuration "
                       f"({cheapest:.4f}: every layer at {widths[0]} bits); raise the budget or add narrower widths "
                       "to quant.budget.widths")


def check_budget(model: nn.Module, recipe: QuantRecipe, images: torch.Tensor) -> None:
    """The error :func:`search` gives for a budget below the cheapest configuration, from ``model`` as it is:
    the costs depend on its architecture alone, so the CLI checks before training. ``images``: a batch."""
    budget = recipe.budget
    device = next(model.parameters()).device
    images = images[: budget.images].to(device)
    widths, _, qmodel, names, _ = _prepared(model, recipe, images, device)
    cost, fixed = layer_costs(qmodel, names, widths, budget.kind, images)
    reference = reference_cost(model, budget.kind, images)
    limit = _limit(budget, reference)
    if limit - fixed < cost.min(1).sum():
        raise _below_cheapest(limit, fixed, cost, reference, budget.kind, widths)


def layer_costs(qmodel: nn.Module, names: list[str], widths: list[int], kind: str,
                example: torch.Tensor) -> tuple[np.ndarray, float]:
    """``[layers, widths]`` cost of each searched layer's weights at each width, and the cost of the rest.

    ``size``: packed weight bytes, ``ceil(numel * bits / 8)``; the rest is the model's other bytes (scales,
    biases, layers not searched), plus a float32 bias for each searched layer that has none (bias
    correction adds one). ``bitops``: MACs x weight bits x input bits (32 for a float input).
    """
    layers = [qmodel.get_submodule(n) for n in names]
    if kind == "size":
        cost = np.array([[math.ceil(m.weight.numel() * b / 8) for b in widths] for m in layers], dtype=np.float64)
        current = sum(math.ceil(m.weight.numel() * m.weight_quantizer.spec.bits / 8) for m in layers)
        reserve = sum(4 * out_channels(m) for m in layers if m.bias is None)
        return cost, float(model_size_bytes(qmodel) - current + reserve)
    every = [n for n, m in qmodel.named_modules() if isinstance(m, QUANT_LAYERS + LAYERS)]
    macs = _macs(qmodel, every, example)
    searched = set(names)
    fixed = 0.0
    for n in every:
        if n in searched:
            continue
        m = qmodel.get_submodule(n)
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        fixed += macs.get(n, 0) * (wq.spec.bits if wq else 32) * (iq.spec.bits if iq else 32)
    cost = np.array([[macs[n] * b * (m.input_quantizer.spec.bits if m.input_quantizer else 32) for b in widths]
                     for n, m in zip(names, layers)], dtype=np.float64)
    return cost, float(fixed)


def reference_cost(model: nn.Module, kind: str, example: torch.Tensor) -> float:
    """FP32's cost: the float model's bytes, or its MACs x 32 x 32."""
    if kind == "size":
        return float(model_size_bytes(model))
    names = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    return float(sum(_macs(model, names, example).values()) * 32 * 32)


# ------------------------------------------------------------------------------ sensitivities


def _delta_output(layer: nn.Module, x: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
    """The change of a layer's output when its (quantized) weight changes by ``dw`` (bias cancels)."""
    if isinstance(layer, nn.modules.conv._ConvNd):  # a quantized ConvTranspose's _conv_forward transposes
        return layer._conv_forward(x, dw, None)
    return F.linear(x, dw)


def sensitivities(qmodel: nn.Module, names: list[str], quantized: list[dict[int, torch.Tensor]], images: torch.Tensor,
                  probes: int, generator: torch.Generator) -> np.ndarray:
    """``[layers, widths]`` output noise power (mean over images of ``||J_l dy||^2``) per layer and width.

    ``quantized[l][b]`` is layer ``l``'s weight on its ``b``-bit grid; the model runs at its current widths.
    """
    widths = list(quantized[0])
    noise = np.zeros((len(names), len(widths)))
    layers = [qmodel.get_submodule(n) for n in names]
    for start in tqdm(range(0, images.shape[0], CHUNK), desc="mixed precision: sensitivity", leave=False, disable=None):
        xb = images[start:start + CHUNK]
        inputs: dict[str, torch.Tensor] = {}
        outputs: dict[str, torch.Tensor] = {}

        def keep(name, mod, args, out):
            x = args[0].detach()
            inputs[name] = mod.input_quantizer(x) if mod.input_quantizer is not None else x
            out.retain_grad()
            outputs[name] = out

        handles = [m.register_forward_hook(lambda m, a, o, n=n: keep(n, m, a, o)) for n, m in zip(names, layers)]
        try:
            with torch.enable_grad():
                z = logits_of(qmodel(xb.detach().requires_grad_(True)))
                grads = {n: [] for n in names}
                for p in range(probes):
                    v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                    qmodel.zero_grad(set_to_none=True)
                    for o in outputs.values():
                        o.grad = None
                    z.backward(v, retain_graph=p < probes - 1)
                    for n in names:
                        grads[n].append(outputs[n].grad.detach().clone())
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for i, (n, m) in enumerate(zip(names, layers)):
                g = torch.stack(grads[n])  # [probes, batch, ...]
                for j, b in enumerate(widths):
                    dy = _delta_output(m, inputs[n], quantized[i][b] - quantized[i][widths[-1]])
                    proj = (g * dy.unsqueeze(0)).flatten(2).sum(2)  # [probes, batch]: v^T J dy per image
                    noise[i, j] += float(proj.double().pow(2).mean(0).sum())
        qmodel.zero_grad(set_to_none=True)
    noise /= images.shape[0]
    # fewer bits never add less noise: make each row non-increasing in the width, and non-negative
    noise = np.maximum.accumulate(np.clip(noise, 0, None)[:, ::-1], axis=1)[:, ::-1]
    return noise


# ------------------------------------------------------------------------------ the knapsack


def pareto_front(noise: np.ndarray, cost: np.ndarray, buckets: int = BUCKETS):
    """Minimum summed noise for every cost on a grid of ``buckets`` steps (multiple-choice knapsack).

    Returns ``(unit, best, choice)``: ``best[j]`` is the least noise of a configuration whose cost, each
    layer's rounded up to whole units, is at most ``j * unit``; ``choice`` lets :func:`configuration` recover it.
    """
    layers, widths = noise.shape
    unit = max(float(cost.max(1).sum()) / buckets, 1e-12)
    units = np.ceil(cost / unit - 1e-9).astype(np.int64)
    size = int(units.max(1).sum()) + 1
    best = np.zeros(size)
    choice = np.zeros((layers, size), dtype=np.int64)
    for i in range(layers):
        new = np.full(size, np.inf)
        for j in range(widths):
            c = units[i, j]
            cand = np.full(size, np.inf)
            cand[c:] = best[: size - c] + noise[i, j]
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
        best = new
    return unit, best, (choice, units)


def configuration(choice_units, index: int) -> list[int]:
    """Per layer, the width index of the front's configuration at cost bucket ``index``."""
    choice, units = choice_units
    picks = [0] * choice.shape[0]
    for i in range(choice.shape[0] - 1, -1, -1):
        picks[i] = int(choice[i, index])
        index -= int(units[i, picks[i]])
    return picks


# ------------------------------------------------------------------------------ the search


def _escape(name: str) -> str:
    """A module name as an fnmatch pattern that matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _set_widths(qmodel: nn.Module, names: list[str], quantizers: list[dict], widths: list[int]) -> None:
    for n, qs, b in zip(names, quantizers, widths):
        qmodel.get_submodule(n).weight_quantizer = qs[b]


@torch.no_grad()
@frozen_weights()
def _noise(qmodel: nn.Module, images: torch.Tensor, target: torch.Tensor) -> float:
    out = torch.cat([logits_of(qmodel(images[s:s + CHUNK])) for s in range(0, images.shape[0], CHUNK)])
    return float((out - target).double().pow(2).flatten(1).sum(1).mean())


def search(model: nn.Module, recipe: QuantRecipe, calib_batches, num_batches: int = 8,
           device: torch.device | str = "cpu", *, equalize: bool = False, seed: int = 0, input_fn=None) -> MixedResult:
    """Per-layer weight widths for ``recipe.budget`` (see the module doc); returns the result with the recipe.

    ``model`` is the trained float model (left untouched); ``equalize`` equalizes it first, as the PTQ that
    will follow should. Layers that a rule of ``recipe`` already gives a weight width keep it. ``input_fn`` takes a
    batch to the model's input tensor (``lambda b: b["pixel_values"]``); by default a batch's first item. A model
    that returns a tuple, a dict or a transformers output is measured on its logits.
    """
    budget = recipe.budget
    if budget is None:
        raise QFrameError(f"quant recipe {recipe.name!r} has no budget to search for; use quant=auto or set quant.budget")
    if recipe.weight is None:
        raise QFrameError(f"quant recipe {recipe.name!r} quantizes no weights: mixed precision chooses weight widths")
    images = calibration_images(calib_batches if input_fn is None else (input_fn(b) for b in calib_batches),
                                num_batches, device)[: budget.images]
    widths, fmodel, qmodel, names, fixed_rules = _prepared(model, recipe, images, device, equalize)
    quantizers, quantized = [], []
    for n in names:
        layer = qmodel.get_submodule(n)
        qs = {}
        for b in widths:
            q = layer.fit_weight_quantizer(recipe.weight.make(b)).to(device)  # a ConvTranspose's scales on its axis 1
            q.calibrate_from(layer.weight_to_quantize())
            qs[b] = q
        quantizers.append(qs)
        quantized.append({b: q(layer.weight_to_quantize()).detach() for b, q in qs.items()})
    _set_widths(qmodel, names, quantizers, [widths[-1]] * len(names))
    with torch.no_grad():
        target = torch.cat([logits_of(fmodel(images[s:s + CHUNK])) for s in range(0, images.shape[0], CHUNK)])
    signal = float(target.double().pow(2).flatten(1).sum(1).mean())
    base_noise = _noise(qmodel, images, target)
    generator = torch.Generator(device=images.device).manual_seed(seed)
    noise = sensitivities(qmodel, names, quantized, images, budget.probes, generator)
    cost, fixed = layer_costs(qmodel, names, widths, budget.kind, images)
    reference = reference_cost(model, budget.kind, images.to(next(model.parameters()).device))
    limit = _limit(budget, reference)
    result = MixedResult(recipe, budget.kind, names, widths, noise, cost, fixed, reference, limit, signal, base_noise)
    result.input_bits = {n: fixed_rules[n].input_bits for n in names
                         if fixed_rules.get(n) is not None and fixed_rules[n].input_bits is not None}
    _solve(result, qmodel, quantizers, images, target)
    return result


def _solve(result: MixedResult, qmodel: nn.Module, quantizers: list[dict], images: torch.Tensor,
           target: torch.Tensor) -> None:
    """Front, choice at the budget, the recipe, and measured SQNR of a few points (fills ``result``)."""
    unit, best, choice = pareto_front(result.noise, result.cost)
    room = result.limit - result.fixed
    if room < unit * np.ceil(result.cost / unit - 1e-9).min(1).sum():
        raise _below_cheapest(result.limit, result.fixed, result.cost, result.reference, result.kind, result.widths)
    index = min(int(math.floor(room / unit + 1e-9)), len(best) - 1)
    names, widths = result.layers, result.widths

    def point(j: int) -> FrontPoint:
        picks = configuration(choice, j)
        bits = [widths[p] for p in picks]
        cost = result.fixed + sum(result.cost[i, p] for i, p in enumerate(picks))
        return FrontPoint(cost / result.reference, _db(result.signal, result.base_noise + best[j]), bits)

    finite = np.flatnonzero(np.isfinite(best))
    steps = finite[np.r_[True, np.diff(best[finite]) < 0]]  # where the front improves
    # buckets round costs up, so a later bucket can hold a configuration that really costs less: keep the
    # points no cheaper point beats
    front, top = [], -math.inf
    for p in sorted((point(int(j)) for j in steps), key=lambda p: (p.cost, -p.sqnr_estimated)):
        if p.sqnr_estimated > top:
            front.append(p)
            top = p.sqnr_estimated
    result.front = front
    result.chosen = point(index)
    spread = sorted({int(k) for k in np.linspace(0, len(result.front) - 1, MEASURED_POINTS).round()})
    for p in [result.front[k] for k in spread] + [result.chosen]:
        _set_widths(qmodel, names, quantizers, p.widths)
        p.sqnr_measured = _db(result.signal, _noise(qmodel, images, target))
    for b in widths:
        _set_widths(qmodel, names, quantizers, [b] * len(names))
        cost = (result.fixed + result.cost[:, widths.index(b)].sum()) / result.reference
        estimated = _db(result.signal, result.base_noise + result.noise[:, widths.index(b)].sum())
        result.uniform[b] = FrontPoint(cost, estimated, [b] * len(names), _db(result.signal, _noise(qmodel, images, target)))
    chosen = result.chosen
    numels = [qmodel.get_submodule(n).weight.numel() for n in names]
    average = sum(b * k for b, k in zip(chosen.widths, numels)) / sum(numels)
    base = result.recipe
    label = f"{base.name}_w{average:.1f}a{base.input.bits if base.input else 16}"
    # each searched layer's width first (the first matching rule wins), with the input width its own rule set
    rules = [LayerRule(_escape(n), weight_bits=b, input_bits=result.input_bits.get(n))
             for n, b in zip(names, chosen.widths)] + list(base.rules)
    result.recipe = dataclasses.replace(base, name=label, budget=None, rules=rules)
    log.info("mixed precision: %d layers, widths %s; chose %s at %.4f of FP32's %s (budget %.4f), estimated output "
             "SQNR %.1f dB, measured %.1f dB", len(names), widths, label, chosen.cost, result.kind,
             result.limit / result.reference, chosen.sqnr_estimated, chosen.sqnr_measured)


def recipe_yaml(recipe: QuantRecipe) -> str:
    """``recipe`` as a ``quant/`` group file: ``quant=<file name>`` (or :func:`qframe.quant.recipe.preset`) loads it."""
    from omegaconf import OmegaConf

    data = dataclasses.asdict(recipe)
    data.pop("budget", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def plot_front(result: MixedResult, path) -> None:
    """The front (estimated), measured points, uniform widths, the budget and the choice, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.step([p.cost for p in result.front], [p.sqnr_estimated for p in result.front], where="post",
            label="front (estimated)", color="tab:blue")
    measured = [p for p in result.front if p.sqnr_measured is not None]
    ax.plot([p.cost for p in measured], [p.sqnr_measured for p in measured], "o", color="tab:blue", label="front (measured)")
    for b, p in result.uniform.items():
        ax.plot(p.cost, p.sqnr_measured, "s", color="tab:gray")
        ax.annotate(f"all w{b}", (p.cost, p.sqnr_measured), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.axvline(result.limit / result.reference, color="tab:red", linestyle="--", label="budget")
    c = result.chosen
    ax.plot(c.cost, c.sqnr_measured, "*", markersize=14, color="tab:red", label=f"chosen ({result.recipe.name})")
    ax.set_xlabel(f"{'model bytes' if result.kind == 'size' else 'bit operations'} / FP32")
    ax.set_ylabel("output SQNR (dB)")
    ax.set_title("mixed precision: Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)
