"""Users' own models, many at once: every stage of qframe on `transformers` vision models, a row each.

    python benchmarks/transformers_sweep.py                 # writes benchmarks/results/transformers_sweep.{md,json}
    python benchmarks/transformers_sweep.py --models rt_detr dpt --no-write

Models: the test battery's (tests/third_party/hf_models.py) and more architectures built here the same
way (random init from small configs, nothing downloaded, 64x64 structured random images, BN running
statistics from the model's own activations: tests/third_party/vision_checks.normalise_bn). For each: how
much of the FP32 output depends on the input; ``qframe.ptq`` at w8a8 (how many layers are quantized, float
with a reason, float without one, BatchNorms left unfolded; output SQNR against the FP32 model), ONNX export
(TensorRT lint errors, compute layers that stay float without a reason the recipe gave), onnxruntime
against the PyTorch model (the FP32 export too, which tells an exporter problem from a quantization one),
and ``qframe.convert`` against the fake-quant model. Every SQNR is over the part of the reference that
varies from image to image (each output less the batch's mean output): a constant part would carry the
ratio while saying nothing of what the input changes. A stage that raises ends the row with its error.
The battery's tests assert these per model; this table is for finding the next model that breaks.

DEIMv2's row disagrees with PyTorch in the FP32 export too, and not through the exporter: in one of the 16
images two of its top-20 encoder scores lie 2.9e-6 apart, onnxruntime's float rounding orders them the other
way, and two of that image's query rows differ, in logits and boxes (every other of the 320 rows agrees).
With BN statistics drawn apart from the activations, RT-DETR (v1 and v2) and D-FINE did the same on exact ties
(52 of RT-DETR's 84 scored positions carried a feature row another position had); they agree now.

The PTQ SQNR column is low, even negative, on models that amplify rounding noise at random init: a
MobileNetV2's layers each compute their float layer to 33-36 dB (tests/third_party/test_transformers.py), and
it loses 1.5-2 dB a block on the way to its logits. Where a model's output barely varies (YOLOS: 4e-6 of its
energy), the SQNR columns say little; where it does not vary at all (SAM, SuperPoint), they are left blank.
D-FINE's and DEIMv2's quantized models compute one output for every image: their backbones' frozen norms
keep identity statistics, the random-init features reach the encoder at 1e-9 to 1e-15, below half a step
of the smallest scale qframe gives, and calibration names those layers in a warning.

The detectors whose backbones hold frozen BatchNorms (DETR, Conditional and Deformable DETR, RT-DETR v1
and v2) export Q/DQ graphs that onnxruntime runs exactly as PyTorch does, now that qframe folds those
norms: left as a float scale and shift after each quantized convolution, they agreed to 13-36 dB.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import qframe
from qframe.bisect import sqnr_db
from qframe.utils.env import environment, results_header
from qframe.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "third_party"))
log = logging.getLogger("transformers_sweep")


def extra_configs() -> dict:
    """Architectures beyond the test battery's (sizes as small as each config allows)."""
    import transformers as T

    from vision_checks import SIZE

    vit = dict(image_size=SIZE, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    resnet = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                            out_features=["stage4"])
    detr = dict(use_timm_backbone=False, backbone_config=resnet, use_pretrained_backbone=False, d_model=32,
                encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_labels=10)
    rt_detr = dict(
        backbone_config=T.RTDetrResNetConfig(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                             out_features=["stage2", "stage3", "stage4"]),
        encoder_in_channels=[64, 128, 256], d_model=32, encoder_hidden_dim=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        num_queries=20, decoder_layers=2, num_labels=10, encoder_attention_heads=2, decoder_attention_heads=2,
        decoder_n_points=2, num_feature_levels=3, decoder_in_channels=[32, 32, 32], num_denoising=0,
        anchor_image_size=None)
    d_fine = {**rt_detr, "head_dim": 16, "lqe_hidden_dim": 16, "backbone_config": T.HGNetV2Config(
        stem_channels=[3, 16, 16], stage_in_channels=[16, 32, 64, 128], stage_mid_channels=[16, 16, 32, 64],
        stage_out_channels=[32, 64, 128, 256], hidden_sizes=[32, 64, 128, 256], stage_num_blocks=[1, 1, 1, 1],
        stage_numb_of_layers=[2, 2, 2, 2], out_features=["stage2", "stage3", "stage4"])}
    # RF-DETR / LW-DETR: a windowed ViT, one level; 8 queries (a 64x64 image has 16 patches to choose them from)
    vit_backbone = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=2, image_size=SIZE,
                        patch_size=16, out_features=["stage1", "stage2", "stage3", "stage4"])
    lw_decoder = dict(d_model=32, decoder_ffn_dim=64, decoder_layers=2, decoder_self_attention_heads=2,
                      decoder_cross_attention_heads=2, decoder_n_points=2, num_queries=8, group_detr=1, num_labels=10)
    return {
        "swinv2": lambda: T.Swinv2ForImageClassification(T.Swinv2Config(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=10)),
        "beit": lambda: T.BeitForImageClassification(T.BeitConfig(
            **vit, intermediate_size=64, num_labels=10, use_relative_position_bias=True, layer_scale_init_value=0.1,
            use_mean_pooling=True)),
        "data2vec_vision": lambda: T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(
            **vit, intermediate_size=64, num_labels=10, use_relative_position_bias=True)),
        "dinov2": lambda: T.Dinov2ForImageClassification(T.Dinov2Config(
            **vit, mlp_ratio=2, num_labels=10, layerscale_value=0.1)),
        "ijepa": lambda: T.IJepaForImageClassification(T.IJepaConfig(**vit, intermediate_size=64, num_labels=10)),
        "vit_msn": lambda: T.ViTMSNForImageClassification(T.ViTMSNConfig(**vit, intermediate_size=64, num_labels=10)),
        "focalnet": lambda: T.FocalNetForImageClassification(T.FocalNetConfig(
            image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3],
            num_labels=10)),
        "pvt": lambda: T.PvtForImageClassification(T.PvtConfig(
            image_size=SIZE, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_encoder_blocks=4,
            sequence_reduction_ratios=[8, 4, 2, 1], num_attention_heads=[1, 1, 2, 2], patch_sizes=[4, 2, 2, 2],
            strides=[4, 2, 2, 2], mlp_ratios=[2, 2, 2, 2], num_labels=10)),
        "pvt_v2": lambda: T.PvtV2ForImageClassification(T.PvtV2Config(
            image_size=SIZE, hidden_sizes=[16, 32], depths=[1, 1], num_encoder_blocks=2, sr_ratios=[4, 2],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2], num_labels=10)),
        "hiera": lambda: T.HieraForImageClassification(T.HieraConfig(
            image_size=[SIZE, SIZE], patch_size=[7, 7], patch_stride=[4, 4], patch_padding=[3, 3], embed_dim=16,
            depths=[1, 1], num_heads=[1, 2], masked_unit_size=[8, 8], query_stride=[2, 2], num_query_pool=1,
            num_labels=10)),
        "mobilenet_v1": lambda: T.MobileNetV1ForImageClassification(T.MobileNetV1Config(
            depth_multiplier=0.25, image_size=SIZE, num_labels=10)),
        "mobilevitv2": lambda: T.MobileViTV2ForImageClassification(T.MobileViTV2Config(
            image_size=SIZE, patch_size=2, width_multiplier=0.25, num_labels=10)),
        "convnextv2": lambda: T.ConvNextV2ForImageClassification(T.ConvNextV2Config(
            hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)),
        "poolformer": lambda: T.PoolFormerForImageClassification(T.PoolFormerConfig(
            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10)),
        "textnet": lambda: T.TextNetForImageClassification(T.TextNetConfig(num_labels=10)),
        "dpt": lambda: T.DPTForDepthEstimation(T.DPTConfig(
            **{**vit, "num_hidden_layers": 4}, intermediate_size=64, backbone_out_indices=[0, 1, 2, 3],
            neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_in_index=-1)),
        "glpn": lambda: T.GLPNForDepthEstimation(T.GLPNConfig(
            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
            decoder_hidden_size=16)),
        "swiftformer": lambda: T.SwiftFormerForImageClassification(T.SwiftFormerConfig(
            depths=[1, 1, 1, 1], embed_dims=[16, 24, 32, 48], num_labels=10)),
        "hgnet_v2": lambda: T.HGNetV2ForImageClassification(T.HGNetV2Config(num_labels=10)),
        "dinov2_registers": lambda: T.Dinov2WithRegistersForImageClassification(T.Dinov2WithRegistersConfig(
            **vit, mlp_ratio=2, num_labels=10, num_register_tokens=2)),
        "dinov3_vit": lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**vit, intermediate_size=64, num_register_tokens=2)),
        "dinov3_convnext": lambda: T.DINOv3ConvNextModel(T.DINOv3ConvNextConfig(
            hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])),
        "clip_vision": lambda: T.CLIPVisionModel(T.CLIPVisionConfig(**vit, intermediate_size=64)),
        "siglip_vision": lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**vit, intermediate_size=64)),
        "vitpose": lambda: T.VitPoseForPoseEstimation(T.VitPoseConfig(backbone_config=T.VitPoseBackboneConfig(
            image_size=[SIZE, SIZE], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            mlp_ratio=2, out_indices=[2]), num_labels=17)),
        "depth_anything": lambda: T.DepthAnythingForDepthEstimation(T.DepthAnythingConfig(
            backbone_config=T.Dinov2Config(**{**vit, "num_hidden_layers": 4}, mlp_ratio=2, out_indices=[1, 2, 3, 4],
                                           reshape_hidden_states=False),
            neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, reassemble_hidden_size=32, patch_size=16,
            head_hidden_size=8)),
        "superpoint": lambda: T.SuperPointForKeypointDetection(T.SuperPointConfig(
            encoder_hidden_sizes=[16, 16, 32, 32], decoder_hidden_size=64, keypoint_decoder_dim=65,
            descriptor_decoder_dim=64, max_keypoints=32)),
        "mask2former": lambda: T.Mask2FormerForUniversalSegmentation(T.Mask2FormerConfig(
            backbone_config=T.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                         num_heads=[1, 1, 2, 2], window_size=2,
                                         out_features=["stage1", "stage2", "stage3", "stage4"]),
            feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64, dim_feedforward=64,
            encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=10, num_labels=10, common_stride=4)),
        "eomt": lambda: T.EomtForUniversalSegmentation(T.EomtConfig(
            **{**vit, "num_hidden_layers": 4}, intermediate_size=64, num_blocks=2, num_queries=10, num_labels=10)),
        "detr": lambda: T.DetrForObjectDetection(T.DetrConfig(**detr, num_queries=10)),
        "conditional_detr": lambda: T.ConditionalDetrForObjectDetection(T.ConditionalDetrConfig(**detr, num_queries=10)),
        "rt_detr_v2": lambda: T.RTDetrV2ForObjectDetection(T.RTDetrV2Config(**rt_detr)),
        "rt_detr": lambda: T.RTDetrForObjectDetection(T.RTDetrConfig(**rt_detr)),
        "d_fine": lambda: T.DFineForObjectDetection(T.DFineConfig(**d_fine)),
        "deimv2": lambda: T.Deimv2ForObjectDetection(T.Deimv2Config(**d_fine)),
        "rf_detr": lambda: T.RfDetrForObjectDetection(T.RfDetrConfig(backbone_config=T.RfDetrDinov2Config(
            **vit_backbone, num_windows=4, window_block_indexes=[0, 2]), **lw_decoder, intermediate_size=64)),
        "lw_detr": lambda: T.LwDetrForObjectDetection(T.LwDetrConfig(backbone_config=T.LwDetrViTConfig(
            **vit_backbone, pretrain_image_size=SIZE, window_block_indices=[0, 2], num_windows=4, num_windows_side=2),
            projector_scale_factors=[1.0], projector_in_channels=[32] * 4, projector_out_channels=32,
            num_feature_levels=1, **lw_decoder)),
        "dab_detr": lambda: T.DabDetrForObjectDetection(T.DabDetrConfig(
            **{k: v for k, v in detr.items() if k != "d_model"} | {"decoder_layers": 2}, hidden_size=32, num_queries=10)),
        "pp_lcnet": lambda: T.PPLCNetForImageClassification(T.PPLCNetConfig(scale=0.25, class_expand=64, num_labels=10)),
        "pp_ocrv5_mobile_det": lambda: T.PPOCRV5MobileDetForObjectDetection(T.PPOCRV5MobileDetConfig()),
        "beit_seg": lambda: T.BeitForSemanticSegmentation(T.BeitConfig(
            **{**vit, "num_hidden_layers": 4}, intermediate_size=64, num_labels=5, out_indices=[1, 2, 3, 4],
            use_auxiliary_head=False, pool_scales=[1, 2], auxiliary_channels=16)),
        "mobilevit_seg": lambda: T.MobileViTForSemanticSegmentation(T.MobileViTConfig(
            image_size=SIZE, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=5,
            aspp_out_channels=32)),
        "mobilenet_v2_seg": lambda: T.MobileNetV2ForSemanticSegmentation(T.MobileNetV2Config(
            depth_multiplier=0.35, image_size=SIZE, num_labels=5)),
        "swin2sr": lambda: T.Swin2SRForImageSuperResolution(T.Swin2SRConfig(
            image_size=SIZE, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, upscale=2,
            upsampler="pixelshuffle")),
        "maskformer": lambda: T.MaskFormerForInstanceSegmentation(T.MaskFormerConfig(
            backbone_config=T.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1],
                                         num_heads=[1, 1, 2, 2], window_size=2,
                                         out_features=["stage1", "stage2", "stage3", "stage4"]),
            decoder_config=T.DetrConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                        num_queries=10),
            fpn_feature_size=32, mask_feature_size=32, num_labels=5)),
        "sam": lambda: T.SamModel(T.SamConfig(  # no prompt: the mask decoder's own tokens
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE,
                               patch_size=16, output_channels=16, window_size=2, global_attn_indexes=[1], mlp_dim=64,
                               num_pos_feats=8),
            prompt_encoder_config=dict(hidden_size=16, image_size=SIZE, patch_size=16, mask_input_channels=4,
                                       image_embedding_size=SIZE // 16),
            mask_decoder_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32,
                                     iou_head_hidden_dim=16))),
        "deformable_detr": lambda: T.DeformableDetrForObjectDetection(T.DeformableDetrConfig(
            **{**detr, "backbone_config": T.ResNetConfig(
                embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                out_features=["stage2", "stage3", "stage4"]), "decoder_layers": 2},
            num_queries=20, num_feature_levels=3, encoder_n_points=2, decoder_n_points=2)),
    }


