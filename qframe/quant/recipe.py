"""Quantization recipes (what to quantize, how) and ``quantize_``, the module swap that applies one.

A recipe is plain data, the same in Python and in the Hydra ``quant/`` group; the built-in
presets are the YAML files in ``conf/quant`` (shipped as ``qframe.conf``) and :func:`preset` reads them, so there is a
single source of truth for what ``w8a8`` means.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from qframe.errors import QFrameError, check_field_types, one_of, require_recipe
from qframe.models.ops import ResidualAdd
from qframe.quant.budget import Budget
from qframe.quant.modules import QUANT_BLOCKS, QUANT_LAYERS, QuantPool, QuantResidualAdd, TensorQuantizer
from qframe.quant.registry import quant_class_for
from qframe.quant.observers import OBSERVERS, make_observer
from qframe.quant.spec import QuantSpec, check_bits
from qframe.utils.modules import (bake_hook_made_weights, eager_module, keep_pruned, pruning_masks,
                                  require_initialized, set_submodule)

log = logging.getLogger(__name__)


@dataclass
class QuantizerConfig:
    """One tensor's quantizer: the grid (:class:`QuantSpec` fields) and the observer that sets its range."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: Optional[int] = None
    rounding: str = "half_even"
    observer: str = "minmax"
    observer_args: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_field_types(self, 'QuantizerConfig', skip=('bits',))  # check_bits names the range
        self.spec()  # validates bits, granularity, group size
        if self.observer not in OBSERVERS:
            raise one_of("observer", self.observer, OBSERVERS)
        if not isinstance(self.observer_args, Mapping):
            raise QFrameError(f"observer_args={self.observer_args!r} is invalid; valid: a mapping of the "
                              f"{self.observer!r} observer's options, e.g. {{}}")
        make_observer(self.observer, self.spec(), **dict(self.observer_args))  # its options, checked now, not at calibration

    def spec(self) -> QuantSpec:
        # the grid fields mirror QuantSpec's (Hydra needs them on this mutable schema); copy them by name
        return QuantSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QuantSpec)})

    def make(self, bits: int | None = None) -> TensorQuantizer:
        cfg = self if bits is None else dataclasses.replace(self, bits=bits)
        return TensorQuantizer(cfg.spec(), cfg.observer, dict(cfg.observer_args))


@dataclass
class LayerRule:
    """Override for the layers whose qualified name matches ``pattern`` (fnmatch).

    ``:first`` and ``:last`` name the first and last quantizable layers of the model, whatever
    they are called. The first matching rule wins.
    """

    pattern: str
    weight_bits: Optional[int] = None
    input_bits: Optional[int] = None
    keep_float: bool = False

    def __post_init__(self):
        check_field_types(self, 'LayerRule')
        if not isinstance(self.pattern, str) or not self.pattern:
            raise QFrameError(f"quant rule pattern={self.pattern!r} is invalid; valid: an fnmatch pattern of layer "
                              "names, :first or :last")
        if self.keep_float and (self.weight_bits is not None or self.input_bits is not None):
            log.warning("quant rule %r keeps its layers float, so its weight_bits=%s / input_bits=%s do not apply",
                        self.pattern, self.weight_bits, self.input_bits)
        for name in ("weight_bits", "input_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), f"quant rule {self.pattern!r}: {name}",
                           also=", or null to keep the recipe's")

    def matches(self, name: str, index: int, count: int) -> bool:
        if self.pattern == ":first":
            return index == 0
        if self.pattern == ":last":
            return index >= 0 and index == count - 1  # index -1: a layer that is no position's
        return fnmatch.fnmatchcase(name, self.pattern)


RESIDUAL_INPUTS = ("skip", "both")
POOLS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)


