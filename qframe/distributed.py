"""Multi-process (DistributedDataParallel) helpers for runs started with ``torchrun``.

``torchrun --nproc_per_node=N -m qframe ...`` starts N processes and tells each its place through
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). These
helpers read that, create the process group when it is needed (``gloo`` for CPU tensors, ``nccl``
for CUDA), and degrade to no-ops in an ordinary single process, so callers need no branches:
``barrier()`` returns at once, ``all_reduce_mean(t)`` returns ``t``, ``is_main()`` is True.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from qframe.errors import QFrameError

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    """An integer from the environment (torchrun sets these); a one-line error for garbage."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise QFrameError(f"environment variable {name}={value!r} is invalid; valid: an integer (torchrun sets it)") from None


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the run: the process group's size, else ``$WORLD_SIZE``, else 1."""
    if _initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's global rank (0 .. world_size-1); 0 in a single process."""
    if _initialized():
        return dist.get_rank()
    # a stray RANK in the environment of a single process must not make it a non-main rank
    return _env_int("RANK", 0) if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its own machine (selects its GPU); 0 in a single process."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """True when this process is one of several (started by torchrun, or a group already exists)."""
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """The device this rank computes on: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun,
    so every process on a machine gets its own GPU; anything else is returned unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def init_if_needed(device: torch.device | str = "cpu") -> bool:
    """Create the default process group if this is a multi-process run and none exists yet.

    The backend follows ``device``: ``nccl`` for CUDA, ``gloo`` otherwise. Rendezvous is torchrun's
    ``env://``. Returns True when the run is distributed (whether or not this call created the group).
    """
    if not is_distributed():
        return False
    if _initialized():
        return True
    if not dist.is_available():
        raise QFrameError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    device = local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        # nccl binds to the current CUDA device; without this every rank would use GPU 0
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://")
    log.info("process group: backend %s, rank %d of %d", backend, dist.get_rank(), dist.get_world_size())
    return True


def barrier() -> None:
    """Wait until every rank gets here; a no-op in a single process."""
    if not _initialized():
        return
    if dist.get_backend() == "nccl":
        # tell nccl which GPU to use for the barrier instead of letting it guess
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over all ranks (a new tensor); ``tensor`` itself in a single process."""
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    # nccl reduces only CUDA tensors, gloo is happiest with CPU ones: move there and back
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = tensor.detach().to(comm, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of ``tensor`` over all ranks (a new tensor); ``tensor`` itself in a single process.

    Integer tensors are averaged in float64 (a mean of integers is not an integer).
    """
    if not _initialized() or dist.get_world_size() == 1:
        return tensor
    total = all_reduce_sum(tensor if tensor.is_floating_point() else tensor.to(torch.float64))
    return total / dist.get_world_size()


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer of ``module`` (BatchNorm statistics, quantizer ranges) from rank ``src`` to all.

    DDP does this itself at the start of each training forward; calling it after the last step of
    an epoch makes evaluation and checkpoints identical on every rank too.
    """
    if not _initialized() or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


def cleanup() -> None:
    """Destroy the default process group if one exists (call once at the end of a torchrun process)."""
    if _initialized():
        dist.destroy_process_group()
