"""The budget of a mixed-precision recipe (``quant=auto``): what the per-layer widths must fit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from qframe.errors import QFrameError, check_field_types
from qframe.quant.spec import MAX_BITS, MIN_BITS

LIMITS = ("size_ratio", "size_bytes", "bitops_ratio")


@dataclass
class Budget:
    """Exactly one limit: ``size_ratio`` (model bytes as a fraction of the FP32 model's), ``size_bytes``,
    or ``bitops_ratio`` (bit operations, weight bits x input bits per multiply-accumulate, as a fraction
    of FP32's 32 x 32). The search gives each quantized layer one of ``widths`` for its weights;
    ``images`` calibration images measure the sensitivities; ``probes`` random projections of the
    output estimate how each layer's error reaches it."""

    size_ratio: Optional[float] = None
    size_bytes: Optional[int] = None
    bitops_ratio: Optional[float] = None
    widths: List[int] = field(default_factory=lambda: [2, 3, 4, 5, 6, 8])
    images: int = 256
    probes: int = 2

    def __post_init__(self):
        check_field_types(self, "quant.budget", skip=("images", "probes"))  # np.int64 widths, "0.2" as a ratio
        set_ = [name for name in LIMITS if getattr(self, name) is not None]
        if len(set_) != 1:
            raise QFrameError(f"quant.budget needs exactly one of {', '.join(LIMITS)}; got "
                              f"{', '.join(set_) if set_ else 'none'} (e.g. quant.budget.size_ratio=0.18)")
        for name in ("size_ratio", "bitops_ratio"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise QFrameError(f"quant.budget.{name}={value!r} is invalid; valid: a fraction 0 < x <= 1")
        if self.size_bytes is not None and self.size_bytes < 1:
            raise QFrameError(f"quant.budget.size_bytes={self.size_bytes!r} is invalid; valid: an integer >= 1")
        if not self.widths or any(isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS
                                  for b in self.widths):
            raise QFrameError(f"quant.budget.widths={list(self.widths)!r} is invalid; valid: a non-empty list of "
                              f"integers {MIN_BITS}..{MAX_BITS}")
        for name in ("images", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QFrameError(f"quant.budget.{name}={value!r} is invalid; valid: an integer >= 1")

    @property
    def kind(self) -> str:
        """``size`` or ``bitops``: what the limit counts."""
        return "bitops" if self.bitops_ratio is not None else "size"