@dataclass
class QuantRecipe:
    """What ``quantize_`` does: quantizers for weights and layer inputs, per-layer rules, BN folding."""

    name: str = "w8a8"
    weight: Optional[QuantizerConfig] = field(
        default_factory=lambda: QuantizerConfig(bits=8, granularity="per_channel", axis=0)
    )
    input: Optional[QuantizerConfig] = field(default_factory=lambda: QuantizerConfig(bits=8, observer="percentile"))
    rules: List[LayerRule] = field(default_factory=list)
    fold_bn: bool = True
    # with fold_bn: convolution branches that are summed (RepVGG-style blocks) merge into one convolution,
    # quantized once (qframe.quant.branches); False keeps them apart, an identity BatchNorm branch in float
    merge_branches: bool = True
    quantize_residual: bool = True  # quantize the skip input of residual adds
    # "both": also the branch's conv output, so the conv has an 8-bit output and the add takes two 8-bit
    # inputs, the layout runtimes run in integer (onnxruntime's QLinearConv + QLinearAdd); "skip": the
    # branch stays float into the add (TensorRT fuses that conv + add; onnxruntime runs the conv in float)
    residual_inputs: str = "both"
    # quantize the input of global average pooling (integer pooling averages codes; the conv before it then
    # has an 8-bit output)
    quantize_pool: bool = True
    int32_bias: bool = True  # biases on the int32 accumulator grid (input scale x weight scale), as integer kernels add them
    # mixed precision (quant=auto): per-layer weight widths are searched to fit this budget, giving an
    # ordinary recipe with one rule per layer (qframe.methods.mixed.search); None for a fixed recipe
    budget: Optional[Budget] = None

    def __post_init__(self):
        check_field_types(self, 'QuantRecipe')
        if not isinstance(self.name, str) or not self.name.strip() or self.name.startswith(".") or \
                any(c in self.name for c in '/\\:*?"<>|') or not self.name.isprintable():
            raise QFrameError(f"quant recipe name {self.name!r} is invalid; valid: a file-name stem such as w4a8 or "
                              "my_recipe (it names the run's files, e.g. ptq_<name>.pt)")
        if self.residual_inputs not in RESIDUAL_INPUTS:
            raise one_of("residual_inputs", self.residual_inputs, RESIDUAL_INPUTS)
        for role in ("weight", "input"):
            given = getattr(self, role)
            if given is not None and not isinstance(given, QuantizerConfig):
                raise QFrameError(f"quant recipe {self.name!r}: {role}={given!r} is invalid; valid: a "
                                  "qframe.QuantizerConfig(...) or None")
        if not isinstance(self.rules, (list, tuple)) or not all(isinstance(r, LayerRule) for r in self.rules):
            bad = self.rules if not isinstance(self.rules, (list, tuple)) else next(
                r for r in self.rules if not isinstance(r, LayerRule))
            raise QFrameError(f"quant recipe {self.name!r}: rules holds {bad!r}; valid: a list of qframe.LayerRule")
        if self.weight is None and self.input is None:
            raise QFrameError(f"quant recipe {self.name!r} quantizes nothing: set weight and/or input")
        if self.input is not None and self.input.granularity != "per_tensor" and self.input.axis in (0, None):
            raise QFrameError(f"quant recipe {self.name!r}: input granularity={self.input.granularity} with axis="
                              f"{self.input.axis} has one scale per image of the calibration batch (axis 0 is the "
                              "batch), which a batch of another size does not fit; valid: axis=1 (the channels of "
                              "[N, C, H, W]) or axis=-1 (the features of [N, T, C]), or granularity=per_tensor")
        for rule in self.rules:
            for bits in (rule.weight_bits, rule.input_bits):
                if bits is not None:
                    QuantSpec(bits=bits)  # same range check as everywhere else

    def label(self) -> str:
        return self.name


def preset_names() -> list[str]:
    """Names of the built-in recipes (the files of the ``quant/`` config group)."""
    folder = resources.files("qframe.conf") / "quant"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset(name: str, **overrides) -> QuantRecipe:
    """A built-in recipe by name (``w8a8``, ``w4a8``, ``w4a16``...), optionally with field overrides."""
    from omegaconf import OmegaConf

    names = preset_names()
    if name not in names:
        raise one_of("quant preset", name, names)
    from omegaconf.errors import OmegaConfBaseException

    text = (resources.files("qframe.conf") / "quant" / f"{name}.yaml").read_text()
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(QuantRecipe), OmegaConf.create(text), overrides)
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:  # an unknown field, a wrong type, a rule without its pattern
        if isinstance(exc.__cause__, QFrameError):
            raise exc.__cause__ from None
        first = str(exc).splitlines()[0]
        keys = f"; valid fields: {', '.join(f.name for f in dataclasses.fields(QuantRecipe))}" if " not in " in first else ""
        raise QFrameError(f"preset({name!r}, {', '.join(f'{k}={v!r}' for k, v in overrides.items())}): {first}{keys}") from None


def _resolve(rules: list[LayerRule], name: str, index: int, count: int) -> LayerRule | None:
    return next((r for r in rules if r.matches(name, index, count)), None)


