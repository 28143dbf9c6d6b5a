"""RCT: single-copy integer weights, stochastic-rounding updates, the bit-width controller, accounting."""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.methods.qat import QATConfig, prepare_qat
from qframe.methods.rct import (RCTConfig, RCTLinear, RCTOptimizer, measure_training, prepare_rct, rct,
                                reachable_tensors, requantize, rct_layers, to_fake_quant)
from qframe.methods.rct.energy import mac_pj, training_step_energy
from qframe.quant.functional import stochastic_round
from qframe.quant.recipe import preset
from qframe.train import TrainConfig, build_optimizer


def _batches(data, n=2, size=32):
    loader = data.loader("train", size, shuffle=True, seed=int(torch.randint(0, 1000, ())))
    return [b for _, b in zip(range(n), loader)]


def _weight_shaped_floats(model, optimizer, shapes):
    return [(path, tuple(t.shape)) for path, t in reachable_tensors(model, optimizer)
            if t.is_floating_point() and tuple(t.shape) in shapes]


def test_no_float_copy_of_a_weight_exists_between_rct_steps(digits, small_model):
    model = small_model(digits)
    batches = _batches(digits, 4)
    rmodel = prepare_rct(model, preset("w8a8"), batches, 2, RCTConfig(interval=2))
    optimizer = RCTOptimizer(rmodel, 0.05, RCTConfig(interval=2))
    shapes = {tuple(layer.codes.shape) for _, layer in rct_layers(rmodel)}
    assert len(shapes) >= 3
    for x, y in batches:
        rmodel.train()
        loss = nn.functional.cross_entropy(rmodel(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        assert _weight_shaped_floats(rmodel, optimizer, shapes) == []
    # the momentum exists, as int8 [N, K] of each weight: the walk does reach optimizer state
    flat = {(s[0], int(torch.Size(s[1:]).numel())) for s in shapes}
    state = [t for _, t in reachable_tensors(optimizer) if t.dtype == torch.int8 and tuple(t.shape) in shapes | flat]
    assert len(state) >= 2 * len(shapes) - 1  # codes of every layer + momentum of every layer


def test_the_walk_finds_the_float_master_weights_of_qat(digits, small_model):
    """The check above can fail: QAT, which keeps FP32 masters and float Adam moments, is caught."""
    model = small_model(digits)
    batches = _batches(digits, 2)
    qmodel = prepare_qat(model, preset("w8a8"), batches, 1, QATConfig())
    optimizer = build_optimizer(qmodel, TrainConfig())
    x, y = batches[0]
    nn.functional.cross_entropy(qmodel.train()(x), y).backward()
    optimizer.step()
    shapes = {tuple(m.weight.shape) for m in qmodel.modules() if isinstance(m, nn.Conv2d)}
    found = _weight_shaped_floats(qmodel, optimizer, shapes)
    assert len(found) >= 3 * len(shapes)  # master weights, exp_avg, exp_avg_sq (and grads)


def test_stochastic_rounding_keeps_small_updates_that_plain_rounding_loses():
    codes = torch.randint(-50, 50, (200_000,)).float()
    update = torch.rand(()) * 0.3 + 0.05  # a fraction of a quantization step
    rounded = stochastic_round(codes - update)
    mean_change = (rounded - codes).mean()
    # standard error of the mean < 0.5 / sqrt(n) ~ 0.0011: 6 sigma
    assert abs(mean_change + update) < 0.007
    assert torch.all((rounded - codes).abs() <= 1)
    assert torch.equal(torch.round(codes - update), codes)  # round-to-nearest: the update underflows


def test_many_tiny_rct_updates_move_the_weight_by_their_sum_in_expectation():
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    linear = nn.Linear(256, 64, bias=False)
    layer = RCTLinear(linear, 8)
    cfg = RCTConfig(momentum=0.0, grad_bits=None, interval=10**6, adapt_range=False)  # on one fixed grid
    model = nn.Sequential(layer)
    optimizer = RCTOptimizer(model, lr=1.0, cfg=cfg)
    start = layer.codes.float().clone()
    frac = 0.1 + 0.2 * torch.rand(())  # every update is this fraction of a step
    steps = 200
    grad = frac * layer.scale[:, None].expand_as(layer.codes)  # lr * g / scale == frac
    for _ in range(steps):
        layer.updater(layer, grad.clone())
    moved = (start - layer.codes.float())  # updates subtract
    inside = (start > -128 + steps) & (start < 127)  # away from the clamp
    expected = frac * steps
    assert abs(moved[inside].mean() - expected) < 0.03 * expected
    # the same updates with round-to-nearest leave the weight where it was
    assert torch.equal(torch.round(start - frac), start)


def _controller_model(bits, cfg):
    torch.manual_seed(0)
    layers = nn.Sequential(RCTLinear(nn.Linear(64, 32), bits), RCTLinear(nn.Linear(32, 8), bits))
    return layers, RCTOptimizer(layers, lr=1.0, cfg=cfg)


def test_controller_adds_a_bit_when_updates_underflow_and_drops_one_when_they_are_large():
    cfg = RCTConfig(bits_init=6, bits_min=4, bits_max=8, interval=3, momentum=0.0, grad_bits=None,
                    underflow_below=0.01, overflow_above=0.5)
    model, optimizer = _controller_model(6, cfg)
    small, large = model[0], model[1]
    before = small.weight.clone()
    for _ in range(3):
        small.updater(small, 0.001 * small.scale[:, None].expand_as(small.codes).clone())  # 0.001 steps
        large.updater(large, 3.0 * large.scale[:, None].expand_as(large.codes).clone())  # 3 steps
        optimizer.step()
    assert small.bits == 7 and large.bits == 5
    assert small.codes.dtype == torch.int8
    # widening is exact: the weight is the same numbers on a finer grid (up to this step's updates)
    assert (small.weight - before).abs().max() <= small.scale.max() * 2 + 1e-7
    assert [e["to"] for e in optimizer.events] == [7, 5]
    assert optimizer.history["0"] == [6, 7] and optimizer.history["1"] == [6, 5]


def test_controller_budget_narrows_the_largest_update_layers_until_the_average_fits():
    cfg = RCTConfig(bits_init=8, bits_min=4, bits_max=8, interval=1, momentum=0.0, grad_bits=None,
                    underflow_below=0.01, overflow_above=0.5, target_bits=6.0)
    model, optimizer = _controller_model(8, cfg)
    big, small = model[0], model[1]  # 64 x 32 and 32 x 8 codes
    sizes = [big.codes.numel(), small.codes.numel()]
    averages = []
    for _ in range(4):
        # the big layer's updates underflow (the rule alone would keep it at 8), the small one's are in band
        big.updater(big, 0.001 * big.scale[:, None].expand_as(big.codes).clone())
        small.updater(small, 0.1 * small.scale[:, None].expand_as(small.codes).clone())
        optimizer.step()
        averages.append(sum(n * layer.bits for n, layer in zip(sizes, model)) / sum(sizes))
    assert averages[0] == pytest.approx((7 * sizes[0] + 7 * sizes[1]) / sum(sizes))  # one bit per layer per decision
    assert averages[-1] <= 6.0 and optimizer.average_bits() == pytest.approx(averages[-1])
    assert all(e["budget"] for e in optimizer.events)  # every move was the budget's, none the rule's
    # without a budget the same updates move nothing up or down but the underflowing layer, already at its maximum
    free_model, free = _controller_model(8, dataclasses.replace(cfg, target_bits=None))
    for _ in range(4):
        free_model[0].updater(free_model[0], 0.001 * free_model[0].scale[:, None].expand_as(free_model[0].codes).clone())
        free_model[1].updater(free_model[1], 0.1 * free_model[1].scale[:, None].expand_as(free_model[1].codes).clone())
        free.step()
    assert [layer.bits for layer in free_model] == [8, 8]


def test_controller_budget_blocks_a_widening_that_would_break_it():
    cfg = RCTConfig(bits_init=6, bits_min=4, bits_max=8, interval=1, momentum=0.0, grad_bits=None,
                    underflow_below=0.01, overflow_above=0.5, target_bits=6.0)
    model, optimizer = _controller_model(6, cfg)
    for layer in model:  # both underflow: the rule would widen both
        layer.updater(layer, 0.001 * layer.scale[:, None].expand_as(layer.codes).clone())
    optimizer.step()
    assert optimizer.average_bits() <= 6.0 and not optimizer.events


def test_controller_stays_within_its_bounds():
    cfg = RCTConfig(bits_init=8, bits_min=8, bits_max=8, interval=1, momentum=0.0, grad_bits=None)
    model, optimizer = _controller_model(8, cfg)
    for _ in range(3):
        for layer in model:
            layer.updater(layer, 1e-6 * torch.ones_like(layer.codes, dtype=torch.float32))
        optimizer.step()
    assert [layer.bits for layer in model] == [8, 8]


def test_controller_may_go_to_16_bits_in_int16():
    cfg = RCTConfig(bits_init=8, bits_min=8, bits_max=16, interval=1, momentum=0.0, grad_bits=None)
    model, optimizer = _controller_model(8, cfg)
    w = model[0].weight.clone()
    for _ in range(8):
        for layer in model:
            layer.updater(layer, torch.zeros_like(layer.codes, dtype=torch.float32))
        optimizer.step()
    assert model[0].bits == 16 and model[0].codes.dtype == torch.int16
    assert torch.equal(model[0].weight, w)  # eight exact widenings


def test_requantize_widening_is_exact_and_narrowing_is_unbiased():
    codes = torch.randint(-8, 8, (64, 300), dtype=torch.int8)
    scale = torch.rand(64) + 0.1
    wide, wide_scale = requantize(codes, scale, 4, 7)
    assert torch.equal(wide.float() * wide_scale[:, None], codes.float() * scale[:, None])
    narrow, narrow_scale = requantize(codes.to(torch.int8) * 5, scale, 8, 6)
    exact = (codes.float() * 5) * scale[:, None]
    got = narrow.float() * narrow_scale[:, None]
    assert (got - exact).abs().max() <= narrow_scale.max() + 1e-6
    assert abs((got - exact).mean()) < 0.02 * scale.mean()
    with pytest.raises(QFrameError, match="valid: integers 2..16"):
        requantize(codes, scale, 4, 17)


def test_rct_config_rejects_bad_values():
    with pytest.raises(QFrameError, match="bits_min <= bits_init <= bits_max"):
        RCTConfig(bits_init=3, bits_min=4)
    with pytest.raises(QFrameError, match="method.rct.bits_max=17"):
        RCTConfig(bits_max=17)
    with pytest.raises(QFrameError, match="underflow_below < overflow_above"):
        RCTConfig(underflow_below=0.5, overflow_above=0.1)


def test_rct_resumes_exactly_from_a_checkpoint_and_deploys_as_fake_quant(digits, small_model, tmp_path, monkeypatch):
    import qframe.train as train_module

    model = small_model(digits)
    train = TrainConfig(epochs=1, batch_size=64, warmup_epochs=0.0)
    cfg = RCTConfig(bits_init=6, interval=5)
    calib = _batches(digits, 2)
    args = dict(epochs=2, lr=0.02, calib_batches=calib, num_batches=2, seed=1)
    per_epoch, save = {}, train_module.atomic_torch_save

    def keep_every_epoch(obj, path):  # the run's checkpoint file is overwritten; keep each epoch's
        save(obj, path)
        per_epoch[obj["epoch"]] = tmp_path / f"epoch{obj['epoch']}.pt"
        save(obj, per_epoch[obj["epoch"]])

    monkeypatch.setattr(train_module, "atomic_torch_save", keep_every_epoch)
    full, opt_full = rct(model, preset("w8a8"), digits, cfg, train, checkpoint_path=tmp_path / "a.pt", **args)
    resumed, opt_resumed = rct(model, preset("w8a8"), digits, cfg, train, checkpoint_path=tmp_path / "b.pt",
                               resume=str(per_epoch[0]), **args)
    assert opt_resumed.steps == opt_full.steps and opt_full.history == opt_resumed.history
    for (name, a), (_, b) in zip(rct_layers(full), rct_layers(resumed)):
        assert a.bits == b.bits and torch.equal(a.codes, b.codes), name
    x, _ = next(iter(digits.loader("test", 128)))
    with torch.no_grad():
        integer_logits = resumed(x)
        for _, layer in rct_layers(resumed):  # the dequantizing path does the fake-quant model's float maths
            layer.integer_gemm = False
        logits = resumed(x)
        deployed = to_fake_quant(resumed)
        out = deployed(x)
        assert torch.allclose(logits, out, atol=1e-5)
        # integer GEMMs sum in another order: an activation on a rounding boundary may land one step away
        assert torch.allclose(integer_logits, out, atol=2e-3)
        assert (integer_logits.argmax(1) == out.argmax(1)).float().mean() > 0.97
    assert len(deployed_layers(deployed)) == len(opt_full.layers)


def deployed_layers(model):
    from qframe.quant.modules import QuantConv2d, QuantLinear

    return [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear))]