_boxes = lambda out: torch.cat([out.logits, out.pred_boxes], -1)  # noqa: E731
EXTRA_OUTPUTS = {
    "dpt": lambda out: out.predicted_depth, "glpn": lambda out: out.predicted_depth,
    "depth_anything": lambda out: out.predicted_depth, "vitpose": lambda out: out.heatmaps,
    "superpoint": lambda out: out.scores, "clip_vision": lambda out: out.pooler_output,
    "siglip_vision": lambda out: out.pooler_output, "dinov3_vit": lambda out: out.pooler_output,
    "dinov3_convnext": lambda out: out.pooler_output, "eomt": lambda out: out.class_queries_logits,
    "mask2former": lambda out: out.class_queries_logits,
    "detr": _boxes, "conditional_detr": _boxes, "rt_detr": _boxes, "rt_detr_v2": _boxes, "d_fine": _boxes,
    "deformable_detr": _boxes, "deimv2": _boxes, "rf_detr": _boxes, "lw_detr": _boxes, "dab_detr": _boxes,
    "pp_lcnet": lambda out: out.last_hidden_state, "pp_ocrv5_mobile_det": lambda out: out.last_hidden_state,
    "sam": lambda out: out.pred_masks.flatten(1), "swin2sr": lambda out: out.reconstruction,
    "maskformer": lambda out: out.class_queries_logits,
}


