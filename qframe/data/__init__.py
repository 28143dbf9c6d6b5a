"""Data sets held in memory as normalised tensors: ``digits`` (scikit-learn) and ``imagefolder``.

``build_data`` returns a :class:`DataBundle` with stratified, seed-deterministic train/val/test
splits normalised with the train split's per-channel mean and std.
"""

from __future__ import annotations

import os

from qframe.data.common import DataBundle, augment_batch, check_fractions, make_bundle, stratified_split
from qframe.errors import QFrameError, one_of

DATASETS = ("digits", "imagefolder")


def build_data(name: str, *, root: str | os.PathLike | None = None, image_size: int = 32, channels: int = 1,
               val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
               extensions: tuple | None = None) -> DataBundle:
    """Load data set ``name`` resized to ``image_size`` with ``channels`` (1 or 3) and split it.

    ``root`` is the class-per-folder directory for ``imagefolder`` (``digits`` refuses one), whose
    files with one of ``extensions`` are read (default: every extension Pillow opens, e.g. PGM,
    PNG, JPEG, BMP, TIFF, GIF, WebP).
    The same ``seed`` gives the same split on every machine.
    """
    if name not in DATASETS:
        raise one_of("data set", name, DATASETS)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise QFrameError(f"image_size must be an integer >= 8, got {image_size!r}")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise QFrameError(f"channels must be 1 or 3, got {channels!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise QFrameError(f"seed must be an integer, got {seed!r}")
    check_fractions(val_fraction, test_fraction)
    if name == "digits" and (root is not None or extensions is not None):
        given = f"root={str(root)!r}" if root is not None else f"extensions={extensions!r}"
        raise QFrameError(f"{given} is for data set 'imagefolder'; 'digits' is built in and reads no folder; valid: "
                          "build_data('imagefolder', root=<folder>), or no root")
    if name == "digits":
        from qframe.data.digits import load_digits_images

        images, labels, classes = load_digits_images(image_size, channels)
    else:
        from qframe.data.imagefolder import load_imagefolder_images

        images, labels, classes = load_imagefolder_images(None if root is None else str(root), image_size,
                                                          channels, extensions)
    return make_bundle(images, labels, classes, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


__all__ = ["DATASETS", "DataBundle", "build_data", "augment_batch", "stratified_split"]
