"""The user's own data and task: ptq, qat and rct take any iterable of batches, a loss and an input function."""

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.methods.qat import QATConfig, qat
from qframe.methods.rct import RCTConfig, rct
from qframe.train import TrainConfig


class Regressor(nn.Module):
    """Two inputs (an image and a per-sample scalar), a dict output: nothing like (images, labels)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, image, gain):
        x = torch.relu(self.bn(self.conv(image))).mean((2, 3))
        return {"pred": self.fc(x) * gain[:, None]}


def _batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        image, gain = torch.randn(8, 3, 8, 8, generator=g), torch.rand(8, generator=g) + 0.5
        target = torch.stack([image.mean((1, 2, 3)), image.std((1, 2, 3))], 1) * gain[:, None]
        out.append({"inputs": (image, gain), "target": target})
    return out


def _loss(outputs, batch):
    return nn.functional.mse_loss(outputs["pred"], batch["target"])


def _input(batch):
    return batch["inputs"]


def _eval_loss(model, batches):
    with torch.no_grad():
        return sum(_loss(model(*_input(b)), b).item() for b in batches) / len(batches)


@pytest.mark.parametrize("method", ["qat", "rct"])
def test_a_regression_task_with_two_inputs_trains(method):
    torch.manual_seed(0)
    model = Regressor().eval()
    train, held = _batches(12, 1), _batches(4, 2)
    if method == "qat":
        qmodel = qat(model, qframe.preset("w8a8"), train, QATConfig(epochs=3, lr=0.01), TrainConfig(optimizer="adamw"),
                     num_batches=2, loss_fn=_loss, input_fn=_input)
        start = qframe.ptq(model, qframe.preset("w8a8"), train, 2, input_fn=_input)
    else:
        qmodel, _ = rct(model, qframe.preset("w8a8"), train, RCTConfig(), epochs=3, lr=0.05, num_batches=2,
                        loss_fn=_loss, input_fn=_input)
        start = qframe.ptq(model, qframe.preset("w8a8"), train, 2, input_fn=_input)
    before, after = _eval_loss(start, held), _eval_loss(qmodel.eval(), held)
    assert after < 0.7 * before, (before, after)  # it learned the task from these batches and this loss


def test_classification_stays_the_default_and_a_plain_list_of_batches_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    qmodel = qat(model, qframe.preset("w8a8"), batches, QATConfig(epochs=1), num_batches=2)
    assert torch.isfinite(qmodel(batches[0][0])).all()
    with pytest.raises(QFrameError, match="loss_fn"):  # batches without labels need a loss
        qat(model, qframe.preset("w8a8"), [b[0] for b in batches], QATConfig(epochs=1), num_batches=2)


def test_a_one_shot_iterator_is_named_as_the_problem():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 12, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    with pytest.raises(QFrameError, match="one-shot iterator"):
        qat(model, qframe.preset("w8a8"), iter(batches), QATConfig(epochs=2), calib_batches=batches, num_batches=1)


def test_labels_losses_and_batches_that_do_not_fit_are_one_line():
    from qframe.methods.loop import fit_batches

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(8, 3, 8, 8)
    labels = torch.zeros(8, dtype=torch.long)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = qframe.build_data("digits", image_size=16, channels=1, seed=1)

    def train(batches, **kwargs):
        return fit_batches(model, batches, epochs=1, optimizer=optimizer, **kwargs)

    cases = [
        (lambda: train([(x, torch.full((8,), 50))]), r"logits of shape \(8, 3\) \(label 50\); valid: integer class indices 0..2"),
        (lambda: train([(x, torch.rand(8))]), r"\(float32 labels of shape \(8,\)\); valid: .* or one probability per class"),
        (lambda: train([(x, labels)], loss_fn=lambda out, batch: out), r"loss_fn gave shape \(8, 3\); valid: one number"),
        (lambda: train([(x, labels)], loss_fn=lambda out, batch: 1.0), "loss_fn gave float"),
        (lambda: qframe.evaluate(model, [(x, torch.full((8,), -1))]), r"\(label -1\)"),
        (lambda: qframe.evaluate(model, [x]), r"evaluation batch 0 is a Tensor; valid: \(images, labels\) pairs"),
        (lambda: qframe.evaluate(model, data), r"got the data bundle; valid: data.loader\('test', 64\)"),
        (lambda: qframe.evaluate(model, data.loader("test", 64)),
         r"evaluation batch 0 \(shape \(64, 1, 16, 16\)\) does not fit the model: .*3 channels"),
    ]
    for make, message in cases:
        with pytest.raises(QFrameError, match=message) as err:
            make()
        assert "\n" not in str(err.value)
    # soft labels, one probability per class, stay valid
    assert train([(x, torch.softmax(torch.randn(8, 3), 1))])[0]["train_loss"] > 0


class _Kill(Exception):
    pass


class _Samples(torch.utils.data.Dataset):
    """The samples of ``_batches`` one by one, for a shuffling DataLoader."""

    def __init__(self, batches):
        self.items = [({"inputs": (b["inputs"][0][i], b["inputs"][1][i]), "target": b["target"][i]})
                      for b in batches for i in range(len(b["target"]))]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train_own(method, model, tmp_path, *, resume=None, die_after=None, epochs=3, recipe="w4a8", qat_cfg=None,
               rct_cfg=None, **extra):
    """qat or rct on a seeded, shuffling DataLoader of the user's task, checkpointing to tmp_path/last.pt."""
    calls = {"n": 0}

    def loss(outputs, batch):
        calls["n"] += 1
        if die_after is not None and calls["n"] > die_after:
            raise _Kill
        return _loss(outputs, batch)

    loader = torch.utils.data.DataLoader(_Samples(_batches(6, 1)), batch_size=8, shuffle=True,
                                         generator=torch.Generator().manual_seed(7))
    kwargs = dict(calib_batches=_batches(2, 5), num_batches=2, loss_fn=loss, input_fn=_input,
                  checkpoint_path=tmp_path / "last.pt", resume=resume, **extra)
    if method == "qat":
        cfg = QATConfig(epochs=epochs, lr=0.01, observer_steps=2, **(qat_cfg or {}))
        return qat(model, qframe.preset(recipe), loader, cfg, **kwargs)
    return rct(model, qframe.preset(recipe), loader, RCTConfig(**(rct_cfg or {})), epochs=epochs, lr=0.05,
               observer_steps=2, **kwargs)[0]


