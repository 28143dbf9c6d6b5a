"""AdaRound: learned rounding of weights (Nagel et al., "Up or Down?", ICML 2020).

Each weight is rounded down or up, not to the nearest level: ``w~ = s * clamp(floor(w/s) + h(V), qmin,
qmax)`` with a rectified sigmoid ``h(V)`` in ``[0, 1]`` per weight, optimised so that the layer's
output on calibration data stays close to the float layer's, while a regulariser
``sum(1 - |2h - 1|^beta)`` (``beta`` annealed from 20 to 2) drives every ``h`` to 0 or 1. The result
is a rounding choice per weight; the weights are then stored on their grid, so export, convert and
QAT see an ordinary calibrated model.

The layer objective is quadratic in the weight: with ``X`` the rows (im2col patches) a layer sees in
the quantized model and ``R = Y_float - X W0^T`` the error that is there before rounding,
``E(W) = mean_rows ||X (W - W0)^T - R||^2`` needs only ``G = X^T X``, ``X^T R`` and ``||R||^2`` over
*all* calibration rows, gathered once; every optimisation step is then a few small matrix
products whatever the number of images. Block reconstruction (BRECQ, Li et al. 2021) optimises
the roundings of all layers of a block jointly on the block's output: see
:mod:`qframe.quant.block_reconstruction`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from qframe.errors import QFrameError, check_field_types, require_config
from qframe.quant import functional as QF
from qframe.quant.capture import call_counts, called_once, check_remedy_inputs, layerwise_pass, reference_outputs
from qframe.quant.modules import QUANT_LAYERS, QuantConv1d, QuantConv2d, QuantLinear
from qframe.utils.modules import zero_padding

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (the paper's values)
ROUNDABLE = (QuantConv1d, QuantConv2d, QuantLinear)
ROW_CHUNK_ELEMENTS = 2**24  # cap on im2col temporaries while gathering statistics
MIN_ROWS, ROWS_PER_INPUT = 2048, 256  # sampled rows: at least MIN_ROWS, and no more than ROWS_PER_INPUT per input
# below this many multiply-adds per step a layer optimises on one thread: with tensors this small, waiting
# for a second (possibly descheduled) thread at every op costs far more than it saves
SMALL_WORK = 2**22


@contextlib.contextmanager
def single_thread_if(condition: bool):
    """Run the block with one torch thread when ``condition`` holds; restore the thread count after."""
    threads = torch.get_num_threads()
    if condition and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass
class AdaRoundConfig:
    """Optimisation settings, per layer (or block): Adam on the rounding logits."""

    iterations: int = 1000
    lr: float = 1e-2
    reg: float = 0.01  # weight of the rounding regulariser against the reconstruction error
    warmup: float = 0.2  # fraction of iterations with no regulariser
    beta_start: float = 20.0
    beta_end: float = 2.0
    batch_size: int = 32  # images per step of block reconstruction
    block_layers: int = 3  # block reconstruction: largest number of quantized layers in one block
    # layer objective: at most this many rows (output positions) drawn from the images, fewer for layers with
    # few inputs per output (see quadratic_objective); None: every row
    max_rows: Optional[int] = 16384
    # block reconstruction: each activation quantizer inside the block passes each value on unquantized with this
    # probability during the optimisation (QDrop, Wei et al. 2022); 0: every activation quantized
    drop_prob: float = 0.0

    def __post_init__(self):
        check_field_types(self, 'AdaRoundConfig')
        for name in ("iterations", "batch_size", "block_layers", "max_rows"):
            value = getattr(self, name)
            if name == "max_rows" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QFrameError(f"adaround {name}={value!r} is invalid; valid: an integer >= 1")
        if not self.lr > 0 or not self.reg >= 0:
            raise QFrameError(f"adaround lr={self.lr!r} / reg={self.reg!r} are invalid; valid: lr > 0, reg >= 0")
        if not 0 <= self.warmup < 1:
            raise QFrameError(f"adaround warmup={self.warmup!r} is invalid; valid: 0 <= warmup < 1")
        if not 0 <= self.drop_prob < 1:
            raise QFrameError(f"adaround drop_prob={self.drop_prob!r} is invalid; valid: 0 <= drop_prob < 1")
        if not self.beta_start >= self.beta_end > 0:
            raise QFrameError(f"adaround beta_start={self.beta_start!r} / beta_end={self.beta_end!r} are invalid; "
                              "valid: beta_start >= beta_end > 0 (the regulariser anneals from soft to hard rounding)")


# ----------------------------------------------------------------------------------- pure maths


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1)``: reaches 0 and 1 exactly, unlike a sigmoid."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_logits(rest: torch.Tensor) -> torch.Tensor:
    """Logits ``V`` with ``h(V) = rest`` (the fractional part of ``w / s``): rounding starts at the float value."""
    rest = rest.clamp(0.01, 0.99)
    return -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def rounding_regulariser(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero once every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def beta_schedule(step: int, total: int, cfg: AdaRoundConfig) -> float | None:
    """``beta`` at ``step``: None during the warm-up (no regulariser), then linear from start to end."""
    start = int(cfg.warmup * total)
    if step < start:
        return None
    progress = (step - start) / max(1, total - start)
    return cfg.beta_start + (cfg.beta_end - cfg.beta_start) * progress


class LearnedRounding(nn.Module):
    """The rounding of one weight tensor onto its grid: floor codes plus a learned 0/1 per weight.

    ``soft()`` is differentiable in ``logits`` (for optimisation), ``hard()`` the final weight, and
    ``nearest()`` the round-to-nearest weight the quantizer would give; all three are dequantized.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec):
        super().__init__()
        s, z = QF.expand_qparams(weight, scale, zero_point, spec)
        u = weight.detach().float() / s + z
        self.register_buffer("step", s)
        self.register_buffer("zero", z)
        self.register_buffer("base", torch.floor(u))
        self.register_buffer("exact", u)
        self.qmin, self.qmax = spec.qmin, spec.qmax
        self.logits = nn.Parameter(initial_logits(u - self.base))

    def _dequant(self, code: torch.Tensor) -> torch.Tensor:
        return (code.clamp(self.qmin, self.qmax) - self.zero) * self.step

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.logits)

    def soft(self) -> torch.Tensor:
        return self._dequant(self.base + self.h())

    def hard(self) -> torch.Tensor:
        return self._dequant(self.base + (self.logits.detach() >= 0).float())

    def nearest(self) -> torch.Tensor:
        return self._dequant(torch.round(self.exact))

    def regulariser(self, beta: float) -> torch.Tensor:
        return rounding_regulariser(self.h(), beta)


