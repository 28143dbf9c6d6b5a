"""Training loop: a run killed after an epoch resumes to exactly the state of an unbroken run."""

import dataclasses

import pytest
import torch
from torch import nn

import qframe
from qframe.data import augment_batch
from qframe.errors import QFrameError
from qframe.train import TrainConfig, evaluate, fit


class _Kill(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted_run(digits, tmp_path, small_model):
    cfg = TrainConfig(epochs=2, batch_size=128, lr=3e-3)
    steps = len(digits.loader("train", cfg.batch_size, shuffle=True, drop_last=True))

    def augment(x, g):
        return augment_batch(x, shift=0.1, generator=g)

    full = small_model(digits)
    fit(full, digits, cfg, seed=1, augment=augment)

    calls = {"n": 0}

    def dying_augment(x, g):
        calls["n"] += 1
        if calls["n"] == steps + 2:  # in the middle of the second epoch
            raise _Kill
        return augment(x, g)

    ckpt = tmp_path / "last.pt"
    with pytest.raises(_Kill):
        fit(small_model(digits), digits, cfg, seed=1, augment=dying_augment, checkpoint_path=ckpt)
    assert ckpt.is_file() and not list(tmp_path.glob(".*tmp"))  # no half-written file left

    torch.manual_seed(12345)  # the resumed process starts with other RNG state
    resumed = small_model(digits)
    history = fit(resumed, digits, TrainConfig(epochs=2, batch_size=128, lr=3e-3, resume=str(ckpt)), seed=1,
                  augment=augment, checkpoint_path=ckpt)
    assert [h["epoch"] for h in history] == [1, 2]
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_training_learns(digits, small_model):
    model = small_model(digits)
    before = evaluate(model, digits.loader("val", 256))["accuracy"]
    fit(model, digits, TrainConfig(epochs=3, batch_size=64, lr=3e-3), seed=0)
    after = evaluate(model, digits.loader("val", 256))["accuracy"]
    assert after > max(80.0, before + 30)


def test_resume_from_a_plain_state_dict_is_one_line(digits, tmp_path, small_model):
    path = tmp_path / "weights.pt"
    torch.save(small_model(digits).state_dict(), path)
    with pytest.raises(QFrameError, match="cannot resume training: it lacks") as err:
        fit(small_model(digits), digits, TrainConfig(epochs=1, resume=str(path)))
    assert "\n" not in str(err.value)


def test_corrupt_resume_checkpoint_is_one_line(digits, tmp_path, small_model):
    path = tmp_path / "last.pt"
    path.write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(QFrameError, match="corrupt") as err:
        fit(small_model(digits), digits, TrainConfig(epochs=1, resume=str(path)))
    assert "\n" not in str(err.value)


def test_resuming_another_model_or_optimizer_is_one_line(digits, tmp_path):
    from qframe.models import build_model

    ckpt = tmp_path / "last.pt"
    cnn = build_model("compact_cnn", digits.num_classes, digits.channels, digits.image_size)
    fit(cnn, digits, TrainConfig(epochs=1, batch_size=256, min_steps=0), checkpoint_path=ckpt)
    # the run directory's checkpoint belongs to another architecture (e.g. model= changed before resume=auto)
    other = build_model("mobilenet_v2", digits.num_classes, digits.channels, digits.image_size, width_mult=0.25)
    with pytest.raises(QFrameError) as err:
        fit(other, digits, TrainConfig(epochs=1, batch_size=256, resume=str(ckpt)))
    message = str(err.value)
    assert "\n" not in message and f"resume checkpoint {str(ckpt)!r} does not fit MobileNetV2: " in message
    assert "shape mismatches" in message and "start over (on the command line in a new hydra.run.dir" in message
    # the same model with another number of classes names the differing tensor
    fewer = build_model("compact_cnn", 5, digits.channels, digits.image_size)
    with pytest.raises(QFrameError, match=r"2 shape mismatches \(e.g. classifier\.\S+ is \(10, "):
        fit(fewer, digits, TrainConfig(epochs=1, batch_size=256, resume=str(ckpt)))
    # the same model, another optimizer: named from the recorded settings, or (a checkpoint without
    # them) from the optimizer state, whose parameter groups have other keys
    same = build_model("compact_cnn", digits.num_classes, digits.channels, digits.image_size)
    with pytest.raises(QFrameError, match=r"train.optimizer='adamw' \(now 'sgd'\)"):
        fit(same, digits, TrainConfig(epochs=1, batch_size=256, optimizer="sgd", resume=str(ckpt)))
    state = torch.load(ckpt, weights_only=True)
    del state["settings"]
    torch.save(state, ckpt)
    with pytest.raises(QFrameError, match="optimizer state that does not fit train.optimizer=sgd .*momentum"):
        fit(same, digits, TrainConfig(epochs=1, batch_size=256, optimizer="sgd", resume=str(ckpt)))


def test_an_optimizer_state_of_an_older_torch_loads_and_another_algorithms_is_refused():
    from qframe.train import _load_optimizer_state

    params = [torch.nn.Parameter(torch.randn(3, 2))]
    written = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.randn(3, 2)
    written.step()
    state = written.state_dict()
    for group in state["param_groups"]:  # keys newer torch releases added, absent from an older checkpoint
        for key in ("decoupled_weight_decay", "fused", "differentiable", "foreach", "capturable"):
            group.pop(key, None)
    resumed = torch.optim.AdamW(params, lr=1e-3)
    _load_optimizer_state(resumed, state, "run/last.pt", "train.optimizer=adamw")
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], written.state_dict()["state"][0]["exp_avg"])
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    with pytest.raises(QFrameError, match=r"does not fit train.optimizer=sgd \(its hyperparameters are another "
                                          r"optimizer's: amsgrad, betas, dampening, eps, momentum, nesterov\)"):
        _load_optimizer_state(sgd, state, "run/last.pt", "train.optimizer=sgd")


