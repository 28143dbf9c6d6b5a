"""What the third-party model tests share, whatever library the models come from (`transformers`, `timm`):
structured random images, randomised BatchNorm statistics, targets and a loss for any output shape.
Imports torch alone, so a test module can use it before it knows whether its library is installed."""

import torch
from torch import nn

SIZE = 64


def randomise_bn(model):
    """BatchNorm running statistics away from (0, 1), so that folding them changes the weights."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def images(n, seed, size=SIZE):
    """Structured inputs (smooth blobs plus noise), not white noise: closer to what a classifier sees."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False) + \
        0.1 * torch.randn(n, 3, size, size, generator=g)


def top1(out):
    """The predicted class of each image (each pixel, each detection token)."""
    return out.argmax(-1) if out.dim() == 3 else out.argmax(1)


def targets(out, seed):
    """Class targets shaped for cross-entropy over ``out``'s classes (dim 1, or the last of a 3-d output)."""
    g = torch.Generator().manual_seed(seed)
    classes = out.shape[-1] if out.dim() == 3 else out.shape[1]
    shape = out.shape[:-1] if out.dim() == 3 else out.shape[:1] + out.shape[2:]
    return torch.randint(0, classes, shape, generator=g)


def loss(out, seed):
    return nn.functional.cross_entropy(out.flatten(0, 1) if out.dim() == 3 else out,
                                       targets(out, seed).flatten() if out.dim() == 3 else targets(out, seed))
