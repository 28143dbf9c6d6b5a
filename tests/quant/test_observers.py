"""Observers against plain numpy float64 references, on fresh random data every run.

Each test draws a new seed and prints it, so a failure can be replayed (pytest shows the output
of failing tests). Batches get larger towards the end so running statistics and histogram
re-binning are exercised.
"""

import math

import numpy as np
import pytest
import torch

from qframe.errors import QFrameError
from qframe.quant import functional
from qframe.quant.observers import (
    ENTROPY_EPS,
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    make_observer,
)
from qframe.quant.spec import QuantSpec


@pytest.fixture
def rng():
    seed = np.random.SeedSequence().entropy
    print(f"random seed: {seed}")
    return np.random.default_rng(seed)


def make_batches(rng, kind, shape, n=3):
    """``n`` float32 batches of ``kind``; the last one spans a ~3x larger range."""
    batches = []
    for k in range(n):
        if kind == "normal":  # normal with a few outliers
            x = rng.normal(size=shape)
            flat = x.reshape(-1)
            picks = rng.choice(flat.size, size=3, replace=False)
            flat[picks] *= rng.uniform(3, 6, size=3)
        elif kind == "laplace":
            x = rng.laplace(size=shape)
        elif kind == "relu":  # post-ReLU: many exact zeros, positive tail
            x = np.maximum(rng.normal(0.3, 1.0, size=shape), 0.0)
        else:
            raise AssertionError(kind)
        batches.append((x * (3.0 if k == n - 1 else 1.0)).astype(np.float32))
    return batches


def np_blocks(x, spec):
    """One float64 1-D array per scale, in param_shape (row-major) order, written with loops."""
    x = np.asarray(x, dtype=np.float64)
    if spec.granularity == "per_tensor":
        return [x.ravel()]
    rows = np.moveaxis(x, spec.axis, 0).reshape(x.shape[spec.axis], -1)
    if spec.granularity == "per_channel":
        return [rows[c] for c in range(rows.shape[0])]
    blocks = []
    for c in range(rows.shape[0]):
        for start in range(0, rows.shape[1], spec.group_size):
            blocks.append(rows[c, start : start + spec.group_size])  # last group may be shorter
    return blocks


def all_blocks(batches, spec):
    """Per block, the concatenation of that block's data over all batches."""
    per_batch = [np_blocks(b, spec) for b in batches]
    return [np.concatenate([pb[i] for pb in per_batch]) for i in range(len(per_batch[0]))]


def observe(obs, batches):
    for b in batches:
        x = torch.from_numpy(b)
        assert obs(x) is x  # observers return the input unchanged
    return obs


