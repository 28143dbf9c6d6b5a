"""Mixed precision under a budget: the knapsack, the sensitivities, the budget, the recipe it emits."""

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from qframe.config import register, to_config
from qframe.errors import QFrameError
from qframe.measure.size import model_size_bytes
from qframe.methods.mixed import configuration, pareto_front, recipe_yaml, search
from qframe.methods.ptq import ptq
from qframe.models import build_model
from qframe.quant.budget import Budget
from qframe.quant.recipe import LayerRule, QuantRecipe, preset, quantize_


def _compose(*overrides):
    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def _seed():
    torch.manual_seed(torch.seed() % 2**31)
    return np.random.default_rng(torch.randint(0, 2**31, ()).item())


def test_knapsack_matches_brute_force():
    rng = _seed()
    layers, widths = 5, 3
    # noise falls and cost grows with the width, as for real layers
    noise = np.sort(rng.uniform(0.01, 1.0, (layers, widths)), axis=1)[:, ::-1].copy()
    cost = np.sort(rng.uniform(1.0, 10.0, (layers, widths)), axis=1)
    unit, best, choice = pareto_front(noise, cost, buckets=2000)
    configs = list(itertools.product(range(widths), repeat=layers))
    costs = np.array([sum(cost[i, c] for i, c in enumerate(cfg)) for cfg in configs])
    noises = np.array([sum(noise[i, c] for i, c in enumerate(cfg)) for cfg in configs])
    for limit in np.linspace(costs.min() + layers * unit, costs.max(), 9):
        index = min(int(np.floor(limit / unit)), len(best) - 1)
        picks = configuration(choice, index)
        picked_cost = sum(cost[i, c] for i, c in enumerate(picks))
        picked_noise = sum(noise[i, c] for i, c in enumerate(picks))
        assert picked_cost <= limit + 1e-9  # costs are rounded up: what the search calls feasible is
        assert picked_noise == pytest.approx(best[index])
        # optimal among the configurations that fit with a margin of one bucket per layer
        # (+1e-9: at the first limit, costs.min() + layers * unit - layers * unit can round below costs.min())
        assert picked_noise <= noises[costs <= limit - layers * unit + 1e-9].min() + 1e-12
        assert picked_noise >= noises[costs <= limit].min() - 1e-12