def test_rct_state_is_at_most_35_percent_of_qat(digits, small_model):
    model = small_model(digits)
    x, y = _batches(digits, 1, 64)[0]
    qmodel = prepare_qat(model, preset("w8a8"), [(x, y)], 1, QATConfig())
    for optimizer in ("adamw", "sgd"):
        qat = measure_training(qmodel, build_optimizer(qmodel, TrainConfig(optimizer=optimizer)), x, y)
        rmodel = prepare_rct(model, preset("w8a8"), [(x, y)], 1, RCTConfig())
        rct_mem = measure_training(rmodel, RCTOptimizer(rmodel, 0.01, RCTConfig()), x, y)
        ratio = rct_mem["total_bytes"] / qat["total_bytes"]
        assert ratio <= 0.35, (optimizer, ratio)
        assert rct_mem["gradient_bytes"] < 0.05 * qat["gradient_bytes"]  # only biases hold gradients


def test_energy_model_is_labelled_and_prices_integer_macs_below_float():
    assert mac_pj(8, 8) == pytest.approx(0.2 + 0.1)
    assert mac_pj(None, 8) == pytest.approx(3.7 + 0.9)
    assert mac_pj(4, 8) == mac_pj(8, 8) and mac_pj(16, 8) > mac_pj(8, 8)
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    x = torch.randn(4, 1, 16, 16)
    e = training_step_energy(fp32, x)
    assert e["estimate"] is True and "Horowitz" in e["source"]
    assert e["macs_per_gemm"] == 4 * (8 * 14 * 14 * 9 + 10 * 8 * 14 * 14)
    assert e["gemm_uj"] == pytest.approx(3 * e["macs_per_gemm"] * 4.6e-6)