def build(name: str) -> nn.Module:
    from hf_models import OUTPUTS, Logits, configs, images, normalise_bn

    torch.manual_seed(0)
    battery = configs()
    make = battery[name] if name in battery else extra_configs()[name]
    return normalise_bn(Logits(make().eval(), {**OUTPUTS, **EXTRA_OUTPUTS}.get(name)).eval(), images(32, 3))


def _sqnr(ref: torch.Tensor, out) -> float | None:
    """SQNR of ``out`` over the part of ``ref`` that varies across the batch; None where nothing varies."""
    ref = ref.detach().double().numpy()
    out = out.detach().double().numpy() if isinstance(out, torch.Tensor) else out.astype("float64")
    varying = ref - ref.mean(0, keepdims=True)
    return sqnr_db(varying, varying + (out - ref)) if varying.any() else None


def _ort(path: Path, x: torch.Tensor):
    from qframe.export.ort import ort_session

    session = ort_session(str(path), level="basic")
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def run(name: str, scratch: Path) -> dict:
    from hf_models import images, twins

    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.quant.modules import QUANT_LAYERS

    row, stage, start = {"model": name}, "build", time.perf_counter()
    x = images(16, 7)
    pairs = twins(name)
    try:
        model = build(name)
        with torch.no_grad():
            ref = model(x)
        varying = ref.double() - ref.double().mean(0, keepdim=True)
        row["varying_pct"] = 100 * float(varying.norm() ** 2 / ref.double().norm() ** 2)
        stage = "ptq"
        for float_type, twin in pairs:
            qframe.register_module(float_type, twin)
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(images(8, s), None) for s in range(2)], num_batches=2)
        floats = qmodel.qframe_float_layers
        row["quantized"] = sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules())
        row["float_with_reason"] = len(floats)
        row["float_without_reason"] = sum(
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not isinstance(m, QUANT_LAYERS) and not floats.get(n)
            for n, m in qmodel.named_modules())
        row["unfolded_bn"] = len(qmodel.qframe_unfolded_norms)
        with torch.no_grad():
            row["ptq_sqnr_db"] = _sqnr(ref, qmodel(x))
            qref = qmodel(x)
        stage = "export"
        import onnx

        path = export_onnx(qmodel, images(1, 5), scratch / f"{name}_w8a8.onnx")
        graph, chosen = onnx.load(str(path)), chosen_float_layers(qmodel)
        row["lint_errors"] = sum(v.severity == "error" for v in lint_tensorrt(graph, chosen))
        row["unexplained_float"] = len(tensorrt_coverage(graph, chosen).fallbacks(chosen=False))
        stage = "onnxruntime"
        row["ort_sqnr_db"] = _sqnr(qref, _ort(path, x))
        fp32 = export_onnx(model, images(1, 5), scratch / f"{name}_fp32.onnx")
        row["ort_fp32_sqnr_db"] = _sqnr(ref, _ort(fp32, x))
        stage = "convert"
        with torch.no_grad():
            row["convert_sqnr_db"] = _sqnr(qref, qframe.convert(qmodel)(x))
        stage = ""
    except Exception as exc:  # the row says where the model broke
        row["error"] = f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        for float_type, _ in pairs:
            qframe.unregister_module(float_type)
    row["seconds"] = round(time.perf_counter() - start, 1)
    log.info("%s: %s", name, row)
    return row


