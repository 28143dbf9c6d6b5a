"""An energy model for the GEMMs and parameter traffic of a training step, by operand bit width.

Every number it produces is an **estimate** (``estimate: True`` in its output): operation counts
measured on the real model times per-operation energies of a 45 nm process, not a measurement.

Per-operation energies (pJ) are M. Horowitz, "Computing's energy problem (and what we can do
about it)", ISSCC 2014, table of 45 nm figures: integer add 8/16/32 bit 0.03/0.05/0.1, integer
multiply 8/32 bit 0.2/3.1, float add 16/32 bit 0.4/0.9, float multiply 16/32 bit 1.1/3.7, and a
32-bit DRAM access 640 pJ (the figure Han et al., "EIE", ISCA 2016, quote from the same source).

Rules: a multiply-accumulate with two integer operands of at most ``b`` bits costs an integer
multiply scaled from the 8-bit figure by ``(b/8)**2`` (array multipliers grow with the square of
the width; the rule gives 3.2 pJ at 32 bits against Horowitz's 3.1) plus a 32-bit integer add
(the accumulator). Any float operand makes it an fp32 MAC (3.7 + 0.9 pJ). A training step runs
three GEMMs per layer with the same MAC count: forward (weights x inputs), input gradient
(weights x errors) and weight gradient (inputs x errors). Parameter traffic counts the parameter
bytes read twice (forward, backward) and parameters plus optimizer state read and written once
by the update, at the DRAM figure per 32 bits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from qframe.methods.rct.storage import RCTLayer
from qframe.quant.fold import TRANSPOSED
from qframe.quant.modules import QUANT_LAYERS
from qframe.utils.modules import eval_mode

HOROWITZ_45NM_PJ = {
    "int8_add": 0.03, "int16_add": 0.05, "int32_add": 0.1, "int8_mult": 0.2, "int32_mult": 3.1,
    "fp16_add": 0.4, "fp32_add": 0.9, "fp16_mult": 1.1, "fp32_mult": 3.7, "dram_32bit": 640.0,
}
SOURCE = "Horowitz, ISSCC 2014, 45 nm (DRAM per 32 bits as quoted by Han et al., ISCA 2016)"


def mac_pj(a_bits: Optional[int], b_bits: Optional[int]) -> float:
    """Estimated energy of one multiply-accumulate; ``None`` marks a float (fp32) operand."""
    e = HOROWITZ_45NM_PJ
    if a_bits is None or b_bits is None:
        return e["fp32_mult"] + e["fp32_add"]
    bits = max(a_bits, b_bits)
    return e["int8_mult"] * (bits / 8) ** 2 + e["int32_add"]


def _bits_of(module: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """(weight bits, input bits) a layer computes with; None where the operand is float."""
    iq = getattr(module, "input_quantizer", None)
    a_bits = iq.spec.bits if iq is not None and iq.enabled and iq.calibrated else None
    if isinstance(module, RCTLayer):
        return module.bits, a_bits
    # fake quantization still multiplies in fp32: only integer weight storage makes a MAC integer
    return None, None


@torch.no_grad()
def layer_macs(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """MACs of each Conv2d / Linear (plain, fake-quant or RCT) for one forward pass of ``example``."""
    rows, hooks = [], []

    def hook(name):
        def fn(module, inputs, output):
            x = inputs[0]
            if isinstance(module, (nn.Linear,)) or (isinstance(module, RCTLayer) and module.codes.dim() == 2):
                macs = output.numel() * x.shape[-1]
            elif isinstance(module, TRANSPOSED):  # each input value reaches out/groups x kernel outputs
                macs = x.numel() * module.weight[0].numel()
            else:
                w = module.codes if isinstance(module, RCTLayer) else module.weight
                macs = output.numel() * w[0].numel()
            w_bits, a_bits = _bits_of(module)
            rows.append({"layer": name, "macs": int(macs), "weight_bits": w_bits, "input_bits": a_bits})
        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, RCTLayer) + QUANT_LAYERS):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with eval_mode(model):
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return rows


def training_step_energy(model: nn.Module, example: torch.Tensor, *, grad_bits: Optional[int] = None,
                         state_bytes: int = 0, param_bytes: int | None = None) -> dict:
    """Estimated energy (microjoules) of one training step on the batch ``example``.

    ``grad_bits``: width of the backward errors (None: float). ``param_bytes`` defaults to the
    bytes of the model's parameters and buffers as stored.
    """
    rows = layer_macs(model, example)
    gemm_pj = 0.0
    for r in rows:
        w, a = r["weight_bits"], r["input_bits"]
        gemm_pj += r["macs"] * (mac_pj(w, a) + mac_pj(w, grad_bits) + mac_pj(a, grad_bits))
    if param_bytes is None:
        param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    words = (2 * param_bytes + 2 * (param_bytes + state_bytes)) / 4
    movement_pj = words * HOROWITZ_45NM_PJ["dram_32bit"]
    return {"estimate": True, "source": SOURCE, "gemm_uj": gemm_pj * 1e-6, "param_movement_uj": movement_pj * 1e-6,
            "total_uj": (gemm_pj + movement_pj) * 1e-6, "macs_per_gemm": sum(r["macs"] for r in rows)}


def executed_step_energy(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor, *, state_bytes: int = 0,
                         param_bytes: int | None = None) -> dict:
    """Estimated energy (microjoules) of one RCT training step from the integer products that ran.

    One step of ``model`` with ``optimizer`` on ``(x, y)`` runs under
    :func:`qframe.methods.rct.gemm.count_macs`; every multiply-add counted there is an int8 x int8
    MAC with an int32 sum (priced by :func:`mac_pj` at 8 bits), every other multiply-add of the
    three GEMMs (layers on the float path) is priced as fp32 from :func:`layer_macs`. Note that
    the step updates the model.
    """
    from qframe.methods.rct.gemm import count_macs

    on_float = {n for n, m in model.named_modules() if isinstance(m, RCTLayer) and not m._integer()}
    float_macs = 3 * sum(r["macs"] for r in layer_macs(model, x) if r["layer"] in on_float)
    model.train()
    with count_macs() as counts:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    int_macs = counts["int8_gemm"] + counts["int8_depthwise"]
    gemm_pj = int_macs * mac_pj(8, 8) + float_macs * mac_pj(None, None)
    if param_bytes is None:
        param_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    movement_pj = (2 * param_bytes + 2 * (param_bytes + state_bytes)) / 4 * HOROWITZ_45NM_PJ["dram_32bit"]
    return {"estimate": True, "source": SOURCE, "counted": "executed int8 x int8 MACs of one training step",
            "int8_macs": int_macs, "fp32_macs": float_macs, "gemm_uj": gemm_pj * 1e-6,
            "param_movement_uj": movement_pj * 1e-6, "total_uj": (gemm_pj + movement_pj) * 1e-6}

