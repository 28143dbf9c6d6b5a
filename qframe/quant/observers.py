"""Calibration observers: watch tensors, then turn what they saw into a scale and zero point.

Every observer keeps statistics per *block* (one block per scale, see
:func:`qframe.quant.functional.block_view`) and hands a range to
:func:`qframe.quant.functional.compute_qparams`. All statistics are vectorised over blocks, bins
and candidates; the only Python loops are over chunks of candidates / blocks (to cap memory).

Histogram observers (``percentile``, ``mse``, ``entropy``) keep, per block, a signed histogram
over ``[-R, R]`` (``R`` = the running max ``|x|`` of the block) with ``2 * n`` bins of width
``R / n``; symmetric specs fold it into an ``|x|`` histogram of ``n`` bins over ``[0, R]``.
``n = num_bins`` per tensor; per channel / per group it is
``min(num_bins, max(floor, HIST_BINS_BUDGET // blocks))`` (floor: ``MIN_BLOCK_BINS``, for entropy
at least ``4 * (qmax + 1)``) so that many-block histograms stay small: they are buffers, so they
also travel in state dicts until :meth:`Observer.reset`. Padding of ragged per-group blocks is
left out of every statistic. Unsigned symmetric specs clip ``|x|`` like signed ones.
"""

from __future__ import annotations

import inspect
import logging

import torch

from qframe.errors import QFrameError, one_of
from qframe.quant import functional
from qframe.quant.spec import QuantSpec

logger = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2**22  # cap on [blocks, candidates, bins or groups] temporaries
HIST_BINS_BUDGET = 2**18  # bins over [0, R] summed over all blocks of one per-channel/per-group observer
MIN_BLOCK_BINS = 128  # never fewer bins than this per block (unless num_bins itself is smaller)
ENTROPY_EPS = 1e-12  # stands in for Q == 0 where P > 0, so such a candidate gets a large (finite) KL
_TINY = torch.finfo(torch.float32).tiny