@pytest.mark.slow
def test_rct_experiment_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qframe", "+experiment=smoke", "method=rct", "method.compare=[]",
         "method.rct.interval=2", "method.rct.bits_init=6", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rct_info = metrics["rct"]
    # qat: 8-bit QAT with RCT's optimizer, lr, epochs and start; convert: the RCT model as integers
    assert [r["method"] for r in metrics["results"]] == ["fp32", "ptq", "qat", "rct", "convert"]
    assert metrics["results"][2]["optimizer"].startswith("sgd")
    assert metrics["rct"]["memory"]["ratio_vs_qat_same_optimizer"] < 0.35
    assert 4 <= rct_info["average_bits"] <= 8 and len(rct_info["history_steps"]) >= 2
    assert rct_info["memory"]["rct"]["total_bytes"] < 0.35 * rct_info["memory"]["qat"]["total_bytes"]
    assert 0 < rct_info["energy_estimate"]["gemm_saving"] < 1
    assert (tmp_path / "rct_bits.png").stat().st_size > 5000
    assert sorted(p.name for p in tmp_path.glob("rct_*.pt")) == ["rct_w8a8.pt"]  # the main preset's, as ptq_ / qat_


def test_rct_from_scratch_experiment_keeps_batchnorm_and_folds_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qframe", "+experiment=rct_orin_scratch", "model=compact_cnn", "data.image_size=16",
         "train.epochs=1", "train.min_steps=0", "method.epochs=1", "method.calib_batches=2", "method.rct.interval=2",
         "measure.enabled=false", "device=cpu", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BatchNorms train beside them and fold into their scales at the end" in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {r["method"]: r for r in metrics["results"]}
    assert rows["rct"]["accuracy"] > 20 and rows["qat"]["accuracy"] > 20  # both learned from the untrained model
    assert metrics["config"]["method"]["rct"]["from_scratch"] is True