class _Linear3(nn.Module):
    """Three linear layers, no activation: the output is exactly linear in each layer's weight error."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 48), nn.Linear(48, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_sensitivity_is_the_output_noise_of_one_layer_at_a_time():
    """For a linear model the estimate E_v[(v^T J dy)^2] has the measured ||dz||^2 as its mean."""
    _seed()
    model = _Linear3().eval()
    x = torch.randn(128, 24)
    widths = [3, 8]
    recipe = QuantRecipe(name="t", weight=preset("w4a8").weight, input=None,
                         budget=Budget(size_ratio=0.5, widths=widths, images=128, probes=48))
    result = search(model, recipe, [x], 1)
    assert result.layers == ["a", "b", "c"]

    def output(rules):
        q = ptq(model, dataclasses.replace(recipe, budget=None, rules=rules), [x], 1)
        with torch.no_grad():
            return q(x).double()

    top = output([LayerRule("*", weight_bits=8)])
    for i, name in enumerate(result.layers):
        measured = float((output([LayerRule(name, weight_bits=3), LayerRule("*", weight_bits=8)]) - top)
                         .pow(2).sum(1).mean())
        assert result.noise[i, 0] == pytest.approx(measured, rel=0.2), name
        assert result.noise[i, 1] == 0  # the widest width is the reference: no added noise


def _mobilenet(normalise_bn):
    model = build_model("mobilenet_v2", num_classes=4, in_channels=1, image_size=16, width_mult=0.35)
    return normalise_bn(model, _images(64)).eval()


def _images(n):
    return F.avg_pool2d(torch.randn(n, 1, 18, 18), 3, 1)


@pytest.mark.parametrize("limit", [{"size_ratio": 0.16}, {"bitops_ratio": 0.03}])
def test_search_respects_the_budget_and_emits_an_ordinary_recipe(normalise_bn, limit):
    _seed()
    model = _mobilenet(normalise_bn)
    x = _images(64)
    recipe = preset("w4a8", budget=Budget(**limit, widths=[2, 4, 8], images=64, probes=1))
    with pytest.raises(QFrameError, match="has a budget: search its per-layer widths first"):
        quantize_(build_model("compact_cnn", 3, 1, 16), recipe)
    result = search(model, recipe, [x[:32], x[32:]], 2)
    chosen = result.recipe
    assert chosen.budget is None and chosen.name.startswith("w4a8_w")
    # w4a8's own rules keep the first and last layers at 8 bits; the search leaves them alone
    assert len(result.layers) == sum(isinstance(m, nn.Conv2d) or isinstance(m, nn.Linear) for m in model.modules()) - 2
    qmodel = ptq(model, chosen, [x], 1)
    widths = {n: m.weight_quantizer.spec.bits for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")}
    assert {widths[n] for n in result.layers} <= {2, 4, 8}
    assert [widths[n] for n in result.layers] == result.chosen.widths
    if result.kind == "size":
        # the real bytes of the quantized model, counted independently of the search
        assert model_size_bytes(qmodel) <= result.limit
        assert model_size_bytes(qmodel) / result.reference == pytest.approx(result.chosen.cost, rel=0.02)
    else:
        macs, total = {}, 0
        hooks = [m.register_forward_hook(lambda m, a, o, n=n: macs.__setitem__(n, o[0].numel() * m.weight[0].numel()))
                 for n, m in qmodel.named_modules() if hasattr(m, "weight_quantizer")]
        with torch.no_grad():
            qmodel(x[:1])
        for h in hooks:
            h.remove()
        for n, mac in macs.items():
            m = qmodel.get_submodule(n)
            total += mac * m.weight_quantizer.spec.bits * (m.input_quantizer.spec.bits if m.input_quantizer else 32)
        fp32 = sum(macs.values()) * 32 * 32
        assert total <= result.limit and result.limit == pytest.approx(0.03 * fp32)
    # the front: cost ascending, estimated SQNR rising; the choice within the budget
    costs, sqnr = [p.cost for p in result.front], [p.sqnr_estimated for p in result.front]
    assert costs == sorted(costs) and sqnr == sorted(sqnr) and len(set(sqnr)) == len(sqnr)
    assert result.chosen.cost <= result.limit / result.reference + 1e-9
    # the recipe file loads back into the same recipe (what quant=<file> would read)
    loaded = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantRecipe),
                                                 OmegaConf.create(recipe_yaml(chosen))))
    assert loaded == chosen


def test_budget_below_the_cheapest_configuration_is_one_clear_error(normalise_bn):
    model = _mobilenet(normalise_bn)
    recipe = preset("w4a8", budget=Budget(size_ratio=0.01, widths=[4, 8], images=16, probes=1))
    with pytest.raises(QFrameError, match="below the cheapest configuration"):
        search(model, recipe, [_images(16)], 1)


@pytest.mark.parametrize("limit", [{"size_ratio": 0.01}, {"bitops_ratio": 0.001}])
def test_check_budget_gives_the_searchs_error_from_the_untrained_model(normalise_bn, limit):
    """The CLI refused an impossible budget only after training the FP32 model; check_budget finds it from the
    architecture, with the figures the search gives."""
    from qframe.methods.mixed import check_budget

    _seed()
    recipe = preset("w4a8", budget=Budget(**limit, widths=[4, 8], images=16, probes=1))
    untrained = build_model("mobilenet_v2", num_classes=4, in_channels=1, image_size=16, width_mult=0.35).eval()
    with pytest.raises(QFrameError, match="below the cheapest configuration") as early:
        check_budget(untrained, recipe, _images(16))
    with pytest.raises(QFrameError) as late:
        search(_mobilenet(normalise_bn), recipe, [_images(16)], 1)
    assert str(early.value) == str(late.value)
    check_budget(untrained, preset("w4a8", budget=Budget(**{k: 0.3 for k in limit}, widths=[4, 8], images=16)),
                 _images(16))


def test_quant_auto_composes_with_a_budget():
    cfg = to_config(_compose("quant=auto"))
    assert cfg.quant.budget == Budget(size_ratio=0.18)
    cfg = to_config(_compose("quant=auto", "quant.budget.size_ratio=null", "quant.budget.bitops_ratio=0.05",
                             "quant.budget.widths=[4,8]"))
    assert cfg.quant.budget.kind == "bitops" and cfg.quant.budget.widths == [4, 8]
    assert to_config(_compose()).quant.budget is None


@pytest.mark.parametrize("overrides, message", [
    (["quant.budget.size_ratio=1.5"], r"quant.budget.size_ratio=1.5 is invalid; valid: a fraction 0 < x <= 1"),
    (["quant.budget.bitops_ratio=0.05"], "quant.budget needs exactly one of size_ratio, size_bytes, bitops_ratio; "
                                         "got size_ratio, bitops_ratio"),
    (["quant.budget.widths=[4,17]"], r"quant.budget.widths=\[4, 17\] is invalid"),
])
def test_bad_budgets_are_one_line_errors(overrides, message):
    with pytest.raises(QFrameError, match=message):
        to_config(_compose("quant=auto", *overrides))


@pytest.mark.slow
def test_quant_auto_on_the_command_line_writes_the_recipe_search_and_front(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "qframe", "+experiment=smoke", "quant=auto", "quant.budget.size_ratio=0.2",
                           "method.compare=[w4a8]", "method.bias_correction=true", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    search_ = json.loads((tmp_path / "mixed_search.json").read_text())
    recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantRecipe),
                                                 OmegaConf.create((tmp_path / "mixed_recipe.yaml").read_text())))
    rows = {(r["method"], r["precision"]): r for r in metrics["results"]}
    assert ("ptq+bc", recipe.name) in rows and ("ptq+bc", "w4a8") in rows
    fp32 = rows["fp32", "fp32"]["size_bytes"]
    # the bytes of the quantized model the run measured fit the budget
    assert rows["ptq+bc", recipe.name]["size_bytes"] <= 0.2 * fp32
    assert metrics["mixed_precision"]["limit_ratio"] == pytest.approx(0.2)
    assert {layer["bits"] for layer in search_["layers"]} <= {2, 3, 4, 5, 6, 8}
    assert (tmp_path / "mixed_front.png").stat().st_size > 10_000


def test_the_chosen_widths_win_over_a_base_rule_that_sets_only_the_input_width(caplog):
    """A base rule giving layer b 4-bit inputs must not shadow b's searched weight width, and b keeps its inputs."""
    import logging

    _seed()
    model = _Linear3().eval()
    x = torch.randn(64, 24)
    recipe = QuantRecipe(name="t", weight=preset("w4a8").weight, input=preset("w4a8").input,
                         rules=[LayerRule("b", input_bits=4)],
                         budget=Budget(size_ratio=0.2, widths=[3, 4, 8], images=64, probes=8))
    result = search(model, recipe, [x], 1)
    assert "b" in result.layers
    with caplog.at_level(logging.WARNING, logger="qframe.quant.recipe"):
        qmodel = quantize_(copy.deepcopy(model), result.recipe)
    chosen = dict(zip(result.layers, result.chosen.widths))
    assert qmodel.b.weight_quantizer.spec.bits == chosen["b"] and qmodel.b.input_quantizer.spec.bits == 4
    assert all(getattr(qmodel, n).weight_quantizer.spec.bits == b for n, b in chosen.items())
    assert "never applies" not in caplog.text  # the base rule's setting is carried, not lost


class _DictOut(nn.Module):
    """A model returning a dict (as transformers' models return their outputs), fed dict batches."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, 5))

    def forward(self, x):
        return {"logits": self.net(x), "pooled": x.mean((2, 3))}


def test_search_takes_a_model_with_dict_outputs_and_dict_batches_as_its_logits():
    """It raised TypeError on the model's output, and on dict batches (no input_fn)."""
    _seed()
    model = _DictOut().eval()
    x = torch.randn(32, 3, 8, 8)
    recipe = preset("w4a8", budget=Budget(size_ratio=0.2, widths=[2, 4, 8], images=32, probes=1))
    batches = [{"pixel_values": x[:16]}, {"pixel_values": x[16:]}]
    with pytest.raises(QFrameError, match="calibration batch 0 gives a dict where one tensor of images is needed"):
        search(model, recipe, batches, 2)
    got = search(model, recipe, batches, 2, input_fn=lambda b: b["pixel_values"])
    want = search(model.net, recipe, [x[:16], x[16:]], 2)  # the same layers, returning the logits alone
    assert [n.removeprefix("net.") for n in got.layers] == want.layers
    assert got.chosen.widths == want.chosen.widths and np.allclose(got.noise, want.noise)
