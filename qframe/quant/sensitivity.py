"""Which layers a quantized model's error comes from: per-layer output SQNR.

For every module that owns quantizers (a quantized Conv / Linear: its weight and input; a residual
add, a pooling or an attention site placed by the target), the model's output is compared with the
float model's (every quantizer off) twice: with only that module's quantizers on (``alone_db``: the
error the module brings by itself) and with every quantizer on but that module's (``without_db``:
what keeping it float would win back). The worst layers are the candidates for 8 bits, float, or a
remedy (``LayerRule``, equalization, AdaRound).

    report = qframe.sensitivity(qmodel, calib_batches, num_batches=4)
    print(report.table(top=10))
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.quant.modules import quantizers
from qframe.utils.modules import eval_mode
from qframe.quant.frozen import frozen_weights


@dataclass(frozen=True)
class LayerSensitivity:
    """One module's share of the model's quantization error (SQNR in dB of the model's output)."""

    name: str  # the module owning the quantizers
    quantizers: tuple[str, ...]  # their names inside it: weight_quantizer, input_quantizer, skip_quantizer, ...
    alone_db: float  # only this module's quantizers on
    without_db: float  # every quantizer on except this module's


@dataclass(frozen=True)
class SensitivityReport:
    """Per-module output SQNR, the most harmful module (lowest ``alone_db``) first."""

    model_db: float  # every quantizer on
    batches: int
    layers: list[LayerSensitivity] = field(default_factory=list)

    def table(self, top: int | None = None) -> str:
        """A markdown table of the ``top`` most harmful modules (all by default)."""
        lines = [f"Output SQNR with every quantizer on: {_fmt(self.model_db)} dB over {self.batches} batches.", "",
                 "| module | quantizers | SQNR alone dB | SQNR all but this dB | gain if float dB |",
                 "|---|---|---|---|---|"]
        for row in self.layers[:top]:
            gain = row.without_db - self.model_db
            lines.append(f"| {row.name or '(model)'} | {', '.join(row.quantizers)} | {_fmt(row.alone_db)} | "
                         f"{_fmt(row.without_db)} | {_fmt(gain)} |")
        return "\n".join(lines)


def _fmt(db: float) -> str:
    return "inf" if math.isinf(db) else f"{db:.1f}"


def _compared_outputs(outputs):
    """What :func:`sensitivity` compares by default: a tensor output, its ``logits``, or every tensor of a
    tuple / list / dict output (a detector's boxes and scores), flattened and joined; else ``outputs``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else None
    if items is None:
        return outputs
    tensors = [_compared_outputs(item) for item in items if item is not None]
    tensors = [t.detach().float().reshape(-1) for t in tensors if isinstance(t, torch.Tensor)]
    return torch.cat(tensors) if tensors else outputs


@torch.no_grad()
@frozen_weights()
def sensitivity(qmodel: nn.Module, batches: Iterable, *, num_batches: int = 4, input_fn: Callable | None = None,
                output_fn: Callable | None = None) -> SensitivityReport:
    """Per-module output SQNR of a quantized, calibrated model (``qframe.ptq`` / ``qat``'s result) on
    ``num_batches`` of ``batches``; see the module docstring. Quantizers the caller turned off stay off
    and count as float. ``input_fn(batch)`` gives the model's inputs (default: ``batch[0]`` of a
    tuple, else the batch); ``output_fn(outputs)`` the tensor compared (default: the output itself, its
    ``logits``, or every tensor of a tuple / list / dict output, flattened and joined: the output of the
    largest values weighs most, so pass ``output_fn`` to score one of outputs of unlike scales, e.g. a
    detector's scores beside its boxes in pixels). The model is left as it was (training flag and quantizers).
    """
    from qframe.bisect import sqnr_db
    from qframe.errors import require_fake_quant, require_module
    from qframe.utils.batches import all_finite, check_batches, default_input_fn, run_batch, to_device

    require_module(qmodel, "qframe.sensitivity")
    require_fake_quant(qmodel, "qframe.sensitivity")
    check_batches(batches, "batches", input_fn)
    if not isinstance(num_batches, numbers.Integral) or isinstance(num_batches, bool) or num_batches < 1:
        raise QFrameError(f"num_batches={num_batches!r} is invalid; valid: an integer >= 1")
    num_batches = int(num_batches)
    active = [(name, q) for name, q in quantizers(qmodel) if q.enabled]
    if not active:
        raise QFrameError("the model has no quantizer turned on; valid: a model quantized by qframe.ptq, qat or "
                          "quantize_ + calibrate")
    groups: dict[str, list[tuple[str, object]]] = {}
    for name, q in active:
        owner, _, short = name.rpartition(".")
        # the quantizers of a module's placed call sites (attention matmuls, adds written as +, cats)
        # live in its qframe_sites child: they are that module's
        owner = owner.removesuffix("qframe_sites.quantizers").removesuffix(".")
        groups.setdefault(owner, []).append((short, q))
    input_fn = input_fn or default_input_fn
    output_fn = output_fn or _compared_outputs
    device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    inputs = [to_device(input_fn(batch), device) for batch in itertools.islice(batches, num_batches)]
    if not inputs:
        raise QFrameError("batches gave no batch; valid: an iterable of at least one batch of the model's inputs")
    for i, x in enumerate(inputs):
        if not all_finite(x):
            raise QFrameError(f"batch {i} contains NaN or Inf values; check the data and its normalisation")

    def switch(on) -> None:
        for _, q in active:
            q.enabled = on(q)

    def compared(i: int, x) -> np.ndarray:  # a batch that does not fit, or an output_fn of no tensor, is one line
        out = output_fn(run_batch(qmodel, x, i, what="batch"))
        if not isinstance(out, torch.Tensor):
            raise QFrameError(f"output_fn gave a {type(out).__name__}; valid: a function of the model's outputs "
                              "giving the tensor to compare, e.g. output_fn=lambda o: o.logits")
        return out.detach().float().cpu().numpy().ravel()

    def outputs():  # every batch's output, flattened into one array
        return np.concatenate([compared(i, x) for i, x in enumerate(inputs)])

    with eval_mode(qmodel):
        try:
            switch(lambda q: False)
            reference = outputs()
            switch(lambda q: True)
            model_db = sqnr_db(reference, outputs())
            rows = []
            for owner, members in groups.items():
                mine = {id(q) for _, q in members}
                switch(lambda q: id(q) in mine)
                alone = sqnr_db(reference, outputs())
                switch(lambda q: id(q) not in mine)
                without = sqnr_db(reference, outputs())
                rows.append(LayerSensitivity(owner, tuple(short for short, _ in members), alone, without))
        finally:
            switch(lambda q: True)
    rows.sort(key=lambda r: (r.alone_db, -r.without_db))
    return SensitivityReport(model_db, len(inputs), rows)