def _name_rule(rules: list[LayerRule], name: str) -> LayerRule | None:
    """The rule for a module that is not a Conv2d/Linear (a residual add, a pooling): name patterns
    only, since ``:first`` / ``:last`` count quantizable layers."""
    return _resolve([r for r in rules if not r.pattern.startswith(":")], name, -1, 0)


def _layers(targets) -> list[tuple[str, str]]:
    """``(layer name, target name)`` for each quantized layer the targets become: a twin made of several
    (``QuantMultiheadAttention``: ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``) names each of them."""
    out = []
    for name, _, twin in targets:
        parts = getattr(twin, "LAYERS", None)
        out += [(f"{name}.{part}" if name else part, name) for part in parts] if parts else [(name, name)]
    return out


def _run_order(model: nn.Module, targets, example) -> tuple[list, int]:
    """``targets`` in the order ``model`` first calls them on ``example`` (the first layer is the first one the
    forward runs, not the first declared), those it does not call after them; and how many it called."""
    from qframe.utils.batches import run_batch, to_device
    from qframe.utils.modules import eval_mode

    first: dict[str, int] = {}

    def seen(name):
        def hook(_module, _args):
            first.setdefault(name, len(first))  # returns None: the input goes on as it is
        return hook

    hooks = [module.register_forward_pre_hook(seen(name)) for name, module, _ in targets]
    param = next(model.parameters(), None)
    try:
        with torch.no_grad(), eval_mode(model):
            run_batch(model, to_device(example, param.device if param is not None else "cpu"), what="example batch")
    finally:
        for hook in hooks:
            hook.remove()
    ordered = sorted(targets, key=lambda t: first.get(t[0], len(targets)))  # stable: the others as declared
    return ordered, len(first)


def _layer_rules(rules: list[LayerRule], layers: list[tuple[str, str]], count: int | None = None
                 ) -> dict[str, LayerRule | None]:
    """The rule of each layer: the first matching its own name (``:first`` / ``:last`` by position among the first
    ``count`` layers, all by default), else, for a layer of a larger twin, one naming the twin
    (``encoder.layers.0.self_attn`` covers its projections)."""
    count = len(layers) if count is None else count
    return {layer: _resolve(rules, layer, i if i < count else -1, count)
            or (_name_rule(rules, owner) if owner != layer else None) for i, (layer, owner) in enumerate(layers)}


def _ordered_layers(model: nn.Module, targets, rules: list[LayerRule], example) -> tuple[list, int]:
    """The layers of ``targets`` (:func:`_layers`) and how many of them ``:first`` / ``:last`` count: in the order
    the model runs them on ``example`` where a rule names a position and an example is given, else as declared."""
    if example is None or not any(r.pattern.startswith(":") for r in rules):
        layers = _layers(targets)
        return layers, len(layers)
    ordered, ran = _run_order(model, targets, example)
    if not ran:  # the example ran none of them through their modules (a forward calling .forward): as declared
        layers = _layers(targets)
        return layers, len(layers)
    layers = _layers(ordered)
    return layers, len(_layers(ordered[:ran]))


def rules_by_layer(model: nn.Module, rules: list[LayerRule], example=None) -> dict[str, LayerRule | None]:
    """The rule :func:`quantize_` applies to each layer it would quantize in (float) ``model``, by name
    (``:first`` / ``:last`` in the order the model runs them on ``example`` where one is given)."""
    return _layer_rules(rules, *_ordered_layers(model, _targets(model)[0], rules, example))


def _require_float(model: nn.Module) -> None:
    """A QFrameError for a model quantized already (fake-quant layers, or qframe.convert's integer ones), even
    where some of its layers stayed float: quantizing it again would stack quantizers or miss layers."""
    done = next((f"{type(m).__name__} {n!r}" for n, m in model.named_modules()
                 if isinstance(m, QUANT_LAYERS + QUANT_BLOCKS)), None)
    if done is None and hasattr(model, "qframe_fake_quant_layers"):
        done = "qframe.convert's integer layers"
    if done:
        raise QFrameError(f"{type(model).__name__} is quantized already ({done}); valid: the float model it came from")


