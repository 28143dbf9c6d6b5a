"""The RCT update and its bit-width controller.

:class:`RCTOptimizer` is a ``torch.optim.SGD`` for the few float parameters left (biases) that
also owns the integer weights of the model's RCT layers. During backward each layer hands it
its weight gradient and the update is applied to the codes at once (the gradient is then
dropped):

    m  <- beta * m + (g + wd * w)            (momentum kept as int8 with per-block scales)
    d  <- lr * m / scale                     (the update measured in quantization steps)
    q  <- clamp(stochastic_round(q - d))     (small updates survive in expectation)

Nothing of a weight's shape is ever float: the gradient arrives as an integer accumulator with
a scale (:mod:`.gemm`), and the update runs over tiles of at most ``TILE_ROWS_ELEMENTS`` elements.

Ranges adapt per output channel (``adapt_range``): where an update would push a channel's codes
past the code range, its scale grows by the smallest power of two that makes room and the codes
are re-rounded stochastically onto the coarser grid (exact in expectation; nothing clips); where
a channel's largest code uses at most a quarter of the range, its codes are multiplied by the
largest power of two that keeps them within half of it and the scale divided by the same (exact).
A zero-initialised layer therefore learns: its first update sets the range.

The controller watches ``G = mean|d|`` per layer, the update measured in quantization steps at
the schedule's base learning rate (``initial_lr``; a decaying schedule would otherwise widen every
layer at the end of training). Narrowing a layer by one bit halves its ``G``, widening doubles
it, so a layer settles at the width whose ``G`` lies in ``[underflow_below, overflow_above]``;
keep ``overflow_above / underflow_below`` above 2 (3 or more) so such a width exists. Every
``interval`` steps it adds a bit to a layer whose average ``G`` is below ``underflow_below`` (its updates mostly round away) and drops
one from a layer whose ``G`` is above ``overflow_above`` (it learns fine with coarser steps),
within ``[bits_min, bits_max]``. Widening is exact; narrowing rounds stochastically.

``target_bits`` adds a memory budget: after the rule has spoken, widenings that would take the
average weight width (over all weight elements) above the target are dropped, and layers are
narrowed, the largest ``G`` first, until the average fits (still one bit per layer per decision).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from qframe.errors import QFrameError, check_field_types
from qframe.methods.rct.storage import RCTLayer, check_bits, code_range, rct_layers
from qframe.quant.functional import stochastic_round

log = logging.getLogger(__name__)

MOMENTUM_BLOCK = 64  # elements of a weight row per float32 scale of the int8 momentum
TILE_ELEMENTS = 1 << 14  # weight elements the update handles at once (its float temporaries)


@dataclass
class RCTConfig:
    """RCT's own settings (``method.rct``); epochs and learning rate are ``method.epochs`` / ``method.lr``."""

    bits_init: int = 8  # weight bits every layer starts with (first and last layers too)
    bits_min: int = 4
    bits_max: int = 8  # up to 16 (int16 storage); above 8 the QAT comparison cannot follow
    interval: int = 25  # steps between controller decisions
    underflow_below: float = 0.003  # mean update below this many steps (at the base lr): add a bit
    overflow_above: float = 0.01  # mean update above this many steps (at the base lr): drop a bit
    target_bits: Optional[float] = None  # a memory budget: average weight bits the controller keeps to
    momentum: float = 0.9  # 0 keeps no momentum at all
    weight_decay: float = 0.0
    grad_bits: Optional[int] = 8  # errors quantized to this width in backward; null keeps them float
    integer_gemm: bool = True  # forward, input and weight gradient on the integer kernels (widths <= 8)
    adapt_range: bool = True  # per-channel power-of-two range growth / shrinkage of the codes
    from_scratch: bool = False  # the pipeline starts RCT (and its QAT comparison) from the untrained model
    compare_qat: bool = True  # the pipeline also trains QAT with RCT's optimizer, lr, epochs and start

    def __post_init__(self):
        check_field_types(self, 'RCTConfig')
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
        if not self.weight_decay >= 0:
            raise QFrameError(f"method.rct.weight_decay={self.weight_decay!r} is invalid; valid: a number >= 0")
        if not 0 <= self.momentum < 1:
            raise QFrameError(f"method.rct.momentum={self.momentum!r} is invalid; valid: 0 <= momentum < 1")
        if self.grad_bits is not None:
            check_bits(self.grad_bits, "method.rct.grad_bits")
        if self.target_bits is not None and not self.bits_min <= self.target_bits <= self.bits_max:
            raise QFrameError(f"method.rct.target_bits={self.target_bits!r} is invalid; valid: null or a number "
                              f"from bits_min ({self.bits_min}) to bits_max ({self.bits_max})")


