"""Quantization-aware training: start from the PTQ-calibrated model, train through fake quantizers.

The model QAT trains is the model TensorRT runs: BN is folded into the conv weights before they
are quantized (:class:`~qframe.quant.modules.QuantConvBn2d`), BN statistics freeze after a
configurable epoch, activation ranges keep tracking for a configurable number of steps and are
then frozen, and weight ranges follow the weights (per-channel min/max at every step) unless
learned step sizes (LSQ) are asked for. :func:`fold_qat` turns the result into plain quantized
convolutions for export.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn

from qframe.errors import QFrameError, check_field_types, require_config, require_device
from qframe.methods.loop import fit_batches, resume_settings
from qframe.methods.ptq import ptq
from qframe.quant.modules import QUANT_LAYERS, QuantConvBn2d, TensorQuantizer, quantizers
from qframe.quant.observers import make_observer
from qframe.quant.recipe import QuantRecipe
from qframe.train import TrainConfig, build_optimizer, fit, require_checkpoint_file
from qframe.utils.batches import is_data_bundle, require_calibration_apart
from qframe.utils.modules import (bake_hook_made_weights, eager_module, is_parametrized, keep_pruned, pruning_masks,
                                  set_submodule, unparametrized)

log = logging.getLogger(__name__)


@dataclass
class QATConfig:
    """How quantization-aware training runs after calibration."""

    epochs: int = 5
    lr: float = 5e-4
    lsq: bool = False  # learned step sizes (LSQ) for weights and activations
    observer_steps: int = 0  # activation ranges keep tracking (EMA) for this many steps, then freeze
    ema_momentum: float = 0.01
    freeze_bn_epoch: int = 2  # BN statistics freeze from this epoch (0: from the start)

    def __post_init__(self):
        check_field_types(self, 'QATConfig')
        for name in ("epochs", "observer_steps", "freeze_bn_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise QFrameError(f"method.{name}={value!r} is invalid; valid: an integer >= 0")
        if not self.lr > 0:
            raise QFrameError(f"method.lr={self.lr!r} is invalid; valid: a number > 0")
        if not 0 < self.ema_momentum <= 1:
            raise QFrameError(f"method.ema_momentum={self.ema_momentum!r} is invalid; valid: 0 < ema_momentum <= 1 "
                              "(the weight of each new range)")


def _activation_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    weight_ids = {id(q) for q in _weight_quantizers(model)}
    return [q for _, q in quantizers(model) if id(q) not in weight_ids]


def _weight_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """Those of the quantized layers and of the ``x @ W`` parameters placement quantizes as weights."""
    from qframe.quant.placement import site_weight_quantizers

    layers = [m.weight_quantizer for m in model.modules() if isinstance(m, QUANT_LAYERS) and m.weight_quantizer]
    return layers + [q for q, _ in site_weight_quantizers(model).values()]


def prepare_qat(model: nn.Module, recipe: QuantRecipe, calib_batches, num_batches: int, cfg: QATConfig,
                device: torch.device | str = "cpu", *, input_fn=None, target: str = "tensorrt",
                train_bn: bool = True) -> nn.Module:
    """A calibrated fake-quant copy of ``model`` set up for training (``model`` is untouched).

    With ``recipe.fold_bn``, ``train_bn`` keeps each BN training beside its conv as TensorRT folds
    it (QuantConvBn2d); ``train_bn=False`` folds the BNs before training (as RCT fine-tunes). For a TensorRT
    ``target`` (the default) a recipe TensorRT cannot run as trained is a warning, before any training."""
    if target in ("tensorrt", "dla") and isinstance(recipe, QuantRecipe):
        from qframe.quant.compat import tensorrt_problems

        errors, _ = tensorrt_problems(recipe)
        if errors:
            log.warning("quant recipe %r cannot run on TensorRT as trained: %s; QAT trains it as asked (for "
                        "onnxruntime or a CPU pass target='onnxruntime')", recipe.name, "; ".join(errors))
    model = eager_module(model, "qframe.qat")
    masks = pruning_masks(model)
    qmodel = ptq(model, recipe, calib_batches, num_batches, device, train_bn=train_bn, input_fn=input_fn,
                 target=target, keep_parametrizations=True)  # weight_norm & co. train on
    if masks:  # the pruned weights stay zero while the rest trains
        lost = keep_pruned(qmodel, masks)
        log.info("qat: the torch.nn.utils.prune masks of %d layers kept on their quantized layers while training",
                 len(masks) - len(lost))
        if lost:
            log.warning("qat: the pruning masks of %d layers have no quantized layer of their shape to go on (merged "
                        "or renamed); their pruned weights may grow back in training: %s", len(lost), ", ".join(lost[:8]))
    for q in _weight_quantizers(qmodel):
        if cfg.lsq:
            q.learn_scale()
        else:
            q.dynamic = True
    if cfg.lsq:
        for q in _activation_quantizers(qmodel):
            q.learn_scale()
    else:
        track_activation_ranges(qmodel, cfg.observer_steps, cfg.ema_momentum, device)
    return qmodel


def track_activation_ranges(qmodel: nn.Module, steps: int, momentum: float, device="cpu"):
    """Let ``qmodel``'s activation quantizers keep tracking their ranges (EMA) while it trains.

    Returns ``on_step(step, model)`` for the training loop: it freezes the ranges from step
    ``steps`` on (with ``steps == 0`` they stay as calibrated)."""
    activations = _activation_quantizers(qmodel)
    if steps > 0:
        for q in activations:
            q.observer = make_observer("ema", q.spec, momentum=momentum).to(device)
            q.observing = True
    return _freeze_ranges_after(activations, steps)


def _freeze_ranges_after(activations: list[TensorQuantizer], steps: int):
    """``on_step(step, model)`` that stops ``activations`` observing from step ``steps`` on."""

    def on_step(step: int, _model) -> None:
        if step >= steps:
            for q in activations:
                q.observing = False

    return on_step


def qat(model: nn.Module, recipe: QuantRecipe, data, cfg: QATConfig, train: TrainConfig | None = None, *,
        calib_batches=None, num_batches: int = 8, device: torch.device | str = "cpu", seed: int = 0,
        checkpoint_path=None, resume: str | None = None, augment=None, loss_fn=None, input_fn=None,
        target: str = "tensorrt", train_bn: bool = True) -> nn.Module:
    """Calibrate like PTQ, then fine-tune through the quantizers; return the trained QAT model.

    ``data`` is qframe's data object (``qframe.build_data``) or any re-iterable of batches (a
    DataLoader, a list). ``train`` supplies batch size, optimizer and the rest; ``cfg.epochs`` and
    ``cfg.lr`` replace its epochs and learning rate. ``checkpoint_path`` gets a checkpoint after
    every epoch and ``resume`` continues from one, as in :func:`qframe.train.fit` (qframe's data,
    classification) or :func:`qframe.methods.loop.fit_batches` (any other). ``augment(x, generator)``
    needs qframe's data and classification. ``calib_batches`` defaults to ``data``'s batches.
    ``loss_fn(outputs, batch)`` and ``input_fn(batch)`` set the task (default: classification of
    ``(images, labels)``; :mod:`qframe.methods.loop`). ``target`` places activation quantizers as
    in :func:`qframe.methods.ptq.ptq`; ``train_bn`` as in :func:`prepare_qat`.
    """
    cfg = require_config(cfg, QATConfig, "qat's cfg")
    train = require_config(train, TrainConfig, "qat's train", optional=True)
    device = require_device(device, "qframe.qat")
    train = train or TrainConfig()
    own = is_data_bundle(data) and loss_fn is None and input_fn is None
    if resume is not None:
        require_checkpoint_file(resume, "qat's resume", "the path of a checkpoint that qat's checkpoint_path received")
    if augment is not None and not own:
        raise QFrameError("qat's augment works on qframe's data with the default classification loss; with your "
                          "own batches, loss_fn or input_fn, augment in your DataLoader instead")
    batches = None if own else (data.loader("train", train.batch_size, shuffle=True, seed=seed, drop_last=True)
                                if is_data_bundle(data) else data)
    require_calibration_apart(data, calib_batches, "qat")
    if calib_batches is None:
        calib_batches = data.loader("train", train.batch_size, shuffle=True, seed=seed) if is_data_bundle(data) else data
    qmodel = prepare_qat(model, recipe, calib_batches, num_batches, cfg, device, input_fn=input_fn, target=target,
                         train_bn=train_bn)
    on_step = _freeze_ranges_after(_activation_quantizers(qmodel), cfg.observer_steps)
    convbn = [m for m in qmodel.modules() if isinstance(m, QuantConvBn2d)]

    def on_epoch_start(epoch: int, _model) -> None:
        if epoch >= cfg.freeze_bn_epoch:
            for m in convbn:
                m.freeze_bn()

    train_cfg = dataclasses.replace(train, min_steps=0, patience=0, epochs=cfg.epochs, lr=cfg.lr, resume=resume, checkpoint=None,
                                    warmup_epochs=min(train.warmup_epochs, 0.5 * cfg.epochs))
    settings = None if checkpoint_path is None and resume is None else resume_settings(
        model, recipe, train, seed, ("epochs", "lr", "min_steps", "patience"), data, own,
        method=dataclasses.asdict(cfg))
    if cfg.epochs and own:
        fit(qmodel, data, train_cfg, device=device, seed=seed, checkpoint_path=checkpoint_path, augment=augment,
            desc=f"qat {recipe.name}", on_step=on_step, on_epoch_start=on_epoch_start, settings=settings)
    elif cfg.epochs:
        fit_batches(qmodel, batches, epochs=cfg.epochs, optimizer=build_optimizer(qmodel, train_cfg), loss_fn=loss_fn,
                    input_fn=input_fn, device=device, on_step=on_step, on_epoch_start=on_epoch_start,
                    desc=f"qat {recipe.name}", checkpoint_path=checkpoint_path, resume=resume, settings=settings)
    on_step(cfg.observer_steps, qmodel)
    on_epoch_start(cfg.freeze_bn_epoch, qmodel)
    bake_hook_made_weights(qmodel)  # the pruning masks kept in training: the weights they leave, as parameters
    return qmodel.eval()


def fold_qat(model: nn.Module) -> nn.Module:
    """Replace every QuantConvBn2d by its folded QuantConv2d, in place: the graph that deploys.

    Dynamic weight ranges become fixed ones computed from the folded weights (the same values the
    last forward pass used). A quantized layer's ``torch.nn.utils.parametrizations`` (weight_norm,
    spectral_norm) and ``torch.nn.utils.prune`` masks become the plain weight they compute now: the file
    holds that weight as a constant, and export puts sub-8-bit weights on their grid in place.
    """
    bake_hook_made_weights(model)  # torch.nn.utils.prune masks kept in training: the weights as last stepped, masked
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantConvBn2d):
            set_submodule(model, name, module.to_folded())
        elif isinstance(module, QUANT_LAYERS) and is_parametrized(module):
            set_submodule(model, name, unparametrized(module))
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and module.weight_quantizer is not None and module.weight_quantizer.dynamic:
            module.weight_quantizer.freeze_dynamic(module.weight_to_quantize())
    from qframe.quant.placement import site_weight_quantizers

    for name, (q, parameter) in site_weight_quantizers(model).items():  # x @ W: fixed at W's final range
        if q.dynamic:
            try:
                weight = model.get_parameter(parameter) if parameter is not None else None
            except AttributeError:  # a part of the model placement saw: the name is the whole model's
                weight = None
            if weight is None:
                raise QFrameError(f"fold_qat: the weight of the x @ W site {name} is not found ({parameter!r}); valid: "
                                  "fold the whole model qframe.qat trained, as placed")
            q.freeze_dynamic(weight.detach())
    return model
