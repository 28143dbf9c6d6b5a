"""model=custom: the user's own network from model.factory, on the command line and through build_model."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from qframe.config import ModelConfig
from qframe.errors import QFrameError
from qframe.models import build_model

USER_NETS = '''
import torch
from torch import nn


def build(num_classes, in_channels, width=8, depth=2, weight_norm=False):
    layers, c = [], in_channels
    for _ in range(depth):
        conv = nn.Conv2d(c, width, 3, padding=1, bias=False)
        if weight_norm:
            conv = torch.nn.utils.parametrizations.weight_norm(conv)
        layers += [conv, nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    head = nn.Linear(c, num_classes)
    if weight_norm:  # a layer with no BatchNorm to fold into it: only ptq's own baking makes it plain
        head = torch.nn.utils.parametrizations.weight_norm(head)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def anything(**kwargs):
    SEEN.clear()
    SEEN.update(kwargs)
    return build(kwargs["num_classes"], kwargs["in_channels"])


SEEN = {}


class Net(nn.Module):
    def __init__(self, num_classes):  # takes the class count only: 3-channel images
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def needs_depth(num_classes, depth):
    return build(num_classes, 1, depth=depth)


def not_a_model(num_classes):
    return "model"


def wrong_classes(num_classes, in_channels):
    return build(num_classes + 1, in_channels)


class Output:
    def __init__(self, logits):
        self.logits = logits


class WithOutput(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.net = build(num_classes, in_channels)

    def forward(self, x):
        return Output(self.net(x))


def broken(num_classes):
    raise RuntimeError("out of ideas")
'''


@pytest.fixture
def user_nets(tmp_path, monkeypatch):
    """A module of the user's, importable as ``usernets`` (as from the directory a command runs in)."""
    (tmp_path / "usernets.py").write_text(textwrap.dedent(USER_NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "usernets", raising=False)
    yield tmp_path
    sys.modules.pop("usernets", None)


def test_the_factory_gets_the_data_arguments_it_takes_and_the_users_kwargs(user_nets):
    torch.manual_seed(0)
    model = build_model("custom", 7, 1, 16, factory="usernets:build", kwargs={"depth": 3, "width": 5})
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 and convs[0].in_channels == 1 and convs[-1].out_channels == 5
    assert model(torch.randn(4, 1, 16, 16)).shape == (4, 7)
    # a class by its dotted path, taking num_classes alone
    net = build_model("custom", 3, 3, 20, factory="usernets.Net")
    assert type(net).__name__ == "Net" and net.head.out_features == 3
    # **kwargs only (torchvision's builders, timm's create_model): the class count, beside the user's own
    build_model("custom", 4, 3, 24, factory="usernets:anything", kwargs={"tag": "x", "in_channels": 3})
    import usernets
    assert usernets.SEEN == {"num_classes": 4, "in_channels": 3, "tag": "x"}


def test_the_built_model_is_left_in_training_mode_with_untouched_norm_statistics(user_nets):
    model = build_model("custom", 5, 1, 16, factory="usernets:build")
    assert model.training and all(m.training for m in model.modules())
    norm = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(norm.num_batches_tracked) == 0 and torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))


