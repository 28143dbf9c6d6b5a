"""What all data sets share: the bundle, stratified splits, normalisation, augmentation, loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from qframe.errors import QFrameError, one_of

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Three in-memory splits of normalised images ``[N, C, H, W]`` (float32) and labels ``[N]`` (int64).

    ``mean``/``std`` are the per-channel statistics of the raw train images (pixels in [0, 1]); the
    stored tensors are already normalised with them, and deployment must apply the same.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    channels: int
    image_size: int
    class_names: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def split(self, split: str) -> TensorDataset:
        """The TensorDataset of ``split`` ("train", "val" or "test")."""
        if split not in SPLITS:
            raise one_of("split", split, SPLITS)
        return getattr(self, split)

    def loader(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> DataLoader:
        """A single-process DataLoader over ``split``; shuffling uses a generator seeded with ``seed``."""
        ds = self.split(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise QFrameError(f"batch_size must be a positive integer, got {batch_size!r}")
        # the data are tensors in memory: worker processes would only add start-up time
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          drop_last=drop_last, num_workers=0)


def check_fractions(val_fraction: float, test_fraction: float, prefix: str = "") -> None:
    """Both fractions in (0, 1) and together below 1, else a QFrameError naming them (``prefix``: their
    config section, e.g. ``"data."``)."""
    for what, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise QFrameError(f"{prefix}{what}={f!r} is invalid; valid: a fraction 0 < x < 1")
    if val_fraction + test_fraction >= 1:
        raise QFrameError(f"{prefix}val_fraction + {prefix}test_fraction = {val_fraction} + {test_fraction} "
                          "leaves no training images; valid: a sum < 1")


def stratified_split(labels: Tensor, class_names: list[str], val_fraction: float, test_fraction: float,
                     seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Indices ``(train, val, test)``: per class ``n_test = max(1, round(n * test_fraction))``,
    ``n_val = max(1, round(n * val_fraction))``, the rest train.

    One CPU generator seeded with ``seed`` draws a permutation per class in class order, so the
    same seed gives the same split on every machine. Each split's indices are sorted.
    """
    gen = torch.Generator().manual_seed(seed)
    parts: tuple[list[Tensor], list[Tensor], list[Tensor]] = ([], [], [])
    for c, cname in enumerate(class_names):
        idx = torch.nonzero(labels == c).flatten()
        n = idx.numel()
        if n < 3:
            raise QFrameError(f"class {cname!r} has {n} image(s); each class needs at least 3 (train, val, test)")
        idx = idx[torch.randperm(n, generator=gen)]
        n_test = max(1, round(n * test_fraction))
        n_val = max(1, round(n * val_fraction))
        if n - n_test - n_val < 1:
            raise QFrameError(f"class {cname!r} has {n} images: none left for training after "
                              f"{n_val} val and {n_test} test; lower val_fraction/test_fraction")
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test:n_test + n_val])
        parts[0].append(idx[n_test + n_val:])
    train, val, test = (torch.sort(torch.cat(p)).values for p in parts)
    return train, val, test


def make_bundle(images: Tensor, labels: Tensor, class_names: list[str], *, val_fraction: float,
                test_fraction: float, seed: int) -> DataBundle:
    """Split raw images (``[N, C, H, W]`` in [0, 1]) and normalise all splits with train statistics."""
    train_i, val_i, test_i = stratified_split(labels, class_names, val_fraction, test_fraction, seed)
    x_train = images[train_i]
    mean = x_train.mean(dim=(0, 2, 3), dtype=torch.float64)
    std = x_train.to(torch.float64).std(dim=(0, 2, 3), unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)  # a constant channel must not divide by 0
    m = mean.float().view(1, -1, 1, 1)
    s = std.float().view(1, -1, 1, 1)

    def ds(i: Tensor) -> TensorDataset:
        return TensorDataset(((images[i] - m) / s).contiguous(), labels[i].clone())

    bundle = DataBundle(ds(train_i), ds(val_i), ds(test_i), num_classes=len(class_names),
                        channels=images.shape[1], image_size=images.shape[-1], class_names=list(class_names),
                        mean=mean.tolist(), std=std.tolist())
    log.info("data: %d classes, %d train / %d val / %d test images of %dx%dx%d",
             bundle.num_classes, len(train_i), len(val_i), len(test_i),
             bundle.channels, bundle.image_size, bundle.image_size)
    return bundle


def augment_batch(x: Tensor, *, shift: float = 0.0, hflip: bool = False,
                  generator: torch.Generator | None = None) -> Tensor:
    """Random per-sample translation by up to ``shift`` of the image size and, with ``hflip``,
    horizontal flips with p=0.5; one vectorised ``grid_sample`` for the whole batch.

    Borders are padded with the edge value (inputs are normalised, so zero is not "black").
    ``shift=0`` and ``hflip=False`` return ``x`` unchanged. ``generator`` must be a CPU generator.
    """
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift < 1:
        raise QFrameError(f"augment shift must be in [0, 1), got {shift!r}")
    if x.dim() != 4:
        raise QFrameError(f"augment_batch expects [B, C, H, W], got shape {tuple(x.shape)}")
    if shift == 0 and not hflip:
        return x
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if shift > 0:
        # normalised coordinates span 2 per image side, so shift * size pixels is 2 * shift
        theta[:, :, 2] = (torch.rand(b, 2, generator=generator) * 2 - 1) * (2 * shift)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5
        theta[flip, 0, 0] = -1.0
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