def test_freeze_backbone_trains_only_the_head_first(digits, small_model):
    model = small_model(digits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def check(epoch, m):
        seen.append(epoch)

    fit(model, digits, TrainConfig(epochs=1, batch_size=256, freeze_backbone_epochs=1), on_epoch_start=check)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert seen == [0]
    assert changed == {"classifier.1.weight", "classifier.1.bias"}


def test_min_steps_gives_a_small_data_set_more_epochs(digits, small_model):
    cfg = TrainConfig(epochs=1, batch_size=256, lr=3e-3, min_steps=9)
    steps = len(digits.loader("train", cfg.batch_size, shuffle=True, drop_last=True))
    history = fit(small_model(digits), digits, cfg, seed=0)
    assert len(history) == -(-9 // steps) > 1  # ceil(min_steps / steps per epoch) epochs, not 1


def test_patience_stops_early_and_keeps_the_best_epoch(digits, small_model, monkeypatch):
    import qframe.train as train

    # validation accuracy peaks at epoch 2, then falls: training stops after patience=2 more epochs
    scores = iter([50.0, 80.0, 70.0, 60.0, 90.0, 95.0])
    seen_states = []

    def fake_evaluate(model, loader, device="cpu"):
        seen_states.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"accuracy": next(scores), "loss": 1.0}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    model = small_model(digits)
    history = fit(model, digits, TrainConfig(epochs=6, batch_size=256, lr=3e-3, patience=2), seed=0)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen_states[1][k]), f"{k} is not epoch 2's"


@pytest.mark.parametrize("field, value", [("min_steps", -1), ("patience", 1.5), ("patience", True)])
def test_bad_schedule_settings_are_one_line(field, value):
    with pytest.raises(QFrameError, match=f"train.{field}=.* valid: an integer >= 0"):
        TrainConfig(**{field: value})


