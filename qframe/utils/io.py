"""Atomic writes and checkpoint loading with clear errors.

Results and checkpoints are written to a temporary file in the same folder and moved into place
with :func:`os.replace`, so a killed process leaves either the old file or the new one, never half
of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from qframe.errors import QFrameError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partial file at ``path``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by qframe (or a plain ``state_dict``) with a one-line error.

    Returns a dict that has at least a ``"model"`` state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise QFrameError(f"checkpoint {str(path)!r} does not exist; give the path of a file written by torch.save")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QFrameError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint ({reason})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise QFrameError(
        f"checkpoint {str(path)!r} holds {type(obj).__name__}, not a model; expected a state_dict or a dict with a 'model' key"
    )