def test_folding_a_batchnorm_into_an_rct_layer_is_exact_and_keeps_codes_integer():
    from qframe.methods.rct import RCTConv2d
    from qframe.methods.rct.storage import fold_bn_into_layer

    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    conv, bn = nn.Conv2d(5, 7, 3, padding=1, bias=True), nn.BatchNorm2d(7)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(7))  # about half the gains negative
        bn.weight[0] = 0.0
        bn.bias.copy_(torch.randn(7))
        bn.running_mean.copy_(torch.randn(7))
        bn.running_var.copy_(torch.rand(7) + 0.2)
    layer = RCTConv2d(conv, 6, None).eval()
    bn.eval()
    x = torch.randn(4, 5, 9, 9, dtype=torch.float64)
    before_codes = layer.codes.clone()
    w64 = layer.codes.double() * layer.scale.double().view(-1, 1, 1, 1)
    reference = bn.double()(nn.functional.conv2d(x, w64, layer.bias.double(), padding=1))
    bn.float()
    fold_bn_into_layer(layer, bn)
    assert layer.codes.dtype == torch.int8 and (layer.scale > 0).all()
    negative = bn.weight < 0
    lo = -(2 ** 5)
    for c in range(7):  # codes unchanged, or negated where the gain is negative (the range's low end moves one step)
        expect = -before_codes[c].to(torch.int32) if negative[c] else before_codes[c].to(torch.int32)
        assert torch.equal(layer.codes[c].to(torch.int32), expect.clamp(max=-lo - 1))
    folded = nn.functional.conv2d(x, layer.codes.double() * layer.scale.double().view(-1, 1, 1, 1),
                                  layer.bias.double(), padding=1)
    clipped = [c for c in range(7) if negative[c] and (before_codes[c] == lo).any()]
    keep = [c for c in range(7) if c not in clipped]
    assert torch.allclose(folded[:, keep], reference[:, keep], rtol=1e-5, atol=1e-5)