def check_rules(model: nn.Module, recipe: QuantRecipe):
    """The layers ``quantize_`` would swap, after checking that each of ``recipe.rules`` matches one.

    A QFrameError when the model has no quantizable layer or a rule pattern matches none (the
    pipeline runs this on the float model, before training). Returns ``quantize_``'s targets.
    """
    _require_float(model)
    targets, unsupported = _targets(model)
    if not targets:
        reasons = "; ".join(f"{n}: {why}" for n, why in list(unsupported.items())[:3])
        raise QFrameError(f"{type(model).__name__} has no layer qframe can quantize (Conv, ConvTranspose, Linear, their "
                          f"subclasses, or a type given to qframe.register_module){'; ' + reasons if reasons else ''}")
    layers = _layers(targets)
    names = [n for n, _ in layers]
    owners = {owner for layer, owner in layers if owner != layer}
    for rule in recipe.rules:
        if not any(rule.matches(n, i, len(names)) for i, n in enumerate(names)) and \
                not any(rule.matches(n, -1, 0) for n in owners):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise QFrameError(f"quant rule pattern {rule.pattern!r} matches no quantizable layer of "
                              f"{type(model).__name__} (recipe {recipe.name}); layers are: {shown}")
    _check_weight_axis(targets, recipe)
    return targets, unsupported


def _settings(rule: LayerRule) -> dict:
    return {k: getattr(rule, k) for k in ("weight_bits", "input_bits") if getattr(rule, k) is not None} | (
        {"keep_float": True} if rule.keep_float else {})


def _warn_shadowed(recipe: QuantRecipe, layers: list[tuple[str, str]], rules: dict, count: int) -> None:
    """Warn about a rule that matches layers only earlier rules set (the first match wins) when that drops one
    of its settings: a rule the earlier ones repeat loses nothing."""
    names = [n for n, _ in layers]
    for rule in recipe.rules:
        matched = [n for i, n in enumerate(names) if rule.matches(n, i if i < count else -1, count)]
        lost = [n for n in matched if rules.get(n) is not rule
                and any(_settings(rules[n]).get(k) != v for k, v in _settings(rule).items())]
        if matched and all(rules.get(n) is not rule for n in matched) and lost:
            log.warning("quant rule %r (recipe %s) never applies: earlier rules already set %s (the first matching "
                        "rule wins); put it first or merge the settings into one rule", rule.pattern, recipe.name,
                        ", ".join(matched[:4]) + (", ..." if len(matched) > 4 else ""))


def _check_weight_axis(targets, recipe: QuantRecipe) -> None:
    """A per-channel / per-group weight axis each target layer's weight has (known before any training)."""
    spec = recipe.weight
    if spec is None or spec.granularity == "per_tensor":
        return
    for name, module, _ in targets:
        weight = getattr(module, "weight", None)
        if weight is None:
            weight = getattr(module, "in_proj_weight", None)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            continue  # a lazy layer's weight has no shape before its first batch
        if isinstance(weight, torch.Tensor) and not -weight.dim() <= spec.axis < weight.dim():
            raise QFrameError(f"quant.weight.axis={spec.axis} is out of range for layer {name!r} (weight of shape "
                              f"{tuple(weight.shape)}, recipe {recipe.name}); valid: 0..{weight.dim() - 1} "
                              "(0: output channels)")


def _check_target_and_budget(recipe: QuantRecipe, target: str) -> None:
    from qframe.quant.placement import TARGETS

    if target not in TARGETS:  # checked with or without an example, which is where it is used
        raise one_of("placement target", target, TARGETS)
    if recipe.budget is not None:
        raise QFrameError(f"quant recipe {recipe.name!r} has a budget: search its per-layer widths first "
                          "(qframe.methods.mixed.search, which quant=auto runs) and quantize with the recipe it returns")


def quantize_(model: nn.Module, recipe: QuantRecipe, *, example=None, target: str = "tensorrt") -> nn.Module:
    """Swap every Conv, ConvTranspose and Linear of ``model`` (in place) for its quantized twin.

    With ``example`` (one input batch, or a tuple of inputs) activation quantizers are also placed
    from the model's graph where ``target`` (``tensorrt``, ``dla``, ``onnxruntime``) needs them:
    attention matmuls, residual adds in any form, concats, functional pooling
    (:mod:`qframe.quant.placement`). Returns ``model``. Quantizers start un-calibrated (pass-through) until calibrated by PTQ or
    QAT. Raises :class:`QFrameError` when the model has no layer qframe can quantize or a rule
    pattern matches no layer.
    """
    given, model = model, eager_module(model, "qframe.quantize_")  # a torch.compile wrapper: its module, in place
    require_recipe(recipe, "qframe.quantize_")
    _check_target_and_budget(recipe, target)
    if example is not None:  # an example the model cannot take is one line, as in qframe.ptq, not a placement warning
        from qframe.utils.batches import run_batch, to_device
        from qframe.utils.modules import eval_mode

        param = next(model.parameters(), None)
        with torch.no_grad(), eval_mode(model):
            run_batch(model, to_device(example, param.device if param is not None else "cpu"), what="example batch")
    require_initialized(model, "qframe.quantize_")  # lazy layers: the example batch gave them their shapes
    quantize_fitted(model, recipe, example, target)
    return given