@pytest.mark.parametrize("factory, kwargs, words", [
    (None, {}, ["model=custom needs model.factory", "module:callable"]),
    ("usernets", {}, ["'usernets' is invalid", "module:callable"]),
    ("no_such_module_here:build", {}, ["'no_such_module_here' cannot be imported", "ModuleNotFoundError"]),
    ("usernets:bild", {}, ["has no 'bild'", "build", "needs_depth"]),
    ("usernets:SEEN", {}, ["is a dict, not a function or class"]),
    ("usernets:build", {"dept": 3}, ["model.kwargs.dept is not a parameter", "width, depth"]),
    ("usernets:build", {"num_classes": 3}, ["model.kwargs.num_classes is set by the data", "num_classes=5"]),
    ("usernets:needs_depth", {}, ["needs 'depth'", "model.kwargs.depth=VALUE"]),
    ("usernets:not_a_model", {}, ["returned a str, not a torch.nn.Module"]),
    ("usernets:broken", {}, ["raised RuntimeError: out of ideas", "num_classes=5"]),
    ("usernets:wrong_classes", {}, ["output for a batch of 2 is shape (2, 6)", "(2, 5)"]),
    ("usernets:WithOutput", {}, ["is of type Output", "it has .logits"]),
    ("usernets:Net", {}, ["does not run on a batch of shape (2, 1, 16, 16)", "data.channels"]),
])
def test_a_bad_factory_is_one_line_naming_it(user_nets, factory, kwargs, words):
    with pytest.raises(QFrameError) as e:
        build_model("custom", 5, 1, 16, factory=factory, kwargs=kwargs)
    message = str(e.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_the_config_checks_the_factory_before_anything_runs():
    with pytest.raises(QFrameError, match="model=custom needs model.factory"):
        ModelConfig(name="custom")
    with pytest.raises(QFrameError, match="are for model=custom, not model=compact_cnn"):
        ModelConfig(name="compact_cnn", factory="usernets:build")
    assert ModelConfig(name="custom", factory="usernets:build", kwargs={"depth": 3}).kwargs == {"depth": 3}


@pytest.mark.slow
def test_the_command_line_trains_quantizes_and_exports_the_users_model(user_nets):
    run_dir = user_nets / "run"
    args = ["+experiment=smoke", "model=custom", "model.factory=usernets:build", "+model.kwargs.depth=3",
            "+model.kwargs.weight_norm=true", "method.compare=[]", "measure.enabled=false", "export.enabled=true", "export.target=onnxruntime",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "qframe", *args], capture_output=True, text=True, cwd=user_nets,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["model"]["factory"] == "usernets:build"
    assert metrics["config"]["model"]["kwargs"] == {"depth": 3, "weight_norm": True}
    rows = {(r["method"], r["precision"]) for r in metrics["results"]}
    assert {("fp32", "fp32"), ("ptq", "w8a8")} <= rows and any(m == "onnx" for m, _ in rows)
    # three weight-normed convolutions, each with its BatchNorm folded in (the parametrization baked), all quantized
    state = torch.load(run_dir / "ptq_w8a8.pt", weights_only=False)
    assert sum(1 for k in state["model"] if k.endswith("weight_quantizer.scale")) == 4  # 3 convs + the head
    assert not any("parametrizations" in k for k in state["model"])
    # the same run's model, rebuilt from its config by the ONNX bisect (which bakes the parametrizations as ptq did)
    bisect = subprocess.run([sys.executable, "-m", "qframe.bisect", str(run_dir)], capture_output=True, text=True,
                            cwd=user_nets, timeout=300)
    assert bisect.returncode == 0, bisect.stderr[-2000:]
    assert "no layer over tolerance" in bisect.stdout
    # a typo in the factory stops the run with one line, before any training
    bad = subprocess.run([sys.executable, "-m", "qframe", *args[:-1], "model.factory=usernets:bild",
                          f"hydra.run.dir={user_nets / 'bad'}"], capture_output=True, text=True, cwd=user_nets,
                         timeout=300)
    assert bad.returncode != 0
    assert "qframe: error: model.factory='usernets:bild': 'usernets' has no 'bild'" in bad.stderr
    assert not (user_nets / "bad" / "fp32.pt").exists()


def test_the_factory_module_imports_from_the_working_directory_as_the_qframe_script_runs(tmp_path, monkeypatch):
    """The ``qframe`` console script's sys.path starts at its own folder, not at the working directory."""
    (tmp_path / "cwdnets.py").write_text(textwrap.dedent(USER_NETS))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cwdnets", raising=False)
    try:
        assert build_model("custom", 3, 1, 16, factory="cwdnets:build")(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    finally:
        sys.modules.pop("cwdnets", None)


def test_the_bisect_rebuilds_ptq_and_qat_models_of_parametrized_layers(user_nets):
    """ptq bakes parametrizations and fold_qat bakes those of the quantized layers before a QAT model is saved;
    the bisect rebuilt both with the parametrizations and could not load them (a head with no BatchNorm keeps
    its own)."""
    import dataclasses

    import qframe
    from qframe.bisect import load_run_model

    torch.manual_seed(torch.seed() % 2**31)
    kwargs = {"depth": 2, "weight_norm": True}
    model = build_model("custom", 4, 3, 16, factory="usernets:build", kwargs=kwargs).eval()
    recipe = qframe.preset("w8a8")
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))) for _ in range(2)]
    run = user_nets / "run"
    run.mkdir()
    made = {"ptq_w8a8": qframe.ptq(model, recipe, batches, 2),
            "qat_w8a8": qframe.fold_qat(qframe.qat(model, recipe, batches, qframe.QATConfig(epochs=0), num_batches=2))}
    for name, qmodel in made.items():
        torch.save({"model": qmodel.state_dict(), "recipe": dataclasses.asdict(recipe)}, run / f"{name}.pt")
    (run / "metrics.json").write_text(json.dumps({
        "config": {"model": {"name": "custom", "width_mult": 1.0, "arch": None, "factory": "usernets:build",
                             "kwargs": kwargs}, "data": {"channels": 3}},
        "data": {"classes": 4, "image_size": 16}}))
    x = torch.randn(4, 3, 16, 16)
    for name, qmodel in made.items():
        loaded = load_run_model(run, name)
        with torch.no_grad():
            assert torch.allclose(loaded(x), qmodel.eval()(x), atol=1e-6), name