def learned_rounding(layer) -> LearnedRounding:
    """The :class:`LearnedRounding` of a calibrated quantized layer's weight, starting at its float value."""
    q = layer.weight_quantizer
    if q is None or not q.calibrated or not q.enabled:
        raise QFrameError("adaround needs calibrated weight quantizers; run ptq (or calibrate_weights) first")
    return LearnedRounding(layer.weight.detach(), q.scale.detach(), q.zero_point, q.spec).to(layer.weight.device)


# ------------------------------------------------------------------------ the layer objective


def _groups(layer) -> int:
    return getattr(layer, "groups", 1)  # a Linear has one


def _as_2d(layer: nn.Module, x: torch.Tensor):
    """``layer`` (a Conv1d / Conv2d) as a 2-D convolution of ``x``: ``(x, kernel, dilation, stride, padding)``, a
    Conv1d's input one row high. Zero padding stays a number (the input is not copied); another padding mode
    (reflect, replicate, circular) or a ``"same"`` that pads one side more pads ``x`` as the layer does."""
    padding = zero_padding(layer, "")
    if isinstance(padding, str):
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * len(layer.kernel_size)
    geometry = (tuple(layer.kernel_size), tuple(layer.dilation), tuple(layer.stride), tuple(padding))
    if x.dim() == 3:
        return (x.unsqueeze(2), *((1, *g) if i < 3 else (0, *g) for i, g in enumerate(geometry)))
    return (x, *geometry)


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What each output row of ``layer`` multiplies: ``[rows, groups, inputs per group]`` (im2col for a conv)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1])
    x, kernel, dilation, stride, padding = _as_2d(layer, x)
    cols = F.unfold(x, kernel, dilation, padding, stride)  # [N, Cin*k*k, L]
    g = layer.groups
    return cols.transpose(1, 2).reshape(-1, g, cols.shape[1] // g)


def layer_outputs(y: torch.Tensor, groups: int, linear: bool) -> torch.Tensor:
    """A layer output as ``[rows, groups, outputs per group]``, rows in :func:`layer_rows` order: a Linear's features
    are its last dim, whatever the dims before them (tokens ``[B, L, C]``, ConvNeXt's ``[B, H, W, C]``)."""
    if linear:
        y = y.reshape(-1, y.shape[-1])
    else:
        y = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(y.shape[0], groups, -1)


def sampled_rows(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, rows: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` output positions drawn uniformly (with replacement) from all images: the patches they
    multiply ``[rows, groups, k]`` and the outputs ``[rows, groups, out/g]``, gathered directly, with no
    im2col of the whole input."""
    g = _groups(layer)
    if isinstance(layer, nn.Linear):
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        pick = torch.randint(0, xs.shape[0], (rows,), generator=generator, device=x.device)
        return xs[pick].float().unsqueeze(1), ys[pick].float().unsqueeze(1)
    x, (kh, kw), (dh, dw), (sh, sw), (ph, pw) = _as_2d(layer, x)
    y = y.unsqueeze(2) if y.dim() == 3 else y  # a Conv1d's output, one row high
    n, _, oh, ow = y.shape
    height, width = x.shape[2], x.shape[3]
    flat = torch.randint(0, n * oh * ow, (rows,), generator=generator, device=x.device)
    img, oy, ox = flat // (oh * ow), (flat // ow) % oh, flat % ow
    pixels = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # [N*H*W, C]: a tap is then one row gather
    taps = []
    for i in range(kh):
        iy = oy * sh + i * dh - ph
        for j in range(kw):
            ix = ox * sw + j * dw - pw
            inside = ((iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)).unsqueeze(1)  # zero padding
            at = (img * height + iy.clamp(0, height - 1)) * width + ix.clamp(0, width - 1)
            taps.append(pixels.index_select(0, at) * inside)  # [rows, C]
    patches = torch.stack(taps, dim=2).float()  # [rows, C, kh*kw]: unfold's (channel, ky, kx) order
    return patches.reshape(rows, g, -1), y[img, :, oy, ox].float().reshape(rows, g, -1)


class QuadraticObjective:
    """``E(W) = mean_rows sum_out (X (W - W0)^T - R)^2`` from its sufficient statistics (float64 sums).

    ``gram = X^T X / n`` and ``cross = X^T R / n`` per group, ``energy = ||R||^2 / n``. ``E(W0) =
    energy`` is the error the layer has before its weights are rounded (from its quantized input).
    """

    def __init__(self, gram: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor, weight0: torch.Tensor):
        self.gram, self.cross, self.energy = gram, cross, energy
        self.weight0 = weight0
        self._cross_t = cross.transpose(1, 2)  # [g, out/g, k], the layout of the weight

    def to(self, dtype: torch.dtype) -> "QuadraticObjective":
        return QuadraticObjective(self.gram.to(dtype), self.cross.to(dtype), self.energy.to(dtype), self.weight0.to(dtype))

    def _delta(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.gram.shape[0]
        return (weight - self.weight0).reshape(g, -1, self.gram.shape[1]).to(self.gram.dtype)  # [g, out/g, k]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        d = self._delta(weight)
        return (torch.bmm(d, self.gram) * d).sum() - 2.0 * (d * self._cross_t).sum() + self.energy

    def gradient(self, weight: torch.Tensor) -> torch.Tensor:
        """``dE/dW = 2 (W - W0) G - 2 cross^T``, shaped like ``weight``."""
        d = self._delta(weight)
        return (2.0 * (torch.bmm(d, self.gram) - self._cross_t)).reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def quadratic_objective(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, *, max_rows: int | None = None,
                        generator: torch.Generator | None = None) -> QuadraticObjective:
    """The layer objective of :class:`QuadraticObjective` from ``x`` (the layer's quantized input, after
    its input quantizer) and ``y`` (the float model's output of this layer), over every row, or, where
    there are more than ``max_rows``, over that many rows drawn at random (a conv on large maps has far
    more rows than its Gram matrix needs). Sums are float32 per chunk, accumulated in float64."""
    g = _groups(layer)
    w0 = layer.weight.detach()
    w = w0.float().reshape(g, w0.shape[0] // g, -1)  # [g, out/g, k]
    bias = None if layer.bias is None else layer.bias.detach().float().reshape(g, -1)
    k = w.shape[2]
    linear = isinstance(layer, nn.Linear)
    total = y.numel() // (y.shape[-1] if linear else y.shape[1])
    if max_rows is not None:
        max_rows = min(max_rows, max(MIN_ROWS, ROWS_PER_INPUT * k))  # a small Gram matrix needs few rows
    if max_rows is not None and total > max_rows:
        chunks = [sampled_rows(layer, x, y, max_rows, generator)]
    else:
        step = max(1, ROW_CHUNK_ELEMENTS // max(1, layer_rows(layer, x[:1]).numel()))
        chunks = ((layer_rows(layer, x[s:s + step].float()), layer_outputs(y[s:s + step].float(), g, linear))
                  for s in range(0, x.shape[0], step))
    gram = torch.zeros(g, k, k, dtype=torch.float64, device=x.device)
    cross = torch.zeros(g, k, w.shape[1], dtype=torch.float64, device=x.device)
    energy = torch.zeros((), dtype=torch.float64, device=x.device)
    rows = 0
    for xr, yr in chunks:
        xg, yg = xr.transpose(0, 1), yr.transpose(0, 1)  # [g, r, .]
        resid = yg - torch.bmm(xg, w.transpose(1, 2))
        if bias is not None:
            resid = resid - bias.unsqueeze(1)
        gram += torch.bmm(xg.transpose(1, 2), xg).double()
        cross += torch.bmm(xg.transpose(1, 2), resid).double()
        energy += resid.double().pow(2).sum()
        rows += xr.shape[0]
    return QuadraticObjective(gram / rows, cross / rows, energy / rows, w0.double())


def optimise_rounding(rounding: LearnedRounding, objective: QuadraticObjective, cfg: AdaRoundConfig) -> None:
    """Adam on ``rounding.logits`` against ``objective(soft weight)`` plus the annealed regulariser.

    The gradient is written out (:meth:`QuadraticObjective.gradient`, the rectified sigmoid's and the
    regulariser's derivatives) rather than taken by autograd: the tensors of one layer are small, so
    per-step overhead, not arithmetic, sets the time, and a few fused in-place ops keep it low.
    """
    work = objective.gram.numel() * rounding.logits.shape[0] // objective.gram.shape[0]  # multiply-adds per step
    with single_thread_if(work < SMALL_WORK):
        _adam(rounding, objective, cfg)


def _adam(rounding: LearnedRounding, objective: QuadraticObjective, cfg: AdaRoundConfig) -> None:
    v = rounding.logits.data
    m, sq = torch.zeros_like(v), torch.zeros_like(v)
    b1, b2, eps = 0.9, 0.999, 1e-8
    stretch = ZETA - GAMMA
    for step in range(cfg.iterations):
        beta = beta_schedule(step, cfg.iterations, cfg)
        sig = torch.sigmoid(v)
        raw = sig * stretch + GAMMA
        h = raw.clamp(0.0, 1.0)
        code = rounding.base + h
        inside = (code >= rounding.qmin) & (code <= rounding.qmax)
        weight = (code.clamp(rounding.qmin, rounding.qmax) - rounding.zero) * rounding.step
        grad_h = objective.gradient(weight) * rounding.step * inside
        if beta is not None and cfg.reg > 0:
            t = 2.0 * h - 1.0
            grad_h = grad_h - (2.0 * cfg.reg * beta) * t.abs().pow(beta - 1.0) * t.sign()
        grad = grad_h * (sig * (1.0 - sig) * stretch) * ((raw > 0.0) & (raw < 1.0))
        m.mul_(b1).add_(grad, alpha=1.0 - b1)
        sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        correction = math.sqrt(1.0 - b2 ** (step + 1)) / (1.0 - b1 ** (step + 1))
        v.addcdiv_(m, sq.sqrt().add_(eps), value=-cfg.lr * correction)


@torch.no_grad()
def store_weight(layer, weight: torch.Tensor) -> bool:
    """Write ``weight`` (already on the layer's grid) into the layer, in place; weights that are exactly zero
    (pruned) stay zero. Through a ``torch.nn.utils.parametrizations`` parametrization (its ``right_inverse``)
    or into a ``torch.nn.utils.prune`` layer's ``weight_orig``; returns False, leaving the layer as it was,
    where the layer would not compute ``weight`` from what was written (spectral_norm has no inverse)."""
    from torch.nn.utils import parametrize

    current = layer.weight.detach()
    weight = torch.where(current == 0, torch.zeros_like(weight), weight).to(current.dtype)
    if parametrize.is_parametrized(layer, "weight"):
        before = {n: p.detach().clone() for n, p in layer.parametrizations.weight.named_parameters()}
        layer.weight = weight
        if not torch.allclose(layer.weight, weight, rtol=1e-5, atol=1e-7):
            for n, p in layer.parametrizations.weight.named_parameters():
                p.copy_(before[n])
            log.warning("%s: its parametrization cannot take a rounded weight back (no inverse); it keeps nearest "
                        "rounding", type(layer).__name__)
            return False
        return True
    if isinstance(layer._parameters.get("weight_orig"), torch.Tensor):  # pruned: weight = weight_orig * mask
        layer.weight_orig.copy_(weight)
        setattr(layer, "weight", layer.weight_orig * layer.weight_mask)
        return True
    layer.weight.copy_(weight)
    return True


def adaround_layer(layer: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AdaRoundConfig, *,
                   generator: torch.Generator | None = None) -> tuple[float, float]:
    """Learn the rounding of one quantized layer in place; returns (nearest, learned) reconstruction error.

    ``x``: the layer's input in the quantized model (before its input quantizer); ``y``: the float
    model's output of the layer. Keeps nearest rounding where the learned one does not do better.
    """
    with torch.no_grad():
        if layer.input_quantizer is not None:
            x = layer.input_quantizer(x)
        exact = quadratic_objective(layer, x, y, max_rows=cfg.max_rows, generator=generator)
    objective = exact.to(torch.float32)
    rounding = learned_rounding(layer)
    optimise_rounding(rounding, objective, cfg)
    with torch.no_grad():
        nearest, learned = rounding.nearest(), rounding.hard()
        e_near, e_learn = float(exact(nearest.double())), float(exact(learned.double()))
        if not store_weight(layer, learned if e_learn < e_near else nearest):
            return e_near, e_near
    return e_near, min(e_learn, e_near)


def warn_unroundable(qmodel: nn.Module, what: str) -> None:
    """One warning naming the quantized layers of ``qmodel`` with a weight quantizer that the rounding remedies
    leave at nearest rounding: kinds other than :data:`ROUNDABLE` (Conv3d, ConvTranspose)."""
    others = [(n, type(m).__name__) for n, m in qmodel.named_modules()
              if isinstance(m, QUANT_LAYERS) and not isinstance(m, ROUNDABLE) and m.weight_quantizer is not None]
    if others:
        log.warning("%s rounds Conv1d / Conv2d / Linear layers; %d quantized layers of other kinds keep nearest "
                    "rounding: %s", what, len(others), "; ".join(f"{n} ({kind})" for n, kind in others[:8])
                    + (" ..." if len(others) > 8 else ""))


def roundable_layers(qmodel: nn.Module, images: torch.Tensor, what: str = "adaround") -> list[str]:
    """Quantized Conv1d / Conv2d / Linear layers of ``qmodel`` with a weight quantizer, in execution order; those a
    forward pass calls more than once keep nearest rounding, named in a warning
    (:func:`~qframe.quant.capture.called_once`), and so do quantized layers of other kinds (Conv3d, ConvTranspose)."""
    counts = call_counts(qmodel, images)
    warn_unroundable(qmodel, what)
    names = [n for n in counts if isinstance(qmodel.get_submodule(n), ROUNDABLE)
             and qmodel.get_submodule(n).weight_quantizer is not None]
    if not names:
        raise QFrameError(f"{what} found no quantized Conv1d / Conv2d / Linear layer with a weight quantizer; run ptq first")
    names = called_once(counts, names, what, "nearest rounding")
    names = _own_weights(qmodel, names, what)
    if not names:
        raise QFrameError(f"{what} found no quantized Conv1d / Conv2d / Linear layer that a forward pass calls once")
    return names


def _own_weights(qmodel: nn.Module, names: list[str], what: str) -> list[str]:
    """``names`` without the layers that share one weight parameter (tied weights): rounded for each layer in
    turn, the last would undo the others' rounding; they keep nearest rounding, named in a warning."""
    users: dict[int, list[str]] = {}
    for name in names:
        weight = qmodel.get_submodule(name)._parameters.get("weight")
        if weight is not None:
            users.setdefault(id(weight), []).append(name)
    tied = [group for group in users.values() if len(group) > 1]
    if tied:
        log.warning("%s: layers sharing one weight keep nearest rounding (each would round it for itself): %s", what,
                    "; ".join(" = ".join(group) for group in tied))
    shared = {n for group in tied for n in group}
    return [n for n in names if n not in shared]


def adaround_hook(targets: dict[str, torch.Tensor], cfg: AdaRoundConfig, errors: dict, bar=None, generator=None):
    """A :func:`~qframe.quant.capture.layerwise_pass` pre-hook that AdaRounds each layer it reaches
    against the float layer's output in ``targets`` (the target is dropped once used)."""
    return reconstruction_hook(adaround_layer, targets, cfg, errors, bar, generator)


def reconstruction_hook(reconstruct, targets: dict[str, torch.Tensor], cfg: AdaRoundConfig, errors: dict,
                        bar=None, generator=None):
    """A pre-hook calling ``reconstruct(module, x, target, cfg, generator=...)`` on each module it reaches,
    recording ``(error before, error after)`` in ``errors`` and on the progress ``bar``."""

    def hook(name: str, module: nn.Module, x: torch.Tensor) -> None:
        errors[name] = reconstruct(module, x, targets.pop(name), cfg, generator=generator)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{name}: {errors[name][0]:.3g} -> {errors[name][1]:.3g}")

    return hook


def log_gain(what: str, errors: dict[str, tuple[float, float]]) -> None:
    gain = sum(e[1] for e in errors.values()) / max(1e-30, sum(e[0] for e in errors.values()))
    log.info("%s: %d done, summed reconstruction error %.1f %% of nearest rounding's", what, len(errors), 100 * gain)


def check_remedy_config(cfg, cls: type, what: str):
    """``cfg`` as given to a remedy whose settings are a ``cls`` (None: the defaults); one line naming ``what``
    unless it is one (an OmegaConf node of the schema, from a Hydra app, becomes one)."""
    if cfg is None:
        return cls()
    if type(cfg).__module__.startswith("omegaconf"):
        return require_config(cfg, cls, what)
    if not isinstance(cfg, cls):
        raise QFrameError(f"{what} {type(cfg).__name__} {str(cfg)[:60]} is invalid; valid: "
                          f"qframe.{cls.__name__}(...) or None for the defaults")
    return cfg


def check_adaround_config(cfg) -> AdaRoundConfig:
    """``cfg`` as given to AdaRound (None: the defaults); one line unless it is an :class:`AdaRoundConfig`."""
    return check_remedy_config(cfg, AdaRoundConfig, "AdaRound config")


def adaround(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor, cfg: AdaRoundConfig | None = None, *,
             seed: int = 0) -> dict[str, tuple[float, float]]:
    """AdaRound every quantized Conv1d / Conv2d / Linear of ``qmodel`` in place, layer by layer in execution order.

    ``reference``: the float model ``qmodel`` was quantized from (BN folded, same module names);
    ``images``: calibration images (run through ``qmodel`` as one batch). Each layer learns from the
    input the quantized model gives it, with every earlier layer already rounded, and the output of the
    float layer. Returns per layer the reconstruction error with nearest and with learned rounding.
    """
    check_remedy_inputs(qmodel, reference, images, "qframe.adaround")
    cfg = check_adaround_config(cfg)
    return round_layerwise(qmodel, reference, images, "adaround",
                           lambda targets, errors, bar, gen: adaround_hook(targets, cfg, errors, bar, gen), seed)


def round_layerwise(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor, what: str, make_hook,
                    seed: int = 0) -> dict[str, tuple[float, float]]:
    """The layer-wise pass of a rounding remedy (``what``: AdaRound, GPTQ) over ``qmodel``'s roundable layers:
    ``make_hook(targets, errors, bar, generator)`` gives the pre-hook that rounds each layer the pass reaches
    against the float layer's output in ``targets``. Returns the errors the hook recorded, per layer."""
    qmodel.eval()
    reference.eval()
    names = roundable_layers(qmodel, images, what)
    targets = reference_outputs(reference, names, images)
    errors: dict[str, tuple[float, float]] = {}
    with tqdm(total=len(names), desc=what, leave=False, disable=None) as bar:
        hook = make_hook(targets, errors, bar, torch.Generator(device=images.device).manual_seed(seed))
        layerwise_pass(qmodel, images, before={n: hook for n in names})
    log_gain(f"{what} layers", errors)
    return errors