@pytest.mark.parametrize("method", ["qat", "rct"])
def test_a_killed_run_on_the_users_own_batches_resumes_to_the_state_of_an_uninterrupted_one(method, tmp_path):
    torch.manual_seed(0)
    model = Regressor().eval()
    full = _train_own(method, model, tmp_path).state_dict()
    (tmp_path / "last.pt").unlink()
    with pytest.raises(_Kill):
        _train_own(method, model, tmp_path, die_after=6 + 3)  # six batches an epoch: dies inside the second
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 0
    torch.manual_seed(123)  # torch's RNG comes from the checkpoint, not from the caller
    resumed = _train_own(method, model, tmp_path, resume=str(tmp_path / "last.pt")).state_dict()
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0, msg=key)
    # without the checkpoint the second and third epochs would not have been replayed: not the same state
    fresh = _train_own(method, model, tmp_path, epochs=2).state_dict()
    assert any(not torch.equal(fresh[k], full[k]) for k in full if fresh[k].is_floating_point())


def test_resuming_the_users_own_batches_under_other_settings_or_from_nothing_is_one_line(tmp_path):
    torch.manual_seed(0)
    model = Regressor().eval()
    with pytest.raises(_Kill):
        _train_own("qat", model, tmp_path, die_after=7)
    last = str(tmp_path / "last.pt")
    other = Regressor().eval()  # another starting model: another run, whatever its settings
    cases = [
        (dict(resume=last, epochs=4), r"resume checkpoint '.*last.pt' was written with method.epochs=3 \(now 4\); "
                                      r"resume with the settings it was written with, or start over without resume"),
        (dict(resume=last, recipe="w8a8"), r"was written with quant.name='w4a8', quant.weight.bits=4, .*\(now 'w8a8', 8"),
        (dict(resume=last, qat_cfg=dict(freeze_bn_epoch=0)), r"was written with method.freeze_bn_epoch=\d+ \(now 0\)"),
        (dict(resume=last, model=other), r"was written with start_weights='[0-9a-f]{12}' \(now '[0-9a-f]{12}'\)"),
        (dict(resume=str(tmp_path / "nothing.pt")), r"qat's resume='.*nothing.pt': that checkpoint does not exist; "
                                                     r"valid: the path of a checkpoint that qat's checkpoint_path"),
        (dict(augment=lambda x, g: x), "qat's augment works on qframe's data .* augment in your DataLoader instead"),
    ]
    for kwargs, message in cases:
        with pytest.raises(QFrameError, match=message) as err:
            _train_own("qat", kwargs.pop("model", model), tmp_path, **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(QFrameError, match="rct's augment works on qframe's data"):
        _train_own("rct", model, tmp_path, augment=lambda x, g: x)
    with pytest.raises(_Kill):
        _train_own("rct", model, tmp_path, die_after=7)
    with pytest.raises(QFrameError, match=r"was written with method.rct.bits_min=4 \(now 6\)"):
        _train_own("rct", model, tmp_path, resume=last, rct_cfg=dict(bits_min=6))


def test_resume_settings_on_the_users_batches_leave_out_what_fit_batches_does_not_use():
    from qframe.methods.loop import resume_settings

    model, recipe = Regressor().eval(), qframe.preset("w8a8")
    record = resume_settings(model, recipe, TrainConfig(), 0, ("epochs", "lr"), _batches(2, 1), own=False)
    changed = resume_settings(model, recipe, TrainConfig(batch_size=7, label_smoothing=0.3, warmup_epochs=0.0),
                              0, ("epochs", "lr"), _batches(2, 1), own=False)
    assert record == changed and "train.optimizer" in record and "train.batch_size" not in record
    own = resume_settings(model, recipe, TrainConfig(), 0, ("epochs", "lr"))
    assert own["train.batch_size"] == 64 and own["train.label_smoothing"] == 0.05
    assert own["start_weights"] == record["start_weights"] != resume_settings(
        Regressor().eval(), recipe, TrainConfig(), 0, ("epochs", "lr"))["start_weights"]


def test_a_checkpoint_of_qframes_own_training_loop_given_to_fit_batches_is_one_line(tmp_path):
    from qframe.methods.loop import fit_batches
    from qframe.train import fit

    data = qframe.build_data("digits", image_size=16, channels=1, seed=0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, data.num_classes))
    fit(model, data, TrainConfig(epochs=1, batch_size=256), checkpoint_path=tmp_path / "fit.pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(QFrameError, match=r"was written by qframe.train.fit \(qframe's data and classification\)"):
        fit_batches(model, data.loader("train", 256), epochs=2, optimizer=optimizer, resume=str(tmp_path / "fit.pt"))


def test_a_missing_resume_file_is_named_in_the_words_of_the_python_call_on_qframes_data_too(tmp_path):
    data = qframe.build_data("digits", image_size=16, channels=1, seed=0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, data.num_classes)).eval()
    for call, verb in [(lambda r: qat(model, qframe.preset("w8a8"), data, QATConfig(epochs=1), resume=r), "qat"),
                       (lambda r: rct(model, qframe.preset("w8a8"), data, RCTConfig(), epochs=1, lr=0.01, resume=r),
                        "rct")]:
        with pytest.raises(QFrameError, match=f"^{verb}'s resume='auto': that checkpoint does not exist; valid: the "
                                              f"path of a checkpoint that {verb}'s checkpoint_path received$"):
            call("auto")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_half_precision_weights_is_refused_before_any_step(dtype, digits):
    """QAT of a float16 model under AdamW turned its weights, then its ranges, to NaN (eps is 0 in float16)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval().to(dtype)
    data = [(torch.randn(8, 3, 8, 8, dtype=dtype), torch.randint(0, 4, (8,))) for _ in range(2)]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(QFrameError, match=f"qat w8a8: the model trains {str(dtype)[6:]} parameters.*model.float"):
        qat(model, qframe.preset("w8a8"), data, QATConfig(epochs=1), TrainConfig(optimizer="adamw"), num_batches=2)
    with pytest.raises(QFrameError, match="the model trains .* parameters"):  # qframe's own data: train.fit
        qframe.train.fit(model, digits, TrainConfig(epochs=1))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
