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

import dataclasses
import logging
import math
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError
from qframe.utils.batches import (all_finite, batch_size, call_model, check_batches, cross_entropy, default_input_fn,
                                  default_loss_fn, is_data_bundle, logits_of, run_batch, to_device)

# and, for code that imported them from here, the batch helpers of qframe.utils.batches
__all__ = ["fit_batches", "resume_settings",
           "all_finite", "batch_size", "call_model", "check_batches", "cross_entropy", "default_input_fn",
           "default_loss_fn", "is_data_bundle", "logits_of", "run_batch", "to_device"]

log = logging.getLogger(__name__)


def fit_batches(model: nn.Module, batches: Iterable, *, epochs: int, optimizer: torch.optim.Optimizer,
                loss_fn: Callable | None = None, input_fn: Callable | None = None, device="cpu",
                on_step=None, on_epoch_start=None, desc: str = "train", checkpoint_path=None,
                resume=None, settings: dict | None = None) -> list[dict]:
    """Train ``model`` for ``epochs`` passes over ``batches`` with ``optimizer``; return per-epoch mean losses.

    A cosine learning-rate decay runs over all steps when ``batches`` has a length. ``on_step(step,
    model)`` and ``on_epoch_start(epoch, model)`` are the hooks :func:`qframe.train.fit` calls.
    ``checkpoint_path`` gets an atomic checkpoint after every epoch (model, optimizer, schedule, the
    RNG states of torch and of ``batches``' shuffling generator); ``resume`` continues from one, and
    reaches the state of an uninterrupted run when the data come in the same order (a seeded or
    fixed order, or a DataLoader shuffled by torch's global RNG). Raises :class:`QFrameError` on a
    non-finite loss, on an epoch that gets no batches (a one-shot iterator: pass a list or a
    DataLoader), and on a checkpoint written for other batches per epoch, optimizer, or ``settings``
    (what the caller records, :func:`resume_settings`; without them, ``epochs``).
    """
    from qframe.train import require_float32_training, restore_training, save_training

    loss_fn, input_fn = loss_fn or default_loss_fn, input_fn or default_input_fn
    require_float32_training(model, desc)
    total = epochs * len(batches) if hasattr(batches, "__len__") else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)) if total else 1.0)
    history, step, start = [], 0, 0
    # what a checkpoint must agree with: the length of the schedule, hence the learning rate of every step
    settings = {**(settings or {"epochs": epochs}),
                "batches_per_epoch": len(batches) if hasattr(batches, "__len__") else None}
    shuffle = _shuffle_generator(batches)
    model.to(device)
    if resume is not None:
        state = restore_training(resume, model, optimizer, scheduler, settings,
                                 optimizer_name=f"the optimizer ({type(optimizer).__name__})", name="resume",
                                 valid="the path of a checkpoint that checkpoint_path received",
                                 restart="start over without resume",
                                 model_hint="resume with the model it was written for")
        if "step" not in state:
            raise QFrameError(f"resume={str(resume)!r} was written by qframe.train.fit (qframe's data and "
                              "classification), not for these batches; resume with the data it was written for")
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


# TrainConfig settings fit_batches does not use (it trains the batches it is given, with a plain cosine schedule)
UNUSED_BY_FIT_BATCHES = ("label_smoothing", "bf16", "warmup_epochs", "freeze_backbone_epochs")


def resume_settings(model: nn.Module, recipe, train, seed: int, overridden: tuple[str, ...], data=None,
                    own: bool = True, **sections) -> dict:
    """What a QAT or RCT checkpoint must agree with to be resumed, by configuration name: the starting
    model (a digest of its weights: another FP32 model is another run), ``seed``, the recipe
    (``quant.*``), the training settings of ``train`` the method does not replace (``overridden``)
    and its training loop uses (``own``: :func:`qframe.train.fit` on qframe's data, else
    :func:`fit_batches` on ``data``), and the method's own ``sections`` (e.g. ``method=asdict(cfg)``)."""
    from qframe.train import flat_settings, recorded_settings, weights_digest

    if not own:
        overridden += UNUSED_BY_FIT_BATCHES + (() if is_data_bundle(data) else ("batch_size",))
    kept = {k: v for k, v in recorded_settings(train).items() if k not in overridden}
    return flat_settings({"start_weights": weights_digest(model), "seed": seed, "train": kept,
                          "quant": dataclasses.asdict(recipe), **sections})


def _shuffle_generator(batches) -> torch.Generator | None:
    """The generator that shuffles a DataLoader built with ``generator=...``; its state goes with a checkpoint."""
    generator = getattr(getattr(batches, "sampler", None), "generator", None)
    return generator if isinstance(generator, torch.Generator) else None