def test_rct_trains_batchnorm_beside_integer_layers_and_folds_it_at_the_end(digits, small_model):
    from qframe.quant.recipe import preset as make_preset

    model = small_model(digits)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert norms > 0
    recipe = make_preset("w8a8", fold_bn=False)
    trained, opt = rct(model, recipe, digits, RCTConfig(interval=5), TrainConfig(epochs=1, batch_size=64),
                       epochs=1, lr=0.05, calib_batches=_batches(digits, 2), num_batches=2, observer_steps=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())  # folded into the codes' scales
    assert len(rct_layers(trained)) == len(opt.layers)
    x, y = next(iter(digits.loader("test", 256)))
    seen = {}  # each RCT layer's input and output, cloned before an in-place activation overwrites them
    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0].clone(), o.clone())}))
             for name, layer in rct_layers(trained)]
    with torch.no_grad():
        out = trained(x)
        for hook in hooks:
            hook.remove()
        deployed_model = to_fake_quant(trained)
        deployed = deployed_model(x)
        layers = dict(deployed_model.named_modules())
        for name, (inp, expected) in seen.items():  # layer by layer on the same input: float rounding only
            torch.testing.assert_close(layers[name](inp), expected, atol=1e-5 * expected.abs().max(), rtol=0)
    # end to end, a last-bit difference can move an activation across a rounding boundary downstream,
    # which shifts a few logits by a fraction of a step (how many depends on the GEMM's summation order)
    assert (out - deployed).abs().mean() < 1e-3
    assert (out.argmax(1) == deployed.argmax(1)).float().mean() >= 0.99
    assert (out.argmax(1) == y).float().mean() > 0.3  # it learned from its random start in one epoch


