"""Fresh random kernel inputs shared by the kernel tests: one seed per run, printed in failures."""

import os

import torch

SEED = int.from_bytes(os.urandom(4), "little")
GEN = torch.Generator().manual_seed(SEED)


def randint(low, high, *shape):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=GEN)


def positive(*shape):
    return torch.rand(shape, generator=GEN) * 0.05 + 0.001


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
