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
from qframe.quant.capture import (call_counts, called_once, channel_sums, check_remedy_inputs, layerwise_pass,
                                  reference_means)
from qframe.quant.modules import (QuantConv1d, QuantConv2d, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d,
                                  QuantConvTranspose3d, QuantLinear)

log = logging.getLogger(__name__)

# output channels on dim 1 of a convolution's output, the last dim of a Linear's (capture.channel_sums)
CORRECTABLE = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear, QuantConvTranspose1d, QuantConvTranspose2d,
               QuantConvTranspose3d)


def correctable_layers(qmodel: nn.Module, images: torch.Tensor) -> list[str]:
    """Quantized Conv / ConvTranspose (1d, 2d, 3d) / Linear layers of ``qmodel`` in execution order; those a forward
    pass calls more than once keep their bias, named in a warning (:func:`~qframe.quant.capture.called_once`)."""
    counts = call_counts(qmodel, images)
    names = [n for n in counts if isinstance(qmodel.get_submodule(n), CORRECTABLE)]
    if not names:
        raise QFrameError("bias correction found no quantized Conv / Linear layer; quantize the model first (ptq)")
    names = called_once(counts, names, "bias correction", "their bias")
    if not names:
        raise QFrameError("bias correction found no quantized Conv / Linear layer that a forward pass calls once")
    return names


def bias_correction_hook(targets: dict[str, torch.Tensor], shifts: dict[str, float]):
    """A :func:`~qframe.quant.capture.layerwise_pass` post-hook: the layer's mean output error on this pass
    goes into its bias (recorded in ``shifts``), and the layer's output is recomputed with it, so the
    layers after it see exactly what the corrected model computes."""

    def hook(name: str, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        sums, count = channel_sums(out, isinstance(layer, nn.Linear))
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
    """Empirical bias correction of every quantized Conv / ConvTranspose / Linear of ``qmodel``, in place.

    ``reference`` is the float model ``qmodel`` was quantized from (BN folded, same module names);
    ``images`` the calibration images, run through ``qmodel`` as one batch. Returns, per layer, the
    largest mean-output shift (absolute, over channels) that was removed.
    """
    check_remedy_inputs(qmodel, reference, images, "qframe.correct_biases")
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
