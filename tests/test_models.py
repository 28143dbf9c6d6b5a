"""Tests of the model zoo: shapes, Conv->BN structure, errors and backbone transfer."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.models import MODELS, ZOO, build_model, load_backbone, replace_head
from qframe.utils.io import atomic_torch_save

# small widths keep the 2-core test run fast; the default width is checked once below
FAST = {"mobilenet_v2": 0.5, "resnet18": 0.25, "compact_cnn": 0.5}
HEADS = {"mobilenet_v2": ("features.0.0", "classifier.1"), "resnet18": ("conv1", "fc"),
         "compact_cnn": ("features.0.0", "classifier.1")}


def _forward_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """Leaf modules in the order the forward pass calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: order.append(mod))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return order


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_zoo_forward_shapes(name, in_channels):
    for size in (32, 64):
        model = build_model(name, 7, in_channels, size, width_mult=FAST[name]).eval()
        x = torch.randn(3, in_channels, size, size)
        out = model(x)
        assert out.shape == (3, 7)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_every_conv_is_followed_by_batchnorm(name):
    model = build_model(name, 5, 1, 32, width_mult=FAST[name]).eval()
    order = _forward_order(model, torch.randn(2, 1, 32, 32))
    convs = [i for i, m in enumerate(order) if isinstance(m, nn.Conv2d)]
    assert convs, "no conv ran"
    for i in convs:
        assert i + 1 < len(order) and isinstance(order[i + 1], nn.BatchNorm2d), f"conv #{i} not followed by BN"
        assert order[i].bias is None
        assert order[i + 1].num_features == order[i].out_channels
    # activations are modules, not functional calls
    assert any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in order)


@pytest.mark.parametrize("name", ZOO)
def test_first_conv_and_classifier_names(name):
    model = build_model(name, 6, 1, 32, width_mult=FAST[name])
    first, head = HEADS[name]
    conv = model.get_submodule(first)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == 1
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)) is conv
    linear = model.get_submodule(head)
    assert isinstance(linear, nn.Linear) and linear.out_features == 6


def test_small_input_stems_keep_resolution():
    small = build_model("mobilenet_v2", 3, 3, 32, width_mult=0.5)
    large = build_model("mobilenet_v2", 3, 3, 224, width_mult=0.5)
    assert small.features[0][0].stride == (1, 1) and large.features[0][0].stride == (2, 2)
    r_small = build_model("resnet18", 3, 3, 64, width_mult=0.25)
    r_large = build_model("resnet18", 3, 3, 128, width_mult=0.25)
    assert r_small.conv1.kernel_size == (3, 3) and r_small.conv1.stride == (1, 1)
    assert isinstance(r_small.maxpool, nn.Identity)
    assert r_large.conv1.kernel_size == (7, 7) and isinstance(r_large.maxpool, nn.MaxPool2d)
    # 32x32 through the small MobileNetV2 still has a 2x2 map before pooling
    feats = small.features(torch.randn(1, 3, 32, 32))
    assert feats.shape[-2:] == (2, 2)


def test_default_mobilenet_matches_torchvision_parameter_count():
    # torchvision's mobilenet_v2(num_classes=1000) has 3,504,872 parameters
    model = build_model("mobilenet_v2", 1000, 3, 224)
    assert sum(p.numel() for p in model.parameters()) == 3_504_872


def test_width_mult_scales_models():
    for name in ZOO:
        small = build_model(name, 4, 3, 32, width_mult=0.25)
        big = build_model(name, 4, 3, 32, width_mult=0.5)
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_unknown_model_lists_valid_names():
    with pytest.raises(QFrameError) as e:
        build_model("mobilenet_v9", 10)
    msg = _one_line(e)
    assert "mobilenet_v9" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_classes=1), "num_classes"), (dict(num_classes=10, in_channels=2), "in_channels"),
    (dict(num_classes=10, width_mult=0.0), "width_mult"), (dict(num_classes=10, width_mult=-1.0), "width_mult"),
    (dict(num_classes=10, image_size=8), "image_size"),
])
def test_bad_arguments_are_one_line_errors(kwargs, word):
    with pytest.raises(QFrameError) as e:
        build_model("compact_cnn", **kwargs)
    assert word in _one_line(e)


def test_torchvision_without_torchvision_is_a_clear_error():
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision imports here")
    with pytest.raises(QFrameError) as e:
        build_model("torchvision", 10, arch="resnet50")
    msg = _one_line(e)
    assert "needs torchvision" in msg and "mobilenet_v2, resnet18, compact_cnn" in msg


