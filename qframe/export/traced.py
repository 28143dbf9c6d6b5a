"""What an export's trace left out of the file: the calibrated quantizers it never ran.

Tracing records the ops one forward pass runs on the example. Where the forward branches on tensor values
(``if x.mean() > 0: ...``), the file holds the branch the example took; where a quantized op runs inside a
``torch.jit.script_if_tracing`` function, the trace records the function and not its quantizer. Either way the
file computes something else than the model, without an error. torch's tracer warns at every tensor it turns
into a Python value, shapes included (every transformers model does so on its input's channel count), so its
warnings do not tell such a branch apart; a calibrated quantizer that the trace never ran does.
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn

log = logging.getLogger(__name__)


@contextlib.contextmanager
def traced_parts(model: nn.Module, what: str):
    """Around an export of ``model``: a warning naming the calibrated quantizers the trace did not run."""
    from qframe.quant.modules import quantizers

    ran: set[str] = set()
    used = {n: q for n, q in quantizers(model) if q.enabled and (q.calibrated or q.dynamic)}
    hooks = [q.register_forward_pre_hook(lambda _m, _a, name=n: ran.add(name)) for n, q in used.items()]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
    if missed := [n for n in used if n not in ran]:
        log.warning("%s: %d calibrated quantizers never ran while the example was traced, so the file has no Q/DQ "
                    "for them and may compute something else than the model (a branch on tensor values that the "
                    "example did not take, or an op inside a script_if_tracing function): %s; check the file with "
                    "ort_parity on inputs that take the other branches", what, len(missed),
                    ", ".join(missed[:6]) + (" ..." if len(missed) > 6 else ""))