def test_resuming_under_other_training_settings_names_them(digits, tmp_path, small_model):
    ckpt = tmp_path / "last.pt"
    fit(small_model(digits), digits, TrainConfig(epochs=1, batch_size=256, lr=3e-3, min_steps=0), checkpoint_path=ckpt)
    saved = torch.load(ckpt, weights_only=True)["settings"]
    assert saved["train.batch_size"] == 256 and saved["seed"] == 0
    assert "train.resume" not in saved and "train.checkpoint" not in saved
    with pytest.raises(QFrameError) as err:
        fit(small_model(digits), digits, TrainConfig(epochs=1, batch_size=128, lr=1e-2, min_steps=0, resume=str(ckpt)))
    assert str(err.value) == (f"resume checkpoint {str(ckpt)!r} was written with train.batch_size=256, train.lr=0.003 "
                              "(now 128, 0.01); resume with the settings it was written with, or start over (on the "
                              "command line in a new hydra.run.dir; in Python without resume)")
    # where it was resumed from and the memory layout are no training settings
    history = fit(small_model(digits), digits,
                  TrainConfig(epochs=1, batch_size=256, lr=3e-3, min_steps=0, channels_last=True, resume=str(ckpt)))
    assert [h["epoch"] for h in history] == [1]


def test_a_run_that_stopped_early_resumes_to_its_best_epoch_without_training_more(digits, small_model, tmp_path,
                                                                                   monkeypatch):
    import qframe.train as train_module

    real = train_module.evaluate
    accuracies = iter([50.0, 60.0, 55.0] * 4)  # best at epoch 2, so patience=1 stops after epoch 3

    def scripted(model, loader, device="cpu"):
        return {**real(model, loader, device), "accuracy": next(accuracies)}

    monkeypatch.setattr(train_module, "evaluate", scripted)
    ckpt = tmp_path / "last.pt"
    cfg = TrainConfig(epochs=8, batch_size=256, patience=1, min_steps=0)
    model = small_model(digits)
    history = fit(model, digits, cfg, checkpoint_path=ckpt)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    resumed = small_model(digits)
    again = fit(resumed, digits, dataclasses.replace(cfg, resume=str(ckpt)))
    assert again == history  # nothing trained after the stop
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), f"{k} is not the best epoch's"


def test_recorded_settings_are_python_values_a_weights_only_load_reads(tmp_path):
    import numpy as np

    from qframe.train import flat_settings

    settings = flat_settings({"method": {"epochs": np.int64(3), "lr": torch.tensor(0.5), "rct": {"bits": [np.int8(4)]},
                                         "args": {}}, "seed": np.int32(2)})
    assert settings == {"method.epochs": 3, "method.lr": 0.5, "method.rct.bits": [4], "method.args": {}, "seed": 2}
    assert all(type(v) in (int, float, list, dict) for v in settings.values())
    assert type(settings["method.rct.bits"][0]) is int
    torch.save({"settings": settings}, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True)["settings"] == settings


class _DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return {"logits": self.fc(x), "features": x}


def test_evaluate_reads_the_logits_of_a_dict_output():
    """A model returning a dict (transformers' outputs are dicts) raised a raw TypeError in cross_entropy."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _DictOutput().eval()
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    result = qframe.evaluate(model, [(x[:12], y[:12]), (x[12:], y[12:])])
    with torch.no_grad():
        logits = model.fc(x)
    assert result["images"] == 20
    assert result["accuracy"] == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))
    assert result["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits.double(), y)), rel=1e-5)


@pytest.mark.parametrize("device, says", [("tpu", "device='tpu' cannot be used"),
                                          ("cuda:7", "device='cuda:7' cannot be used")])
def test_a_device_this_torch_cannot_use_is_one_line(device, says):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval()
    batches = [(torch.randn(2, 3, 6, 6), torch.zeros(2, dtype=torch.long))]
    for call in (lambda: qframe.ptq(model, qframe.preset("w8a8"), batches, 1, device=device),
                 lambda: qframe.evaluate(model, batches, device=device)):
        with pytest.raises(QFrameError, match=says) as err:
            call()
        assert "\n" not in str(err.value) and "valid here: 'cpu'" in str(err.value)