HEAD_FIRST = """
import torch
from torch import nn


class HeadFirst(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = nn.Linear(8, num_classes)  # declared before the layer the input meets first
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.fc(torch.relu(self.stem(x)).mean((2, 3)))


def build(num_classes):
    return HeadFirst(num_classes)
"""


def test_the_bisect_rebuilds_first_and_last_rules_as_ptq_resolved_them(tmp_path, monkeypatch):
    """ptq resolves :first by the order the input meets the layers; the rebuild resolved it by declaration order
    and loaded the checkpoint into the swapped bit widths without an error."""
    import dataclasses

    import qframe
    from qframe.bisect import load_run_model

    (tmp_path / "headfirst.py").write_text(textwrap.dedent(HEAD_FIRST))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "headfirst", raising=False)
    torch.manual_seed(0)
    model = build_model("custom", 4, 3, 16, factory="headfirst:build").eval()
    recipe = qframe.preset("w8a8", rules=[qframe.LayerRule(":first", weight_bits=4)])
    qmodel = qframe.ptq(model, recipe, [torch.randn(8, 3, 16, 16)], 1)
    assert (qmodel.stem.weight_quantizer.spec.bits, qmodel.fc.weight_quantizer.spec.bits) == (4, 8)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": qmodel.state_dict(), "recipe": dataclasses.asdict(recipe)}, run / "ptq_custom.pt")
    (run / "metrics.json").write_text(json.dumps({
        "config": {"model": {"name": "custom", "width_mult": 1.0, "arch": None, "factory": "headfirst:build",
                             "kwargs": {}}, "data": {"channels": 3}},
        "data": {"classes": 4, "image_size": 16}}))
    loaded = load_run_model(run, "ptq_custom")
    assert (loaded.stem.weight_quantizer.spec.bits, loaded.fc.weight_quantizer.spec.bits) == (4, 8)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), qmodel.eval()(x), atol=1e-6)
    sys.modules.pop("headfirst", None)


def test_the_bisect_rebuilds_a_model_ptq_equalized(tmp_path):
    """Equalization turns ReLU6 modules into ChannelClips and may give a layer a bias: the rebuild had neither,
    and the checkpoint did not load."""
    import dataclasses

    import qframe
    from qframe.bisect import load_run_model
    from qframe.quant.equalize import ChannelClip

    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 10, 3, 16, width_mult=0.25).eval()
    recipe = qframe.preset("w8a8")
    calib = [(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    qmodel = qframe.ptq(model, recipe, calib, 2, equalize=True)
    assert any(isinstance(m, ChannelClip) for m in qmodel.modules())
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": qmodel.state_dict(), "recipe": dataclasses.asdict(recipe)}, run / "ptq_w8a8.pt")
    (run / "metrics.json").write_text(json.dumps({
        "config": {"model": {"name": "mobilenet_v2", "width_mult": 0.25, "arch": None}, "data": {"channels": 3}},
        "data": {"classes": 10, "image_size": 16}}))
    loaded = load_run_model(run, "ptq_w8a8")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded(x), qmodel.eval()(x), atol=1e-6)
