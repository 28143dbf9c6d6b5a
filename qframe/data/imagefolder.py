"""A folder of images with one sub-folder per class (as torchvision's ImageFolder), read into memory."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qframe.errors import QFrameError

log = logging.getLogger(__name__)

_PROGRESS_MIN_FILES = 500  # below this loading takes about a second; a bar would only be noise


def pillow_extensions() -> tuple[str, ...]:
    """Every file extension Pillow has an image reader for (``.png``, ``.tif``, ``.webp``, ...)."""
    from PIL import Image  # lazy: only this loader needs PIL

    Image.init()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def _normalise_extensions(extensions) -> tuple[str, ...]:
    if extensions is None:
        return pillow_extensions()
    if isinstance(extensions, str):
        extensions = (extensions,)
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    if not exts:
        raise QFrameError("extensions must name at least one file type, e.g. ('.png', '.jpg')")
    return exts


def find_images(root: str | None, extensions) -> tuple[list[Path], list[int], list[str]]:
    """Image paths, their class indices and the class names (sorted folder names) under ``root``."""
    if root is None:
        raise QFrameError("data.root must be set for data=imagefolder")
    base = Path(root).expanduser()
    if not base.is_dir():
        what = "is a file, not a folder" if base.exists() else "does not exist"
        raise QFrameError(f"data folder '{root}' {what}; valid: a folder with one sub-folder of images per class")
    exts = _normalise_extensions(extensions)
    # plain sorted order, as torchvision's ImageFolder, so class indices agree with it
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise QFrameError(f"data folder '{root}' has no class folders; put each class's images in its own sub-folder")
    if len(classes) < 2:
        raise QFrameError(f"data folder '{root}' has only one class folder ({classes[0]!r}); need at least 2 classes")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (base / name).iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts)
        if not files:
            shown = ", ".join(exts) if len(exts) <= 8 else ", ".join(exts[:8]) + f" (or {len(exts) - 8} more Pillow reads)"
            raise QFrameError(f"class folder '{base / name}' has no images with extensions {shown}")
        paths += files
        labels += [c] * len(files)
    return paths, labels, classes


def _read(path: Path, mode: str, image_size: int) -> np.ndarray:
    from PIL import Image  # lazy: only this loader needs PIL

    try:
        with Image.open(path) as im:
            im = im.convert(mode).resize((image_size, image_size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... for bad files
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QFrameError(f"cannot read image '{path}' ({reason})") from exc
    return arr / 255.0


def load_imagefolder_images(root: str | None, image_size: int, channels: int,
                            extensions) -> tuple[Tensor, Tensor, list[str]]:
    """All images under ``root`` as ``[N, channels, image_size, image_size]`` in [0, 1], labels, class names."""
    from tqdm import tqdm

    paths, labels, classes = find_images(root, extensions)
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.float32)
    for i, p in enumerate(tqdm(paths, desc=f"loading {root}", unit="img", leave=False,
                               disable=len(paths) < _PROGRESS_MIN_FILES)):
        arr = _read(p, mode, image_size)
        out[i] = arr[..., None] if channels == 1 else arr
    log.info("read %d images in %d classes from %s", len(paths), len(classes), root)
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), classes
