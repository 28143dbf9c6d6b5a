"""Classifier-head replacement and backbone loading for transfer learning."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.io import load_checkpoint, unwrapped
from qframe.utils.modules import set_submodule

log = logging.getLogger(__name__)


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise QFrameError(f"model {type(model).__name__} has no nn.Linear classifier to replace")
    return last


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier (the last ``nn.Linear``) if its ``out_features != num_classes``.

    The new layer keeps ``in_features``, bias, dtype and device of the old one. Returns ``model``.
    """
    name, old = _last_linear(model)
    if old.out_features != num_classes:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        set_submodule(model, name, new)
        log.info("replaced head %s: %d -> %d classes", name, old.out_features, num_classes)
    return model


def load_backbone(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load the weights of checkpoint ``path`` that fit ``model``; return the keys that were skipped.

    Meant for transfer learning: a backbone trained on another data set loads, while its head
    (whose shape differs with the number of classes) is skipped and keeps its fresh weights.
    Skipped are checkpoint keys whose shape differs from the model's and keys the model does not
    have; both are logged. A checkpoint that shares no weight with the model is a QFrameError.
    """
    checkpoint = load_checkpoint(path)
    state = checkpoint["model"]
    state = unwrapped(state)  # checkpoints saved from DataParallel / DDP prefix every key with "module."
    own = model.state_dict()
    fit, skipped = {}, []
    for key, value in state.items():
        if key in own and isinstance(value, torch.Tensor) and value.shape == own[key].shape:
            fit[key] = value
        else:
            skipped.append(key)
    # Transfer learning skips the head only; a checkpoint of another architecture or width fits a few
    # shape-less or tiny tensors at most (e.g. BatchNorm's num_batches_tracked), which is no backbone.
    weights = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    fitting = [k for k in weights if k in fit]
    if not fit or len(fitting) * 2 < len(weights):
        first = next((k for k in weights if k not in fit), None)
        why = (f"e.g. {first} is {tuple(state[first].shape)} there, "
               + (f"{tuple(own[first].shape)} in the model" if first in own else "not in the model")) if first else ""
        saved = f" (saved from {checkpoint['model_name']})" if "model_name" in checkpoint else ""
        raise QFrameError(f"checkpoint {str(path)!r}{saved} shares {len(fitting)} of its {len(weights)} weight tensors "
                          f"with {type(model).__name__} ({why}); was it saved from a different architecture or "
                          "width? give the model and model.width_mult it was trained with")
    model.load_state_dict(fit, strict=False)
    missing = [k for k in own if k not in fit]
    for key in skipped:
        shape = tuple(state[key].shape) if isinstance(state[key], torch.Tensor) else "?"
        where = f"model has {tuple(own[key].shape)}" if key in own else "not in model"
        log.info("load_backbone: skipped %s %s (%s)", key, shape, where)
    log.info("load_backbone: loaded %d tensors from %s, skipped %d, %d model tensors left as initialised",
             len(fit), path, len(skipped), len(missing))
    return skipped
