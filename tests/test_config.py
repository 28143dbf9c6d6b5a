"""Hydra composition of every experiment, and one-line errors for bad values."""

from importlib import resources

import pytest
from hydra import compose, initialize_config_module

from qframe.config import Config, register, to_config
from qframe.errors import QFrameError

EXPERIMENTS = sorted(p.name[:-5] for p in (resources.files("qframe.conf") / "experiment").iterdir()
                     if p.name.endswith(".yaml"))


def _compose(*overrides):
    register()
    with initialize_config_module(config_module="qframe.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_composes():
    cfg = to_config(_compose())
    assert isinstance(cfg, Config)
    assert (cfg.model.name, cfg.data.name, cfg.quant.name, cfg.method.name) == ("mobilenet_v2", "digits", "w8a8", "ptq")
    assert cfg.quant.weight.granularity == "per_channel" and cfg.quant.input.granularity == "per_tensor"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = to_config(_compose(f"+experiment={experiment}"))
    assert isinstance(cfg, Config)
    if experiment.endswith("_orin"):
        assert cfg.device.dla and cfg.device.target == "tensorrt"
    if experiment == "ptq_cpu":  # the CPU recipe: MSE activation ranges, bias correction, ONNX export
        assert cfg.device.name == "cpu" and cfg.quant.input.observer == "mse" and cfg.method.bias_correction
        assert cfg.export.enabled and cfg.method.ptq_options().needs_reference
    if experiment.startswith("qat_"):
        assert cfg.method.name == "qat" and cfg.method.qat_config().epochs >= 1
        # sub-8-bit variants of the same experiment (what --multirun quant=w4a8,w4a4 runs)
        for quant in ("w4a8", "w4a4"):
            assert to_config(_compose(f"+experiment={experiment}", f"quant={quant}")).quant.name == quant
    # experiments also run on the user's own folder
    cfg = to_config(_compose(f"+experiment={experiment}", "data=imagefolder", "data.root=/some/faces"))
    assert cfg.data.name == "imagefolder" and cfg.data.root == "/some/faces"


def test_experiments_exist():
    assert {"ptq_cpu", "ptq_desktop", "ptq_orin", "qat_desktop", "qat_orin", "smoke"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("group", ["quant=w8a8", "quant=w4a8", "quant=w4a16",
                                   "quant=w4a4", "model=resnet18", "model=compact_cnn", "device=orin",
                                   "device=desktop_gpu"])
def test_group_choices_compose(group):
    assert isinstance(to_config(_compose(group)), Config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.weight.bits=9", "quant.weight: quantization bits=9 is out of range; valid: integers 2..8"),
        ("quant.input.bits=1", "quant.input: quantization bits=1 is out of range"),
        ("method.adaround.iterations=-1", "method.adaround: adaround iterations=-1 is invalid"),
        ("model.name=vgg99", "unknown model 'vgg99'; valid: mobilenet_v2, resnet18, compact_cnn, torchvision"),
        ("data.name=mnist", "unknown data set 'mnist'; valid: digits, imagefolder"),
        ("quant.weight.granularity=per_row", "unknown granularity 'per_row'"),
        ("quant.input.observer=magic", "unknown observer 'magic'"),
        ("method.compare=[w9a9]", "unknown quant preset in method.compare 'w9a9'"),
        ("method.compare=[w4a8,auto]", "method.compare holds 'auto', a mixed-precision search, not a recipe: run it as "
                                       "quant=auto; valid in method.compare: w2a2, w3a3, w4a16, w4a4, w4a8, w8a8"),
        ("train.epochs=-1", "train.epochs=-1 is invalid"),
        ("data.channels=2", "data.channels=2 is invalid"),
        ("quant.rules=[{pattern:classifier*,weight_bits:12}]", "quant rule 'classifier*': weight_bits=12 is out of range"),
        # checked while composing, before any data is read or any training starts
        ("method.calib_batch_size=0", "method.calib_batch_size=0 is invalid; valid: an integer >= 1"),
        ("method.calib_batches=-3", "method.calib_batches=-3 is invalid; valid: an integer >= 1"),
        ("device.threads=0", "device.threads=0 is invalid; valid: an integer >= 1, or null"),
        ("device.threads=-1", "device.threads=-1 is invalid"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 is invalid; valid: a fraction 0 < x < 1"),
        ("data.test_fraction=0", "data.test_fraction=0.0 is invalid"),
        ("data.val_fraction=0.5 data.test_fraction=0.5", "= 0.5 + 0.5 leaves no training images; valid: a sum < 1"),
        ("export.exporter=jit", "export.exporter='jit' is invalid; valid: auto, torchscript, dynamo"),
        # torch's own checks, which ran mid-training with a traceback, or values it took silently
        ("train.weight_decay=-1", "train.weight_decay=-1.0 is invalid; valid: a number >= 0"),
        ("train.label_smoothing=2", "train.label_smoothing=2.0 is invalid; valid: a number in [0, 1]"),
        ("train.label_smoothing=-0.5", "train.label_smoothing=-0.5 is invalid"),
        ("train.momentum=-3", "train.momentum=-3.0 is invalid; valid: a number in [0, 1]"),
        ("train.optimizer=sgd train.momentum=0", "train.momentum=0 is invalid with train.optimizer=sgd"),
        ("method=rct method.rct.momentum=0 train.momentum=0", "the QAT row beside RCT trains with SGD (Nesterov)"),
        ("train.warmup_epochs=-1", "train.warmup_epochs=-1.0 is invalid; valid: a number >= 0"),
        ("train.freeze_backbone_epochs=-2", "train.freeze_backbone_epochs=-2 is invalid; valid: an integer >= 0"),
        ("export.dla_core=-5", "export.dla_core=-5 is invalid; valid: an integer >= 0"),
        ("method.compare=[w4a8,w8a8,w4a8]", "method.compare lists 'w4a8' twice"),
        ("quant.name=../../evil", "quant recipe name '../../evil' is invalid; valid: a file-name stem"),
        ("quant.name=''", "quant recipe name '' is invalid"),
    ],
)
def test_bad_values_give_one_line(override, message):
    with pytest.raises(QFrameError) as err:
        to_config(_compose(*override.split()))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_imagefolder_without_root_is_one_line():
    with pytest.raises(QFrameError, match="data.root") as err:
        to_config(_compose("data=imagefolder"))
    assert "\n" not in str(err.value)
    # a folder given with the built-in digits would be silently ignored: the run would train on digits
    with pytest.raises(QFrameError, match=r"data.root='/some/faces' is for data=imagefolder; data=digits is built "
                                          r"in and reads no folder") as err:
        to_config(_compose("data.root=/some/faces"))
    assert "\n" not in str(err.value)


def test_unknown_key_is_rejected_while_composing():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="bits"):
        _compose("quant.bits=9")


@pytest.mark.parametrize("override, key, where", [("+train.epoch=3", "train.epoch", "train"),
                                                  ("+trian.epochs=3", "trian", "the config"),
                                                  ("+quant.weight.bitz=4", "quant.weight.bitz", "quant.weight")])
def test_a_key_added_with_plus_that_the_schema_lacks_is_one_line(override, key, where):
    """With +, a misspelt key went into the composed config and the run went on with its default."""
    with pytest.raises(QFrameError, match=rf"unknown key {key}; valid keys of {where}: ") as err:
        to_config(_compose("+experiment=smoke", override))
    assert "\n" not in str(err.value)
    # free-form sections take any key
    assert to_config(_compose("model=custom", "model.factory=torch.nn:Identity", "+model.kwargs.anything=1"))