def np_quant_mse(a, lo, hi, spec):
    """Quantize-dequantize MSE of ``a`` on the grid compute_qparams gives ``[lo, hi]`` (float64)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec.symmetric:
        amax = max(-lo, hi) if spec.signed else hi
        scale, zp = max(amax / spec.qmax, 1e-8), 0.0
    else:
        scale = max((hi - lo) / (spec.qmax - spec.qmin), 1e-8)
        zp = float(np.clip(spec.qmin - np.round(lo / scale), spec.qmin, spec.qmax))
    q = np.clip(np.round(a / scale) + zp, spec.qmin, spec.qmax)
    return float(np.mean(((q - zp) * scale - a) ** 2))


SHAPE_SPECS = [
    ((40, 30), QuantSpec()),
    ((6, 20, 3), QuantSpec(granularity="per_channel", axis=0)),
    ((12, 5, 7), QuantSpec(granularity="per_channel", axis=1)),
    ((6, 5, 7), QuantSpec(granularity="per_group", axis=0, group_size=16)),  # 35 per row: ragged groups
    ((4, 6, 8), QuantSpec(granularity="per_group", axis=1, group_size=8)),
]


# ---------------------------------------------------------------- min / max / ema


@pytest.mark.parametrize("shape,spec", SHAPE_SPECS)
@pytest.mark.parametrize("kind", ["normal", "relu"])
def test_minmax_matches_reference(rng, shape, spec, kind):
    batches = make_batches(rng, kind, shape)
    obs = observe(MinMaxObserver(spec), batches)
    lo, hi = obs.min_max()
    ref_lo = np.array([np.min(a) for a in all_blocks(batches, spec)])
    ref_hi = np.array([np.max(a) for a in all_blocks(batches, spec)])
    assert tuple(lo.shape) == functional.param_shape(shape, spec)
    np.testing.assert_array_equal(lo.numpy().ravel(), ref_lo)
    np.testing.assert_array_equal(hi.numpy().ravel(), ref_hi)


@pytest.mark.parametrize("shape,spec", SHAPE_SPECS[:3])
def test_ema_matches_float64_recurrence(rng, shape, spec):
    momentum = float(rng.uniform(0.05, 0.5))
    batches = make_batches(rng, "laplace", shape, n=5)
    obs = observe(make_observer("ema", spec, momentum=momentum), batches)
    ref_lo = ref_hi = None
    for b in batches:
        blocks = np_blocks(b, spec)
        lo = np.array([np.min(a) for a in blocks])
        hi = np.array([np.max(a) for a in blocks])
        if ref_lo is None:
            ref_lo, ref_hi = lo, hi
        else:
            ref_lo = ref_lo + momentum * (lo - ref_lo)
            ref_hi = ref_hi + momentum * (hi - ref_hi)
    lo, hi = obs.min_max()
    np.testing.assert_allclose(lo.numpy().ravel(), ref_lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi.numpy().ravel(), ref_hi, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- percentile


def _bracket(a, p):
    return np.percentile(a, p, method="lower"), np.percentile(a, p, method="higher")


@pytest.mark.parametrize("kind", ["normal", "laplace", "relu"])
@pytest.mark.parametrize("p", [99.99, 99.9, 99.0])
def test_percentile_symmetric_per_tensor(rng, kind, p):
    spec = QuantSpec()
    batches = make_batches(rng, kind, (200, 100))
    obs = observe(make_observer("percentile", spec, percentile=p), batches)
    amax = float(obs.min_max()[1])
    width = float(obs.histogram()[1])
    a = np.abs(np.concatenate([b.ravel() for b in batches]).astype(np.float64))
    lo, hi = _bracket(a, p)  # np.percentile(|x|, p) lies in [lo, hi]
    assert lo - 2 * width <= amax <= hi + 2 * width, (amax, lo, hi, width)


@pytest.mark.parametrize("spec", [QuantSpec(granularity="per_channel", axis=1), QuantSpec(symmetric=False)])
def test_percentile_per_channel_and_asymmetric(rng, spec):
    p = 99.5
    batches = make_batches(rng, "laplace", (3000, 4))
    obs = observe(make_observer("percentile", spec, percentile=p), batches)
    lo, hi = (t.numpy().ravel() for t in obs.min_max())
    widths = obs.histogram()[1].numpy()
    for i, a in enumerate(all_blocks(batches, spec)):
        w = widths[i]
        if spec.symmetric:
            r_lo, r_hi = _bracket(np.abs(a), p)
            assert r_lo - 2 * w <= hi[i] <= r_hi + 2 * w
        else:
            r_lo, r_hi = _bracket(a, p)
            assert r_lo - 2 * w <= hi[i] <= r_hi + 2 * w
            r_lo, r_hi = _bracket(a, 100 - p)
            assert r_lo - 2 * w <= lo[i] <= r_hi + 2 * w
    scale, zp = obs.compute_qparams()
    assert tuple(scale.shape) == functional.param_shape((3000, 4), spec)


# ---------------------------------------------------------------- mse


MSE_CASES = [
    ("normal", (200, 100), QuantSpec(bits=8)),
    ("normal", (200, 100), QuantSpec(bits=4)),
    ("laplace", (200, 100), QuantSpec(bits=4, symmetric=False)),
    ("relu", (200, 100), QuantSpec(bits=4, signed=False)),
    ("laplace", (4, 3000), QuantSpec(bits=4, granularity="per_channel", axis=0)),
    ("normal", (2, 2048), QuantSpec(bits=3, granularity="per_group", axis=0, group_size=512)),
    ("laplace", (8, 96), QuantSpec(bits=4, granularity="per_group", axis=0, group_size=32)),  # small blocks
]


@pytest.mark.parametrize("kind,shape,spec", MSE_CASES)
def test_mse_close_to_brute_force(rng, kind, shape, spec):
    min_ratio = 0.3
    batches = make_batches(rng, kind, shape)
    obs = observe(make_observer("mse", spec, min_ratio=min_ratio), batches)
    lo, hi = (t.numpy().ravel().astype(np.float64) for t in obs.min_max())
    for i, a in enumerate(all_blocks(batches, spec)):
        best = math.inf
        for r in np.linspace(min_ratio, 1.0, 1001):  # the observer's search space, finely
            if spec.symmetric:
                amax = r * np.max(np.abs(a))
                best = min(best, np_quant_mse(a, -amax if spec.signed else 0.0, amax, spec))
            else:
                best = min(best, np_quant_mse(a, r * min(a.min(), 0.0), r * max(a.max(), 0.0), spec))
        got = np_quant_mse(a, lo[i], hi[i], spec)
        assert got <= 1.02 * best, (i, got, best)
        full = np_quant_mse(a, a.min(), a.max(), spec) if not spec.symmetric else None
        if spec.bits <= 4 and full is not None:
            assert got < full


def test_gaussian_with_far_outliers_is_clipped_sensibly(rng):
    """N(0, 1) plus a dozen outliers at 10-20 sigma: clipping methods land a few sigma out."""
    batches = []
    for _ in range(4):
        x = rng.normal(size=50000)
        x[rng.choice(x.size, 3, replace=False)] = rng.choice([-1, 1], 3) * rng.uniform(10, 20, 3)
        batches.append(x.astype(np.float32))
    cases = [
        ("mse", QuantSpec(bits=4), dict(min_ratio=0.05), 2.0, 3.2),  # MSE-optimal 4-bit clip: ~2.5 sigma
        ("entropy", QuantSpec(bits=8), {}, 3.0, 6.0),
        ("entropy", QuantSpec(bits=4), {}, 2.5, 5.0),
        ("percentile", QuantSpec(), dict(percentile=99.9), 3.1, 3.5),  # 99.9% of |N(0,1)|: 3.29
    ]
    for name, spec, kwargs, low, high in cases:
        amax = float(observe(make_observer(name, spec, **kwargs), batches).min_max()[1])
        assert low < amax < high, (name, spec.short(), amax)


# ---------------------------------------------------------------- entropy


def ref_entropy_kls(hist, nq, start, stride):
    """TensorRT KL calibration, one candidate at a time; returns {bins kept: KL}."""
    hist = np.array(hist, dtype=np.float64)
    hist[0] = hist[1]  # the zero-spike rule of pytorch-quantization
    kls = {}
    for i in range(start, len(hist) + 1, stride):
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()
        merged = i // nq
        q = np.zeros(i)
        for g in range(nq):
            lo = g * merged
            hi = i if g == nq - 1 else lo + merged
            nonzero = hist[lo:hi] > 0
            if nonzero.any():
                q[lo:hi][nonzero] = hist[lo:hi].sum() / nonzero.sum()
        p /= p.sum()
        q /= q.sum()
        kl = 0.0
        for k in range(i):
            if p[k] > 0:
                kl += p[k] * math.log(p[k] / (q[k] if q[k] > 0 else ENTROPY_EPS))
        kls[i] = kl
    return kls


ENTROPY_CASES = [
    ("normal", (200, 100), QuantSpec(bits=8), dict(num_bins=512)),
    ("relu", (200, 100), QuantSpec(bits=8, signed=False), dict(num_bins=1024, start_bin=256, stride=8)),
    ("laplace", (200, 100), QuantSpec(bits=8), dict(stride=16)),  # default 2048 bins
    ("laplace", (3, 4000), QuantSpec(bits=4, granularity="per_channel", axis=0), dict(num_bins=256, start_bin=64)),
]


@pytest.mark.parametrize("kind,shape,spec,kwargs", ENTROPY_CASES)
def test_entropy_matches_reference(rng, kind, shape, spec, kwargs):
    batches = make_batches(rng, kind, shape)
    obs = observe(make_observer("entropy", spec, **kwargs), batches)
    hist, width = obs.histogram()
    amax = obs.min_max()[1].numpy().ravel()
    nq = spec.qmax + 1
    start = max(kwargs.get("start_bin", 128), nq)
    for b in range(hist.shape[0]):
        kls = ref_entropy_kls(hist[b].numpy(), nq, start, kwargs.get("stride", 1))
        best = min(kls.values())
        ref_i = max(i for i, kl in kls.items() if kl == best)  # last minimum, like pytorch-quantization
        got_i = int(round(amax[b] / float(width[b])))  # amax = bins kept * bin width
        assert got_i == ref_i or kls[got_i] <= best + 1e-9 * abs(best) + 1e-12, (got_i, ref_i)
        assert abs(amax[b] - ref_i * float(width[b])) <= 1e-4 * amax[b] or got_i != ref_i


def test_rebinning_maps_old_bin_centres(rng):
    n = 64  # bins over [0, R]; the signed histogram has 2n over [-R, R]
    obs = make_observer("percentile", QuantSpec(), num_bins=n)

    def near_centres(bound, size):  # values well inside their bins, so float32 cannot flip a bin
        return -bound + (rng.integers(0, 2 * n, size) + 0.5 + rng.uniform(-0.3, 0.3, size)) * bound / n

    def bin_of(v, bound):
        return min(max(int(math.floor((v / bound + 1) * n)), 0), 2 * n - 1)

    # R grows by 4/3, so no old bin centre lands on a new bin edge
    first = np.append(near_centres(1.0, 3000), 1.0).astype(np.float32)
    second = np.append(near_centres(4 / 3, 3000), -4 / 3).astype(np.float32)
    observe(obs, [first, second])
    old = np.zeros(2 * n)
    for v in first:
        old[bin_of(v, 1.0)] += 1
    ref = np.zeros(2 * n)
    for j in range(2 * n):
        ref[bin_of(-1.0 + (j + 0.5) / n, 4 / 3)] += old[j]
    for v in second:
        ref[bin_of(v, 4 / 3)] += 1
    np.testing.assert_array_equal(obs.histogram(folded=False)[0][0].numpy(), ref)


def test_histogram_counts_everything_after_rebinning(rng):
    spec = QuantSpec(granularity="per_group", axis=0, group_size=16)
    batches = make_batches(rng, "normal", (6, 5, 7), n=4)
    obs = observe(make_observer("percentile", spec), batches)
    signed, width = obs.histogram(folded=False)
    folded, _ = obs.histogram(folded=True)
    sizes = [a.size for a in all_blocks(batches, spec)]  # padding is not counted
    np.testing.assert_array_equal(signed.sum(1).numpy(), sizes)
    np.testing.assert_array_equal(folded.sum(1).numpy(), sizes)
    amax = np.array([np.abs(a).max() for a in all_blocks(batches, spec)])
    np.testing.assert_allclose(width.numpy() * folded.shape[1], amax, rtol=1e-6)


# ---------------------------------------------------------------- shapes, state, errors


def _specs_for(name):
    specs = [QuantSpec(), QuantSpec(granularity="per_channel", axis=1),
             QuantSpec(bits=4, granularity="per_group", axis=0, group_size=8)]
    if name != "entropy":
        specs += [QuantSpec(symmetric=False), QuantSpec(bits=4, symmetric=False, granularity="per_channel"),
                  QuantSpec(bits=4, symmetric=False, granularity="per_group", axis=1, group_size=4)]
    return specs


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_qparam_shapes_and_zero_points(rng, name):
    shape = (6, 10, 3)
    for spec in _specs_for(name):
        kind = "relu" if not spec.symmetric else "normal"
        obs = observe(make_observer(name, spec), make_batches(rng, kind, shape))
        scale, zp = obs.compute_qparams()
        expected = functional.param_shape(shape, spec)
        assert tuple(scale.shape) == expected and tuple(zp.shape) == expected, spec.short()
        assert scale.dtype == torch.float32 and zp.dtype == torch.int32
        assert bool((scale > 0).all())
        assert int(zp.min()) >= spec.qmin and int(zp.max()) <= spec.qmax
        if spec.symmetric:
            assert bool((zp == 0).all())


def test_reset_and_state_dict_round_trip(rng):
    spec = QuantSpec(granularity="per_channel", axis=0)
    batches = make_batches(rng, "laplace", (4, 500))
    obs = observe(make_observer("entropy", spec, num_bins=512), batches)
    fresh = make_observer("entropy", spec, num_bins=512)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.observed
    for a, b in zip(obs.compute_qparams(), fresh.compute_qparams()):
        assert torch.equal(a, b)
    obs.reset()
    assert not obs.observed
    with pytest.raises(QFrameError):
        obs.compute_qparams()


def _one_line_error(fn, *words):
    with pytest.raises(QFrameError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_errors(name):
    obs = make_observer(name, QuantSpec(granularity="per_channel", axis=0))
    _one_line_error(lambda: obs.compute_qparams(), "has seen no data", "calibrate")
    bad = torch.randn(4, 8)
    bad[1, 2] = float("nan")
    _one_line_error(lambda: obs(bad), "NaN or Inf", "1 NaN")
    bad[1, 2] = float("-inf")
    _one_line_error(lambda: obs(bad), "NaN or Inf", "1 Inf")
    assert not obs.observed
    obs(torch.randn(4, 8))
    _one_line_error(lambda: obs(torch.randn(5, 8)), "(5,)", "(4,)")
    _one_line_error(lambda: make_observer(name, QuantSpec(), bogus=1), "bogus", "valid")


def test_registry_errors():
    _one_line_error(lambda: make_observer("kl", QuantSpec()), "unknown observer 'kl'", "minmax")
    _one_line_error(lambda: make_observer("entropy", QuantSpec(symmetric=False)), "symmetric only")
    _one_line_error(lambda: EntropyObserver(QuantSpec(symmetric=False)), "symmetric only")
    _one_line_error(lambda: make_observer("ema", QuantSpec(), momentum=0), "momentum")
    _one_line_error(lambda: make_observer("percentile", QuantSpec(), percentile=101), "percentile")


def test_entropy_ignores_the_zero_spike_of_relu6_outputs(rng):
    """ReLU6 outputs: half exact zeros and a saturation spike at 6 must not drive the clip to ~0."""
    x = np.clip(rng.normal(1.0, 2.0, size=(64, 32, 8, 8)), 0.0, 6.0).astype(np.float32)
    obs = observe(make_observer("entropy", QuantSpec(bits=8)), [x])
    amax = float(obs.min_max()[1])
    assert 3.0 < amax <= 6.0 + 1e-3, amax