def _acc_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps bin sums and KL sums exact enough to rank candidates; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _check_number(option: str, value, ok, valid: str, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise QFrameError(f"observer option {option}={value!r} is invalid; valid: {valid}")


def _blocks(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` as ``[blocks, elements]`` and a mask of real (not padding) elements, or None."""
    rows = functional.block_view(x, spec)
    if spec.granularity != "per_group" or (x.numel() // x.shape[spec.axis]) % spec.group_size == 0:
        return rows, None
    # ragged last groups are zero-padded by block_view; the mask keeps the padding out of statistics
    return rows, functional.block_view(torch.ones_like(x), spec) > 0


def _row_min_max(rows: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if valid is None:
        return torch.aminmax(rows, dim=1)
    return rows.masked_fill(~valid, float("inf")).amin(1), rows.masked_fill(~valid, float("-inf")).amax(1)


class Observer(torch.nn.Module):
    """Base observer: ``forward`` watches a tensor and returns it unchanged.

    Subclasses implement ``_observe(rows, valid)`` (update state from one ``[blocks, elements]``
    batch) and ``_range()`` (per-block ``(min, max)`` to quantize, 1-D). State lives in buffers,
    so ``.to(device)`` and ``state_dict`` round trips work.
    """

    name = "observer"
    _state: tuple[str, ...] = ()  # buffers that are sized by the first batch

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise QFrameError(f"an observer needs a QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        self.register_buffer("qshape", torch.zeros(0, dtype=torch.int64))
        for name in self._state:
            self.register_buffer(name, torch.zeros(0))
        self._param_shape: tuple | None = None

    @property
    def observed(self) -> bool:
        """Whether at least one batch has been observed since construction / :meth:`reset`."""
        return self._param_shape is not None

    def reset(self) -> None:
        """Forget everything observed (frees histograms)."""
        device = self.batches.device
        for name in self._state:
            setattr(self, name, torch.zeros(0, device=device))
        self.batches.zero_()
        self.qshape = torch.zeros(0, dtype=torch.int64, device=device)
        self._param_shape = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` (detached, as float32) and return ``x`` unchanged."""
        data = x.detach().float()
        if data.numel() == 0:
            raise QFrameError(f"observer {self.name!r} got an empty tensor of shape {tuple(x.shape)}; "
                              "calibrate with data")
        # max |x| propagates NaN and is far cheaper than an elementwise isfinite over the tensor
        if not torch.isfinite(data.abs().amax()):
            nan, inf = int(torch.isnan(data).sum()), int(torch.isinf(data).sum())
            raise QFrameError(
                f"calibration data contains NaN or Inf values: {nan} NaN and {inf} Inf in a tensor of shape "
                f"{tuple(x.shape)} seen by the {self.name!r} observer"
            )
        shape = functional.param_shape(data.shape, self.spec)
        if self._param_shape is not None and shape != self._param_shape:
            raise QFrameError(
                f"observer {self.name!r} ({self.spec.short()}) got a tensor of shape {tuple(x.shape)} whose "
                f"quantization parameters have shape {shape}, but earlier batches gave {self._param_shape}; "
                "calibration batches must keep the quantized axis and group layout"
            )
        rows, valid = _blocks(data, self.spec)
        with torch.no_grad():
            self._observe(rows, valid)
        if self._param_shape is None:
            self.qshape = torch.tensor(shape, dtype=torch.int64, device=rows.device)
            self.batches = self.batches.to(rows.device)
        self.batches += 1
        self._param_shape = shape
        return x

    def _require_data(self) -> None:
        if not self.observed:
            raise QFrameError(
                f"observer {self.name!r} ({self.spec.short()}) has seen no data; calibrate with at least one batch"
            )

    def min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range the observer would quantize, ``(min, max)``, each shaped like the scale."""
        self._require_data()
        lo, hi = self._range()
        return lo.float().reshape(self._param_shape), hi.float().reshape(self._param_shape)

    def compute_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale float32, zero_point int32)`` shaped ``functional.param_shape(last shape, spec)``."""
        lo, hi = self.min_max()
        return functional.compute_qparams(lo, hi, self.spec)

    def _symmetric(self, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = amax.float()
        return (-amax if self.spec.signed else torch.zeros_like(amax)), amax

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State tensors are sized by the first batch: take the saved sizes before copying into them.
        for name in ("qshape",) + self._state:
            saved = state_dict.get(prefix + name)
            if isinstance(saved, torch.Tensor):
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=self.batches.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._param_shape = tuple(self.qshape.tolist()) if int(self.batches) > 0 else None

    def extra_repr(self) -> str:
        return f"{self.spec.short()}, batches={int(self.batches)}"


class MinMaxObserver(Observer):
    """Running min and max per block."""

    name = "minmax"
    _state = ("min_val", "max_val")

    def _observe(self, rows, valid):
        lo, hi = _row_min_max(rows, valid)
        if self.observed:
            lo, hi = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        self.min_val, self.max_val = lo, hi

    def _range(self):
        return self.min_val, self.max_val


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min and max (PyTorch's convention).

    The first batch initialises; later batches do ``v = v + momentum * (batch_v - v)``.
    """

    name = "ema"

    def __init__(self, spec: QuantSpec, momentum: float = 0.01):
        super().__init__(spec)
        _check_number("momentum", momentum, lambda m: 0 < m <= 1, "a number in (0, 1]")
        self.momentum = float(momentum)

    def _observe(self, rows, valid):
        lo, hi = _row_min_max(rows, valid)
        if self.observed:
            lo = self.min_val + self.momentum * (lo - self.min_val)
            hi = self.max_val + self.momentum * (hi - self.max_val)
        self.min_val, self.max_val = lo, hi


def _rebin(hist: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Move signed histograms over ``[-old, old]`` onto ``[-new, new]`` (per block, ``new >= old``).

    Each old bin's count goes to the new bin holding its centre; blocks whose range did not grow
    map onto themselves.
    """
    n2 = hist.shape[1]
    dtype = _acc_dtype(hist.device)
    centre = (torch.arange(n2, device=hist.device, dtype=dtype) + 0.5) * (2.0 / n2) - 1.0  # units of old
    ratio = (old.to(dtype) / new.to(dtype).clamp(min=_TINY))[:, None]
    idx = ((centre * ratio + 1.0) * (n2 / 2)).floor().clamp_(0, n2 - 1).long()
    return torch.zeros_like(hist).scatter_add_(1, idx, hist)


def _quantile_position(hist: torch.Tensor, q: float) -> torch.Tensor:
    """Per row, the position in bins (float) where the cumulative fraction reaches ``q``.

    The first bin whose cumulative fraction is ``>= q`` is found with a batched searchsorted, then
    the position is interpolated linearly inside it.
    """
    cdf = hist.cumsum(1)
    cdf = cdf / cdf[:, -1:]
    # q = 0 would stop at bin 0 even when it is empty; a tiny target finds the first non-empty bin
    target = torch.full((hist.shape[0], 1), max(q, 1e-300), dtype=cdf.dtype, device=cdf.device)
    idx = torch.searchsorted(cdf, target).clamp_(max=hist.shape[1] - 1)
    right = cdf.gather(1, idx)
    left = torch.where(idx > 0, cdf.gather(1, (idx - 1).clamp(min=0)), torch.zeros_like(right))
    frac = ((target - left) / (right - left).clamp(min=1e-300)).clamp(0, 1)
    return (idx + frac).squeeze(1)


class _HistogramObserver(Observer):
    """Shared state for histogram observers: a signed histogram per block that grows with ``|x|``."""

    _state = ("hist", "bound", "min_val", "max_val")

    def __init__(self, spec: QuantSpec, num_bins: int = 2048):
        super().__init__(spec)
        _check_number("num_bins", num_bins, lambda n: n >= 8, "an integer >= 8", integer=True)
        self.num_bins, self.min_block_bins = num_bins, MIN_BLOCK_BINS

    def _bins_for(self, blocks: int) -> int:
        if self.spec.granularity == "per_tensor":
            return self.num_bins
        bins = min(self.num_bins, max(self.min_block_bins, HIST_BINS_BUDGET // blocks))
        if 2 * bins * blocks > 2**25:
            logger.warning("%s observer: %d blocks x %d bins histogram (%.0f MiB); consider minmax for this tensor",
                           self.name, blocks, 2 * bins, 2 * bins * blocks * 8 / 2**20)
        return bins

    def _observe(self, rows, valid):
        lo, hi = _row_min_max(rows, valid)
        amax = torch.maximum(-lo, hi)
        if not self.observed:
            self.hist = torch.zeros(rows.shape[0], 2 * self._bins_for(rows.shape[0]), dtype=torch.int64,
                                    device=rows.device)
            self.bound, self.min_val, self.max_val = amax, lo, hi
        else:
            self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
            bound = torch.maximum(self.bound, amax)
            if bool((bound > self.bound).any()):
                self.hist = _rebin(self.hist, self.bound, bound)
            self.bound = bound
        blocks, n2 = self.hist.shape
        idx = ((rows / self.bound.clamp(min=_TINY)[:, None] + 1.0) * (n2 / 2)).floor().clamp_(0, n2 - 1).long()
        idx += torch.arange(blocks, device=rows.device)[:, None] * n2  # one bincount for all blocks
        idx = idx.flatten() if valid is None else idx[valid]
        self.hist += torch.bincount(idx, minlength=blocks * n2).view(blocks, n2)

    def histogram(self, folded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(counts [blocks, bins] int64, bin width [blocks])``.

        ``folded`` (default: the spec is symmetric) gives the ``|x|`` histogram over ``[0, R]``;
        otherwise the signed histogram over ``[-R, R]`` (bin ``j`` starts at ``-R + j * width``).
        """
        self._require_data()
        n = self.hist.shape[1] // 2
        width = self.bound / n
        if self.spec.symmetric if folded is None else folded:
            return self.hist[:, n:] + self.hist[:, :n].flip(-1), width
        return self.hist, width


class PercentileObserver(_HistogramObserver):
    """Clip at a percentile of the data.

    Symmetric: ``amax`` = the ``percentile`` of ``|x|``. Asymmetric: ``min`` / ``max`` = the
    ``100 - percentile`` / ``percentile`` percentiles of ``x``.
    """

    name = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99, num_bins: int = 2048):
        super().__init__(spec, num_bins)
        low = 0 if spec.symmetric else 50
        _check_number("percentile", percentile, lambda p: low < p <= 100, f"a number in ({low}, 100]")
        self.percentile = float(percentile)

    def _range(self):
        q = self.percentile / 100
        hist, width = self.histogram()
        hist, width = hist.to(_acc_dtype(hist.device)), width.to(_acc_dtype(hist.device))
        if self.spec.symmetric:
            return self._symmetric(_quantile_position(hist, q) * width)
        bound = self.bound.to(width.dtype)
        return _quantile_position(hist, 1 - q) * width - bound, _quantile_position(hist, q) * width - bound


class MSEObserver(_HistogramObserver):
    """Pick the clip range minimising the expected quantize-dequantize squared error.

    Candidates shrink the observed range by ``linspace(min_ratio, 1, num_candidates)`` (both ends
    of an asymmetric range by the same ratio). The error of each candidate is evaluated on the
    signed histogram (bin centres weighted by counts) with the exact scale / zero point that
    ``compute_qparams`` gives it and round-half-even onto ``[qmin, qmax]``.
    """

    name = "mse"

    def __init__(self, spec: QuantSpec, num_candidates: int = 100, min_ratio: float = 0.3, num_bins: int = 2048):
        super().__init__(spec, num_bins)
        _check_number("num_candidates", num_candidates, lambda n: n >= 1, "an integer >= 1", integer=True)
        _check_number("min_ratio", min_ratio, lambda r: 0 < r <= 1, "a number in (0, 1]")
        self.num_candidates, self.min_ratio = num_candidates, float(min_ratio)

    def _range(self):
        spec, device = self.spec, self.hist.device
        dtype = torch.float32  # enough to rank candidates, and half the memory traffic of float64
        hist, width = self.histogram(folded=False)
        blocks = hist.shape[0]
        ratios = torch.linspace(self.min_ratio, 1.0, self.num_candidates, dtype=dtype, device=device)
        if spec.symmetric:
            hi = self.bound.to(dtype)[:, None] * ratios
            lo = -hi if spec.signed else torch.zeros_like(hi)
        else:
            lo = self.min_val.clamp(max=0).to(dtype)[:, None] * ratios
            hi = self.max_val.clamp(min=0).to(dtype)[:, None] * ratios
        lo, hi = lo.float(), hi.float()  # the exact values compute_qparams will see
        # only occupied bins contribute: move them to the front and drop the empty tail, which makes
        # small blocks (per-group weights: a few dozen values in hundreds of bins) cheap
        occupied = hist > 0
        n_occ = int(occupied.sum(1).max())
        order = torch.argsort((~occupied).to(torch.int32), dim=1, stable=True)[:, :n_occ]
        counts = hist.gather(1, order).to(dtype)  # zero for padding in blocks with fewer occupied bins
        centres = (order.to(dtype) + 0.5) * width.to(dtype)[:, None] - self.bound.to(dtype)[:, None]
        errors = torch.empty(blocks, self.num_candidates, dtype=dtype, device=device)
        block_step = max(1, CHUNK_ELEMENTS // n_occ)
        for b0 in range(0, blocks, block_step):
            b = slice(b0, b0 + block_step)
            x, w = centres[b, None, :], counts[b, None, :]
            step = max(1, CHUNK_ELEMENTS // (x.shape[0] * n_occ))
            for c0 in range(0, self.num_candidates, step):
                c = slice(c0, c0 + step)
                scale, zp = functional.compute_qparams(lo[b, c], hi[b, c], spec)
                scale, zp = scale.to(dtype)[..., None], zp.to(dtype)[..., None]
                q = torch.clamp(torch.round(x / scale) + zp, spec.qmin, spec.qmax)
                errors[b, c] = (((q - zp) * scale - x) ** 2 * w).sum(-1)
        best = errors.argmin(1, keepdim=True)  # first minimum: the tightest range among ties
        return lo.gather(1, best).squeeze(1), hi.gather(1, best).squeeze(1)


def _entropy_bins(hist: torch.Tensor, nq: int, start: int, stride: int) -> torch.Tensor:
    """TensorRT KL calibration on ``|x|`` histograms ``[blocks, n]``: bins kept per block.

    Candidate ``i`` keeps bins ``[0, i)``: P = ``hist[:i]`` with the tail ``sum(hist[i:])`` added
    to ``P[i-1]``; Q = ``hist[:i]`` merged into ``nq`` groups of ``i // nq`` bins (the remainder
    joins the last group), each group's sum spread evenly over its non-zero source bins; where
    P > 0 but Q == 0 (only possible at bin ``i-1``), Q counts as ``ENTROPY_EPS``. Returns the ``i``
    with the smallest KL(P || Q), the largest such ``i`` on ties (as pytorch-quantization).

    Q is constant on a group's non-zero bins, so KL(P || Q) splits into per-group terms that
    prefix sums of ``hist``, ``hist > 0`` and ``hist * log(hist)`` give directly: each candidate
    costs O(nq) instead of O(bins), all candidates and blocks at once.
    """
    blocks, n = hist.shape
    device = hist.device
    cands = torch.arange(start, n + 1, stride, device=device)
    hist = hist.t().contiguous()  # [n, blocks]: candidate/group lookups below copy whole rows

    def prefix(t):  # [n + 1, blocks], prefix(t)[k] = sum of t[:k]
        return torch.nn.functional.pad(t.cumsum(0), (0, 0, 1, 0))

    csum, cnonzero, cxlogx = prefix(hist), prefix((hist > 0).to(hist.dtype)), prefix(torch.xlogy(hist, hist))
    total = csum[-1:]
    g = torch.arange(nq, device=device)
    kls = []
    for kept in cands.split(max(1, CHUNK_ELEMENTS // (blocks * nq))):
        merged = (kept // nq)[:, None]
        lo = g * merged  # [k, nq] first bin of each group; the last group runs to i
        hi = torch.where(g == nq - 1, kept[:, None], lo + merged)

        def per_group(pre):  # [k, nq, blocks]
            return (pre[hi.flatten()] - pre[lo.flatten()]).view(kept.numel(), nq, blocks)

        sums, nonzero = per_group(csum), per_group(cnonzero)
        kept_sum, last = csum[kept], hist[kept - 1]  # [k, blocks]
        tail = total - kept_sum
        # normalised Q on each group's non-zero bins
        level = sums / nonzero.clamp(min=1) / kept_sum.clamp(min=1)[:, None, :]
        q_last = torch.where(last > 0, level[:, -1], torch.full_like(last, ENTROPY_EPS))
        p_log_p = cxlogx[kept - 1] + torch.xlogy(last + tail, last + tail)  # unnormalised P
        p_log_q = torch.xlogy(sums, level).sum(1) + torch.xlogy(tail, q_last)
        kls.append((p_log_p - p_log_q) / total - torch.log(total))
    kl = torch.cat(kls, 0)  # [candidates, blocks]
    last_min = kl.shape[0] - 1 - kl.flip(0).argmin(0)
    return cands[last_min]


class EntropyObserver(_HistogramObserver):
    """TensorRT's KL-divergence ("entropy") calibration, symmetric only.

    Works on the ``|x|`` histogram of ``num_bins`` bins over ``[0, R]``; candidates keep
    ``i = start_bin, start_bin + stride, ..., <= num_bins`` bins (``i >= qmax + 1`` always).
    ``amax = i * bin_width``, the right edge of the last kept bin (pytorch-quantization's
    ``calib_bin_edges[i]``). With fewer bins per block (per channel / per group) ``start_bin``
    scales with the bin count.
    """

    name = "entropy"

    def __init__(self, spec: QuantSpec, num_bins: int = 2048, start_bin: int = 128, stride: int = 1):
        if not spec.symmetric:
            raise QFrameError("entropy calibration is symmetric only; use symmetric=True or another observer")
        super().__init__(spec, num_bins)
        nq = spec.qmax + 1
        if num_bins < nq:
            raise QFrameError(f"entropy observer needs num_bins >= {nq} (qmax + 1) for {spec.short()}, got {num_bins}")
        _check_number("start_bin", start_bin, lambda s: 1 <= s <= num_bins, f"an integer in [1, {num_bins}]", True)
        _check_number("stride", stride, lambda s: s >= 1, "an integer >= 1", integer=True)
        self.start_bin, self.stride = start_bin, stride
        self.min_block_bins = max(MIN_BLOCK_BINS, 4 * nq)  # candidates need several bins per level

    def _range(self):
        hist, width = self.histogram(folded=True)
        # The first bin holds the exact zeros of post-ReLU data, a spike that has nothing to do with
        # the shape of the distribution and drives KL to absurdly small clips; like
        # pytorch-quantization, give it the count of its neighbour.
        hist = hist.clone()
        hist[:, 0] = hist[:, 1]
        n, nq = hist.shape[1], self.spec.qmax + 1
        start = self.start_bin if n == self.num_bins else round(self.start_bin * n / self.num_bins)
        start = min(max(start, nq), n)
        kept = _entropy_bins(hist.to(_acc_dtype(hist.device)), nq, start, self.stride)
        return self._symmetric(kept.to(width.dtype) * width)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "ema": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, spec: QuantSpec, **kwargs) -> Observer:
    """Build the observer registered as ``name`` with its options ``kwargs``."""
    if name not in OBSERVERS:
        raise one_of("observer", name, OBSERVERS)
    cls = OBSERVERS[name]
    valid = [p for p in inspect.signature(cls).parameters if p != "spec"]
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise QFrameError(
            f"unknown option {unknown[0]!r} for the {name!r} observer; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(spec, **kwargs)