def table(rows: list[dict]) -> str:
    cols = [("varying_pct", "FP32 output varying %"), ("quantized", "quantized layers"),
            ("float_with_reason", "float, reason given"),
            ("float_without_reason", "float, no reason"), ("unfolded_bn", "BN unfolded"),
            ("ptq_sqnr_db", "PTQ SQNR dB"), ("lint_errors", "lint errors"),
            ("unexplained_float", "unexplained float ONNX layers"), ("ort_sqnr_db", "onnxruntime vs PyTorch dB"),
            ("ort_fp32_sqnr_db", "FP32 export vs PyTorch dB"), ("convert_sqnr_db", "convert vs fake-quant dB")]

    def cell(v):
        if isinstance(v, float):
            if math.isinf(v):
                return "exact"
            return f"{v:.1f}" if abs(v) >= 0.1 or v == 0 else f"{v:.0e}"
        return "" if v is None else str(v)

    lines = ["| model | " + " | ".join(c[1] for c in cols) + " | error |", "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(cell(r.get(k)) for k, _ in cols) + f" | {r.get('error', '')} |")
    return "\n".join(lines)


SETUP = ("w8a8 PTQ of random-init models (BN statistics from their own activations) on 2 x 8 structured random "
         "64x64 images; SQNR over 16 other images, over the part of the reference that varies from image to image")


def publish(text: str, name: str, env: dict, command: str, rows: list[dict], write: bool = True) -> None:
    """Print a results table; with ``write``, save it as benchmarks/results/``name``.md and its rows as .json."""
    print(text)
    if write:
        atomic_write_text(text, RESULTS / f"{name}.md")
        atomic_write_json({"environment": env, "command": command, "rows": rows}, RESULTS / f"{name}.json")


def main(argv=None) -> int:
    from hf_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: the battery's and the extra ones")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    names = args.models or list(MODELS) + sorted(extra_configs())
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run(name, Path(scratch)) for name in names]
    env = environment()
    command = ("python benchmarks/transformers_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    import transformers

    text = (results_header("qframe on `transformers` vision models, stage by stage", env, command,
                           transformers=transformers.__version__) +
            SETUP + ". The SQNR of a random-init model says little about a trained one's accuracy; "
            "the columns to watch are the counts and the exporter and runtime agreement. Random networks whose norms "
            "normalise their activations amplify rounding noise: a low PTQ SQNR with each layer near 8-bit rounding, "
            "and onnxruntime or convert rows near 20 dB where one rounding flip moves the output. DEIMv2: two "
            "top-20 query scores of one image lie 3e-6 apart and runtimes order them differently (the script's "
            "docstring).\n\n" + table(rows) + "\n")
    publish(text, "transformers_sweep", env, command, rows, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
