"""QuantSpec: what a quantized tensor looks like, independent of how its range is found."""

from __future__ import annotations

from dataclasses import dataclass

from qframe.errors import QFrameError, check_field_types, one_of

GRANULARITIES = ("per_tensor", "per_channel", "per_group")
# How a value halfway between two codes rounds: to the even code (PyTorch, ONNX, TensorRT on the
# GPU) or away from zero (the Jetson DLA, NVIDIA/TensorRT#2222).
ROUNDINGS = ("half_even", "half_away")
MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, what: str, low: int = MIN_BITS, high: int = MAX_BITS, also: str = "") -> int:
    """``bits`` if it is an integer in ``low..high``, else a one-line QFrameError naming ``what``
    (``also``: other valid values, e.g. ", or null to keep the recipe's")."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise QFrameError(f"{what}={bits!r} is out of range; valid: integers {low}..{high}{also}")
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """The integer grid a tensor is mapped onto.

    Granularity uses one vocabulary everywhere in qframe:

    * ``per_tensor``: one scale for the whole tensor;
    * ``per_channel``: one scale per index along ``axis`` (weights: the output channel, axis 0);
    * ``per_group``: the tensor is viewed as rows along ``axis`` and each row is cut into groups of
      ``group_size`` consecutive elements (in memory order of the remaining dims), one scale per
      group. A row whose length is not a multiple of ``group_size`` ends in a shorter group (it is
      zero-padded internally, which never changes a range that already contains zero).

    ``symmetric`` fixes the zero point at 0; ``narrow_range`` drops the most negative code
    (int8 becomes [-127, 127]), which keeps a symmetric grid symmetric. ``rounding`` says where a
    value exactly halfway between two codes goes (``ROUNDINGS``).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: str = "per_tensor"
    axis: int = 0
    group_size: int | None = None
    rounding: str = "half_even"

    def __post_init__(self):
        check_field_types(self, 'QuantSpec', skip=('bits',))  # check_bits names the range
        if self.rounding not in ROUNDINGS:
            raise one_of("rounding", self.rounding, ROUNDINGS)
        check_bits(self.bits, "quantization bits")
        if self.granularity not in GRANULARITIES:
            raise one_of("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "per_group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise QFrameError(f"per_group quantization needs group_size >= 1, got group_size={self.group_size!r}")
        elif self.group_size is not None:
            raise QFrameError(
                f"group_size={self.group_size} is only valid with granularity='per_group', not {self.granularity!r}"
            )
        if self.narrow_range and not self.signed:
            raise QFrameError("narrow_range=True needs signed=True (it drops the most negative signed code)")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def short(self) -> str:
        """A compact label such as ``int4/per_channel/sym``."""
        kind = "int" if self.signed else "uint"
        gran = self.granularity if self.granularity != "per_group" else f"group{self.group_size}"
        away = "/half_away" if self.rounding == "half_away" else ""
        return f"{kind}{self.bits}/{gran}/{'sym' if self.symmetric else 'asym'}{away}"