def test_rct_says_which_recipe_weight_settings_it_replaces_and_refuses_a_recipe_without_weights(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 4)).eval()
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    with caplog.at_level("WARNING", logger="qframe.methods.rct.method"):
        prepare_rct(model, preset("w8a8"), batches, 1, RCTConfig())
    assert not caplog.records  # the recipe's widths are RCT's starting widths: nothing is replaced
    with caplog.at_level("WARNING", logger="qframe.methods.rct.method"):
        qmodel = prepare_rct(model, preset("w4a16"), batches, 1, RCTConfig(bits_init=6, bits_min=4, bits_max=8))
    text = " | ".join(r.getMessage() for r in caplog.records)
    # w4a16 keeps the first and last layers at 8 bits: all three differ from bits_init=6
    assert "bits_init=6 bits (moving within 4..8), not at the widths of recipe 'w4a16' (4 bits for 2; 8 bits for " \
           "0, 5)" in text, text
    assert "the per-group weights of recipe 'w4a16' do not apply" in text, text
    assert {layer.bits for _, layer in rct_layers(qmodel)} == {6}
    with pytest.raises(QFrameError, match=r"RCT trains integer weights, but recipe 'w8a8' quantizes none "
                                          r"\(weight=None\); valid: a recipe with weights"):
        prepare_rct(model, preset("w8a8", weight=None), batches, 1, RCTConfig())


class _OtherLayers(nn.Module):
    """A Conv2d RCT holds as codes, one that pads by reflection, a ConvTranspose2d and a Conv1d it does not."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.up, self.c1, self.fc = nn.ConvTranspose2d(8, 8, 2, 2), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.up(torch.relu(self.reflect(torch.relu(self.a(x))))))
        return self.fc(self.c1(x.flatten(2)).mean(2))


def test_rct_names_the_layers_that_keep_float_master_weights_and_trains_them(caplog):
    torch.manual_seed(0)
    model = _OtherLayers().eval()
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(2)]
    with caplog.at_level("WARNING", logger="qframe.methods.rct.method"):
        qmodel = prepare_rct(model, preset("w8a8"), batches, 1, RCTConfig())
    assert sorted(n for n, _ in rct_layers(qmodel)) == ["a", "fc"]
    kept = qmodel.qframe_rct_float_master
    assert sorted(kept) == ["c1", "reflect", "up"]
    assert "padding_mode='reflect'" in kept["reflect"] and kept["up"].startswith("ConvTranspose2d")
    assert kept["c1"].startswith("Conv1d") and "integer weights for Conv2d and Linear" in kept["c1"]
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "3 quantized layers keep FP32 master weights" in text and "up (ConvTranspose2d" in text
    # they train (as in QAT), beside the integer layers
    optimizer = RCTOptimizer(qmodel, 0.05, RCTConfig())
    before = {n: qmodel.get_submodule(n).weight.detach().clone() for n in kept}
    x, y = batches[0]
    nn.functional.cross_entropy(qmodel.train()(x), y).backward()
    optimizer.step()
    assert all(not torch.equal(before[n], qmodel.get_submodule(n).weight) for n in kept)
    assert all(qmodel.get_submodule(n).weight_quantizer.dynamic for n in kept)  # ranges follow the weights, as in QAT


class _SamePadding(nn.Module):
    """padding='same' / 'valid' as transformers' EfficientNet writes them, and a 'same' that pads one side more."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same")
        self.dilated = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.valid = nn.Conv2d(8, 8, 3, padding="valid")
        self.even = nn.Conv2d(8, 8, 4, padding="same")
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.valid(torch.relu(self.dilated(torch.relu(self.same(x))))))
        return self.fc(torch.relu(self.even(x)).mean((2, 3)))


def test_string_paddings_run_on_the_integer_gemm_and_an_uneven_same_keeps_a_float_master():
    """'same' reached the integer GEMM as a string: a raw TypeError at the first forward."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3, 10, 10), torch.randint(0, 4, (4,))) for _ in range(2)]
    qmodel = prepare_rct(_SamePadding().eval(), preset("w8a8"), batches, 1, RCTConfig())
    assert sorted(n for n, _ in rct_layers(qmodel)) == ["dilated", "fc", "same", "valid"]
    assert list(qmodel.qframe_rct_float_master) == ["even"]
    assert "padding='same' where it pads both sides alike" in qmodel.qframe_rct_float_master["even"]
    assert (qmodel.same.padding, qmodel.dilated.padding, qmodel.valid.padding) == ((1, 1), (2, 2), (0, 0))
    x = batches[0][0]
    with torch.no_grad():
        integer = qmodel(x)
        for _, layer in rct_layers(qmodel):
            layer.integer_gemm = False
        float_path = qmodel(x)
    assert integer.shape == (4, 4)
    assert (integer - float_path).abs().max() <= 1e-4 * (1 + float_path.abs().max())
