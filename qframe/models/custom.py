"""``model=custom``: the user's own network on the command line, built by a function or class of theirs.

``model.factory=package.module:build`` (or ``package.module.build``) names a callable in a module Python can
import (installed, on ``PYTHONPATH``, or in the directory the command runs in). It is called with
``model.kwargs`` and, where its signature names them, ``num_classes``, ``in_channels`` and ``image_size``
from the data (a factory of ``**kwargs`` only gets ``num_classes``). What it returns must be an ``nn.Module`` whose forward maps an image batch to class logits
``[N, num_classes]``: one forward pass on a zero batch checks that before training starts, so a wrong
model is one line now, not an error deep inside training or export.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.modules import eval_mode

DATA_ARGS = ("num_classes", "in_channels", "image_size")  # what the data decides, passed where accepted
EXAMPLE = "model.factory=mynets:build (mynets.py in the current directory, def build(num_classes): ...)"


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def check_factory_spec(factory: str | None) -> tuple[str, str]:
    """``factory`` split into module and attribute, without importing anything; one line saying why not."""
    if not isinstance(factory, str) or not factory.strip():
        raise QFrameError(f"model=custom needs model.factory, got {factory!r}; valid: an importable "
                          f"'module:callable', e.g. {EXAMPLE}")
    spec = factory.strip()
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise QFrameError(f"model.factory={factory!r} is invalid; valid: 'module:callable' or 'module.callable', "
                          f"e.g. {EXAMPLE}")
    return module_name, attr


def resolve_factory(factory: str | None) -> Callable:
    """The callable ``factory`` names (``module:attr`` or ``module.attr``); one line saying why otherwise."""
    module_name, attr = check_factory_spec(factory)
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `qframe` script's path starts at its own folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the user's module failing while it is imported
        raise QFrameError(f"model.factory={factory!r}: module {module_name!r} cannot be imported ({_first_line(exc)}); "
                          "valid: a module that is installed, on PYTHONPATH or in the current directory") from exc
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise QFrameError(f"model.factory={factory!r}: {module_name!r} has no {attr!r}; its own callables: "
                              f"{', '.join(found) or 'none'}")
        target = getattr(target, part)
    if not callable(target):
        raise QFrameError(f"model.factory={factory!r} is a {type(target).__name__}, not a function or class")
    return target


def _call(fn: Callable, factory: str, data_args: dict, kwargs: dict) -> Any:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass what the user gave
        params = None
    takes_any = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not takes_any:
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in named]
        if unknown:
            raise QFrameError(f"model.kwargs.{unknown[0]} is not a parameter of {factory}; valid: "
                              f"{', '.join(n for n in named if n not in DATA_ARGS) or 'none'}")
    # the data's arguments the signature names; a factory of **kwargs only (torchvision's builders, timm's
    # create_model) gets num_classes, the one they all take, and model.kwargs may give it the others
    args = {} if params is None else {k: v for k, v in data_args.items()
                                      if k in params or (takes_any and k == "num_classes")}
    clash = sorted(set(kwargs) & set(args))
    if clash:
        raise QFrameError(f"model.kwargs.{clash[0]} is set by the data, not by model.kwargs; valid: remove it "
                          f"(the data gives {', '.join(f'{k}={v}' for k, v in args.items())})")
    if params is not None:
        missing = [n for n, p in params.items() if p.default is p.empty and n not in args and n not in kwargs
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing:
            raise QFrameError(f"model.factory={factory!r} needs {missing[0]!r}, which neither the data "
                              f"({', '.join(DATA_ARGS)}) nor model.kwargs gives; valid: model.kwargs.{missing[0]}=VALUE")
    try:
        return fn(**args, **kwargs)
    except Exception as exc:
        given = ", ".join(f"{k}={v!r}" for k, v in {**args, **kwargs}.items())
        raise QFrameError(f"model.factory={factory!r} raised {_first_line(exc)} when called with ({given})") from exc


def custom_model(factory: str | None, num_classes: int, in_channels: int, image_size: int,
                 kwargs: dict | None = None) -> nn.Module:
    """The user's model from ``factory`` (see the module docstring), checked to give ``[N, num_classes]`` logits
    for ``[N, in_channels, image_size, image_size]`` images."""
    fn = resolve_factory(factory)
    kwargs = dict(kwargs or {})
    data_args = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    model = _call(fn, factory, data_args, kwargs)
    if not isinstance(model, nn.Module):
        raise QFrameError(f"model.factory={factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    x = torch.zeros(2, in_channels, image_size, image_size)
    try:
        with torch.no_grad(), eval_mode(model):
            out = model(x)
    except Exception as exc:
        raise QFrameError(f"model.factory={factory!r}: the model does not run on a batch of shape {tuple(x.shape)} "
                          f"({_first_line(exc)}); valid: a model for {in_channels}-channel {image_size}x{image_size} "
                          "images (data.channels, data.image_size)") from exc
    want = (2, num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"of type {type(out).__name__}"
        hint = " (it has .logits: return a module whose forward returns them)" if hasattr(out, "logits") else ""
        raise QFrameError(f"model.factory={factory!r}: the model's output for a batch of 2 is {got}{hint}; valid: "
                          f"class logits of shape {want} ({num_classes} classes in the data)")
    return model