def quantize_fitted(model: nn.Module, recipe: QuantRecipe, example=None, target: str = "tensorrt") -> nn.Module:
    """:func:`quantize_` of a model that ``example`` is known to fit."""
    _check_target_and_budget(recipe, target)
    # old-style weight_norm / spectral_norm / prune hooks recompute a layer's weight: its twin takes the value,
    # and torch.nn.utils.prune's masks go back on the twins, so that training keeps the pruned weights at zero
    masks = pruning_masks(model)
    baked = bake_hook_made_weights(model)
    targets, unsupported = check_rules(model, recipe)
    float_layers = dict(unsupported)
    quantized: dict[str, int] = {}
    layers, count = _ordered_layers(model, targets, recipe.rules, example)
    rules = _layer_rules(recipe.rules, layers, count)
    _warn_shadowed(recipe, layers, rules, count)

    def quantizers_for(layer: str):
        """``(weight quantizer, input quantizer)`` of ``layer`` by its rule; None where the rule keeps it float."""
        rule = rules[layer]
        if rule is not None and rule.keep_float:
            float_layers[layer] = f"kept float by rule {rule.pattern!r}"
            return None
        return (recipe.weight.make(rule.weight_bits if rule else None) if recipe.weight else None,
                recipe.input.make(rule.input_bits if rule else None) if recipe.input else None)

    for name, module, twin in targets:
        parts = getattr(twin, "LAYERS", None)
        if parts:  # a twin of several layers, each with its own rule (an attention's projections)
            made = {part: quantizers_for(f"{name}.{part}" if name else part) for part in parts}
            if not any(made.values()):
                continue
            made = {part: pair or (None, None) for part, pair in made.items()}  # a projection kept float
            layer = twin.from_float(module, {p: w for p, (w, _) in made.items()}, {p: i for p, (_, i) in made.items()})
            for part in parts:
                getattr(layer, part).int32_bias = recipe.int32_bias
        else:
            pair = quantizers_for(name)
            if pair is None:
                continue
            layer = twin.from_float(module, *pair)
            if not isinstance(layer, nn.Module):
                raise QFrameError(f"{twin.__name__}.from_float returned a {type(layer).__name__} for layer {name!r}; "
                                  "valid: the quantized twin, an nn.Module")
            layer.int32_bias = recipe.int32_bias
        set_submodule(model, name, layer)
        quantized[type(module).__name__] = quantized.get(type(module).__name__, 0) + 1
    for module in model.modules():  # nn.TransformerEncoder's nested-tensor path reads the attention's float weights
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, QUANT_BLOCKS) for m in module.modules()):
            module.use_nested_tensor = False
    adds = 0
    if recipe.input is not None and recipe.quantize_residual:
        for name, module in list(model.named_modules()):
            rule = _name_rule(recipe.rules, name)
            if type(module) is ResidualAdd and not (rule is not None and rule.keep_float):
                bits = rule.input_bits if rule else None
                branch = recipe.input.make(bits) if recipe.residual_inputs == "both" else None
                set_submodule(model, name, QuantResidualAdd(recipe.input.make(bits), branch))
                adds += 1
    pools = 0
    if recipe.input is not None and recipe.quantize_pool:
        for name, module in list(model.named_modules()):
            rule = _name_rule(recipe.rules, name)
            if type(module) in POOLS and not (rule is not None and rule.keep_float):
                set_submodule(model, name, QuantPool(module, recipe.input.make(rule.input_bits if rule else None)))
                pools += 1
    if pools:
        log.info("quantized the input of %d pooling layers", pools)
    if adds:
        log.info("quantized the skip branch of %d residual adds", adds)
    model.qframe_float_layers = float_layers
    if baked:
        lost = keep_pruned(model, masks)
        log.info("quantize_: the weight_norm / spectral_norm / pruning hooks of %d layers baked into their weights; "
                 "the pruning masks of %d back on their quantized layers%s", len(baked), len(masks) - len(lost),
                 f" (not on {', '.join(lost)}: no weight of their shape)" if lost else "")
    if example is not None:
        _place(model, recipe, example, target)  # the matmuls it cannot quantize join qframe_float_layers
    line = coverage_line(recipe.name, quantized, model.qframe_float_layers, model)
    log.info("%s%s", line, "" if example is not None else " (modules only: without an example batch the ops a forward "
             "calls outside them, F.linear or x @ W with a parameter, are not read)")
    return model


