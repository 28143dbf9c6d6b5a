"""Real third-party architectures: the vision models of `transformers`, random init from small configs.

Nothing is downloaded: each model is built from its config. For each at w8a8 PTQ: every Conv and
Linear is quantized or listed as float with a reason; every BatchNorm is folded (or listed with a
reason); the quantized model computes what the float one does up to 8-bit rounding; a QAT step from
a fresh init (zero BN gammas included) stays finite.
"""

import pytest
import torch
from torch import nn

import qframe
from qframe.methods.qat import QATConfig, prepare_qat
from qframe.quant.modules import QUANT_LAYERS, QuantConvBn2d

pytest.importorskip("transformers")

from hf_models import MODELS, Logits  # tests/third_party/hf_models.py
from hf_models import configs as _configs
from hf_models import images as _images
from hf_models import randomise_bn as _randomise_bn


@pytest.fixture(scope="module", params=MODELS)
def built(request):
    torch.manual_seed(0)
    model = Logits(_randomise_bn(_configs()[request.param]().eval())).eval()
    calib = [(_images(8, s), None) for s in range(2)]
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, num_batches=2)
    return request.param, model, qmodel


def test_every_layer_is_quantized_or_listed_with_a_reason(built):
    name, model, qmodel = built
    floats = qmodel.qframe_float_layers
    for layer_name, module in qmodel.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and not isinstance(module, QUANT_LAYERS):
            assert layer_name in floats and floats[layer_name], f"{name}: {layer_name} is float without a reason"
    assert sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) >= 3


def test_every_batchnorm_is_folded(built):
    name, model, qmodel = built
    had = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    left = [n for n, m in qmodel.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert not left, f"{name}: {len(left)} of {had} BatchNorms unfolded: {qmodel.qframe_unfolded_norms}"


def test_the_quantized_model_computes_what_the_float_one_does(built):
    name, model, qmodel = built
    x = _images(16, 7)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 0.15, name


def test_a_qat_step_from_a_fresh_init_stays_finite(built):
    name, model, _ = built
    fresh = Logits(_configs()[name]().train())  # fresh BN statistics and the config's own init
    qmodel = prepare_qat(fresh.eval(), qframe.preset("w8a8"), [(_images(8, 3), None)], 1, QATConfig())
    qmodel.train()
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for step in range(2):
        loss = nn.functional.cross_entropy(qmodel(_images(8, 10 + step)), torch.arange(8) % 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), f"{name}: loss {loss.item()} at step {step}"
    assert all(torch.isfinite(p).all() for p in qmodel.parameters())
    if any(isinstance(m, nn.BatchNorm2d) for m in fresh.modules()):
        assert any(isinstance(m, QuantConvBn2d) for m in qmodel.modules()), f"{name}: no Conv2d/BN pair trains folded"


def test_the_readme_snippet_runs_verbatim_on_a_transformers_model():
    """The README's "Quantize your own model" block, unchanged, with a transformers ResNet as MyNet."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Quantize your own model", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    torch.manual_seed(0)
    namespace = {
        "MyNet": lambda: Logits(_configs()["resnet"]()),
        "my_loader": [(_images(8, s), torch.arange(8) % 10) for s in range(3)],
    }
    exec(compile(snippet, "README.md", "exec"), namespace)
    qmodel, model = namespace["qmodel"], namespace["model"]
    assert sum(isinstance(m, QUANT_LAYERS) for m in qmodel.modules()) >= 5
    assert qframe.model_size_bytes(qmodel) < 0.35 * qframe.model_size_bytes(model)
    x = _images(4, 9)
    with torch.no_grad():
        assert (qmodel(x) - model(x)).norm() / model(x).norm() < 0.15
