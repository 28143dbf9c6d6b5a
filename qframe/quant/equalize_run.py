"""Equalization chains read by running a model that torch.fx cannot trace.

Most models users bring (transformers' CNNs among them) do not trace with torch.fx: control flow on shapes
and flags. Running the model once on an example batch sees every call that happens: the leaf modules (a
forward hook each) and the torch functions called between them (a ``TorchFunctionMode``), each with the
tensors it reads and writes. A producer (a Conv2d or Linear called once) is chained to a consumer where its
output reaches it through per-channel homogeneous steps only (ReLU / ReLU6 / ChannelClip, poolings, dropout,
Identity, a flatten from the channel axis on), each tensor on the way read by one step alone. Shapes are
the run's own, so a reshape counts as a channel flatten only where it makes ``[B, C * rest]`` of ``[B, C,
...]``. :func:`qframe.quant.equalize.equalize` then tries each chain on the example before it keeps it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

_F_RELU = {torch.relu, F.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_}
_F_KEEP = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, torch.Tensor.contiguous}
_F_FLAT = {torch.flatten, torch.Tensor.flatten, torch.Tensor.view, torch.Tensor.reshape, torch.reshape}
_METADATA = (torch.Size, int, float, bool, str, torch.dtype, torch.device)  # what reads no values to compute with


def _key(t) -> tuple | None:
    """A tensor's identity at this moment: in-place ops bump its version, so they make a new one."""
    return (id(t), t._version) if isinstance(t, torch.Tensor) else None


def _reads(*objects) -> list:
    """The keys of every tensor in ``objects``, inside lists, tuples and dicts too."""
    keys = []
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            keys.append(_key(obj))
        elif isinstance(obj, (list, tuple)):
            keys += _reads(*obj)
        elif isinstance(obj, dict):
            keys += _reads(*obj.values())
    return keys


class _Recorder(TorchFunctionMode):
    """The functions called outside the leaf modules, with what they read (before the call: an in-place op
    writes a new version) and what they write."""

    def __init__(self, events, live, depth):
        super().__init__()
        self.events, self.live, self.depth = events, live, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reads = _reads(args, kwargs) if self.depth[0] == 0 else []
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        shape_in = first.shape if first is not None else None
        out = func(*args, **kwargs)
        if not reads or isinstance(out, _METADATA):
            return out  # inside a leaf module (its own maths), or a shape / a number read from a tensor
        self.live.append(out)  # alive, so its id is not reused
        single = isinstance(out, torch.Tensor)
        pad = {"pad": args[1] if len(args) > 1 else kwargs.get("pad"), "mode": args[2] if len(args) > 2 else
               kwargs.get("mode", "constant"), "value": args[3] if len(args) > 3 else kwargs.get("value")} \
            if func is F.pad else {}
        self.events.append((func, None, reads, _key(out) if single else None, shape_in,
                            out.shape if single else None, pad))
        return out


def _zero_pad(event) -> bool:
    """An F.pad that pads the spatial dims only, by whole rows and columns of zeros (what a per-channel scale
    leaves as it is): no cropping (a negative pad), no padding of the channel axis."""
    pad, shape = event[6].get("pad"), event[4]
    return (event[6].get("mode", "constant") == "constant" and not event[6].get("value") and shape is not None
            and isinstance(pad, (list, tuple)) and len(pad) <= 2 * (len(shape) - 2) and all(p >= 0 for p in pad))


def _step(event, modules_kind) -> str | None:
    """What one event is on a chain: 'layer', 'relu' (an activation that clips), 'keep' (homogeneous), or None."""
    func, module, _, _, shape_in, shape_out, _ = event
    if module is not None:
        if type(module) in (nn.Conv2d, nn.Linear):
            return "layer"
        return modules_kind(module)
    if func in _F_RELU:
        return "relu"
    if func in _F_KEEP or func is F.pad and _zero_pad(event):
        return "keep"
    if func in _F_FLAT and shape_in is not None and shape_out is not None and len(shape_out) == 2 and \
            len(shape_in) >= 2 and shape_out[0] == shape_in[0] and shape_out[1] == math.prod(shape_in[1:]):
        return "flatten" if len(shape_in) > 2 else "keep"
    return None


def chains_by_running(model: nn.Module, example, chain_type, homogeneous: tuple, activations: tuple, link) -> list:
    """``chain_type(producer, consumer, activation, spatial, between)`` for each chain the run shows (see the
    module doc); ``link(producer, consumer, flattened)`` as :func:`qframe.quant.equalize._link`."""
    from qframe.utils.batches import run_batch

    names = {m: n for n, m in model.named_modules()}
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    events, live, depth = [], [], [0]
    calls: dict[nn.Module, int] = {}

    def pre(module, args, kwargs):
        depth[0] += 1
        if depth[0] == 1:
            events.append([None, module, _reads(args, kwargs), None, None, None, {}])

    def post(module, args, out):
        depth[0] -= 1
        if depth[0] == 0:
            calls[module] = calls.get(module, 0) + 1
            events[-1][3] = _key(out) if isinstance(out, torch.Tensor) else None
            live.append(out)

    hooks = [h for m in leaves for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                         m.register_forward_hook(post))]
    try:
        with torch.no_grad(), _Recorder(events, live, depth):
            run_batch(model, example, what="example batch")
    finally:
        for h in hooks:
            h.remove()
    events = [tuple(e) for e in events if not (len(e[2]) == 1 and e[3] == e[2][0])]  # returns its one input as it is
    readers: dict[tuple, list[int]] = {}
    for i, (_, _, reads, *_) in enumerate(events):
        for key in set(reads):
            readers.setdefault(key, []).append(i)

    def kind(module):
        if isinstance(module, activations):
            return "relu"
        return "flatten" if isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1 \
            else "keep" if isinstance(module, homogeneous) and not isinstance(module, nn.Flatten) else None

    # tensors read outside the leaf modules: a layer's weight among them is used elsewhere too (a .forward call)
    outside = {key[0] for func, module, reads, *_ in events if module is None for key in reads}

    def once(module) -> bool:
        return calls.get(module) == 1 and id(module.weight) not in outside

    chains = []
    for _, producer, _, out, *_ in events:
        if producer is None or type(producer) not in (nn.Conv2d, nn.Linear) or not once(producer):
            continue
        between, activation, flattened, key = [], None, False, out
        while key is not None and len(readers.get(key, ())) == 1:
            event = events[readers[key][0]]
            step = _step(event, kind)
            module = event[1]
            if step == "layer":
                spatial = link(producer, module, flattened) if once(module) else None
                if spatial is not None:
                    chains.append(chain_type(names[producer], names[module], activation, spatial, between))
                break
            if step is None or (step == "relu" and activation is not None) or (module is not None and calls.get(module) != 1):
                break
            if step == "relu":
                activation = names[module] if module is not None else "<relu>"
            flattened = flattened or step == "flatten"
            if module is not None:
                between.append(names[module])
            key = event[3]
    return chains
