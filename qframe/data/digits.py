"""scikit-learn's bundled handwritten digits: 1797 real 8x8 grey images of 0-9, no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def load_digits_images(image_size: int, channels: int) -> tuple[Tensor, Tensor, list[str]]:
    """Images ``[1797, channels, image_size, image_size]`` in [0, 1], labels, class names "0".."9".

    The 8x8 images are resized with bilinear interpolation; 3 channels repeat the grey one.
    """
    from sklearn.datasets import load_digits  # lazy: sklearn takes about a second to import

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # pixel values are 0..16
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.clamp_(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    labels = torch.from_numpy(d.target).long()
    return x.contiguous(), labels, [str(c) for c in range(10)]
