"""Small vision models of `transformers`, built from configs with random init (nothing downloaded),
shared by tests/third_party and benchmarks/third_party_sqnr.py."""

import torch
from torch import nn

import transformers

SIZE = 64


def configs():
    T = transformers
    return {
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, num_channels=3)),
        "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.35, num_labels=10, image_size=SIZE)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_labels=10, num_stages=2)),
        "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            width_coefficient=0.2, depth_coefficient=0.2, image_size=SIZE, num_labels=10, hidden_dim=256)),
        "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=10)),
        "mobilevit": lambda: T.MobileViTForImageClassification(T.MobileViTConfig(
            image_size=SIZE, patch_size=2, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 24, 32, 40, 160],
            num_labels=10)),
        "vit": lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, num_labels=10)),
        "levit": lambda: T.LevitForImageClassification(T.LevitConfig(
            image_size=SIZE, hidden_sizes=[32, 48, 64], num_attention_heads=[1, 2, 2], depths=[1, 1, 1],
            key_dim=[8, 8, 8], num_labels=10, patch_size=16)),
    }


MODELS = sorted(configs())


class Logits(nn.Module):
    """A transformers classifier as images -> logits (its output is a ModelOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def randomise_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def images(n, seed):
    """Structured inputs (smooth blobs plus noise), not white noise: closer to what a classifier sees."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 8, 8, generator=g)
    return nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False) + \
        0.1 * torch.randn(n, 3, SIZE, SIZE, generator=g)
