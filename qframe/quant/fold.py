"""Batch-norm folding: merge an inference-mode BatchNorm2d into the Conv2d that feeds it.

``y = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta`` becomes a conv with
``w' = w * gamma / sqrt(var + eps)`` and ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``,
which is what TensorRT does at engine build time; quantizing ``w'`` is what deploys.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qframe.utils.modules import set_submodule

log = logging.getLogger(__name__)


def _conv_bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    graph = torch.fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and type(modules.get(src.target)) is nn.Conv2d
            and len(src.users) == 1  # the conv output feeds nothing but this BN
            and calls[src.target] == 1 == calls[node.target]  # neither module is shared
        ):
            pairs.append((src.target, node.target))
    return pairs


def _conv_bn_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if type(a) is nn.Conv2d and isinstance(b, nn.BatchNorm2d):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Names of (Conv2d, BatchNorm2d) pairs where the BN consumes the conv output alone.

    Uses a torch.fx trace of the forward pass; models that cannot be traced fall back to
    adjacent children of ``nn.Sequential`` containers.
    """
    try:
        return _conv_bn_pairs_fx(model)
    except Exception as exc:  # fx raises many types on untraceable control flow
        log.debug("fx trace failed (%s); folding adjacent Conv2d/BatchNorm2d in Sequential containers", exc)
        return _conv_bn_pairs_sequential(model)


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn``'s running statistics and affine parameters into ``conv`` in place."""
    inv_std = torch.rsqrt(bn.running_var.double() + bn.eps)
    gamma = bn.weight.double() if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(inv_std)
    factor = gamma * inv_std
    weight = conv.weight.double() * factor.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(factor)
    conv.weight.copy_(weight.to(conv.weight.dtype))
    new_bias = (beta + (bias - bn.running_mean.double()) * factor).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def fold_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every foldable BatchNorm2d of ``model`` into its conv, in place; return the pairs.

    The BN modules are replaced by ``nn.Identity`` so module names (and name filters) stay valid.
    Only valid for inference: the running statistics are what gets folded.
    """
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        fold_conv_bn(model.get_submodule(conv_name), model.get_submodule(bn_name))
        set_submodule(model, bn_name, nn.Identity())
    log.info("folded %d BatchNorm2d layers into their convolutions", len(pairs))
    return pairs


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
        new.weight, new.bias = conv.weight, conv.bias
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


def fuse_conv_bn(model: nn.Module) -> list[tuple[str, str]]:
    """Pair each foldable Conv2d with its BatchNorm2d as a :class:`ConvBn2d`, in place.

    Unlike :func:`fold_bn` the BN keeps training; the BN module's place becomes ``nn.Identity``.
    """
    pairs = find_conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        bn = model.get_submodule(bn_name)
        set_submodule(model, conv_name, ConvBn2d.from_pair(model.get_submodule(conv_name), bn))
        set_submodule(model, bn_name, nn.Identity())
    log.info("paired %d Conv2d/BatchNorm2d layers for training with folded weights", len(pairs))
    return pairs
