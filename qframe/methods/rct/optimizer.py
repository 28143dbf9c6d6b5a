"""The RCT update and its bit-width controller.

:class:`RCTOptimizer` is a ``torch.optim.SGD`` for the few float parameters left (biases) that
also owns the integer weights of the model's RCT layers. During backward each layer hands it
its weight gradient and the update is applied to the codes at once (the gradient is then
dropped):

    m  <- beta * m + (g + wd * w)            (momentum kept as int8 with per-block scales)
    d  <- lr * m / scale                     (the update measured in quantization steps)
    q  <- clamp(stochastic_round(q - d))     (small updates survive in expectation)

The controller watches ``G = mean|d|`` per layer. Every ``interval`` steps it adds a bit to a
layer whose average ``G`` is below ``underflow_below`` (its updates mostly round away) and drops
one from a layer whose ``G`` is above ``overflow_above`` (it learns fine with coarser steps),
within ``[bits_min, bits_max]``. Widening is exact; narrowing rounds stochastically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from qframe.errors import QFrameError
from qframe.methods.rct.storage import RCTLayer, check_bits, code_range, rct_layers
from qframe.quant.functional import stochastic_round

log = logging.getLogger(__name__)

MOMENTUM_BLOCK = 64  # elements per float32 scale of the int8 momentum


@dataclass
class RCTConfig:
    """RCT's own settings (``method.rct``); epochs and learning rate are ``method.epochs`` / ``method.lr``."""

    bits_init: int = 8  # weight bits every layer starts with (first and last layers too)
    bits_min: int = 4
    bits_max: int = 8  # up to 16 (int16 storage); above 8 the QAT comparison cannot follow
    interval: int = 25  # steps between controller decisions
    underflow_below: float = 0.01  # mean update below this many steps: add a bit
    overflow_above: float = 0.05  # mean update above this many steps: drop a bit
    momentum: float = 0.9  # 0 keeps no momentum at all
    weight_decay: float = 0.0
    grad_bits: Optional[int] = 8  # errors quantized to this width in backward; null keeps them float

    def __post_init__(self):
        for name in ("bits_init", "bits_min", "bits_max"):
            check_bits(getattr(self, name), f"method.rct.{name}")
        if not self.bits_min <= self.bits_init <= self.bits_max:
            raise QFrameError(f"method.rct needs bits_min <= bits_init <= bits_max, got {self.bits_min}, "
                              f"{self.bits_init}, {self.bits_max}")
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise QFrameError(f"method.rct.interval={self.interval!r} is invalid; valid: an integer >= 1")
        if not 0 <= self.underflow_below < self.overflow_above:
            raise QFrameError(f"method.rct needs 0 <= underflow_below < overflow_above, got "
                              f"{self.underflow_below} and {self.overflow_above}")
        if not 0 <= self.momentum < 1:
            raise QFrameError(f"method.rct.momentum={self.momentum!r} is invalid; valid: 0 <= momentum < 1")
        if self.grad_bits is not None:
            check_bits(self.grad_bits, "method.rct.grad_bits")


