"""The test split shipped with an export, compactly, so the device checks its engines on the same images.

``test_set.npz`` (next to ``build_engines.sh``) holds the images as 8-bit pixels (what a camera
gives; one byte a value, zip-compressed) with the train split's mean and std to normalise them,
the labels, and, for each exported model, its PyTorch predictions and accuracy on exactly those
decoded images (a DLA run's model also with the GPU's rounding, ``<name>_half_even``). A device
then compares an engine with the model it came from image by image
(top-1 agreement) as well as with the labels, without PyTorch or the data set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.io import atomic_write_npz
from qframe.utils.modules import copy_model, eval_mode
from qframe.quant.frozen import frozen_weights

log = logging.getLogger(__name__)

FILE_NAME = "test_set.npz"


@dataclass
class TestSet:
    """Decoded test images (normalised float32 ``[N, C, H, W]``), labels, and reference predictions."""

    __test__ = False  # not a pytest test class

    images: np.ndarray
    labels: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # model name -> top-1 class per image
    accuracy: dict[str, float] = field(default_factory=dict)  # model name -> % on these images
    class_names: list[str] = field(default_factory=list)


def _encode(x: torch.Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def decode(pixels: np.ndarray, mean, std) -> np.ndarray:
    """8-bit pixels ``[N, C, H, W]`` -> the normalised float32 images the model takes."""
    m = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
    return ((pixels.astype(np.float32) / np.float32(255) - m) / s).astype(np.float32)


@torch.no_grad()
@frozen_weights()
def save_test_set(path, data, models: dict[str, nn.Module], batch: int = 256) -> Path:
    """Write ``data``'s test split to ``path`` (see the module docstring) with each model's predictions."""
    path = Path(path)
    x, y = data.test.tensors
    if not data.mean or not data.std:
        raise QFrameError("the data bundle has no mean/std; the test set cannot be stored as pixels")
    pixels = _encode(x, data.mean, data.std)
    images = torch.from_numpy(decode(pixels, data.mean, data.std))
    arrays = {"pixels": pixels, "labels": y.numpy().astype(np.int64), "mean": np.asarray(data.mean, np.float32),
              "std": np.asarray(data.std, np.float32), "class_names": np.asarray(data.class_names)}
    for name, model in _with_gpu_rounding(models).items():
        device = next(model.parameters()).device
        with eval_mode(model):
            pred = torch.cat([model(images[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(images), batch)])
        arrays[f"pred_{name}"] = pred.numpy().astype(np.int64)
        arrays[f"accuracy_{name}"] = np.float64(100.0 * (pred == y).float().mean().item())
    atomic_write_npz(arrays, path)
    log.info("test set: %d images as 8-bit pixels in %s (%.0f KiB)", len(pixels), path.name, path.stat().st_size / 1024)
    return path


def _with_gpu_rounding(models: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``models`` plus, for each that rounds activations half away from zero (a DLA run), a copy rounding
    half to even as the GPU engine does, named ``<name>_half_even``: each engine gets its own reference."""

    from qframe.quant.modules import quantizers, set_rounding

    out = dict(models)
    for name, model in models.items():
        if any(q.spec.rounding == "half_away" for _, q in quantizers(model)):
            gpu = copy_model(model)
            set_rounding(gpu, "half_even")
            out[f"{name}_half_even"] = gpu
    return out


def load_test_set(path) -> TestSet:
    """Read a file written by :func:`save_test_set`."""
    path = Path(path)
    if not path.is_file():
        raise QFrameError(f"test set not found: {path}; export the run again (the export stage writes {FILE_NAME})")
    with np.load(path, allow_pickle=False) as z:
        names = [k[5:] for k in z.files if k.startswith("pred_")]
        return TestSet(images=decode(z["pixels"], z["mean"], z["std"]), labels=z["labels"],
                       predictions={n: z[f"pred_{n}"] for n in names},
                       accuracy={n: float(z[f"accuracy_{n}"]) for n in names},
                       class_names=[str(c) for c in z["class_names"]])
