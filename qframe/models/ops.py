"""Small building blocks the zoo shares with quantization."""

import torch
from torch import nn


class ResidualAdd(nn.Module):
    """``x + skip`` as a module, so quantization can put a quantizer on the skip branch.

    TensorRT fuses a conv with the add that follows it only when the add's other input (the
    skip branch) arrives quantized; :func:`qframe.quantize_` swaps this for
    :class:`qframe.quant.modules.QuantResidualAdd`, which does that.
    """

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + skip
