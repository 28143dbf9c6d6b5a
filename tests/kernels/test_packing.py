"""pack_int4 / unpack_int4: the byte layout every int4 kernel reads."""

import os

import pytest
import torch

from qframe.errors import QFrameError
from qframe.kernels.packing import pack_int4, packed_cols, unpack_int4

SEED = int.from_bytes(os.urandom(4), "little")
GEN = torch.Generator().manual_seed(SEED)


def random_int4(n: int, k: int) -> torch.Tensor:
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=GEN)
    w[0, 0], w[-1, -1] = -8, 7  # both ends of the range, every time
    return w


@pytest.mark.parametrize("n,k", [(1, 1), (1, 2), (7, 33), (16, 64), (5, 255)])
def test_round_trip_is_exact(n, k):
    w = random_int4(n, k)
    packed = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (k + 1) // 2) == (n, packed_cols(k))
    assert torch.equal(unpack_int4(packed, k), w), f"seed {SEED}"


def test_layout_low_nibble_holds_the_even_column():
    w = torch.tensor([[1, -2, -8, 7, 3]], dtype=torch.int8)
    # byte 0: low 1, high -2 (0xE); byte 1: low -8 (0x8), high 7; byte 2: low 3, zero pad.
    assert pack_int4(w).tolist() == [[0xE1, 0x78, 0x03]]


def test_layout_matches_nibble_arithmetic_on_random_values():
    w = random_int4(9, 31)
    packed = pack_int4(w).to(torch.int32)
    lo, hi = packed & 0xF, packed >> 4
    assert torch.equal(lo, w[:, 0::2].to(torch.int32) & 0xF), f"seed {SEED}"
    assert torch.equal(hi[:, :-1], w[:, 1::2].to(torch.int32) & 0xF), f"seed {SEED}"
    assert torch.all(hi[:, -1] == 0), "odd K must pad with a zero nibble"
    # what the kernels rely on: (nibble ^ 8) is w + 8 as an unsigned value
    assert torch.equal(lo ^ 8, w[:, 0::2].to(torch.int32) + 8)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 4), "int8"),
        (torch.zeros(4, dtype=torch.int8), "2-D"),
        (torch.tensor([[8, 0]], dtype=torch.int8), r"\[0, 8\].*\[-8, 7\]"),
        (torch.tensor([[-9, 0]], dtype=torch.int8), r"\[-9, 0\].*\[-8, 7\]"),
    ],
)
def test_pack_rejects_bad_input(bad, message):
    with pytest.raises(QFrameError, match=message):
        pack_int4(bad)


def test_unpack_rejects_bad_input():
    packed = pack_int4(random_int4(3, 6))
    with pytest.raises(QFrameError, match=r"k=8 .* valid: k=6 or k=5"):
        unpack_int4(packed, 8)
    with pytest.raises(QFrameError, match="uint8"):
        unpack_int4(packed.to(torch.int8), 6)
