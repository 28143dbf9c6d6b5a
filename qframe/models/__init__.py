"""The model zoo: MobileNetV2, ResNet-18, a compact CNN, any torchvision classifier, and the user's own network.

``build_model`` is the one entry point. The zoo models are written so quantization tools find
what they expect: every Conv2d is followed directly by its BatchNorm2d (so BN folds into it),
convs before BN have no bias, activations are modules, and global average pooling lets any
``image_size >= 16`` work. torchvision is imported only when ``name == "torchvision"``; ``name == "custom"``
builds the user's network from ``factory`` (:mod:`qframe.models.custom`).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

from torch import nn

from qframe.errors import QFrameError, one_of
from qframe.models.compact import CompactCNN, compact_cnn
from qframe.models.heads import load_backbone, replace_head
from qframe.models.mobilenet_v2 import MobileNetV2, mobilenet_v2
from qframe.models.resnet import ResNet, resnet18

log = logging.getLogger(__name__)

ZOO = ("mobilenet_v2", "resnet18", "compact_cnn")


def _torchvision_model(num_classes: int, in_channels: int = 3, image_size: int = 224, *,
                       width_mult: float = 1.0, arch: str | None = None) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=...)``; never downloads weights."""
    try:
        import torchvision  # noqa: F401  (lazy: heavy, and may be missing or a mismatched build)
        from torchvision import models as tvm
    except Exception as exc:  # ImportError, but a broken CUDA build raises OSError/RuntimeError too
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QFrameError(f"model 'torchvision' needs torchvision, which cannot be imported here ({reason}); "
                          f"use one of: {', '.join(ZOO)}") from exc
    if not arch:
        raise QFrameError("model 'torchvision' needs arch=<torchvision model name>, e.g. arch=resnet50")
    valid = tvm.list_models(module=tvm)  # classification models only
    if arch not in valid:
        raise one_of("torchvision arch", arch, sorted(valid))
    if width_mult != 1.0:
        log.warning("width_mult=%s is ignored for torchvision models", width_mult)
    model = tvm.get_model(arch, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for name, conv in model.named_modules():
        if isinstance(conv, nn.Conv2d):
            new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, 1 if conv.groups == 1 else in_channels,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            return
    raise QFrameError(f"torchvision model {type(model).__name__} has no Conv2d to adapt to in_channels={in_channels}")


MODELS: dict[str, Callable[..., nn.Module] | None] = {
    "mobilenet_v2": mobilenet_v2,
    "resnet18": resnet18,
    "compact_cnn": compact_cnn,
    "torchvision": _torchvision_model,
    "custom": None,  # the user's factory (model.factory), built by qframe.models.custom
}


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, *,
                width_mult: float = 1.0, arch: str | None = None, checkpoint: str | os.PathLike | None = None,
                factory: str | None = None, kwargs: dict | None = None) -> nn.Module:
    """Build model ``name`` from :data:`MODELS` for ``num_classes`` classes.

    ``image_size`` picks the stem (inputs <= 64 keep more resolution); ``arch`` is the torchvision
    model name for ``name="torchvision"``; ``factory`` and its ``kwargs`` build ``name="custom"``, the
    user's own network (:mod:`qframe.models.custom`); ``checkpoint`` loads a backbone with
    :func:`load_backbone` (weights whose shape does not fit, such as another data set's head, are skipped).
    """
    if name not in MODELS:
        raise one_of("model", name, MODELS)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise QFrameError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in (1, 3) or isinstance(in_channels, bool):
        raise QFrameError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise QFrameError(f"image_size must be an integer >= 16, got {image_size!r}")
    if not isinstance(width_mult, (int, float)) or isinstance(width_mult, bool) or not width_mult > 0:
        raise QFrameError(f"width_mult must be > 0, got {width_mult!r}")
    if name == "torchvision":
        model = _torchvision_model(num_classes, in_channels, image_size, width_mult=width_mult, arch=arch)
    elif name == "custom":
        from qframe.models.custom import custom_model

        if width_mult != 1.0 or arch:
            log.warning("width_mult and arch are ignored for model=custom (its factory builds it)")
        model = custom_model(factory, num_classes, in_channels, image_size, kwargs)
    else:
        if arch:
            log.warning("arch=%r is ignored for model %r (it is for model=torchvision)", arch, name)
        model = MODELS[name](num_classes, in_channels, image_size, width_mult=float(width_mult))
    if checkpoint is not None:
        load_backbone(model, checkpoint)
    return model


__all__ = ["MODELS", "ZOO", "build_model", "replace_head", "load_backbone",
           "MobileNetV2", "ResNet", "CompactCNN", "mobilenet_v2", "resnet18", "compact_cnn"]
