"""Post-training quantization: fold BN, swap in quantized layers, calibrate, done."""

from __future__ import annotations

import copy
import itertools
import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError
from qframe.methods.loop import batch_size, call_model, default_input_fn, to_device
from qframe.quant.fold import fold_bn, fuse_conv_bn
from qframe.quant.modules import QUANT_LAYERS, quantizers
from qframe.quant.recipe import QuantRecipe, quantize_

log = logging.getLogger(__name__)


def calibrate_weights(model: nn.Module) -> int:
    """Set every weight quantizer's range from its (static) weight; return how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and module.weight_quantizer is not None:
            module.weight_quantizer.calibrate_from(module.weight_to_quantize())
            count += 1
    return count


def _finite(inputs) -> bool:
    return all(torch.isfinite(t).all() for t in _flat(inputs) if t.is_floating_point())


def _flat(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [t for x in items for t in _flat(x)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, num_batches: int, device: torch.device | str = "cpu", *,
              input_fn=None) -> int:
    """Run ``num_batches`` batches through ``model`` with its activation quantizers observing.

    ``batches`` is any iterable of batches (a DataLoader, a list); ``input_fn(batch)`` gives the
    model's inputs (default ``batch[0]`` of a tuple, else the batch; a tuple or dict it returns is
    passed as ``model(*x)`` / ``model(**x)``: :mod:`qframe.methods.loop`). Weight quantizers that
    are already calibrated keep quantizing, so activation ranges see the quantized weights upstream.
    Returns the number of samples seen. Raises :class:`QFrameError` on an empty calibration set or
    a batch holding NaN / Inf.
    """
    input_fn = input_fn or default_input_fn
    if num_batches < 1:
        raise QFrameError(f"calib_batches={num_batches} must be >= 1")
    pending = [(n, q) for n, q in quantizers(model) if not q.calibrated]
    for _, q in pending:
        q.observer.reset()
        q.calibrating = True
    model.eval()
    seen = batches_seen = 0
    try:
        for i, batch in enumerate(tqdm(batches, total=num_batches, desc="calibrate", leave=False, disable=None)):
            if i >= num_batches:
                break
            x = to_device(input_fn(batch), device)
            n = batch_size(x)
            if n == 0:
                continue
            if not _finite(x):
                raise QFrameError(f"calibration batch {i} contains NaN or Inf values; check the data and its normalisation")
            call_model(model, x)
            seen += n
            batches_seen += 1
    finally:
        for _, q in pending:
            q.calibrating = False
    if seen == 0:
        raise QFrameError("calibration set is empty: no images reached the model; give a non-empty calibration split")
    for _, q in pending:
        q.finalize()
    log.info("calibrated %d quantizers on %d images (%d batches)", len(pending), seen, batches_seen)
    return seen


def ptq(
    model: nn.Module,
    recipe: QuantRecipe,
    calib_batches: Iterable,
    num_batches: int = 8,
    device: torch.device | str = "cpu",
    *,
    train_bn: bool = False,
    target: str = "tensorrt",
    input_fn=None,
) -> nn.Module:
    """Quantize a trained model after training: returns a calibrated fake-quant copy.

    The input model is left untouched. Steps: copy, fold BatchNorm into convs (when
    ``recipe.fold_bn``), swap in quantized layers, set weight ranges from the weights, then
    activation ranges from ``num_batches`` calibration batches. ``train_bn=True`` (QAT's start)
    keeps each BN beside its conv as a ConvBn2d that quantizes the folded weight. ``target``
    (``tensorrt``, ``dla``, ``onnxruntime``) decides where activation quantizers go beyond the
    Conv/Linear inputs (:mod:`qframe.quant.placement`, read from the first calibration batch).
    ``calib_batches`` is any iterable of batches; ``input_fn(batch)`` gives the model's inputs
    (default ``batch[0]`` of a tuple, else the batch: see :mod:`qframe.methods.loop`).
    """
    qmodel = copy.deepcopy(model).eval()
    batches = iter(calib_batches)
    first = next(batches, None)
    x = (input_fn or default_input_fn)(first) if first is not None else None
    param = next(qmodel.parameters(), None)
    example = to_device(x, param.device if param is not None else "cpu") if x is not None else None
    tensor = example if isinstance(example, torch.Tensor) else None  # BN folding checks with one-tensor inputs
    if recipe.fold_bn:
        if train_bn:
            fuse_conv_bn(qmodel, tensor)  # Conv2d + BatchNorm2d train as QuantConvBn2d
        fold_bn(qmodel, tensor)  # every other foldable pair, folded as TensorRT folds it
    quantize_(qmodel, recipe, example=example, target=target)
    qmodel.to(device)
    calibrate_weights(qmodel)
    calibrate(qmodel, itertools.chain([first] if first is not None else [], batches), num_batches, device,
              input_fn=input_fn)
    return qmodel
