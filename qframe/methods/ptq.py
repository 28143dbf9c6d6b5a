"""Post-training quantization: fold BN, swap in quantized layers, calibrate, done.

Optional remedies for low bit widths, in the order they run (each is also a function of its own):
cross-layer equalization (:func:`qframe.quant.equalize.equalize`) on the float model, then after
calibration learned rounding (:func:`qframe.quant.adaround.adaround`, or block by block with
:func:`qframe.quant.block_reconstruction.reconstruct_blocks`) and empirical bias correction
(:func:`qframe.quant.bias_correction.correct_biases`), which corrects the final weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from qframe.errors import QFrameError, check_field_types, one_of, require_device, require_module, require_recipe
from qframe.utils.batches import all_finite, batch_size, check_batches, default_input_fn, run_batch, to_device
from qframe.utils.modules import (bake_hook_made_weights, bake_parametrizations, copy_model, eager_module, eval_mode,
                                  require_initialized)
from qframe.quant.adaround import AdaRoundConfig, check_adaround_config
from qframe.quant.gptq import GPTQConfig, check_gptq_config
from qframe.quant.conv_bn import ConvBn2d, fuse_conv_bn
from qframe.quant.fold import TRANSPOSED, fold_bn_fitted
from qframe.quant.functional import SCALE_EPS
from qframe.quant.modules import QUANT_LAYERS, quantizers
from qframe.quant.recipe import QuantRecipe, quantize_fitted
from qframe.quant.frozen import frozen_weights

log = logging.getLogger(__name__)


ROUNDINGS = ("nearest", "adaround", "adaround_block", "gptq")


@dataclass
class PTQOptions:
    """The remedies :func:`ptq` applies: equalization, learned rounding, bias correction."""

    equalize: bool = False
    bias_correction: bool = False
    rounding: str = "nearest"  # nearest, adaround (layer by layer), adaround_block (BRECQ-style blocks), gptq
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self):
        check_field_types(self, 'PTQOptions')
        if self.rounding not in ROUNDINGS:
            raise one_of("method.rounding", self.rounding, ROUNDINGS)

    @property
    def needs_reference(self) -> bool:
        return self.bias_correction or self.rounding != "nearest"


def calibrate_weights(model: nn.Module) -> int:
    """Set every weight quantizer's range from its (static) weight; return how many were set."""
    count = 0
    for module in model.modules():
        if isinstance(module, QUANT_LAYERS) and module.weight_quantizer is not None:
            module.weight_quantizer.calibrate_from(module.weight_to_quantize())
            count += 1
    return count


def _below_smallest_step(observed) -> list[tuple[str, float, int]]:
    """``(name, largest |x| seen, levels of its format)`` of each activation quantizer whose range, though not
    zero, spans fewer steps of the smallest scale qframe gives (``SCALE_EPS``) than its format has levels: its
    tensor keeps that few, none where every value is below half a step (a random-init backbone's features at
    1e-9)."""
    found = []
    for name, q in observed:
        lo, hi = getattr(q.observer, "min_val", None), getattr(q.observer, "max_val", None)
        if not isinstance(lo, torch.Tensor) or not isinstance(hi, torch.Tensor) or lo.numel() == 0:
            continue
        amax = float(torch.maximum(lo.abs(), hi.abs()).max())
        if 0 < amax < SCALE_EPS * q.spec.qmax:
            found.append((name.removesuffix(".input_quantizer"), amax, q.spec.qmax))
    return found


@torch.no_grad()
@frozen_weights()
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
    require_module(model, "qframe.calibrate")
    check_batches(batches, "batches", input_fn)
    if not any(True for _ in quantizers(model)):
        raise QFrameError(f"{type(model).__name__} has no quantizer to calibrate; valid: a model quantize_ has "
                          "quantized (qframe.ptq does both)")
    input_fn = input_fn or default_input_fn
    if isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral) or num_batches < 1:
        raise QFrameError(f"num_batches={num_batches!r} (calibration batches) is invalid; valid: an integer >= 1")
    num_batches = int(num_batches)  # numpy integers too
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
            if not all_finite(x):
                raise QFrameError(f"calibration batch {i} contains NaN or Inf values; check the data and its normalisation")
            run_batch(model, x, i)
            seen += n
            batches_seen += 1
    finally:
        for _, q in pending:
            q.calibrating = False
    if seen == 0:
        raise QFrameError("calibration set is empty: no images reached the model; give a non-empty calibration split")
    unreached = [(n, q) for n, q in pending if not q.observer.observed]
    tiny = _below_smallest_step([(n, q) for n, q in pending if q.observer.observed])
    for _, q in pending:
        if q.observer.observed:
            q.finalize()
    if tiny:
        log.warning("%d activations range below the smallest scale qframe gives (%g a step) and keep few levels or "
                    "none: %s. Their values are far below the rest of the model's: check the model's init or "
                    "normalisation, or keep these layers float", len(tiny), SCALE_EPS,
                    "; ".join(f"{n} (|x| <= {amax:.2g}: {int(amax / SCALE_EPS + 0.5)} of {qmax} levels)"
                              for n, amax, qmax in tiny[:8]) + (" ..." if len(tiny) > 8 else ""))
    if unreached:
        _keep_unreached_float(model, [n for n, _ in unreached])
    log.info("calibrated %d quantizers on %d images (%d batches)", len(pending) - len(unreached), seen, batches_seen)
    return seen


