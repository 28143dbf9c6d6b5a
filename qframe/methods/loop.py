"""The user's own data and task: batches of any form, a loss function, an input function.

qframe's methods default to classification on qframe's data objects (``(images, labels)``
batches, cross-entropy). Any other task plugs in with two functions:

* ``input_fn(batch)`` -> what the model takes: a tensor (``model(x)``), a tuple (``model(*x)``)
  or a dict (``model(**x)``); default ``batch[0]`` for a tuple/list batch, else the batch itself;
* ``loss_fn(outputs, batch)`` -> a scalar loss; default cross-entropy of the outputs (or their
  ``logits``) against ``batch[1]``.

``batches`` is any re-iterable of batches: a ``DataLoader``, a list, a dataset's loader.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError, first_line

log = logging.getLogger(__name__)


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
    raise QFrameError(f"cannot find logits in a model output of type {type(outputs).__name__}; pass loss_fn")


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


def fit_batches(model: nn.Module, batches: Iterable, *, epochs: int, optimizer: torch.optim.Optimizer,
                loss_fn: Callable | None = None, input_fn: Callable | None = None, device="cpu",
                on_step=None, on_epoch_start=None, desc: str = "train", checkpoint_path=None,
                resume=None) -> list[dict]:
    """Train ``model`` for ``epochs`` passes over ``batches`` with ``optimizer``; return per-epoch mean losses.

    A cosine learning-rate decay runs over all steps when ``batches`` has a length. ``on_step(step,
    model)`` and ``on_epoch_start(epoch, model)`` are the hooks :func:`qframe.train.fit` calls.
    ``checkpoint_path`` gets an atomic checkpoint after every epoch (model, optimizer, schedule, the
    RNG states of torch and of ``batches``' shuffling generator); ``resume`` continues from one, and
    reaches the state of an uninterrupted run when the data come in the same order (a seeded or
    fixed order, or a DataLoader shuffled by torch's global RNG). Raises :class:`QFrameError` on a
    non-finite loss, on an epoch that gets no batches (a one-shot iterator: pass a list or a
    DataLoader), and on a checkpoint written for other epochs, batches per epoch or optimizer.
    """
    from qframe.train import restore_training, save_training

    loss_fn, input_fn = loss_fn or default_loss_fn, input_fn or default_input_fn
    total = epochs * len(batches) if hasattr(batches, "__len__") else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) if total else 1.0)
    history, step, start = [], 0, 0
    # what a checkpoint must agree with: the length of the schedule, hence the learning rate of every step
    settings = {"epochs": epochs, "batches": len(batches) if hasattr(batches, "__len__") else None}
    shuffle = _shuffle_generator(batches)
    model.to(device)
    if resume is not None:
        state = restore_training(resume, model, optimizer, scheduler, settings,
                                 optimizer_name=f"the optimizer ({type(optimizer).__name__})", name="resume",
                                 prefix="", valid="the path of a checkpoint that checkpoint_path received",
                                 restart="start over without resume", model_hint="resume with the model it was written for")
        history, step, start = list(state["history"]), state["step"], state["epoch"] + 1
        if shuffle is not None and state.get("shuffle") is not None:
            shuffle.set_state(state["shuffle"])
        log.info("resuming %s from %s at epoch %d/%d", desc, resume, start + 1, epochs)
    for epoch in range(start, epochs):
        if on_epoch_start is not None:
            on_epoch_start(epoch, model)
        model.train()
        loss_sum = seen = 0.0
        for batch in tqdm(batches, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None):
            if on_step is not None:
                on_step(step, model)
            batch = to_device(batch, device)
            loss = loss_fn(call_model(model, input_fn(batch)), batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise QFrameError(f"{desc}: loss_fn gave {got}; valid: one number as a tensor (e.g. a mean over the "
                                  "batch) that backward() can start from")
            if not torch.isfinite(loss):
                raise QFrameError(f"{desc} diverged at epoch {epoch + 1}, step {step}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
            seen += 1
            step += 1
        if not seen:
            raise QFrameError(f"{desc}: the data gave no batches in epoch {epoch + 1}; pass a re-iterable "
                              "(a list of batches or a DataLoader), not a one-shot iterator")
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen})
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, epochs, loss_sum / seen)
        if checkpoint_path is not None:
            save_training(checkpoint_path, model, optimizer, scheduler, epoch, history, settings, step=step,
                          shuffle=None if shuffle is None else shuffle.get_state())
    return history


def _shuffle_generator(batches) -> torch.Generator | None:
    """The generator that shuffles a DataLoader built with ``generator=...``; its state goes with a checkpoint."""
    generator = getattr(getattr(batches, "sampler", None), "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def all_finite(inputs) -> bool:
    return all(torch.isfinite(t).all() for t in _flat(inputs) if t.is_floating_point())


def _flat(inputs) -> list[torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    items = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return [t for x in items for t in _flat(x)]


def run_batch(model: nn.Module, x, index: int = 0, what: str = "calibration batch"):
    """``model`` on ``what`` ``index`` (inputs ``x``); a batch the model cannot take (another channel count or
    size, a dict or tuple the forward does not take) is a one-line QFrameError instead of torch's traceback."""
    try:
        return call_model(model, x)
    except (torch.OutOfMemoryError, QFrameError):
        raise  # memory, not the batch's form; or already one line
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # another size, channel count, rank or signature
        first = first_line(exc)
        shapes = [tuple(t.shape) for t in _flat(x)]
        shown = "shape " + ", ".join(map(str, shapes)) if shapes else f"a {type(x).__name__}"
        if isinstance(x, dict):
            shown = f"a dict with keys {', '.join(map(repr, x))}, called as model(**batch)"
        elif isinstance(x, (tuple, list)):
            shown += f", {len(x)} inputs called as model(*batch)"
        hint = "check input_fn, e.g. input_fn=lambda b: b['pixels'], " if what != "evaluation batch" else "check "
        raise QFrameError(f"{what} {index} ({shown}) does not fit the model: {first}; valid: batches of the inputs "
                          f"the model takes ({hint}channels and size)") from exc


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
