"""Empirical bias correction (Nagel et al. 2019, sec. 4.2; Finkelstein et al. 2019).

Quantizing weights (and the inputs that reach a layer) shifts the mean of the layer's output:
``E[W~ x~] != E[W x]``. The shift per output channel, measured on calibration data, is added back
to the bias, so the mean output error of each layer becomes zero on that data. Layers are
corrected in execution order, each on the inputs the already-corrected quantized model gives it,
so a correction also compensates the error that arrives from upstream.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.quant.capture import channel_sums, execution_order, layerwise_pass, reference_means
from qframe.quant.modules import QuantConv2d, QuantConvTranspose2d, QuantConvTranspose3d, QuantLinear

log = logging.getLogger(__name__)

# output channels on dim 1 (the last for a Linear): not a Conv1d / ConvTranspose1d's 3-d output
CORRECTABLE = (QuantConv2d, QuantLinear, QuantConvTranspose2d, QuantConvTranspose3d)


def correctable_layers(qmodel: nn.Module, images: torch.Tensor) -> list[str]:
    """Quantized Conv2d / ConvTranspose / Linear layers of ``qmodel`` in execution order."""
    names = [n for n in execution_order(qmodel, images) if isinstance(qmodel.get_submodule(n), CORRECTABLE)]
    if not names:
        raise QFrameError("bias correction found no quantized Conv2d / Linear layer; quantize the model first (ptq)")
    return names


def bias_correction_hook(targets: dict[str, torch.Tensor], shifts: dict[str, float]):
    """A :func:`~qframe.quant.capture.layerwise_pass` post-hook: the layer's mean output error on this pass
    goes into its bias (recorded in ``shifts``), and the layer's output is recomputed with it, so the
    layers after it see exactly what the corrected model computes."""

    def hook(name: str, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        sums, count = channel_sums(out)
        delta = targets[name] - sums / count
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(delta.numel(), dtype=layer.weight.dtype, device=layer.weight.device))
        # start from the bias the layer adds (on its int32 grid where it has one), so the correction lands
        # within half a grid step of the target rather than a whole one
        deployed = layer._quant_bias(layer.bias, layer.weight_to_quantize()).detach().double()
        layer.bias.data.copy_((deployed + delta).to(layer.bias.dtype))
        shifts[name] = float(delta.abs().max())
        return type(layer).forward(layer, *args)  # not layer(...): that would run this hook again

    return hook


@torch.no_grad()
def correct_biases(qmodel: nn.Module, reference: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Empirical bias correction of every quantized Conv2d / ConvTranspose / Linear of ``qmodel``, in place.

    ``reference`` is the float model ``qmodel`` was quantized from (BN folded, same module names);
    ``images`` the calibration images, run through ``qmodel`` as one batch. Returns, per layer, the
    largest mean-output shift (absolute, over channels) that was removed.
    """
    qmodel.eval()
    reference.eval()
    names = correctable_layers(qmodel, images)
    targets = reference_means(reference, names, images)
    shifts: dict[str, float] = {}
    hook = bias_correction_hook(targets, shifts)
    layerwise_pass(qmodel, images, after={n: hook for n in names})
    worst = max(shifts, key=shifts.get)
    log.info("bias correction: %d layers, largest mean shift removed %.4g (%s)", len(shifts), shifts[worst], worst)
    return shifts
