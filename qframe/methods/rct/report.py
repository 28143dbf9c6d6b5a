"""What an RCT run reports: bit widths over training, memory against FP32 and QAT, estimated energy."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from qframe.methods.qat import QATConfig, prepare_qat
from qframe.methods.rct.accounting import measure_training
from qframe.methods.rct.energy import executed_step_energy, training_step_energy
from qframe.methods.rct.method import prepare_rct
from qframe.methods.rct.optimizer import RCTConfig, RCTOptimizer
from qframe.methods.rct.storage import rct_layers
from qframe.train import TrainConfig, build_optimizer
from qframe.utils.modules import copy_model


def average_bits_history(optimizer: RCTOptimizer) -> list[float]:
    """Weight bits averaged over all weight elements, at every controller decision."""
    sizes = {name: layer.codes.numel() for name, layer in optimizer.layers}
    total = sum(sizes.values())
    length = len(optimizer.history_steps)
    return [sum(sizes[n] * optimizer.history[n][i] for n in sizes) / total for i in range(length)]


OPTIMIZERS = ("sgd", "adamw")


def compare_training_memory(model: nn.Module, recipe, batch: tuple[torch.Tensor, torch.Tensor], *,
                            train: TrainConfig, qat_cfg: QATConfig, rct_cfg: RCTConfig, rct_lr: float,
                            final_bits: dict[str, int] | None = None, device="cpu") -> dict:
    """Parameter / optimizer-state bytes and one step's peak memory of FP32 training, QAT and RCT.

    FP32 and QAT are each measured with SGD with momentum (``fp32_sgd``, ``qat_sgd``: the
    optimizer RCT uses, with RCT's momentum) and with AdamW (``fp32_adamw``, ``qat_adamw``); QAT
    is the calibrated fake-quant model with FP32 master weights; RCT has integer weights at
    ``final_bits`` and its own optimizer. Each is measured over two steps on ``batch``, which
    also serves as the calibration batch. ``ratio_vs_qat_same_optimizer`` is RCT's parameter +
    optimizer bytes over ``qat_sgd``'s, ``peak_ratio_vs_qat_same_optimizer`` the same for the
    step's peak; ``fp32`` and ``qat`` repeat the entries of ``train.optimizer``.
    """
    x, y = (t.to(device) for t in batch)
    calib = [(x, y)]
    out = {}
    for opt in OPTIMIZERS:
        cfg = dataclasses.replace(train, optimizer=opt, momentum=rct_cfg.momentum or train.momentum)
        fp32 = copy_model(model).to(device)
        out[f"fp32_{opt}"] = measure_training(fp32, build_optimizer(fp32, cfg), x, y)
        del fp32
        qat_model = prepare_qat(model, recipe, calib, 1, qat_cfg, device)
        out[f"qat_{opt}"] = measure_training(qat_model, build_optimizer(qat_model, dataclasses.replace(cfg, lr=qat_cfg.lr)),
                                             x, y)
        del qat_model
    own = train.optimizer if train.optimizer in OPTIMIZERS else "adamw"
    out["fp32"], out["qat"] = out[f"fp32_{own}"], out[f"qat_{own}"]
    rct_model = prepare_rct(model, recipe, calib, 1, rct_cfg, device)
    for name, layer in rct_layers(rct_model):
        if final_bits and name in final_bits:
            layer.set_bits(final_bits[name])
    out["rct"] = measure_training(rct_model, RCTOptimizer(rct_model, rct_lr, rct_cfg), x, y)
    for key in ("fp32", "rct"):
        out[f"{key}_vs_qat_state"] = out[key]["total_bytes"] / out["qat"]["total_bytes"]
    same = out["qat_sgd"]
    out["ratio_vs_qat_same_optimizer"] = out["rct"]["total_bytes"] / same["total_bytes"]
    if out["rct"]["step_peak_bytes"] is not None and same["step_peak_bytes"]:
        out["peak_ratio_vs_qat_same_optimizer"] = out["rct"]["step_peak_bytes"] / same["step_peak_bytes"]
    return out


def _detached_copy(model: nn.Module) -> nn.Module:
    """A deep copy of an RCT model without its optimizer hooks (which would copy the optimizer too)."""
    layers = rct_layers(model)
    saved = [(layer.updater, layer.generator) for _, layer in layers]
    for _, layer in layers:
        layer.updater = layer.generator = None
    try:
        return copy.deepcopy(model)
    finally:
        for (_, layer), (updater, generator) in zip(layers, saved):
            layer.updater, layer.generator = updater, generator


def rct_summary(fp32_model: nn.Module, rct_model: nn.Module, optimizer: RCTOptimizer, recipe, data, cfg, device) -> dict:
    """The ``rct`` section of a run's metrics: bits, their history, memory and the energy estimate."""
    m = cfg.method
    x, y = next(iter(data.loader("train", cfg.train.batch_size, shuffle=True, seed=cfg.seed, drop_last=True)))
    bits = {name: layer.bits for name, layer in rct_layers(rct_model)}
    memory = compare_training_memory(fp32_model, recipe, (x, y), train=cfg.train, qat_cfg=m.qat_config(),
                                     rct_cfg=m.rct, rct_lr=m.lr, final_bits=bits, device=device)
    example = x.to(device)
    fp32_energy = training_step_energy(fp32_model, example, grad_bits=None,
                                       state_bytes=memory["fp32"]["optimizer_state_bytes"])
    probe = _detached_copy(rct_model)  # the counted step updates the model it runs on
    rct_energy = executed_step_energy(probe, RCTOptimizer(probe, m.lr, m.rct), example, y.to(device),
                                      state_bytes=memory["rct"]["optimizer_state_bytes"],
                                      param_bytes=memory["rct"]["parameter_bytes"])
    del probe
    return {
        "final_bits": bits,
        "float_master_layers": dict(getattr(rct_model, "qframe_rct_float_master", {})),  # {layer: why}
        "average_bits": optimizer.average_bits(),
        "bit_history": optimizer.history,
        "history_steps": optimizer.history_steps,
        "average_bits_history": average_bits_history(optimizer),
        "bit_changes": len(optimizer.events),
        "statistic": optimizer.statistic,  # the controller's G (mean update in steps) per layer, per decision
        "events": optimizer.events,
        "steps": optimizer.steps,
        "memory": memory,
        "energy_estimate": {
            "fp32": fp32_energy, "rct": rct_energy,
            "gemm_saving": 1 - rct_energy["gemm_uj"] / fp32_energy["gemm_uj"],
            "total_saving": 1 - rct_energy["total_uj"] / fp32_energy["total_uj"],
            "batch": int(example.shape[0]),
        },
        "config": dataclasses.asdict(m.rct),
    }
