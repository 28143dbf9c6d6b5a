"""Conv2d + BatchNorm2d pairs that train together for quantization-aware training: the BN keeps training
beside its conv (:class:`ConvBn2d`), and quantization sees the folded weight TensorRT will run."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from qframe.quant.fold import _apply_checked, _fused, _producer_base, _without_norm, find_conv_bn_pairs
from qframe.utils.modules import is_parametrized, set_submodule

log = logging.getLogger(__name__)


class ConvBn2d(nn.Conv2d):
    """A Conv2d and the BatchNorm2d after it as one module, for training with the BN kept apart.

    Quantization-aware training swaps it for :class:`qframe.quant.modules.QuantConvBn2d`, which
    quantizes the *folded* weight, the weight TensorRT will run.
    """

    bn: nn.BatchNorm2d

    @classmethod
    def from_pair(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "ConvBn2d":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        chains = conv.parametrizations if is_parametrized(conv) else {}
        for name in ("weight", "bias"):
            if name in chains:  # weight_norm & co. go on training inside the pair: the conv's own parametrization
                parametrize.register_parametrization(new, name, nn.Identity(), unsafe=True)
                new.parametrizations[name] = chains[name]
            else:
                setattr(new, name, getattr(conv, name))
        new.bn = bn
        new.train(conv.training)
        return new

    def fold_factor(self) -> torch.Tensor:
        """``gamma / sqrt(running_var + eps)`` per output channel."""
        bn = self.bn
        gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
        return gamma * torch.rsqrt(bn.running_var + bn.eps)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias with the BN running statistics folded in (what deployment runs)."""
        bn, factor = self.bn, self.fold_factor()
        beta = bn.bias if bn.affine else torch.zeros_like(factor)
        bias = self.bias if self.bias is not None else torch.zeros_like(factor)
        return self.weight * factor.view(-1, 1, 1, 1), beta + (bias - bn.running_mean) * factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self._conv_forward(x, self.weight, self.bias))


def _plain_norm(bn: nn.Module) -> nn.Module:
    """``bn`` itself, or for a norm fused with its activation (timm's BatchNormAct2d) a plain BatchNorm2d
    holding the same parameters and statistics (the same tensors: training one trains the other)."""
    if not _fused(bn):
        return bn
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
    for name in ("weight", "bias"):
        setattr(plain, name, getattr(bn, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        plain._buffers[name] = bn._buffers.get(name)
    return plain.train(bn.training)


def _pair_for_training(model: nn.Module, conv_name: str, bn_name: str) -> None:
    bn = model.get_submodule(bn_name)
    set_submodule(model, conv_name, ConvBn2d.from_pair(model.get_submodule(conv_name), _plain_norm(bn)))
    set_submodule(model, bn_name, _without_norm(bn) if _fused(bn) else nn.Identity())  # a fused norm's activation stays


def _trainable_pair(model: nn.Module, conv_name: str, bn_name: str, fused: bool = False) -> bool:
    """A Conv2d (forward not overridden) and a BatchNorm2d after it; ``fused``: also a norm fused with its
    activation (paired only where the outputs are checked, since what its forward adds is not known)."""
    conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
    return (_producer_base(conv) is nn.Conv2d and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm))
            and (fused or not _fused(bn)))


def fuse_conv_bn(model: nn.Module, example=None) -> list[tuple[str, str]]:
    """Pair each foldable Conv2d with its BatchNorm2d as a :class:`ConvBn2d`, in place.

    Unlike :func:`fold_bn` the BN keeps training; the BN module's place becomes ``nn.Identity``.
    ``example`` finds the pairs of models torch.fx cannot trace and checks that pairing keeps the
    model's outputs (see :func:`fold_bn`). A norm fused with its activation (timm's BatchNormAct2d) is
    paired where ``example`` checks it: a plain BatchNorm2d with its parameters and statistics trains in the
    ConvBn2d and the activation takes the norm's place. Other foldable pairs (Linear + BatchNorm1d,
    Conv1d/3d) are not paired here: call :func:`fold_bn` after it.
    """
    pairs = [p for p in find_conv_bn_pairs(model, example) if _trainable_pair(model, *p, fused=example is not None)]
    if example is not None:
        pairs, _ = _apply_checked(model, pairs, example, {}, _pair_for_training)
    else:
        for conv_name, bn_name in pairs:
            _pair_for_training(model, conv_name, bn_name)
    log.info("paired %d Conv2d/BatchNorm2d layers for training with folded weights", len(pairs))
    return pairs
