"""Typed configuration: the schema Hydra validates ``conf/`` against, and ``to_config``.

The dataclasses are registered in Hydra's ConfigStore as ``qframe_schema``; ``conf/config.yaml``
lists it first in its defaults, so every group file merges into a typed node: unknown keys and
wrong types are rejected while composing, and value checks run in ``__post_init__`` when
:func:`to_config` turns the composed config into these objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from qframe.data.common import check_fractions
from qframe.errors import QFrameError, one_of
from qframe.export.stage import ExportConfig
from qframe.measure.profile import MeasureConfig
from qframe.methods.ptq import PTQOptions
from qframe.methods.qat import QATConfig
from qframe.methods.rct.optimizer import RCTConfig
from qframe.quant.adaround import AdaRoundConfig
from qframe.quant.gptq import GPTQConfig
from qframe.quant.recipe import QuantRecipe, preset, preset_names
from qframe.train import TrainConfig

DATASETS = ("digits", "imagefolder")
MODEL_NAMES = ("mobilenet_v2", "resnet18", "compact_cnn", "torchvision", "custom")
METHODS = ("ptq", "qat", "rct")
TARGETS = ("torch", "tensorrt")


@dataclass
class ModelConfig:
    """Which network: a zoo name (``torchvision`` with ``arch``; ``custom``: the user's own ``factory``), width,
    and a backbone checkpoint."""

    name: str = "mobilenet_v2"
    width_mult: float = 1.0
    arch: Optional[str] = None
    checkpoint: Optional[str] = None  # backbone weights to start from (transfer learning)
    factory: Optional[str] = None  # model=custom: "module:callable" that builds it (qframe.models.custom)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # model=custom: the factory's own arguments

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise one_of("model", self.name, MODEL_NAMES)
        if not self.width_mult > 0:
            raise QFrameError(f"model.width_mult={self.width_mult!r} is invalid; valid: a number > 0")
        if self.name == "custom":
            from qframe.models.custom import check_factory_spec

            check_factory_spec(self.factory)
        elif self.factory or self.kwargs:
            raise QFrameError(f"model.factory / model.kwargs are for model=custom, not model={self.name}; valid: "
                              "model=custom model.factory=module:callable")


@dataclass
class DataConfig:
    """Which images: the bundled digits, or a folder with one sub-folder per class."""

    name: str = "digits"
    root: Optional[str] = None
    image_size: int = 32
    channels: int = 1
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    shift: float = 0.1  # training augmentation: random translation, as a fraction of the image size
    hflip: bool = False  # training augmentation: horizontal flips (faces yes, digits no)

    def __post_init__(self):
        if self.name not in DATASETS:
            raise one_of("data set", self.name, DATASETS)
        if self.name == "imagefolder" and not self.root:
            raise QFrameError("data=imagefolder needs data.root=<folder with one sub-folder per class>")
        if self.name == "digits" and self.root:
            raise QFrameError(f"data.root={self.root!r} is for data=imagefolder; data=digits is built in and reads no "
                              "folder; valid: data=imagefolder data.root=<folder>, or no data.root")
        if self.channels not in (1, 3):
            raise QFrameError(f"data.channels={self.channels!r} is invalid; valid: 1 (grayscale) or 3 (RGB)")
        if not isinstance(self.image_size, int) or self.image_size < 16:
            raise QFrameError(f"data.image_size={self.image_size!r} is invalid; valid: an integer >= 16")
        if not 0.0 <= self.shift < 0.5:
            raise QFrameError(f"data.shift={self.shift!r} is invalid; valid: 0 <= shift < 0.5")
        check_fractions(self.val_fraction, self.test_fraction, prefix="data.")


@dataclass
class MethodConfig(QATConfig):
    """How the trained FP32 model is quantized; ``compare`` adds more presets evaluated side by side.

    ``ptq`` calibrates and evaluates; ``qat`` does that, then trains quantization-aware (the
    :class:`~qframe.methods.qat.QATConfig` fields) and evaluates again; ``rct`` trains with
    integer weights only (``epochs`` and ``lr`` from here, the rest in ``rct``,
    :class:`~qframe.methods.rct.RCTConfig`).

    PTQ remedies (:class:`~qframe.methods.ptq.PTQOptions`), for the PTQ of every method: ``equalize``
    (cross-layer equalization), ``bias_correction``, ``rounding`` (``nearest``, ``adaround``,
    ``adaround_block``, ``gptq``) with its settings in ``adaround`` / ``gptq``.
    """

    name: str = "ptq"
    calib_batches: int = 8
    calib_batch_size: int = 64
    compare: List[str] = field(default_factory=list)
    rct: RCTConfig = field(default_factory=RCTConfig)
    equalize: bool = False
    bias_correction: bool = False
    rounding: str = "nearest"
    adaround: AdaRoundConfig = field(default_factory=AdaRoundConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)

    def __post_init__(self):
        super().__post_init__()
        self.ptq_options()  # validates rounding
        if self.name not in METHODS:
            raise one_of("method", self.name, METHODS)
        for name in ("calib_batches", "calib_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise QFrameError(f"method.{name}={value!r} is invalid; valid: an integer >= 1")
        names = preset_names()
        for i, name in enumerate(self.compare):
            if name not in names:
                raise one_of("quant preset in method.compare", name, names)
            if name in self.compare[:i]:
                raise QFrameError(f"method.compare lists {name!r} twice; valid: each preset once")
        if self.compare:
            # a recipe with a budget (quant=auto) is a search for a recipe, run as the main quant only
            fixed = [n for n in names if preset(n).budget is None]
            for name in self.compare:
                if name not in fixed:
                    raise QFrameError(f"method.compare holds {name!r}, a mixed-precision search, not a recipe: "
                                      f"run it as quant={name}; valid in method.compare: {', '.join(fixed)}")

    def ptq_options(self) -> PTQOptions:
        return PTQOptions(self.equalize, self.bias_correction, self.rounding, self.adaround, self.gptq)

    def qat_config(self) -> QATConfig:
        return QATConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(QATConfig)})


@dataclass
class DeviceConfig:
    """Where the run computes (``torch_device``), what it deploys to (``target``) and which low-bit
    GEMM backend runs converted layers (``kernels``, see :mod:`qframe.kernels.dispatch`)."""

    name: str = "cpu"
    torch_device: str = "auto"  # auto: cuda when available, else cpu
    target: str = "torch"
    dla: bool = False
    threads: Optional[int] = None  # torch intra-op threads on the CPU; None keeps torch's default
    kernels: str = "auto"  # auto (per call: triton > cuda on GPUs, the CPU extension on CPUs), triton, cuda, cpu, reference

    def __post_init__(self):
        from qframe.kernels.dispatch import BACKENDS  # here, not at module level: the schema stays light

        if self.target not in TARGETS:
            raise one_of("device target", self.target, TARGETS)
        if self.kernels not in BACKENDS:
            raise QFrameError(f"device.kernels={self.kernels!r} is invalid; valid: {', '.join(BACKENDS)}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise QFrameError(f"device.threads={self.threads!r} is invalid; valid: an integer >= 1, or null for "
                              "torch's default")
        if self.torch_device != "auto" and self.torch_device.split(":")[0] not in ("cpu", "cuda"):
            raise QFrameError(f"device.torch_device={self.torch_device!r} is invalid; valid: auto, cpu, cuda, cuda:N")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantRecipe = field(default_factory=QuantRecipe)
    method: MethodConfig = field(default_factory=MethodConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0

    def __post_init__(self):
        m = self.method
        if m.name == "rct" and m.rct.compare_qat and not (m.rct.momentum or self.train.momentum):
            raise QFrameError("method.rct.momentum=0 and train.momentum=0: the QAT row beside RCT trains with SGD "
                              "(Nesterov), which needs momentum > 0; valid: method.rct.momentum > 0, or "
                              "method.rct.compare_qat=false")


def register() -> None:
    """Register the schema with Hydra's ConfigStore (done by the app, not at import)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="qframe_schema", node=Config)


def to_config(cfg) -> Config:
    """Validate a composed DictConfig into :class:`Config`; bad values raise one-line QFrameErrors."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    _require_known_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)
    except QFrameError as exc:
        where = _culprit(cfg)  # "quantization bits=9 is out of range" names no section: which one it is
        if where and where not in str(exc):
            raise QFrameError(f"{where}: {exc}") from None
        raise
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, QFrameError) else None
        if cause is not None:
            raise cause from None
        raise QFrameError(str(exc).splitlines()[0]) from None


def _culprit(node, path: str = "") -> str:
    """The dotted path of the innermost section of ``node`` that does not build (its check raised), or ``path``."""
    from omegaconf import DictConfig, OmegaConf

    for key in node.keys() if isinstance(node, DictConfig) else []:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            try:
                OmegaConf.to_object(child)
            except Exception:  # noqa: BLE001 (the check's error, whatever its type: this section is the one)
                return _culprit(child, f"{path}{key}.")
    return path.rstrip(".")


def _require_known_keys(node, path: str = "") -> None:
    """One line for a key the schema does not have: a key added with ``+`` (``+train.epoch=3``) goes into the
    composed config past the schema's check, and the dataclass built from it would drop it without a word.
    Free-form sections (``model.kwargs``, ``observer_args``: dicts) take any key."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, DictConfig):
        kind = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(kind):
            fields = [f.name for f in dataclasses.fields(kind)]
            for key in node.keys():
                if key not in fields:
                    where = path.rstrip(".") or "the config"
                    raise QFrameError(f"unknown key {path}{key}; valid keys of {where}: {', '.join(fields)}")
        children = [(f"{path}{key}.", node._get_node(key)) for key in node.keys()]
    elif isinstance(node, ListConfig):
        children = [(f"{path.rstrip('.')}[{i}].", node._get_node(i)) for i in range(len(node))]
    else:
        return
    for child_path, child in children:
        _require_known_keys(child, child_path)
