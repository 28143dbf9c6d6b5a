"""Small vision models of `transformers`, built from configs with random init (nothing downloaded),
shared by tests/third_party and benchmarks/third_party_sqnr.py."""

import torch
from torch import nn

import transformers
from vision_checks import SIZE, images, loss, normalise_bn, randomise_bn, targets, top1, varying  # noqa: F401 (shared)


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
        # distillation token, and a patch embedding that reads its projection's weight dtype
        "deit": lambda: T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(
            image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_labels=10)),
        # shifted-window attention with a relative position bias (a gathered table added to the scores), patch merging
        "swin": lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
            num_labels=10)),
        # convolutional token embedding and q/k/v projections (conv + BN), attention written with einsum
        "cvt": lambda: T.CvtForImageClassification(T.CvtConfig(
            embed_dim=[16, 32], num_heads=[1, 2], depth=[1, 2], patch_sizes=[7, 3], patch_stride=[4, 2],
            patch_padding=[2, 1], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0],
            drop_path_rate=[0.0, 0.0], qkv_bias=[True, True], cls_token=[False, True],
            qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2],
            padding_q=[1, 1], stride_q=[1, 1], num_labels=10)),
        # weight-standardized convolutions: a Conv2d subclass overriding forward (quantized through a registered twin)
        "bit": lambda: T.BitForImageClassification(T.BitConfig(
            embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=8, num_labels=10)),
        # semantic segmentation: per-pixel class logits at a quarter of the input size
        "segformer": lambda: T.SegformerForSemanticSegmentation(T.SegformerConfig(
            hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[4, 2], num_attention_heads=[1, 2],
            patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=10)),
        # object detection: class logits and boxes of each detection token
        "yolos": lambda: T.YolosForObjectDetection(T.YolosConfig(
            image_size=[SIZE, SIZE], patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, num_detection_tokens=4, num_labels=10)),
        # detection backbone: windowed attention with decomposed relative positions (a scripted function, an If
        # in the ONNX graph whose branches read the outer graph) and an einsum of the queries with a parameter table
        "vitdet": lambda: T.VitDetBackbone(T.VitDetConfig(
            image_size=SIZE, pretrain_image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, mlp_ratio=2, use_relative_position_embeddings=True, window_size=2,
            window_block_indices=[0], out_features=["stage2"])),
        # segmentation head: pyramid pooling to 1, 2, 3, 6 (sizes that do not divide the feature map's), its
        # layers called through a plain list beside add_module
        "upernet": lambda: T.UperNetForSemanticSegmentation(T.UperNetConfig(
            backbone_config=T.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1],
                                             out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=32, use_auxiliary_head=False, num_labels=10)),  # the auxiliary head trains only
    }


# What each model's forward hands on, as one tensor (the default: its classification logits).
OUTPUTS = {
    "segformer": lambda out: out.logits,  # [N, classes, H / 4, W / 4]
    "yolos": lambda out: torch.cat([out.logits, out.pred_boxes], -1),  # [N, tokens, classes + 1 + 4]
    "vitdet": lambda out: out.feature_maps[-1],  # [N, hidden, H / 16, W / 16]
}

MODELS = sorted(configs())


class Logits(nn.Module):
    """A transformers model as images (or the input named ``key``) -> one tensor (its output is a ModelOutput): the
    logits, or ``output(out)``."""

    def __init__(self, model, output=None, key="pixel_values"):
        super().__init__()
        self.model = model
        self.output = output
        self.key = key

    def forward(self, x):
        out = self.model(**{self.key: x})
        return out.logits if self.output is None else self.output(out)


def build(name, train=False):
    """The model ``name`` (random init), wrapped as images -> one tensor."""
    model = configs()[name]()
    return Logits(model.train(train), OUTPUTS.get(name)).train(train)


def _standardized_conv_twin():
    """A quantized twin for transformers' WeightStandardizedConv2d, as a user registers one: the conv whose weight
    is the standardized weight (per output channel: zero mean, unit variance), what the layer computes in eval."""
    from qframe.quant.modules import QuantConv2d

    class QuantStandardizedConv2d(QuantConv2d):
        @classmethod
        def from_float(cls, conv, weight_quantizer=None, input_quantizer=None):
            if conv.pad is not None:
                raise ValueError("dynamic 'SAME' padding is not handled by this twin")
            w = conv.weight.detach().reshape(conv.out_channels, -1)
            w = (w - w.mean(1, keepdim=True)) / torch.sqrt(w.var(1, unbiased=False, keepdim=True) + conv.eps)
            plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, conv.groups, conv.bias is not None)
            plain.weight = nn.Parameter(w.reshape_as(conv.weight).clone())
            plain.bias = conv.bias
            return QuantConv2d.from_float(plain, weight_quantizer, input_quantizer)

    return QuantStandardizedConv2d


def twins(name):
    """``(float type, quantized twin)`` pairs model ``name`` needs registered (qframe.register_module)."""
    if name == "bit":
        from transformers.models.bit.modeling_bit import WeightStandardizedConv2d

        return [(WeightStandardizedConv2d, _standardized_conv_twin())]
    return []
