"""Batches of any form: what the model takes from one, how it is called, the default classification loss.

qframe's methods default to classification of ``(images, labels)`` batches; ``input_fn(batch)``
and ``loss_fn(outputs, batch)`` (:mod:`qframe.methods.loop`) plug in any other task. These helpers
sit below quantization, training and the methods, which all feed batches to models.
"""

from __future__ import annotations

import collections.abc

import torch
from torch import nn

from qframe.errors import QFrameError, first_line


def default_input_fn(batch):
    """``batch[0]`` of an ``(inputs, labels)`` batch, else the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def logits_of(outputs) -> torch.Tensor:
    """The tensor a classifier's output holds: itself, ``.logits`` / ``["logits"]``, or the first item."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs:
        return logits_of(outputs[0])
    raise QFrameError(f"cannot find logits in a model output of type {type(outputs).__name__}; valid: a tensor, an "
                      "output with .logits or ['logits'], or a tuple whose first item is one (for another output, "
                      "training takes loss_fn)")


def default_loss_fn(outputs, batch) -> torch.Tensor:
    """Cross-entropy of the outputs' logits against ``batch[1]`` (classification)."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], torch.Tensor):
        raise QFrameError("the default loss is classification: batches of (inputs, labels); for another task pass "
                          "loss_fn(outputs, batch) (and input_fn(batch) when the inputs are not batch[0])")
    logits = logits_of(outputs)
    return cross_entropy(logits, batch[1].to(logits.device))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy``; labels it cannot take (out of the logits' class range, floats that are not one
    probability per class) are one line saying which and what is valid."""
    try:
        return nn.functional.cross_entropy(logits, labels, reduction=reduction)
    except (IndexError, RuntimeError, ValueError) as exc:
        classes = logits.shape[-1] if logits.dim() else 0
        if labels.is_floating_point():
            detail = f"{str(labels.dtype).replace('torch.', '')} labels of shape {tuple(labels.shape)}"
        elif labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            detail = f"label {int(labels.min()) if int(labels.min()) < 0 else int(labels.max())}"
        else:
            detail = f"labels of shape {tuple(labels.shape)}: {first_line(exc)}"
        raise QFrameError(f"the labels do not fit logits of shape {tuple(logits.shape)} ({detail}); valid: integer "
                          f"class indices 0..{classes - 1} (the model's {classes} outputs), or one probability per "
                          "class") from exc


def to_device(inputs, device):
    """``inputs`` (a tensor, tuple/list or dict of them) on ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(x, device) for x in inputs)
    if isinstance(inputs, dict):
        return {k: to_device(v, device) for k, v in inputs.items()}
    return inputs


def call_model(model: nn.Module, inputs):
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def batch_size(inputs) -> int:
    """The leading size of the first tensor in ``inputs`` (0 for none)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return next((batch_size(x) for x in items if isinstance(x, (torch.Tensor, tuple, list, dict))), 0)


def is_data_bundle(data) -> bool:
    """qframe's own data object (``qframe.build_data``), as opposed to any iterable of batches."""
    return hasattr(data, "loader") and hasattr(data, "split")


def all_finite(inputs) -> bool:
    return all(torch.isfinite(t).all() for t in flat_tensors(inputs) if t.is_floating_point())


def flat_tensors(inputs) -> list[torch.Tensor]:
    """The tensors of a batch or a model output, in order: a dict's (or ModelOutput's) values, a tuple's or
    list's items, nested ones in turn (what the ONNX exporter makes graph inputs / outputs of)."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [t for x in items for t in flat_tensors(x)]


def run_batch(model: nn.Module, x, index: int = 0, what: str = "calibration batch"):
    """``model`` on ``what`` ``index`` (inputs ``x``); a batch the model cannot take (another channel count or
    size, a dict or tuple the forward does not take) is a one-line QFrameError instead of torch's traceback."""
    try:
        return call_model(model, x)
    except (torch.OutOfMemoryError, QFrameError):
        raise  # memory, not the batch's form; or already one line
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # another size, channel count, rank or signature
        first = first_line(exc)
        shapes = [tuple(t.shape) for t in flat_tensors(x)]
        shown = "shape " + ", ".join(map(str, shapes)) if shapes else f"a {type(x).__name__}"
        if isinstance(x, dict):
            shown = f"a dict with keys {', '.join(map(repr, x))}, called as model(**batch)"
        elif isinstance(x, (tuple, list)):
            shown += f", {len(x)} inputs called as model(*batch)"
        hint = "check input_fn, e.g. input_fn=lambda b: b['pixels'], " if what != "evaluation batch" else "check "
        raise QFrameError(f"{what} {index} ({shown}) does not fit the model: {first}; valid: batches of the inputs "
                          f"the model takes ({hint}channels and size)") from exc


def require_calibration_apart(data, calib_batches, verb: str) -> None:
    """One line where ``data`` is a one-shot iterator (a generator) that would also give the calibration batches:
    calibration would take its first batches and training would silently never see them."""
    if calib_batches is None and isinstance(data, collections.abc.Iterator):
        raise QFrameError(f"{verb}'s data is a one-shot {type(data).__name__}: calibration would take its first "
                          "batches and training would never see them; valid: a list of batches or a DataLoader, "
                          "or calib_batches= apart")


def check_batches(batches, what: str, input_fn) -> None:
    """One line unless ``batches`` is an iterable of batches (not one tensor, not None) and ``input_fn`` is
    None or callable."""
    if isinstance(batches, torch.Tensor):
        raise QFrameError(f"{what} is one tensor of shape {tuple(batches.shape)}; valid: an iterable of batches, "
                          "e.g. [images] or a DataLoader")
    if isinstance(batches, tuple) and len(batches) >= 2 and all(isinstance(t, torch.Tensor) for t in batches) and \
            len({t.dim() for t in batches}) > 1:  # tensors of different ranks: the parts of one batch
        shapes = ", ".join(str(tuple(t.shape)) for t in batches)
        raise QFrameError(f"{what} is one batch (tensors of shapes {shapes}); valid: an iterable of batches, "
                          "e.g. [(images, labels)] or a DataLoader")
    try:
        iter(batches)
    except TypeError:
        raise QFrameError(f"{what} is {type(batches).__name__}, not an iterable of batches; valid: a list of "
                          "batches or a DataLoader") from None
    if input_fn is not None and not callable(input_fn):
        raise QFrameError(f"input_fn={input_fn!r} is not callable; valid: a function of a batch giving the model's "
                          "inputs, e.g. input_fn=lambda b: b['pixels']")