def _block_quantize(x: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes (shape of ``x``) and one float32 scale per MOMENTUM_BLOCK elements, stochastic rounding."""
    flat = x.reshape(-1)
    pad = -flat.numel() % MOMENTUM_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, MOMENTUM_BLOCK)
    scale = torch.clamp(blocks.abs().amax(1) / 127.0, min=1e-30)
    codes = torch.clamp(stochastic_round(blocks / scale[:, None], generator), -127, 127).to(torch.int8)
    return codes.view(-1)[: flat.numel()].view_as(x), scale


def _block_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).float()
    pad = -flat.numel() % MOMENTUM_BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, MOMENTUM_BLOCK) * scale[:, None]
    return blocks.view(-1)[: flat.numel()].view_as(codes)


class RCTOptimizer(torch.optim.SGD):
    """SGD for the float parameters plus the single-copy integer update of the RCT layers.

    The learning rate of ``param_groups[0]`` (which schedulers move) drives both. Call
    :meth:`step` once per batch after ``backward``: the integer layers were already updated
    during backward; ``step`` updates the float parameters and runs the controller.
    """

    def __init__(self, model: torch.nn.Module, lr: float, cfg: RCTConfig, seed: int = 0):
        self.layers = rct_layers(model)
        if not self.layers:
            raise QFrameError("RCT found no layer to train: quantize the model with qframe.methods.rct.prepare_rct first")
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:  # SGD refuses an empty list; a bias-free model still has a learning rate to schedule
            params = [torch.nn.Parameter(torch.zeros(()), requires_grad=False)]
        super().__init__(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)
        self.rct_state: dict[str, dict] = {}
        self.steps = 0
        self.history: dict[str, list[int]] = {name: [layer.bits] for name, layer in self.layers}
        self.history_steps: list[int] = [0]
        self.events: list[dict] = []
        for name, layer in self.layers:
            layer.updater = self._update_layer
            layer.generator = self.generator
            self.rct_state[name] = {"update_sum": 0.0, "update_count": 0}
        self._names = {id(layer): name for name, layer in self.layers}

    @torch.no_grad()
    def _update_layer(self, layer: RCTLayer, grad: torch.Tensor) -> None:
        cfg, lr = self.cfg, self.param_groups[0]["lr"]
        state = self.rct_state[self._names[id(layer)]]
        scale = layer.scale.view(-1, *([1] * (grad.dim() - 1)))
        if cfg.weight_decay:
            grad = grad + cfg.weight_decay * layer.weight
        if cfg.momentum:
            if "momentum_codes" in state:
                grad = cfg.momentum * _block_dequantize(state["momentum_codes"], state["momentum_scale"]) + grad
            state["momentum_codes"], state["momentum_scale"] = _block_quantize(grad, self.generator)
        steps = grad * (lr / scale)
        state["update_sum"] += steps.abs().mean().item()
        state["update_count"] += 1
        qmin, qmax = code_range(layer.bits)
        codes = torch.clamp(stochastic_round(layer.codes.float() - steps, self.generator), qmin, qmax)
        layer.codes.copy_(codes.to(layer.codes.dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps % self.cfg.interval == 0:
            self.adapt_bits()
        return loss

    def adapt_bits(self) -> list[dict]:
        """One controller decision for every layer (normally every ``interval`` steps); returns the changes."""
        cfg, changes = self.cfg, []
        for name, layer in self.layers:
            state = self.rct_state[name]
            if state["update_count"] == 0:
                continue
            mean_update = state["update_sum"] / state["update_count"]
            state["update_sum"], state["update_count"] = 0.0, 0
            old = layer.bits
            if mean_update < cfg.underflow_below and old < cfg.bits_max:
                layer.set_bits(old + 1, self.generator)
            elif mean_update > cfg.overflow_above and old > cfg.bits_min:
                layer.set_bits(old - 1, self.generator)
            if layer.bits != old:
                changes.append({"step": self.steps, "layer": name, "from": old, "to": layer.bits,
                                "mean_update_steps": mean_update})
        for name, layer in self.layers:
            self.history[name].append(layer.bits)
        self.history_steps.append(self.steps)
        self.events += changes
        if changes:
            log.debug("RCT step %d: %s", self.steps, ", ".join(f"{c['layer']} {c['from']}->{c['to']}" for c in changes))
        return changes

    def average_bits(self) -> float:
        """Weight bits averaged over all weight elements of the RCT layers."""
        total = sum(layer.codes.numel() for _, layer in self.layers)
        return sum(layer.codes.numel() * layer.bits for _, layer in self.layers) / total

    def state_dict(self):
        state = super().state_dict()
        state["rct"] = {"layers": self.rct_state, "steps": self.steps, "history": self.history,
                        "history_steps": self.history_steps, "events": self.events,
                        "generator": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        rct = state_dict.pop("rct", None)
        if rct is None:
            raise QFrameError("optimizer checkpoint has no RCT state; it was not written by RCT training")
        super().load_state_dict(state_dict)
        self.rct_state = rct["layers"]
        self.steps, self.history = rct["steps"], rct["history"]
        self.history_steps, self.events = rct["history_steps"], rct["events"]
        self.generator.set_state(rct["generator"])
