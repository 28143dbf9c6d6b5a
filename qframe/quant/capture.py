"""What layer-wise PTQ steps see: tensors inside a model on calibration data, in one pass each.

Bias correction and AdaRound compare a quantized model with its float reference one layer (or
block) at a time, in execution order, each on the inputs it receives once every earlier layer has
been dealt with. Instead of one forward pass per layer, qframe runs the float reference once to
record what each layer should produce (:func:`reference_outputs`, :func:`reference_means`), then
the quantized model once on all calibration images as one batch (:func:`layerwise_pass`): hooks fix
each layer as the pass reaches it, so the layers after it see its corrected output.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from qframe.errors import QFrameError, require_module
from qframe.quant.modules import QUANT_LAYERS

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 128  # images per forward pass of the float reference
FP16_MAX = 6.0e4  # stored targets go to float16 only when every value fits


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibration_images(batches: Iterable, num_batches: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first ``num_batches`` batches of images (labels dropped) as one tensor on ``device``."""
    if isinstance(batches, torch.Tensor):
        return batches.to(device)
    images = []
    for i, batch in enumerate(batches):
        if i >= num_batches:
            break
        x = _inputs(batch)
        if not isinstance(x, torch.Tensor):
            raise QFrameError(f"calibration batch {i} gives a {type(x).__name__} where one tensor of images is needed; valid: "
                              "batches of images or (images, labels), or an input_fn that takes a batch to its images "
                              "(e.g. input_fn=lambda b: b['pixel_values'])")
        if not torch.isfinite(x).all():
            raise QFrameError(f"calibration batch {i} contains NaN or Inf values; check the data and its normalisation")
        images.append(x)
    if not images or sum(x.shape[0] for x in images) == 0:
        raise QFrameError("calibration set is empty: no images reached the model; give a non-empty calibration split")
    return torch.cat(images).to(device)


def check_remedy_inputs(qmodel, reference, images, verb: str) -> None:
    """What a remedy (bias correction, AdaRound, block reconstruction) is given: two models and the calibration
    images as one non-empty tensor of finite values; one line naming what is wrong otherwise (NaN images would
    otherwise be written into the model's biases and roundings)."""
    require_module(qmodel, verb)
    require_module(reference, f"{verb} (reference, the float model)")
    if not isinstance(images, torch.Tensor):
        hint = " (a list of batches: torch.cat them)" if isinstance(images, (list, tuple)) else ""
        raise QFrameError(f"{verb} needs the calibration images as one tensor, got {type(images).__name__}{hint}; "
                          "valid: a tensor [N, C, H, W]")
    if images.dim() == 0 or images.shape[0] == 0:
        raise QFrameError(f"{verb}: images of shape {tuple(images.shape)} hold no image; valid: at least one image")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise QFrameError(f"{verb}: the calibration images contain NaN or Inf values; check the data and its "
                          "normalisation")
    norms = dict(qmodel.named_modules())
    for name, module in reference.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and name in norms and \
                not isinstance(norms[name], nn.modules.batchnorm._BatchNorm):
            raise QFrameError(f"{verb}: the reference keeps BatchNorm {name!r}, which the quantized model folded into "
                              "its layer, so each layer would learn toward the output before its norm; valid: the float "
                              "model with BN folded as the quantized one (qframe.fold_bn on a copy)")


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise QFrameError(f"module {name!r} is not in {type(model).__name__}; the reference and the quantized "
                          "model must have the same module names") from None


def run_hooked(model: nn.Module, example: torch.Tensor, handles: list) -> None:
    """One forward pass of ``model`` on the first item of ``example``, without gradients, then the hooks
    ``handles`` removed (also when the pass raises)."""
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()


