"""Memory accounting from the tensors that exist: parameters, optimizer state, peak of a step.

Nothing here is computed from a formula: bytes are summed over the distinct tensor storages
reachable from a model and its optimizer, and the peak memory of a step is measured from the
allocator while the step runs (:func:`qframe.measure.memory.step_peak_memory`: the CUDA
allocator's ``max_memory_allocated``, or on the CPU the C allocator's live bytes after every op).
"""

from __future__ import annotations

import types
from typing import Iterable, Iterator

import torch
from torch import nn

from qframe.measure.memory import step_peak_memory

_SKIP = (str, bytes, int, float, bool, type(None), types.FunctionType, types.BuiltinFunctionType, types.ModuleType,
         type, torch.Generator, torch.dtype, torch.device)


def reachable_tensors(*roots) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor reachable from ``roots`` through attributes, containers and bound methods.

    Yields ``(path, tensor)`` once per tensor object; a module's parameters, buffers and
    sub-modules, an optimizer's state and parameter groups, and plain Python attributes are all
    followed, so nothing a training loop holds on to escapes the walk.
    """
    seen: set[int] = set()
    stack = [(f"root{i}", r) for i, r in enumerate(roots)]
    while stack:
        path, obj = stack.pop()
        if isinstance(obj, _SKIP) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            yield path, obj
            if obj.grad is not None:
                stack.append((path + ".grad", obj.grad))
            continue
        if isinstance(obj, dict):
            stack += [(f"{path}[{k!r}]", v) for k, v in obj.items()]
            stack += [(f"{path}.key", k) for k in obj if isinstance(k, torch.Tensor)]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        elif isinstance(obj, types.MethodType):
            stack.append((path + ".__self__", obj.__self__))
        elif hasattr(obj, "__dict__"):
            stack += [(f"{path}.{k}", v) for k, v in vars(obj).items()]


def _storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] = frozenset()) -> tuple[int, set[int]]:
    total, keys = 0, set()
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = t.untyped_storage().data_ptr()
        if key in keys or key in exclude or t.numel() == 0:
            continue
        keys.add(key)
        total += t.untyped_storage().nbytes()
    return total, keys


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Bytes of the model's parameters and buffers, of the optimizer's state beyond them, and of
    the gradients the parameters hold now (between a backward pass and the next ``zero_grad``)."""
    param_bytes, keys = _storage_bytes(list(model.parameters()) + list(model.buffers()))
    state = [t for _, t in reachable_tensors(list(optimizer.state.values()), getattr(optimizer, "rct_state", {}))]
    state_bytes, state_keys = _storage_bytes(state, exclude=keys)
    grad_bytes, _ = _storage_bytes([p.grad for p in model.parameters() if p.grad is not None], exclude=keys | state_keys)
    return {"parameter_bytes": param_bytes, "optimizer_state_bytes": state_bytes, "total_bytes": param_bytes + state_bytes,
            "gradient_bytes": grad_bytes}


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One plain training step (forward, loss, backward, optimizer step); returns the loss."""
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def measure_training(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> dict:
    """State bytes and the peak memory of one training step, after a first step has created the state.

    ``step_peak_delta_bytes``: the most memory live at once during the step beyond what lived
    before it (activations kept for backward, gradients, temporaries), gradients of the previous
    step released first; ``step_peak_bytes``: that plus the parameters and optimizer state, the
    training memory at the step's peak. ``None`` where the allocator cannot be read.
    """
    training_step(model, optimizer, x, y)  # optimizer state exists only after a step
    optimizer.zero_grad(set_to_none=True)
    peak = step_peak_memory(lambda: training_step(model, optimizer, x, y), x.device)
    out = training_state_bytes(model, optimizer)
    delta = peak["peak_bytes"]
    out["step_peak_delta_bytes"] = delta
    out["step_peak_bytes"] = None if delta is None else delta + out["total_bytes"]
    out["step_peak_method"] = peak["method"]
    return out
