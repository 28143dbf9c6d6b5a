"""What the third-party model tests share, whatever library the models come from (`transformers`, `timm`):
structured random images, randomised or data-derived BatchNorm statistics, targets and a loss for any
output shape.
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


def normalise_bn(model, x, floor=0.25, shift=0.3, scale=(0.6, 1.6), seed=1):
    """BatchNorm statistics of the model's own activations on ``x``, set layer by layer in one eval pass (each
    norm sees what the norms before it now compute): a random init's activations shrink or grow layer after
    layer, and statistics drawn apart from them (``randomise_bn``) leave many models computing a constant.
    Each channel's variance is floored at ``floor`` times the layer's median, so a channel whose weights
    cancel on smooth inputs is not blown up; then each mean moves by ``shift`` standard deviations and each
    variance is scaled by ``scale``, so that folding the norms changes the weights. The affine weight takes the
    gain that ``eps`` would take from a variance far below it. Frozen norms (detector backbones) keep theirs:
    their forward computes ``x * scale + shift``, which loses the input to float32 rounding once a mean dwarfs
    the deviation it is normalised by (a DETR so normalised: float32 and float64 outputs 0.9 of the varying
    part apart)."""
    g = torch.Generator().manual_seed(seed)

    def set_statistics(norm, args):
        t = args[0].detach().double()
        dims = [d for d in range(t.dim()) if d != 1]
        mean, var = t.mean(dims), t.var(dims, unbiased=False)
        var = torch.maximum(var, floor * var.median()).clamp_min(1e-30)
        mean = mean + shift * var.sqrt() * torch.randn(mean.shape, generator=g, dtype=mean.dtype)
        var = var * torch.empty(var.shape, dtype=var.dtype).uniform_(*scale, generator=g)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            if norm.weight is not None:
                norm.weight.mul_(torch.sqrt((var + norm.eps) / var).to(norm.weight.dtype))

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    modes = {m: m.training for m in model.modules()}  # each module back in its own mode (a wrapper may differ)
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return model


def varying(out):
    """The part of a batch of outputs that depends on the input: each output less its mean over the batch."""
    return out - out.mean(0, keepdim=True)


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
