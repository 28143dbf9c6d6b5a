"""Torch functions written another way while a model is exported to ONNX: the same values, in ops every
exporter route and opset writes (``F.fold`` of non-overlapping patches as a reshape, adaptive average
pooling as means over its bins, pooling of unbatched inputs, interpolation to the input's own size)."""

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


def _avg_pool_ceil_without_padding(func, input, kernel_size, stride=None, padding=0, ceil_mode=False,
                                   count_include_pad=True, *rest, **kwargs):
    """Average pooling with ``ceil_mode`` and no padding: torch divides each window that runs past the input's
    end by the elements inside it, whatever ``count_include_pad`` says (there is no padding to count). The
    exporter writes ``count_include_pad=1``, which onnxruntime's QLinearAveragePool (the fusion of a Q/DQ'd
    AveragePool at its higher optimisation levels) reads as counting the overhang too: transformers'
    EfficientNet pools by one window larger than its feature map, and its outputs were 20 % off. Written with
    ``count_include_pad=False``, the same values in torch, and one reading in every runtime."""
    if ceil_mode and count_include_pad and all(p == 0 for p in (padding if isinstance(padding, (tuple, list))
                                                                else (padding,))):
        count_include_pad = False
    pool = _pool2d_batched if func is torch.nn.functional.avg_pool2d else lambda f, *a, **k: f(*a, **k)
    return pool(func, input, kernel_size, stride, padding, ceil_mode, count_include_pad, *rest, **kwargs)


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
             torch.nn.functional.max_pool2d: _pool2d_batched,
             torch.nn.functional.avg_pool1d: _avg_pool_ceil_without_padding,
             torch.nn.functional.avg_pool2d: _avg_pool_ceil_without_padding,
             torch.nn.functional.avg_pool3d: _avg_pool_ceil_without_padding,
             torch.nn.functional.interpolate: _interpolate_same_size}


class ExportRewrites(torch.overrides.TorchFunctionMode):
    """Ops the TorchScript exporter has no (valid) ONNX form for, computed with ops it has, with the same values
    for the input size the export traces: :data:`_REWRITES`. A mode, not patched functions: a placed site
    (qframe.quant.placement: a pooled input) still sees the torch function itself and quantizes first."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        rewrite = _REWRITES.get(func)
        return func(*args, **(kwargs or {})) if rewrite is None else rewrite(func, *args, **(kwargs or {}))
