"""RCT as a method: quantize once, train the integer weights, hand back a deployable model."""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.methods.ptq import ptq
from qframe.methods.rct.optimizer import RCTConfig, RCTOptimizer
from qframe.methods.rct.storage import RCTConv2d, RCTLayer, RCTLinear, rct_layers
from qframe.quant.modules import QuantConv2d, QuantConvBn2d, QuantLinear, TensorQuantizer
from qframe.quant.recipe import QuantRecipe
from qframe.quant.spec import QuantSpec
from qframe.train import TrainConfig, fit
from qframe.utils.modules import set_submodule

log = logging.getLogger(__name__)


def prepare_rct(model: nn.Module, recipe: QuantRecipe, calib_batches, num_batches: int, cfg: RCTConfig,
                device: torch.device | str = "cpu") -> nn.Module:
    """A copy of ``model`` whose Conv2d / Linear weights exist only as ``cfg.bits_init``-bit codes.

    BN is folded and activation ranges are calibrated exactly as PTQ does with ``recipe`` (its
    weight settings are replaced by RCT's per-channel codes); ``model`` is untouched and no float
    copy of a weight remains in the result.
    """
    qmodel = ptq(model, recipe, calib_batches, num_batches, device)
    swapped = 0
    for name, module in list(qmodel.named_modules()):
        if isinstance(module, QuantConvBn2d):
            raise QFrameError(f"RCT needs BN folded into {name}; use a recipe with fold_bn=true")
        if isinstance(module, (QuantConv2d, QuantLinear)):
            kind = RCTConv2d if isinstance(module, QuantConv2d) else RCTLinear
            layer = kind(module, cfg.bits_init, module.input_quantizer, cfg.grad_bits).to(device)
            set_submodule(qmodel, name, layer.train(module.training))
            swapped += 1
    log.info("RCT: %d layers hold %d-bit integer weights only", swapped, cfg.bits_init)
    return qmodel


def rct(model: nn.Module, recipe: QuantRecipe, data, cfg: RCTConfig, train: TrainConfig, *, epochs: int,
        lr: float, calib_batches, num_batches: int = 8, device: torch.device | str = "cpu", seed: int = 0,
        checkpoint_path=None, resume: str | None = None, augment=None) -> tuple[nn.Module, RCTOptimizer]:
    """Train ``model`` with RCT for ``epochs`` at learning rate ``lr``; return the model and its optimizer.

    The optimizer carries the bit-width history (``history``, ``history_steps``, ``events``).
    ``train`` supplies batch size, warm-up and the rest; checkpoints and resume work as in
    :func:`qframe.train.fit`. Distributed training is not supported.
    """
    qmodel = prepare_rct(model, recipe, calib_batches, num_batches, cfg, device)
    holder: dict = {}

    def make(m: nn.Module) -> RCTOptimizer:
        holder["opt"] = RCTOptimizer(m, lr, cfg, seed)
        return holder["opt"]

    train_cfg = dataclasses.replace(train, min_steps=0, patience=0, epochs=epochs, lr=lr, resume=resume, checkpoint=None,
                                    warmup_epochs=min(train.warmup_epochs, 0.5 * epochs), freeze_backbone_epochs=0)
    if epochs:
        fit(qmodel, data, train_cfg, device=device, seed=seed, checkpoint_path=checkpoint_path, augment=augment,
            desc=f"rct {recipe.name}", make_optimizer=make)
    else:
        make(qmodel)
    return qmodel.eval(), holder["opt"]


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