def _place(model: nn.Module, recipe: QuantRecipe, example, target: str) -> None:
    """Quantizers where the graph needs them beyond Conv/Linear inputs; the recipe's switches still apply."""
    from qframe.quant.modules import QUANT_LAYERS
    from qframe.quant.placement import TARGET_RULES, WEIGHT_B, place_quantizers

    rules = TARGET_RULES[target]  # quantize_ checked the target
    rules = dataclasses.replace(rules, residual=rules.residual if recipe.quantize_residual else "none",
                                pool=rules.pool and recipe.quantize_pool)
    skip = QUANT_LAYERS + (QuantResidualAdd, QuantPool, TensorQuantizer) + ((ResidualAdd,) if not recipe.quantize_residual else ())
    float_ops: dict[str, str] = {}
    weights = recipe.weight is not None and recipe.weight.granularity != "per_group"
    if recipe.input is None:  # weight-only: no activation quantizer to place; the weights left float are named
        none = dataclasses.replace(rules, matmul=False, residual="none", concat=False, pool=False)
        place_quantizers(model, example, None, target, skip=skip, rules=none, float_ops=float_ops, weight_only=True)
        if float_ops:
            model.qframe_float_layers = {**model.qframe_float_layers, **float_ops}
            log.warning("placement: %d ops keep a float weight: %s", len(float_ops),
                        "; ".join(f"{n or type(model).__name__}: {why}" for n, why in float_ops.items()))
        return

    def make(kind: str, role: str) -> TensorQuantizer:
        if role != WEIGHT_B:
            return recipe.input.make()
        # the recipe's weight grid; a matmul's weight is [K, N]: its output channels are axis 1
        return recipe.weight.make().transposed()

    counts = place_quantizers(model, example, make, target, skip=skip, rules=rules, float_ops=float_ops,
                              weights=weights)
    model.qframe_placed = counts
    if float_ops:
        model.qframe_float_layers = {**model.qframe_float_layers, **float_ops}
        log.warning("placement: %d activation ops stay float: %s", len(float_ops),
                    "; ".join(f"{n or type(model).__name__}: {why}" for n, why in float_ops.items()))
    if counts:
        log.info("placed activation quantizers from the graph for %s: %s", target,
                 ", ".join(f"{kind} x{n}" for kind, n in sorted(counts.items())))


def _targets(model: nn.Module) -> tuple[list[tuple[str, nn.Module, type]], dict[str, str]]:
    """``([(name, module, twin class)], {name: why it stays float})`` over the model's layers."""
    inside = {n: quant_class_for(m)[0] is not None for n, m in model.named_modules()
              if isinstance(m, nn.MultiheadAttention)}  # name: whether it has a twin
    targets, unsupported = [], {}
    for name, module in model.named_modules():
        twin, why = quant_class_for(module)
        owner = next((a for a in inside if name.startswith(a + ".")), None)
        if owner is not None and inside[owner]:
            continue  # its out_proj: the attention's twin quantizes it
        if twin is not None and owner is not None:
            twin, why = None, f"inside nn.MultiheadAttention {owner!r}, which reads its weights directly"
        if twin is not None:
            targets.append((name, module, twin))
        elif why is not None:
            unsupported[name] = why
    return targets, unsupported


def coverage_line(recipe_name: str, quantized: dict[str, int], float_layers: dict[str, str], model=None) -> str:
    """One line: what ``quantize_`` quantized, by type, and what stayed float, by type and reason."""
    done = ", ".join(f"{kind} x{n}" for kind, n in sorted(quantized.items())) or "nothing"
    groups: dict[tuple[str, str], int] = {}
    modules = dict(model.named_modules()) if model is not None else {}
    for name, why in float_layers.items():  # "module::MatMul": an op placement leaves float
        kind = type(modules[name]).__name__ if name in modules else name.rpartition("::")[2] if "::" in name else "layer"
        key = (kind, "kept float by a rule" if why.startswith("kept float by rule") else why)
        groups[key] = groups.get(key, 0) + 1
    rest = "; ".join(f"{kind} x{n} ({why})" for (kind, why), n in sorted(groups.items()))
    return f"quantize_ {recipe_name}: quantized {done}" + (f"; float: {rest}" if rest else "; nothing left float")