def call_counts(model: nn.Module, example: torch.Tensor, types: tuple = QUANT_LAYERS) -> dict[str, int]:
    """How many times one forward pass calls each of ``model``'s modules of ``types``, in the order it first
    calls them."""
    counts: dict[str, int] = {}
    run_hooked(model, example, [
        m.register_forward_pre_hook(lambda mod, args, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
        for name, m in model.named_modules() if isinstance(m, types)])
    return counts


def execution_order(model: nn.Module, example: torch.Tensor, types: tuple = QUANT_LAYERS) -> list[str]:
    """Names of ``model``'s modules of ``types`` in the order one forward pass first calls them."""
    return list(call_counts(model, example, types))


def called_once(counts: dict[str, int], names: list[str], what: str, keeps: str) -> list[str]:
    """``names`` without the layers ``counts`` (:func:`call_counts`) shows called more than once per forward pass
    (a head shared by the levels of a feature pyramid): a layer-wise remedy sees one call's input and output, not
    all of them. Those are named in one warning: ``what`` skips them, and they keep ``keeps``."""
    shared = {n: counts[n] for n in names if counts.get(n, 0) > 1}
    if shared:
        log.warning("%s: %d layers a forward pass calls more than once keep %s: %s", what, len(shared), keeps,
                    "; ".join(f"{n} ({c} calls)" for n, c in shared.items()))
    return [n for n in names if n not in shared]


def channel_sums(out: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel dim: the last of a Linear's output, whatever the dims before it
    (tokens ``[B, L, C]``, ConvNeXt's ``[B, H, W, C]``), dim 1 of a convolution's ``[B, C, ...]``."""
    flat = out.reshape(-1, out.shape[-1]) if linear else out.transpose(0, 1).reshape(out.shape[1], -1).t()
    return flat.double().sum(0), flat.shape[0]


def _run_with_hooks(model: nn.Module, names: list[str], images: torch.Tensor, hook, chunk: int) -> None:
    handles = [_module(model, n).register_forward_hook(lambda m, a, o, n=n: hook(n, o)) for n in names]
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], chunk):
                model(images[start:start + chunk])
    finally:
        for h in handles:
            h.remove()


def reference_means(model: nn.Module, names: list[str], images: torch.Tensor, *,
                    chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Per-channel mean output (float64) of each module in ``names`` over ``images``, in one pass."""
    sums: dict[str, list] = {}

    def hook(name, out):
        s, n = channel_sums(out, isinstance(_module(model, name), nn.Linear))
        acc = sums.setdefault(name, [0, 0])
        acc[0], acc[1] = acc[0] + s, acc[1] + n

    _run_with_hooks(model, names, images, hook, chunk)
    missing = [n for n in names if n not in sums]
    if missing:
        raise QFrameError(f"modules {', '.join(missing)} of {type(model).__name__} are not called in its forward pass")
    return {n: s / c for n, (s, c) in sums.items()}


def reference_outputs(model: nn.Module, names: list[str], images: torch.Tensor, *,
                      chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """The output of each module in ``names`` for every image, in one pass; stored as float16 where
    the values fit (a target's rounding error is then ~1e-7 of its energy, far below any quantization
    error it is compared with), float32 otherwise."""
    parts: dict[str, list] = {}

    def keep(name, out):
        parts.setdefault(name, []).append(out.detach().half() if bool(out.abs().max() < FP16_MAX) else out.detach())

    _run_with_hooks(model, names, images, keep, chunk)
    outputs = {}
    for name in names:
        if name not in parts:
            raise QFrameError(f"module {name!r} of {type(model).__name__} is not called in its forward pass")
        chunks = parts.pop(name)
        if len({t.dtype for t in chunks}) > 1:
            chunks = [t.float() for t in chunks]
        outputs[name] = torch.cat(chunks)
    return outputs


Hook = Callable[[str, nn.Module, torch.Tensor], None]
PostHook = Callable[[str, nn.Module, tuple, torch.Tensor], torch.Tensor | None]


def layerwise_pass(model: nn.Module, images: torch.Tensor, before: dict[str, Hook] | None = None,
                   after: dict[str, PostHook] | None = None) -> None:
    """One forward pass of ``model`` on all ``images`` as a single batch, with ``before[name](name, module,
    input)`` called as each named module is reached (it may change the module: the pass then goes on with
    the changed module) and ``after[name](name, module, args, output)`` once it has run (its return value,
    when not None, replaces the output). Hooks do not fire inside forward passes that a hook runs itself.
    Gradients are off outside the hooks; hooks may enable them."""
    before, after = before or {}, after or {}
    busy = [False]  # hooks do not fire for the forward passes a hook itself makes (e.g. optimising a block)

    def guarded(fn, *args):
        if busy[0]:
            return None
        busy[0] = True
        try:
            return fn(*args)
        finally:
            busy[0] = False

    handles = []
    for name, fn in before.items():
        handles.append(_module(model, name).register_forward_pre_hook(
            lambda m, args, name=name, fn=fn: guarded(fn, name, m, args[0])))
    for name, fn in after.items():
        handles.append(_module(model, name).register_forward_hook(
            lambda m, args, out, name=name, fn=fn: guarded(fn, name, m, args, out)))
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