def test_torchvision_model_when_available():
    tvm = pytest.importorskip("torchvision.models")
    model = build_model("torchvision", 4, 1, 32, arch="resnet18")
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(QFrameError):
        build_model("torchvision", 4, arch=None)
    with pytest.raises(QFrameError):
        build_model("torchvision", 4, arch="no_such_net")
    assert tvm is not None


@pytest.mark.parametrize("name", ZOO)
def test_transfer_backbone_keeps_weights_and_replaces_head(name, tmp_path):
    src = build_model(name, 10, 1, 32, width_mult=FAST[name])
    with torch.no_grad():  # fresh random weights so equality cannot come from the initialiser
        for p in src.parameters():
            p.copy_(torch.randn_like(p))
    path = tmp_path / "src.pt"
    atomic_torch_save({"model": src.state_dict()}, path)
    dst = build_model(name, 5, 1, 32, width_mult=FAST[name], checkpoint=str(path))
    head = HEADS[name][1]
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for key, value in dst_sd.items():
        if key.startswith(head + "."):
            assert value.shape[0] == 5
            assert not torch.equal(value[:5], src_sd[key][:5])
        else:
            assert torch.equal(value, src_sd[key]), key
    fresh = build_model(name, 5, 1, 32, width_mult=FAST[name])
    assert sorted(load_backbone(fresh, path)) == sorted([f"{head}.weight", f"{head}.bias"])


def test_load_backbone_strips_module_prefix_and_rejects_other_architectures(tmp_path):
    src = build_model("compact_cnn", 3, 3, 32)
    path = tmp_path / "ddp.pt"
    atomic_torch_save({f"module.{k}": v for k, v in src.state_dict().items()}, path)
    dst = build_model("compact_cnn", 3, 3, 32)
    assert load_backbone(dst, path) == []
    assert torch.equal(dst.classifier[1].weight, src.classifier[1].weight)
    with pytest.raises(QFrameError) as e:
        load_backbone(build_model("resnet18", 3, 3, 32, width_mult=0.25), path)
    assert "shares 0 of its" in _one_line(e) and "different architecture" in _one_line(e)


def test_load_backbone_rejects_a_checkpoint_that_fits_only_a_few_tensors(tmp_path):
    # a compact_cnn checkpoint shares a few names and shapes with a narrow MobileNetV2 (BatchNorm
    # counters, a stray conv): loading those and training the rest from scratch is no transfer
    src = build_model("compact_cnn", 10, 1, 16)
    path = atomic_torch_save({"model": src.state_dict(), "model_name": "compact_cnn"}, tmp_path / "cnn.pt")
    with pytest.raises(QFrameError) as e:
        build_model("mobilenet_v2", 10, 1, 16, width_mult=0.25, checkpoint=str(path))
    message = _one_line(e)
    assert "cnn.pt' (saved from compact_cnn) shares" in message and "MobileNetV2" in message
    assert "give the model and model.width_mult it was trained with" in message
    # the same architecture at another width shares names but no shapes
    with pytest.raises(QFrameError, match=r"shares \d+ of its 22 weight tensors with CompactCNN \(e.g. features.0.0.weight is"):
        build_model("compact_cnn", 10, 1, 16, width_mult=0.5, checkpoint=str(path))


def test_corrupt_or_missing_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(256))
    with pytest.raises(QFrameError) as e:
        build_model("compact_cnn", 5, checkpoint=str(bad))
    assert "bad.pt" in _one_line(e)
    with pytest.raises(QFrameError) as e:
        build_model("compact_cnn", 5, checkpoint=str(tmp_path / "missing.pt"))
    assert "missing.pt" in _one_line(e)


def test_replace_head():
    model = build_model("resnet18", 10, 3, 32, width_mult=0.25)
    old = model.fc
    assert replace_head(model, 10).fc is old  # same size: untouched
    replace_head(model, 4)
    assert model.fc is not old and model.fc.out_features == 4 and model.fc.in_features == old.in_features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(QFrameError):
        replace_head(nn.Sequential(nn.Conv2d(1, 1, 3)), 3)


def test_import_does_not_pull_in_torchvision():
    import subprocess
    import sys

    code = "import sys, qframe.models; assert 'torchvision' not in sys.modules; assert 'sklearn' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