UNREACHED = "did not run on the calibration batches (no range to quantize with)"

def _float_layer(layer: nn.Module) -> nn.Module | None:
    """The plain float layer a built-in quantized Conv / Linear was made from (same parameters); None for others."""
    from qframe.quant.modules import QUANT_MODULES

    kind = next((f for f, q in QUANT_MODULES.items() if type(layer) is q and f is not ConvBn2d), None)
    if kind is None:
        return None
    if kind is nn.Linear:
        new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None, device="meta")
    elif issubclass(kind, TRANSPOSED):
        new = kind(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.output_padding, layer.groups, layer.bias is not None, layer.dilation, layer.padding_mode,
                   device="meta")
    else:
        new = kind(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                   layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta")
    new.weight, new.bias = layer.weight, layer.bias
    return new.train(layer.training)


def _keep_unreached_float(model: nn.Module, names: list[str]) -> None:
    """Quantizers that saw no calibration data (their module never ran: a branch the inputs do not take, a
    layer the model builds but never calls) have no range. A built-in quantized layer goes back to float;
    another quantized layer (a registered twin) runs with its quantizers off, any other owner with that
    one off. Each is listed in ``model.qframe_float_layers`` with the reason, and one warning names them."""
    from qframe.utils.modules import set_submodule

    floats = dict(getattr(model, "qframe_float_layers", None) or {})
    modules = dict(model.named_modules())
    owners = []
    for name in names:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        layer = modules.get(owner)
        plain = _float_layer(layer) if isinstance(layer, QUANT_LAYERS) else None
        if plain is not None:
            set_submodule(model, owner, plain)
        elif isinstance(layer, QUANT_LAYERS):  # a twin qframe cannot undo: its quantizers off
            for q in (layer.input_quantizer, layer.weight_quantizer):
                if q is not None:
                    q.enabled = False
        else:
            modules[name].enabled = False
        key = owner if owner else name
        if ".qframe_sites.quantizers." in f".{name}":  # a placed call site: "<module>::<site>", as placement names ops
            module, _, site = name.rpartition("qframe_sites.quantizers.")
            key = f"{module.rstrip('.')}::{site}"
        if key not in floats:
            floats[key] = UNREACHED
            owners.append(key)
    model.qframe_float_layers = floats
    shown = ", ".join(owners[:8]) + (f", ... ({len(owners)} in all)" if len(owners) > 8 else "")
    log.warning("calibration: %d layers %s; they stay float (the quantize_ line counted them quantized): %s",
                len(owners), UNREACHED, shown)


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
    equalize: bool = False,
    bias_correction: bool = False,
    rounding: str = "nearest",
    adaround: AdaRoundConfig | None = None,
    gptq: GPTQConfig | None = None,
    keep_parametrizations: bool = False,
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

    Remedies for low bit widths: ``equalize`` (cross-layer equalization with high-bias absorption,
    before quantizing), ``rounding="adaround"`` (learned rounding, layer by layer) or
    ``"adaround_block"`` (block by block), tuned by ``adaround``, or ``"gptq"`` (Hessian-based
    error compensation, layer by layer, seconds in all) tuned by ``gptq``, and ``bias_correction``
    (empirical, last), all on the same calibration images (models with one tensor input).

    Weights that old-style ``weight_norm`` / ``spectral_norm`` / ``prune`` hooks or
    ``torch.nn.utils.parametrizations`` compute become plain parameters of their value in the copy
    (logged), pruned zeros kept; ``keep_parametrizations=True`` keeps the parametrizations, to train
    through them (QAT does), except on layers a BatchNorm is folded into.
    """
    model = eager_module(model, "qframe.ptq")
    require_initialized(model, "qframe.ptq")
    device = require_device(device, "qframe.ptq")
    require_recipe(recipe, "qframe.ptq")
    options = PTQOptions(equalize, bias_correction, rounding, check_adaround_config(adaround), check_gptq_config(gptq))
    if train_bn and (options.equalize or options.needs_reference):
        raise QFrameError("equalize, bias_correction and rounding are PTQ steps; QAT starts from plain PTQ (train_bn=True)")
    check_batches(calib_batches, "calib_batches", input_fn)
    input_fn = input_fn or default_input_fn
    qmodel = copy_model(model).eval()
    baked = bake_hook_made_weights(qmodel)  # pruned weights stay zero: the remedies keep exact zeros
    if not keep_parametrizations:  # a PTQ model does not train: the weights they compute, as plain parameters
        baked.update(bake_parametrizations(qmodel))
    if baked:
        shown = ", ".join(f"{n or type(qmodel).__name__} ({kind})" for n, kind in list(baked.items())[:8])
        log.info("qframe.ptq: the weight_norm / spectral_norm / pruning hooks or parametrizations of %d layers baked "
                 "into their weights: %s", len(baked), shown)
    batches = iter(calib_batches)
    first = next(batches, None)
    x = input_fn(first) if first is not None else None
    param = next(qmodel.parameters(), None)
    example = to_device(x, param.device if param is not None else "cpu") if x is not None else None
    tensor = example if isinstance(example, torch.Tensor) else None  # BN folding checks with one-tensor inputs
    out = None
    if example is not None:
        with torch.no_grad():
            out = run_batch(qmodel, example)  # before anything is changed: a batch that does not fit is one line
    if options.equalize:
        from qframe.quant.equalize import equalize as equalize_

        equalize_(qmodel, example=example)
        out = None  # the output changed (by rounding)
    if recipe.fold_bn:
        if train_bn:
            fuse_conv_bn(qmodel, tensor)  # Conv2d + BatchNorm2d train as QuantConvBn2d
            out = None
        # every other foldable pair, folded as TensorRT folds it; the first batch fits, checked above
        with eval_mode(qmodel):  # ConvBn2d layers are made in training mode
            # any batch form, as run_batch gave it to the model (a list of inputs as a tuple: model(*x))
            folded = fold_bn_fitted(qmodel, tuple(example) if isinstance(example, list) else example,
                                    recipe.merge_branches, out)
        if train_bn and folded:
            log.info("qframe.ptq: %d BatchNorm layers beside layers other than Conv2d (Conv1d / 3d, ConvTranspose, "
                     "Linear) or before a layer are folded before training, their statistics kept as they are: %s",
                     len(folded), ", ".join(" + ".join(pair) for pair in folded[:8]) + (" ..." if len(folded) > 8 else ""))
    batches = itertools.chain([first] if first is not None else [], batches)
    if not options.needs_reference:
        quantize_fitted(qmodel, recipe, example, target)
        qmodel.to(device)
        calibrate_weights(qmodel)
        calibrate(qmodel, batches, num_batches, device, input_fn=input_fn)
        return qmodel
    if not isinstance(x, torch.Tensor):
        raise QFrameError("bias_correction, adaround and gptq need a model with one tensor input; input_fn gave "
                          f"{type(x).__name__}")
    from qframe.quant.capture import calibration_images

    images = calibration_images((input_fn(b) for b in batches), num_batches, device)
    reference = copy.deepcopy(qmodel).to(device)
    quantize_fitted(qmodel, recipe, example, target)
    qmodel.to(device)
    calibrate_weights(qmodel)
    batch = max(1, images.shape[0] // num_batches)
    calibrate(qmodel, images.split(batch), num_batches, device)
    remedy(qmodel, reference, images, options)
    return qmodel


def remedy(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor, options: PTQOptions) -> nn.Module:
    """Learned rounding and bias correction of a calibrated ``qmodel`` against its float ``reference``.

    Both run in one layer-wise pass over the calibration images: each layer (or block) is rounded as
    the pass reaches it, then its bias corrected, so every later layer learns from the inputs it will
    really get.
    """
    from qframe.quant import adaround as ada
    from qframe.quant import bias_correction as bc
    from qframe.quant import block_reconstruction as blocks
    from qframe.quant.capture import layerwise_pass, reference_means, reference_outputs

    start = time.perf_counter()
    qmodel.eval()
    reference.eval()
    before, after, errors, shifts = {}, {}, {}, {}
    cfg = options.adaround
    if options.rounding in ("adaround", "gptq", "adaround_block"):
        from qframe.quant import gptq as gq

        names = (blocks.ordered_blocks(qmodel, images, cfg.block_layers) if options.rounding == "adaround_block"
                 else ada.roundable_layers(qmodel, images, "gptq" if options.rounding == "gptq" else "adaround"))
        make, settings = {"adaround": (ada.adaround_hook, cfg), "gptq": (gq.gptq_hook, options.gptq),
                          "adaround_block": (blocks.block_hook, cfg)}[options.rounding]
        hook = make(reference_outputs(reference, names, images), settings, errors,
                    generator=torch.Generator(device=images.device).manual_seed(0))
        before = {n: hook for n in names}
    if options.bias_correction:
        names = bc.correctable_layers(qmodel, images)
        hook = bc.bias_correction_hook(reference_means(reference, names, images), shifts)
        after = {n: hook for n in names}
    total = len(before) + len(after)
    with tqdm(total=total, desc="ptq remedies", leave=False, disable=None) as bar:
        def counted(fn):
            def wrapped(*args):
                out = fn(*args)
                bar.update(1)
                return out
            return wrapped

        layerwise_pass(qmodel, images, {n: counted(f) for n, f in before.items()},
                       {n: counted(f) for n, f in after.items()})
    if errors:
        ada.log_gain(f"{options.rounding}", errors)
    if shifts:
        worst = max(shifts, key=shifts.get)
        log.info("bias correction: %d layers, largest mean shift removed %.4g (%s)", len(shifts), shifts[worst], worst)
    log.info("ptq remedies (rounding=%s, bias_correction=%s) on %d images took %.1f s", options.rounding,
             options.bias_correction, images.shape[0], time.perf_counter() - start)
    return qmodel
