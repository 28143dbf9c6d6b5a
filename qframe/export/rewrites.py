"""Torch functions written another way while a model is exported to ONNX: the same values, in ops every
exporter route and opset writes (``F.fold`` of non-overlapping patches as a reshape, adaptive average
pooling as means over its bins, pooling of unbatched inputs, ceil-mode pooling as torch computes it,
interpolation to the input's own size)."""

from __future__ import annotations

import torch


def _fold_as_reshape(func, input, output_size, kernel_size, dilation=1, padding=0, stride=1):
    """``F.fold`` of non-overlapping patches (kernel == stride, no padding or dilation: MobileViTV2's) is a
    reshape and a permute, which export at any opset and with sizes read from shapes; the TorchScript
    exporter's Col2Im (opset 18) wants static sizes. Other folds are left to the exporter."""
    pair = torch.nn.modules.utils._pair
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = pair(kernel_size), pair(stride), pair(dilation), pair(padding)
    height, width = (int(v) if not isinstance(v, torch.Tensor) else v for v in pair(output_size))
    plain = (kh, kw) == (sh, sw) and (dh, dw) == (1, 1) and (ph, pw) == (0, 0) and input.dim() in (2, 3)
    if not plain or height % kh or width % kw:
        return func(input, output_size, kernel_size, dilation=dilation, padding=padding, stride=stride)
    batched = input.dim() == 3
    patches = input if batched else input.unsqueeze(0)
    n = patches.shape[0]
    x = patches.reshape(n, -1, kh, kw, height // kh, width // kw).permute(0, 1, 4, 2, 5, 3)
    x = x.reshape(n, -1, height, width)
    return x if batched else x.squeeze(0)


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
    """The input rows ``[start, end)`` that adaptive pooling averages into each of ``out`` outputs."""
    return [(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _adaptive_avg_pool2d_as_means(func, input, output_size):
    """Adaptive average pooling to an output size that does not divide the input's (UperNet's and PSPNet's
    pyramid pooling: scales 1, 2, 3, 6): each output averages a rectangle of the input, so it is the mean over
    its rows of the mean over its columns, one slice and ReduceMean per output row and column. To a size that
    divides it, it is the AveragePool (kernel = stride = input / output) the exporter writes where the graph
    knows the input's size, written here for the traced size, so also where the size is computed from shapes
    (a ViT's tokens reshaped to a map by sizes read from the input: BEiT's segmentation head). To 1 x 1, it is
    left to the exporter (GlobalAveragePool)."""
    height, width = (int(v) for v in input.shape[-2:])
    oh, ow = (d if o is None else int(o) for o, d in zip(torch.nn.modules.utils._pair(output_size), (height, width)))
    if (oh, ow) == (1, 1):
        return func(input, output_size)
    if height % oh == 0 and width % ow == 0:
        kernel = (height // oh, width // ow)
        return _pool2d_batched(torch.nn.functional.avg_pool2d, input, kernel, kernel)
    rows = torch.cat([input[..., a:b, :].mean(-2, keepdim=True) for a, b in _adaptive_bins(height, oh)], -2)
    return torch.cat([rows[..., a:b].mean(-1, keepdim=True) for a, b in _adaptive_bins(width, ow)], -1)


def _pool2d_batched(func, input, *args, **kwargs):
    """2-d pooling of an unbatched ``[C, H, W]`` input (SuperPoint's non-maximum suppression pools its
    ``[N, H, W]`` scores so): the exporter writes a MaxPool / AveragePool over a 3-d tensor, which ONNX
    refuses; pooled as a batch of one instead."""
    if input.dim() != 3:
        return func(input, *args, **kwargs)
    out = func(input.unsqueeze(0), *args, **kwargs)
    return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


def _as_tuple(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _ceil_adds_nothing(sizes, kernel_size, stride, pads, dilation=1) -> bool:
    """Whether pooling with ``ceil_mode`` gives the windows that flooring gives, in every dimension: torch drops a
    last window that starts in the right padding. The exporter writes ``ceil_mode=1``, whose ONNX output size
    keeps that window (a file shape inference and onnxruntime refuse), so such a pool is written floored."""
    n = len(sizes)
    kernel, pads, dilation = _as_tuple(kernel_size, n), _as_tuple(pads, n), _as_tuple(dilation, n)
    strides = _as_tuple(stride if stride not in (None, (), []) else kernel_size, n)
    for size, k, s, p, d in zip(sizes, kernel, strides, pads, dilation):
        span = int(size) + 2 * p - d * (k - 1) - 1
        ceil = -(-span // s) + 1
        if ceil > span // s + 1 and (ceil - 1) * s < int(size) + p:  # an extra window that torch keeps
            return False
    return True


_SPATIAL = {torch.nn.functional.avg_pool1d: 1, torch.nn.functional.avg_pool2d: 2, torch.nn.functional.avg_pool3d: 3,
            torch.nn.functional.max_pool1d: 1, torch.nn.functional.max_pool2d: 2, torch.nn.functional.max_pool3d: 3}


def _pool(func, *args, **kwargs):
    batched = func in (torch.nn.functional.avg_pool2d, torch.nn.functional.max_pool2d)
    return _pool2d_batched(func, *args, **kwargs) if batched else func(*args, **kwargs)


def _avg_pool_as_torch_pools(func, input, kernel_size, stride=None, padding=0, ceil_mode=False,
                             count_include_pad=True, *rest, **kwargs):
    """Average pooling with ``ceil_mode`` written so that every runtime reads it as torch computes it.

    A pool whose ceiling adds only windows torch drops is written floored (:func:`_ceil_adds_nothing`). Without
    padding, torch divides each window that runs past the input's end by the elements inside it, whatever
    ``count_include_pad`` says (there is no padding to count). The exporter writes ``count_include_pad=1``,
    which onnxruntime's QLinearAveragePool (the fusion of a Q/DQ'd AveragePool at its higher optimisation
    levels) reads as counting the overhang too: transformers' EfficientNet pools by one window larger than its
    feature map, and its outputs were 20 % off. Written with ``count_include_pad=False``, the same values in
    torch."""
    spatial = _SPATIAL[func]
    pads = _as_tuple(padding, spatial)
    if ceil_mode and _ceil_adds_nothing(input.shape[-spatial:], kernel_size, stride, pads):
        ceil_mode = False
    elif ceil_mode and count_include_pad and not any(pads):
        count_include_pad = False
    return _pool(func, input, kernel_size, stride, padding, ceil_mode, count_include_pad, *rest, **kwargs)


def _max_pool_as_torch_pools(func, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                             return_indices=False):
    """Max pooling with ``ceil_mode`` whose ceiling adds only windows torch drops, written floored."""
    spatial = _SPATIAL[func]
    if ceil_mode and _ceil_adds_nothing(input.shape[-spatial:], kernel_size, stride, _as_tuple(padding, spatial),
                                        dilation):
        ceil_mode = False
    return _pool(func, input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                 return_indices=return_indices)


def _interpolate_same_size(func, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                           recompute_scale_factor=None, antialias=False):
    """Antialiased resizing has no ONNX form; to the input's own size (what DINOv2 with registers does to its
    position embeddings when traced at its native resolution) it is the input, for every mode."""
    kwargs = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                  recompute_scale_factor=recompute_scale_factor, antialias=antialias)
    if antialias and size is not None and not align_corners:
        spatial = tuple(int(v) for v in input.shape[2:])
        wanted = tuple(int(v) for v in (size if isinstance(size, (tuple, list)) else [size] * len(spatial)))
        if wanted == spatial:
            return input
    return func(input, **kwargs)


_REWRITES = {torch.nn.functional.fold: _fold_as_reshape,
             torch.nn.functional.adaptive_avg_pool2d: _adaptive_avg_pool2d_as_means,
             **{f: _avg_pool_as_torch_pools for f in (torch.nn.functional.avg_pool1d, torch.nn.functional.avg_pool2d,
                                                      torch.nn.functional.avg_pool3d)},
             **{f: _max_pool_as_torch_pools for f in (torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d,
                                                      torch.nn.functional.max_pool3d)},
             torch.nn.functional.interpolate: _interpolate_same_size}


class ExportRewrites(torch.overrides.TorchFunctionMode):
    """Ops the TorchScript exporter has no (valid) ONNX form for, computed with ops it has, with the same values
    for the input size the export traces: :data:`_REWRITES`. A mode, not patched functions: a placed site
    (qframe.quant.placement: a pooled input) still sees the torch function itself and quantizes first."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rewrite = _REWRITES.get(func)
        return func(*args, **(kwargs or {})) if rewrite is None else rewrite(func, *args, **(kwargs or {}))
