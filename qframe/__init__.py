"""qframe: quantize PyTorch vision models for edge GPUs, DLAs and CPUs.

The public verbs are re-exported here lazily, so ``import qframe`` stays fast, never initialises
CUDA and never compiles anything.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "QuantSpec": "qframe.quant.spec",
    "QuantRecipe": "qframe.quant.recipe",
    "QuantizerConfig": "qframe.quant.recipe",
    "LayerRule": "qframe.quant.recipe",
    "preset": "qframe.quant.recipe",
    "quantize_": "qframe.quant.recipe",
    "fold_bn": "qframe.quant.fold",
    "frozen_weights": "qframe.quant.frozen",
    "ptq": "qframe.methods.ptq",
    "calibrate": "qframe.methods.ptq",
    "qat": "qframe.methods.qat",
    "QATConfig": "qframe.methods.qat",
    "fold_qat": "qframe.methods.qat",
    "rct": "qframe.methods.rct",
    "RCTConfig": "qframe.methods.rct",
    "equalize": "qframe.quant.equalize",
    "adaround": "qframe.quant.adaround",
    "AdaRoundConfig": "qframe.quant.adaround",
    "gptq": "qframe.quant.gptq",
    "GPTQConfig": "qframe.quant.gptq",
    "reconstruct_blocks": "qframe.quant.block_reconstruction",
    "correct_biases": "qframe.quant.bias_correction",
    "Budget": "qframe.quant.budget",
    "build_model": "qframe.models",
    "build_data": "qframe.data",
    "evaluate": "qframe.train",
    "model_size_bytes": "qframe.measure.size",
    "QFrameError": "qframe.errors",
    "convert": "qframe.kernels.convert",
    "register_module": "qframe.quant.registry",
    "sensitivity": "qframe.quant.sensitivity",
    "unregister_module": "qframe.quant.registry",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qframe' has no attribute {name!r}")


def __dir__():
    return __all__
