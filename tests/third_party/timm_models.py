"""Small `timm` vision models, built from timm's own configs with random init (``pretrained=False``: nothing
downloaded), 10 classes at 64x64 inputs; shared by tests/third_party/test_timm.py and
benchmarks/third_party_timm.py. Each is chosen for a layer type the others lack."""

import timm

from vision_checks import SIZE, randomise_bn

# name -> (timm.create_model keyword arguments beyond pretrained/num_classes, what it brings)
MODELS = {
    "resnet18d": ({}, "deep stem, avg-pool shortcut (AvgPool2d + Conv + BN in a Sequential), in-place ReLU"),
    "efficientnet_b0": ({}, "BatchNormAct2d (BN fused with SiLU), squeeze-excite, depthwise convs"),
    "tf_efficientnet_b0": ({}, "Conv2dSame (TF 'SAME' padding computed in forward), BatchNormAct2d"),
    "mobilenetv3_small_100": ({}, "HardSwish, hard-sigmoid squeeze-excite, Linear head after global pool"),
    "mobilenetv4_conv_small": ({}, "universal inverted bottlenecks, BatchNormAct2d with ReLU"),
    "regnety_002": ({}, "group convs, squeeze-excite"),
    "convnext_atto": ({}, "LayerNorm2d, depthwise 7x7, layer scale, Mlp of Linear"),
    "ghostnetv2_100": ({}, "ghost modules (concat, slicing), DFC attention (avg pool, interpolate, sigmoid gate)"),
    "rexnet_100": ({}, "channel-padding residual (add on a channel slice), SiLU, squeeze-excite with BN"),
    "repvgg_a0": ({}, "reparameterizable branches: 3x3 + 1x1 + identity BatchNorm"),
    "mobileone_s0": ({}, "reparameterizable over-parameterized depthwise/pointwise branches"),
    "vit_tiny_patch16_224": ({"img_size": SIZE}, "attention (F.scaled_dot_product_attention), cls token, LayerNorm"),
    "deit_tiny_distilled_patch16_224": ({"img_size": SIZE}, "distillation token, two heads averaged in eval"),
    "efficientvit_b0": ({}, "linear attention (ReLU kernels, matmuls), multi-scale depthwise aggregation"),
    "efficientvit_m0": ({"img_size": SIZE}, "cascaded group attention with Conv+BN projections, attention biases"),
    "levit_128s": ({"img_size": SIZE}, "Linear + BatchNorm1d (LinearNorm), attention biases, HardSwish"),
    "fastvit_t8": ({}, "RepMixer, reparameterizable MobileOne stem, conditional positional encoding"),
    "cs3darknet_focus_s": ({}, "YOLO-style CSP backbone, focus stem (space-to-depth), concat"),
    "dla34": ({}, "deep layer aggregation: concat then Conv + BN, tree of residual blocks"),
    "hrnet_w18_small": ({}, "parallel resolutions, fuse by upsample + add"),
}


def build(name, train=False, **extra):
    """timm model ``name`` at 10 classes (random init)."""
    kwargs, _ = MODELS[name]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs, **extra).train(train)


def reparameterizable(model) -> bool:
    """Whether ``model`` has branches timm merges for deployment (``reparameterize`` / ``fuse`` methods)."""
    return any(hasattr(m, "reparameterize") or hasattr(m, "fuse") for m in model.modules())


def deployable(name, **extra):
    """Model ``name`` in eval mode, BatchNorm statistics randomised (so that folding matters), then as timm
    prescribes for deployment: branches merged where it has them."""
    import timm.utils

    model = randomise_bn(build(name, **extra).eval())
    return timm.utils.reparameterize_model(model) if reparameterizable(model) else model


def _same_conv_twin():
    """A quantized twin for timm's Conv2dSame, as a user registers one: TF 'SAME' padding from the input size,
    then the quantized convolution (whose input quantizer sees the padded input)."""
    from timm.layers.padding import pad_same

    from qframe.quant.modules import QuantConv2d

    class QuantConv2dSame(QuantConv2d):
        @classmethod
        def from_float(cls, conv, weight_quantizer=None, input_quantizer=None):
            new = QuantConv2d.from_float(conv, weight_quantizer, input_quantizer)
            new.__class__ = cls
            return new

        def forward(self, x):
            return super().forward(pad_same(x, self.kernel_size, self.stride, self.dilation))

    return QuantConv2dSame


def twins(name):
    """``(float type, quantized twin)`` pairs model ``name`` needs registered (qframe.register_module)."""
    if name.startswith("tf_"):
        from timm.layers import Conv2dSame

        return [(Conv2dSame, _same_conv_twin())]
    return []
