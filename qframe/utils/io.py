"""Atomic writes and checkpoint loading with clear errors.

Results and checkpoints are written to a temporary file in the same folder and moved into place
with :func:`os.replace`, so a killed process leaves either the old file or the new one, never half
of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from qframe.errors import QFrameError, first_line


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_folder(path: str | os.PathLike) -> Path:
    """Create the folder that will hold file ``path``; a one-line QFrameError where a file is in the way or the
    file system refuses."""
    folder = Path(path).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), folder)
        raise QFrameError(f"cannot write '{path}': '{blocker}' is a file, not a folder; give a path in a folder") from None
    except OSError as exc:
        raise unwritable(path, exc) from None
    return folder


def unwritable(path, exc: OSError) -> QFrameError:
    """One line for a file system that refuses to let ``path`` be written (permissions, a read-only or full disk)."""
    return QFrameError(f"cannot write '{path}': {exc.strerror or type(exc).__name__}; valid: a path in a folder you "
                       "can write to")


def _atomic_write(path: str | os.PathLike, write, mode: int = 0o666) -> Path:
    path = Path(path)
    ensure_folder(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise unwritable(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# What a killed writer leaves: _atomic_write's ".<name>.<8 random characters>.tmp" files and
# export_onnx's ".<name>.onnx.<8 random characters>" scratch folders (tempfile's naming).
_STALE_FILE = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_STALE_FOLDER = re.compile(r"^\..+\.onnx\.[a-z0-9_]{8}$")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and scratch folders a killed run left in ``folder`` (a run directory)
    and its direct sub-folders (checkpoints/, the export folders): they are never under a final name,
    and nothing reads them. Deeper folders are not searched. Returns what was removed."""
    import shutil

    folder = Path(folder)
    removed = []
    subfolders = [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and not _STALE_FOLDER.match(p.name)]
    for place in [folder, *subfolders]:
        for entry in place.iterdir():
            if entry.is_file() and _STALE_FILE.match(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and _STALE_FOLDER.match(entry.name):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` that never leaves a partial file at ``path``."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike, executable: bool = False) -> Path:
    return _atomic_write(path, lambda f: f.write(text.encode()), 0o777 if executable else 0o666)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    return _atomic_write(path, lambda f: f.write(data))


def atomic_copy(src: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``shutil.copyfile`` that never leaves a partial copy at ``path``."""
    import shutil

    def copy(f):
        with open(src, "rb") as source:
            shutil.copyfileobj(source, f, 1 << 20)

    return _atomic_write(path, copy)


def atomic_write_npz(arrays: dict, path: str | os.PathLike) -> Path:
    """``numpy.savez_compressed`` that never leaves a partial archive at ``path``."""
    import numpy as np

    return _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def atomic_onnx_save(graph, path: str | os.PathLike) -> Path:
    """``onnx.save`` (a ModelProto under 2 GiB, all in one file) that never leaves a partial file at ``path``."""
    return atomic_write_bytes(graph.SerializeToString(), path)


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` into ``path`` (format from its suffix) that never leaves a partial image."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda f: fig.savefig(f, format=fmt, **kwargs))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by qframe (or a plain ``state_dict``) with a one-line error.

    Returns a dict that has at least a ``"model"`` state dict.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise QFrameError(f"checkpoint {str(path)!r} {what}; give the path of a file written by torch.save")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        reason = _load_failure(path, exc)
        raise QFrameError(f"checkpoint {str(path)!r} is corrupt or not a torch checkpoint ({reason})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": obj}
    raise QFrameError(
        f"checkpoint {str(path)!r} holds {type(obj).__name__}, not a model; expected a state_dict or a dict with a 'model' key"
    )


def _load_failure(path: Path, exc: Exception) -> str:
    """A short reason for a file torch.load cannot read (its own messages run to paragraphs)."""
    with open(path, "rb") as f:
        head = f.read(2)
    text = str(exc).strip()
    if not head:
        return "the file is empty"
    if head != b"PK" and not head.startswith(b"\x80"):
        return "neither a torch.save zip archive nor a pickle"
    if "central directory" in text or "zip archive" in text:
        return "truncated or damaged zip archive"
    if text.startswith("Weights only load failed"):
        return "it holds Python objects, not only tensors; save model.state_dict() instead"
    return first_line(exc)


def state_mismatch(model: torch.nn.Module, state: dict) -> str | None:
    """A one-line summary of the keys and shapes in which ``state`` and ``model`` differ; None when none do."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    # an empty buffer (an observer's range before calibration) takes the saved tensor's shape on loading
    shapes = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and own[k].numel() > 0
              and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"{len(shapes)} shape mismatches" if shapes else "", f"{len(missing)} missing keys" if missing else "",
             f"{len(unexpected)} unexpected keys" if unexpected else ""]
    first = (f"e.g. {shapes[0]} is {tuple(state[shapes[0]].shape)} in the checkpoint, {tuple(own[shapes[0]].shape)} "
             "in the model") if shapes else f"e.g. {(missing or unexpected)[0]!r}"
    return f"{', '.join(p for p in parts if p)} ({first})"


def unwrapped(state: dict) -> dict:
    """``state`` without the ``module.`` prefix a DistributedDataParallel / DataParallel wrapper gives every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def load_model_state(model: torch.nn.Module, state: dict, source: str, hint: str) -> torch.nn.Module:
    """``model.load_state_dict(state)`` with a one-line QFrameError naming ``source`` when they differ.

    ``hint`` says what would be valid (e.g. the model the checkpoint was written for). Quantized
    modules register some buffers only when loading them, so the check is torch's own; the message
    summarises what differs. After the error the model may hold part of ``state``.
    """
    state = unwrapped(state)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        mismatch = state_mismatch(model, state) or (details[0] if details else str(exc).splitlines()[0])
        raise QFrameError(f"{source} does not fit {type(model).__name__}: {mismatch[:300]}; {hint}") from None
    return model
