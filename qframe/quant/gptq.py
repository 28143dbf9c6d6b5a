"""GPTQ: weights rounded one input column at a time, the error of each spread over the columns not yet
rounded (Frantar et al., "GPTQ", ICLR 2023, after Optimal Brain Quantization).

For one layer with inputs ``X`` (im2col rows for a conv) the output error of weights ``W`` against a
target ``W*`` is ``(W - W*) H (W - W*)^T`` with ``H = X^T X``. Rounding column ``i`` to its grid leaves
an error ``e``; the update ``W[:, i:] -= e / Hinv[i, i] * Hinv[i, i:]`` (``Hinv`` the upper Cholesky
factor of ``H^-1``) moves the columns after it to the values that cancel that error best, and they are
rounded in turn. Columns go in order of decreasing ``H[i, i]`` (the inputs that carry the most energy
first), in blocks of ``block_size`` whose updates to later columns are one matrix product.

qframe's layer objective (:class:`~qframe.quant.adaround.QuadraticObjective`) is measured against the
*float* model's output on the input the *quantized* model gives the layer, so ``W*`` is the weight that
best undoes the error of the layers before (``W0 + (G^-1 cross)^T``, damped) as well as the float
weight ``W0`` itself: GPTQ runs toward both and the layer keeps whichever of them, or nearest rounding,
gives the lower error; where a layer has few input rows for its weights (a classifier head) that error is
measured on held-out calibration images (:func:`gptq_layer`). Unlike AdaRound a weight may move several grid steps;
the scales stay those the weight quantizer was calibrated with, so the result is an ordinary
calibrated model for QAT, convert and export. One layer costs a Cholesky factorisation and a sweep over
its columns: seconds for a whole network where AdaRound takes minutes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from qframe.errors import QFrameError, check_field_types
from qframe.quant import functional as QF
from qframe.quant.adaround import (QuadraticObjective, _groups, check_remedy_config, quadratic_objective,
                                   reconstruction_hook, round_layerwise, store_weight)
from qframe.quant.capture import check_remedy_inputs

log = logging.getLogger(__name__)

# below this many input rows per weight of an output, a layer's roundings are compared on held-out images
HELD_OUT_BELOW = 8


@dataclass
class GPTQConfig:
    """GPTQ settings, per layer."""

    damp: float = 0.01  # added to H's diagonal, as a fraction of its mean: keeps H^-1 well conditioned
    act_order: bool = True  # round the columns whose inputs carry the most energy first
    block_size: int = 128  # columns per block (the updates to later columns are one matrix product per block)
    max_rows: Optional[int] = 16384  # rows (output positions) drawn for H, as AdaRound's max_rows; None: all

    def __post_init__(self):
        check_field_types(self, "GPTQConfig")
        if not 0 < self.damp <= 1:
            raise QFrameError(f"gptq damp={self.damp!r} is invalid; valid: 0 < damp <= 1 (a fraction of H's mean "
                              "diagonal)")
        for name in ("block_size", "max_rows"):
            value = getattr(self, name)
            if name == "max_rows" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QFrameError(f"gptq {name}={value!r} is invalid; valid: an integer >= 1")


def check_gptq_config(cfg) -> GPTQConfig:
    """``cfg`` as given to GPTQ (None: the defaults); one line unless it is a :class:`GPTQConfig`."""
    return check_remedy_config(cfg, GPTQConfig, "GPTQ config")


def _round_to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    return (torch.round(w / s + z).clamp(qmin, qmax) - z) * s


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` per group."""
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    return h + damp * h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None] * eye


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` per group (float64); the damping doubles
    until the factorisation succeeds."""
    for _ in range(12):
        lower, info = torch.linalg.cholesky_ex(_damped(h, damp))
        if not bool(info.any()):
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info.any()):
                return upper
        damp *= 2
    raise QFrameError("gptq: the layer's input Gram matrix is not positive definite even with damping; are the "
                      "calibration images all alike?")


def gptq_round(target: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int,
               qmax: int, cfg: GPTQConfig, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ of grouped weights ``target`` ``[g, out/g, k]`` under ``gram`` ``[g, k, k]`` (``X^T X`` per group):
    weights on the grid of ``scale`` / ``zero`` (shaped as ``target``), dequantized, in ``target``'s order. The sweep
    runs in float64 for a float64 ``target``, else in float32. ``pruned`` (bool, shaped as ``target``): weights
    that round to 0 whatever the sweep made of them, their error spread as any other's (SparseGPT's way)."""
    g, _, k = target.shape
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    h = gram.double().clone()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that is always zero: its weights round to nearest and move nothing
    if cfg.act_order:
        order = torch.argsort(diag, dim=-1, descending=True, stable=True)  # [g, k]
    else:
        order = torch.arange(k, device=target.device).expand(g, k)
    cols = order.unsqueeze(1).expand_as(target)
    w, s, z = (t.to(dtype).gather(2, cols) for t in (target, scale, zero))
    keep = None if pruned is None or not bool(pruned.any()) else pruned.gather(2, cols)
    h = h.gather(1, order.unsqueeze(2).expand(g, k, k)).gather(2, order.unsqueeze(1).expand(g, k, k))
    hinv = _upper_inverse_factor(h, cfg.damp).to(dtype)
    q = torch.empty_like(w)
    for a in range(0, k, cfg.block_size):
        b = min(a + cfg.block_size, k)
        block = w[:, :, a:b].clone()
        errors = torch.empty_like(block)
        for i in range(b - a):
            col = block[:, :, i]
            rounded = _round_to_grid(col, s[:, :, a + i], z[:, :, a + i], qmin, qmax)
            if keep is not None:
                rounded = rounded.masked_fill(keep[:, :, a + i], 0.0)
            q[:, :, a + i] = rounded
            err = (col - rounded) / hinv[:, a + i, a + i, None]
            block[:, :, i:] -= err.unsqueeze(2) * hinv[:, a + i, a + i:b].unsqueeze(1)
            errors[:, :, i] = err
        if b < k:
            w[:, :, b:] -= torch.bmm(errors, hinv[:, a:b, b:])
    out = torch.empty_like(q)
    out.scatter_(2, cols, q)
    return out


def _halves(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: GPTQConfig, generator=None):
    """The layer objective over all images, over the even images and over the odd ones (at least two images)."""
    even = quadratic_objective(layer, x[0::2], y[0::2], max_rows=cfg.max_rows, generator=generator)
    odd = quadratic_objective(layer, x[1::2], y[1::2], max_rows=cfg.max_rows, generator=generator)
    share = ((x.shape[0] + 1) // 2) / x.shape[0]  # of the images, in the even half
    mix = lambda a, b: share * a + (1 - share) * b  # noqa: E731
    whole = QuadraticObjective(mix(even.gram, odd.gram), mix(even.cross, odd.cross), mix(even.energy, odd.energy),
                               even.weight0)
    return whole, even, odd


def _candidate(kind: str, objective: QuadraticObjective, grouped, s, z, spec, cfg: GPTQConfig) -> torch.Tensor:
    """Nearest rounding, or GPTQ toward the float weight (``"float"``) or toward the weight that also undoes the
    error of the layer's input (``"corrected"``), under ``objective``'s Gram matrix."""
    if kind == "nearest":
        return _round_to_grid(grouped, s, z, spec.qmin, spec.qmax)
    target = grouped
    if kind == "corrected":
        shift = torch.linalg.solve(_damped(objective.gram, cfg.damp), objective.cross)
        target = grouped + shift.transpose(1, 2).float()
    return gptq_round(target, objective.gram, s, z, spec.qmin, spec.qmax, cfg, pruned=grouped == 0)


def gptq_layer(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: GPTQConfig, *,
               generator: torch.Generator | None = None) -> tuple[float, float]:
    """GPTQ one quantized Conv1d / Conv2d / Linear in place; returns the reconstruction error of nearest rounding and of
    the rounding kept.

    ``x``: the layer's input in the quantized model (before its input quantizer); ``y``: the float
    model's output of the layer. Three roundings are made: nearest, GPTQ toward the float weight and GPTQ
    toward the weight that also undoes the error of the layer's input; the layer keeps the one with the
    lowest error. A layer with fewer than :data:`HELD_OUT_BELOW` input rows per weight of an output (a
    classifier head sees one row per image) has a Gram matrix of deficient or weak rank, where GPTQ fits
    the calibration images and can do worse on others; there each rounding is made from the even images
    and measured on the odd ones and the other way round (the errors returned are those, averaged), and
    the one kept is made again from all images.
    """
    q = layer.weight_quantizer
    if q is None or not q.calibrated or not q.enabled:
        raise QFrameError("gptq needs calibrated weight quantizers; run ptq (or calibrate_weights) first")
    with torch.no_grad():
        if layer.input_quantizer is not None:
            x = layer.input_quantizer(x)
        weight = layer.weight.detach()
        g = _groups(layer)
        grouped = weight.float().reshape(g, weight.shape[0] // g, -1)
        s, z = QF.expand_qparams(weight, q.scale.detach(), q.zero_point, q.spec)
        s, z = s.reshape(grouped.shape), z.reshape(grouped.shape)
        rows = y.numel() // (y.shape[-1] if isinstance(layer, nn.Linear) else y.shape[1])
        if rows >= HELD_OUT_BELOW * grouped.shape[-1] or x.shape[0] < 2:
            whole = quadratic_objective(layer, x, y, max_rows=cfg.max_rows, generator=generator)
            folds = [(whole, whole)]  # enough rows: the roundings compare on the rows they were made from
        else:
            whole, even, odd = _halves(layer, x, y, cfg, generator)
            folds = [(even, odd), (odd, even)]
        errors, made = {}, {}
        for kind in ("nearest", "float", "corrected"):
            made[kind] = [_candidate(kind, fit, grouped, s, z, q.spec, cfg) for fit, _ in folds]
            if all(torch.isfinite(m).all() for m in made[kind]):
                errors[kind] = sum(float(held(m.reshape(weight.shape).double()))
                                   for m, (_, held) in zip(made[kind], folds)) / len(folds)
        best = min(errors, key=errors.get)
        kept = made[best][0] if len(folds) == 1 else _candidate(best, whole, grouped, s, z, q.spec, cfg)
        if not store_weight(layer, kept.reshape(weight.shape)):
            return errors["nearest"], errors["nearest"]
    return errors["nearest"], errors[best]


def gptq_hook(targets: dict[str, torch.Tensor], cfg: GPTQConfig, errors: dict, bar=None, generator=None):
    """A :func:`~qframe.quant.capture.layerwise_pass` pre-hook that runs GPTQ on each layer it reaches."""
    return reconstruction_hook(gptq_layer, targets, cfg, errors, bar, generator)


def gptq(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor, cfg: GPTQConfig | None = None, *,
         seed: int = 0) -> dict[str, tuple[float, float]]:
    """GPTQ every quantized Conv1d / Conv2d / Linear of ``qmodel`` in place, layer by layer in execution order.

    ``reference``: the float model ``qmodel`` was quantized from (BN folded, same module names);
    ``images``: calibration images. Each layer sees the input the quantized model gives it, with every
    earlier layer already rounded. Returns per layer the reconstruction error of nearest rounding and of
    the rounding kept.
    """
    check_remedy_inputs(qmodel, reference, images, "qframe.gptq")
    cfg = check_gptq_config(cfg)
    return round_layerwise(qmodel, reference, images, "gptq",
                           lambda targets, errors, bar, gen: gptq_hook(targets, cfg, errors, bar, gen), seed)