def _tile_blocks(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """Rows ``[r, K]`` of a flattened weight (any dtype) as ``[r, blocks, MOMENTUM_BLOCK]``, zero-padded."""
    return torch.nn.functional.pad(t, (0, blocks * MOMENTUM_BLOCK - t.shape[1])).view(t.shape[0], blocks, MOMENTUM_BLOCK)


def _round_codes(q: torch.Tensor, generator) -> torch.Tensor:
    """Stochastic rounding of code values: ``floor(q)`` plus one with probability ``q - floor(q)``.

    Unlike ``floor(q + noise)`` it cannot round an integer up: at 14-16 bit codes the sum of a code
    and noise just below one rounds to the next integer in float32.
    """
    base = torch.floor(q)
    noise = torch.rand(q.shape, generator=generator, device=q.device, dtype=q.dtype)
    return base + (noise < q - base).to(q.dtype)


def _pow2_exponent(ratio: torch.Tensor, up: bool) -> torch.Tensor:
    """The integer exponent ``e`` (>= 0) with ``2**e`` the power of two at or above (``up``) / below ``ratio``."""
    e = torch.log2(ratio)
    e = torch.ceil(e - 1e-6) if up else torch.floor(e + 1e-6)
    return torch.clamp(e, min=0).to(torch.int32)


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
        self.statistic: dict[str, list[float]] = {name: [] for name, _ in self.layers}  # G at every decision
        for name, layer in self.layers:
            layer.updater = self._update_layer
            layer.generator = self.generator
            self.rct_state[name] = {"update_sum": 0.0, "update_count": 0}
        self._names = {id(layer): name for name, layer in self.layers}

    @torch.no_grad()
    def _update_layer(self, layer: RCTLayer, grad: torch.Tensor, grad_scale: torch.Tensor | float = 1.0) -> None:
        """Apply one update to ``layer``'s codes: ``grad`` times ``grad_scale`` is the weight gradient
        (an integer accumulator from the integer GEMMs, or a float gradient), shaped like the codes
        or ``[N, K]``. Runs over row tiles; see the module docstring for the rule."""
        cfg, lr = self.cfg, self.param_groups[0]["lr"]
        state = self.rct_state[self._names[id(layer)]]
        n = layer.codes.shape[0]
        codes2d, grad2d = layer.codes.view(n, -1), grad.reshape(n, -1)
        k = codes2d.shape[1]
        blocks = -(-k // MOMENTUM_BLOCK)
        if cfg.momentum and "momentum_codes" not in state:
            state["momentum_codes"] = torch.zeros_like(codes2d, dtype=torch.int8)
            state["momentum_scale"] = torch.zeros((n, blocks), device=codes2d.device)
        qmin, qmax = code_range(layer.bits)
        rows = max(1, TILE_ELEMENTS // (blocks * MOMENTUM_BLOCK))
        total = 0.0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            scale = layer.scale[r0:r1].view(-1, 1, 1)
            g = _tile_blocks(grad2d[r0:r1], blocks).float() * grad_scale
            q = _tile_blocks(codes2d[r0:r1], blocks).float()
            if cfg.weight_decay:
                g += cfg.weight_decay * q * scale
            if cfg.momentum:
                m_codes = _tile_blocks(state["momentum_codes"][r0:r1], blocks)
                g += cfg.momentum * m_codes.float() * state["momentum_scale"][r0:r1, :, None]
                m_scale = torch.clamp(g.abs().amax(2) / 127.0, min=1e-30)
                m_new = torch.clamp(stochastic_round(g / m_scale[..., None], self.generator), -127, 127)
                state["momentum_codes"][r0:r1] = m_new.to(torch.int8).view(r1 - r0, -1)[:, :k]
                state["momentum_scale"][r0:r1] = m_scale
            steps = g.mul_(lr / scale)
            total += steps.abs().sum().item()
            q -= steps
            if cfg.adapt_range:
                grow = _pow2_exponent(torch.clamp(q.abs().amax((1, 2)) / (qmax + 0.5), min=1.0), up=True)
                if bool(grow.any()):
                    factor = torch.pow(2.0, grow.float())
                    q /= factor.view(-1, 1, 1)
                    layer.scale[r0:r1] *= factor
            q = torch.clamp(_round_codes(q, self.generator), qmin, qmax)
            if cfg.adapt_range and qmax >= 4:
                peak = q.abs().amax((1, 2))
                small = (peak > 0) & (peak <= qmax // 4)
                if bool(small.any()):
                    shrink = torch.where(small, _pow2_exponent((qmax // 2) / peak.clamp(min=1), up=False), 0)
                    q *= torch.pow(2.0, shrink.float()).view(-1, 1, 1)
                    layer.scale[r0:r1] /= torch.pow(2.0, shrink.float())
            codes2d[r0:r1] = q.to(layer.codes.dtype).view(r1 - r0, -1)[:, :k]
        # G is judged at the schedule's base learning rate, so warm-up and decay do not move widths
        base_lr = self.param_groups[0].get("initial_lr", lr)
        state["update_sum"] += total / codes2d.numel() * (base_lr / lr if lr > 0 else 1.0)
        state["update_count"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        self.steps += 1
        if self.steps % self.cfg.interval == 0:
            self.adapt_bits()
        return loss

    def adapt_bits(self) -> list[dict]:
        """One controller decision for every layer (normally every ``interval`` steps); returns the changes.

        Each layer moves by at most one bit: up where its ``G`` is below ``underflow_below``, down
        where it is above ``overflow_above``. With ``target_bits`` the decision then keeps to the
        budget (:meth:`_fit_budget`)."""
        cfg, changes, stat = self.cfg, [], {}
        for name, layer in self.layers:
            state = self.rct_state[name]
            if state["update_count"] == 0:
                continue
            stat[name] = state["update_sum"] / state["update_count"]
            state["update_sum"], state["update_count"] = 0.0, 0
            self.statistic[name].append(stat[name])
        moves = {}
        for name, layer in self.layers:
            if name in stat and stat[name] < cfg.underflow_below and layer.bits < cfg.bits_max:
                moves[name] = 1
            elif name in stat and stat[name] > cfg.overflow_above and layer.bits > cfg.bits_min:
                moves[name] = -1
        if cfg.target_bits is not None:
            self._fit_budget(moves, stat)
        for name, layer in self.layers:
            old = layer.bits
            if moves.get(name):
                layer.set_bits(old + moves[name], self.generator)
                changes.append({"step": self.steps, "layer": name, "from": old, "to": layer.bits,
                                "mean_update_steps": stat.get(name), "budget": moves[name] != self._rule(name, stat)})
        for name, layer in self.layers:
            self.history[name].append(layer.bits)
        self.history_steps.append(self.steps)
        self.events += changes
        if changes:
            log.debug("RCT step %d: %s", self.steps, ", ".join(f"{c['layer']} {c['from']}->{c['to']}" for c in changes))
        return changes

    def _rule(self, name: str, stat: dict) -> int:
        """The threshold rule's move for one layer, ignoring the bounds (for the log)."""
        g = stat.get(name)
        return 0 if g is None else 1 if g < self.cfg.underflow_below else -1 if g > self.cfg.overflow_above else 0

    def _fit_budget(self, moves: dict, stat: dict) -> None:
        """Adjust ``moves`` so the average width after them is at most ``target_bits`` where one bit per
        layer can get there: widenings are dropped first (the layer with the largest ``G`` first, the
        least starved of precision), then layers are narrowed, the largest ``G`` first (the ones that
        learn with the coarsest steps; a layer without a statistic counts as G = 0)."""
        cfg = self.cfg
        size = {name: layer.codes.numel() for name, layer in self.layers}
        budget = cfg.target_bits * sum(size.values())

        def total() -> float:
            return sum(size[n] * (layer.bits + moves.get(n, 0)) for n, layer in self.layers)

        for name in sorted((n for n, m in moves.items() if m > 0), key=lambda n: -stat.get(n, 0.0)):
            if total() <= budget:
                return
            del moves[name]
        candidates = [n for n, layer in self.layers if not moves.get(n) and layer.bits > cfg.bits_min]
        for name in sorted(candidates, key=lambda n: -stat.get(n, 0.0)):
            if total() <= budget:
                return
            moves[name] = -1

    def average_bits(self) -> float:
        """Weight bits averaged over all weight elements of the RCT layers."""
        total = sum(layer.codes.numel() for _, layer in self.layers)
        return sum(layer.codes.numel() * layer.bits for _, layer in self.layers) / total

    def state_dict(self):
        state = super().state_dict()
        state["rct"] = {"layers": self.rct_state, "steps": self.steps, "history": self.history,
                        "statistic": self.statistic,
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
        self.statistic = rct.get("statistic", self.statistic)
        self.generator.set_state(rct["generator"])
