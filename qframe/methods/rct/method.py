"""RCT as a method: quantize once, train the integer weights, hand back a deployable model."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers

import torch
from torch import nn

from qframe.errors import QFrameError, require_config, require_device, require_recipe
from qframe.methods.loop import fit_batches, resume_settings
from qframe.methods.ptq import ptq
from qframe.methods.qat import track_activation_ranges
from qframe.methods.rct.optimizer import RCTConfig, RCTOptimizer
from qframe.methods.rct.storage import RCTConv2d, RCTLayer, RCTLinear, fold_bn_into_layer, rct_layers
from qframe.quant.fold import NORM, find_conv_bn_pairs
from qframe.quant.modules import QUANT_LAYERS, QuantConv2d, QuantConvBn2d, QuantLinear, TensorQuantizer
from qframe.quant.placement import site_weight_quantizers
from qframe.quant.recipe import QuantRecipe
from qframe.quant.spec import QuantSpec
from qframe.train import TrainConfig, fit, require_checkpoint_file
from qframe.utils.batches import default_input_fn, is_data_bundle, require_calibration_apart
from qframe.utils.modules import eager_module, pruning_masks, require_initialized, set_submodule, zero_padding

log = logging.getLogger(__name__)


def prepare_rct(model: nn.Module, recipe: QuantRecipe, calib_batches, num_batches: int, cfg: RCTConfig,
                device: torch.device | str = "cpu", *, input_fn=None) -> nn.Module:
    """A copy of ``model`` whose Conv2d / Linear weights exist only as ``cfg.bits_init``-bit codes.

    BN is folded and activation ranges are calibrated exactly as PTQ does with ``recipe`` (its
    weight settings are replaced by RCT's per-channel codes); ``model`` is untouched and no float
    copy of those weights remains in the result. Other quantized layers (Conv1d / Conv3d, transposed
    convolutions, a Conv2d that pads otherwise than with zeros) keep FP32 master weights and train as
    QAT does; they are listed, with the reason, in ``qframe_rct_float_master`` and one warning.
    """
    if recipe.weight is None:
        raise QFrameError(f"RCT trains integer weights, but recipe {recipe.name!r} quantizes none (weight=None); "
                          "valid: a recipe with weights, e.g. w8a8 (RCT sets their widths from method.rct)")
    pruned = pruning_masks(model)
    if pruned:
        log.warning("rct: the torch.nn.utils.prune masks of %d layers are not kept: RCT trains integer codes, and "
                    "the pruned weights start at zero but may move (%s); qframe.qat keeps them", len(pruned),
                    ", ".join(list(pruned)[:8]))
    norms = _norm_pairs(model, calib_batches, input_fn) if not recipe.fold_bn else []
    qmodel = ptq(model, recipe, calib_batches, num_batches, device, input_fn=input_fn)
    _warn_replaced_widths(qmodel, recipe, cfg)
    swapped = 0
    kept: dict[str, str] = {}  # quantized layers that keep float master weights, and why
    for name, module in list(qmodel.named_modules()):
        if isinstance(module, QuantConvBn2d):
            raise QFrameError(f"RCT needs BN folded into {name}; use a recipe with fold_bn=true")
        if isinstance(module, QuantConv2d) and isinstance(why := zero_padding(module, "RCT's integer Conv2d"), str):
            kept[name] = f"Conv2d: {why}"  # another padding mode, or a 'same' that pads one side more
        elif isinstance(module, QUANT_LAYERS) and not isinstance(module, (QuantConv2d, QuantLinear)) and \
                getattr(module, "weight_quantizer", None) is not None:
            kept[name] = f"{type(module).__name__.removeprefix('Quant')} (RCT holds integer weights for Conv2d and Linear)"
        elif isinstance(module, (QuantConv2d, QuantLinear)):
            kind = RCTConv2d if isinstance(module, QuantConv2d) else RCTLinear
            layer = kind(module, cfg.bits_init, module.input_quantizer, cfg.grad_bits).to(device)
            layer.integer_gemm = cfg.integer_gemm
            set_submodule(qmodel, name, layer.train(module.training))
            swapped += 1
    qmodel.qframe_rct_norms = [(layer, norm) for layer, norm in norms
                               if isinstance(qmodel.get_submodule(layer), RCTLayer)]
    log.info("RCT: %d layers hold %d-bit integer weights only%s", swapped, cfg.bits_init,
             f"; {len(qmodel.qframe_rct_norms)} BatchNorms train beside them and fold into their scales at the end"
             if qmodel.qframe_rct_norms else "")
    for name in kept:  # as QAT trains them: weight ranges from the current weights at every step
        qmodel.get_submodule(name).weight_quantizer.dynamic = True
    for name, (q, _) in site_weight_quantizers(qmodel).items():  # x @ W: a parameter, trained in float as in QAT
        kept[name] = "a 2-d parameter multiplied as x @ W (RCT holds integer weights for Conv2d and Linear)"
        q.dynamic = True
    qmodel.qframe_rct_float_master = kept
    if kept:
        shown = "; ".join(f"{n} ({why})" for n, why in list(kept.items())[:8]) + (" ..." if len(kept) > 8 else "")
        log.warning("RCT: %d quantized layers keep FP32 master weights and train as fake-quant layers, as in QAT: %s",
                    len(kept), shown)
    return qmodel


def _warn_replaced_widths(qmodel: nn.Module, recipe: QuantRecipe, cfg: RCTConfig) -> None:
    """Say which of the recipe's weight settings RCT does not use: it starts every layer at
    ``cfg.bits_init`` bits, per output channel, whatever width or granularity the recipe gives."""
    differ = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantConv2d, QuantLinear)) and module.weight_quantizer is not None:
            spec = module.weight_quantizer.spec
            if spec.bits != cfg.bits_init:
                differ.setdefault(spec.bits, []).append(name)
    if differ:
        listed = "; ".join(f"{bits} bits for {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                           for bits, names in sorted(differ.items()))
        log.warning("RCT starts every layer at method.rct.bits_init=%d bits (moving within %d..%d), not at the "
                    "widths of recipe %r (%s)", cfg.bits_init, cfg.bits_min, cfg.bits_max, recipe.name, listed)
    if recipe.weight.granularity != "per_channel":
        log.warning("RCT keeps per-channel weight scales; the %s weights of recipe %r do not apply to it",
                    recipe.weight.granularity.replace("_", "-"), recipe.name)


def _norm_pairs(model: nn.Module, calib_batches, input_fn) -> list[tuple[str, str]]:
    """(layer, BatchNorm) pairs of ``model`` whose BN follows the layer (BN kept through training)."""
    example = None
    if iter(calib_batches) is not calib_batches:  # a re-iterable: one batch can be looked at
        first = next(iter(calib_batches), None)
        example = None if first is None else (input_fn or default_input_fn)(first)
    pairs = find_conv_bn_pairs(model, example if isinstance(example, torch.Tensor) else None)
    return [(a, b) for a, b in pairs if isinstance(model.get_submodule(b), NORM)]


def fold_trained_norms(model: nn.Module) -> int:
    """Fold each BatchNorm that trained beside an RCT layer into that layer's scales (in place).

    The codes stay integer and (but for sign) unchanged (:func:`~.storage.fold_bn_into_layer`);
    the BN's place becomes ``nn.Identity``. Returns how many were folded."""
    pairs = getattr(model, "qframe_rct_norms", [])
    for layer, norm in pairs:
        fold_bn_into_layer(model.get_submodule(layer), model.get_submodule(norm))
        set_submodule(model, norm, nn.Identity())
    model.qframe_rct_norms = []
    return len(pairs)


def rct(model: nn.Module, recipe: QuantRecipe, data, cfg: RCTConfig, train: TrainConfig | None = None, *, epochs: int,
        lr: float, calib_batches=None, num_batches: int = 8, device: torch.device | str = "cpu", seed: int = 0,
        checkpoint_path=None, resume: str | None = None, augment=None, loss_fn=None,
        input_fn=None, observer_steps: int = 0, ema_momentum: float = 0.01) -> tuple[nn.Module, RCTOptimizer]:
    """Train ``model`` with RCT for ``epochs`` at learning rate ``lr``; return the model and its optimizer.

    The optimizer carries the bit-width history (``history``, ``history_steps``, ``events``).
    ``train`` supplies batch size, warm-up and the rest; checkpoints and resume work as in
    :func:`qframe.train.fit` (qframe's data, classification) or :func:`qframe.methods.loop.fit_batches`
    (any other); ``augment`` needs the former. Distributed training is not supported. ``data`` may
    be any re-iterable of batches, with ``loss_fn(outputs, batch)`` / ``input_fn(batch)`` for a task other
    than classification of ``(images, labels)`` (as in :func:`qframe.methods.qat.qat`).
    Activation ranges keep tracking (EMA, ``ema_momentum``) for the first ``observer_steps`` steps,
    as in QAT: from scratch the calibrated ranges of the untrained model do not last. With a recipe
    that keeps BatchNorm (``fold_bn=False``) the BNs train in float beside the integer layers and
    are folded into their per-channel scales when training ends.
    """
    model = eager_module(model, "qframe.rct")
    require_initialized(model, "qframe.rct")
    require_recipe(recipe, "qframe.rct")
    cfg = require_config(cfg, RCTConfig, "rct's cfg")
    train = require_config(train, TrainConfig, "rct's train", optional=True)
    device = require_device(device, "qframe.rct")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 0:
        raise QFrameError(f"rct's epochs={epochs!r} is invalid; valid: an integer >= 0")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise QFrameError(f"rct's lr={lr!r} is invalid; valid: a number > 0")
    train = train or TrainConfig()
    own = is_data_bundle(data) and loss_fn is None and input_fn is None
    if resume is not None:
        require_checkpoint_file(resume, "rct's resume", "the path of a checkpoint that rct's checkpoint_path received")
    if augment is not None and not own:
        raise QFrameError("rct's augment works on qframe's data with the default classification loss; with your "
                          "own batches, loss_fn or input_fn, augment in your DataLoader instead")
    require_calibration_apart(data, calib_batches, "rct")
    if calib_batches is None:
        calib_batches = data.loader("train", train.batch_size, shuffle=True, seed=seed) if is_data_bundle(data) else data
    qmodel = prepare_rct(model, recipe, calib_batches, num_batches, cfg, device, input_fn=input_fn)
    on_step = track_activation_ranges(qmodel, observer_steps, ema_momentum, device)
    holder: dict = {}

    def make(m: nn.Module) -> RCTOptimizer:
        holder["opt"] = RCTOptimizer(m, lr, cfg, seed)
        return holder["opt"]

    train_cfg = dataclasses.replace(train, min_steps=0, patience=0, epochs=epochs, lr=lr, resume=resume, checkpoint=None,
                                    warmup_epochs=min(train.warmup_epochs, 0.5 * epochs), freeze_backbone_epochs=0)
    # RCT's own optimizer replaces train.optimizer, momentum and weight_decay
    settings = None if checkpoint_path is None and resume is None else resume_settings(
        model, recipe, train, seed, ("epochs", "lr", "min_steps", "patience", "freeze_backbone_epochs", "optimizer",
                                     "momentum", "weight_decay"), data, own,
        method={"epochs": epochs, "lr": lr, "observer_steps": observer_steps, "ema_momentum": ema_momentum,
                "rct": dataclasses.asdict(cfg)})
    if epochs and own:
        fit(qmodel, data, train_cfg, device=device, seed=seed, checkpoint_path=checkpoint_path, augment=augment,
            desc=f"rct {recipe.name}", make_optimizer=make, on_step=on_step, settings=settings)
    elif epochs:
        batches = data.loader("train", train.batch_size, shuffle=True, seed=seed, drop_last=True) \
            if is_data_bundle(data) else data
        fit_batches(qmodel, batches, epochs=epochs, optimizer=make(qmodel), loss_fn=loss_fn, input_fn=input_fn,
                    device=device, desc=f"rct {recipe.name}", on_step=on_step, checkpoint_path=checkpoint_path,
                    resume=resume, settings=settings)
    else:
        make(qmodel)
    on_step(observer_steps, qmodel)
    qmodel.eval()
    fold_trained_norms(qmodel)
    return qmodel, holder["opt"]


def to_fake_quant(model: nn.Module) -> nn.Module:
    """Replace each RCT layer (in place) by the QuantConv2d / QuantLinear it deploys as.

    The weight is exactly on its per-channel grid, so the weight quantizer gets the layer's own
    scale and reproduces the codes; the model then exports, converts and measures like any PTQ /
    QAT model. Layers wider than 8 bits keep a float weight and no weight quantizer.
    """
    for name, layer in rct_layers(model):
        weight = layer.weight
        quantizer = None
        if layer.bits <= 8:
            quantizer = TensorQuantizer(QuantSpec(bits=layer.bits, granularity="per_channel", axis=0))
            quantizer.scale = layer.scale.clone()
            quantizer.zero_point = torch.zeros_like(layer.scale, dtype=torch.int32)
        else:
            log.warning("RCT layer %s ended at %d bits; it deploys with a float weight", name, layer.bits)
        set_submodule(model, name, _float_twin(layer, weight, quantizer).train(layer.training))
    return model


def _float_twin(layer: RCTLayer, weight: torch.Tensor, quantizer) -> nn.Module:
    bias = layer.bias is not None
    if isinstance(layer, RCTConv2d):
        out, inp, kh, kw = weight.shape
        float_layer = nn.Conv2d(inp * layer.groups, out, (kh, kw), layer.stride, layer.padding, layer.dilation,
                                layer.groups, bias, device=weight.device)
        twin = QuantConv2d.from_float(float_layer, quantizer, layer.input_quantizer)
    else:
        float_layer = nn.Linear(weight.shape[1], weight.shape[0], bias, device=weight.device)
        twin = QuantLinear.from_float(float_layer, quantizer, layer.input_quantizer)
    with torch.no_grad():
        twin.weight.copy_(weight)
        if bias:
            twin.bias.copy_(layer.bias)
    return twin


def final_bits(model: nn.Module) -> dict[str, int]:
    """Each RCT layer's current weight bit width, by qualified name."""
    return {name: layer.bits for name, layer in rct_layers(model)}
