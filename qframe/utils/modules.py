"""Module-tree helpers shared by the zoo, BN folding and quantization."""

from torch import nn

from qframe.errors import QFrameError


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module called ``name`` (dotted path) of ``model`` with ``module``."""
    if not name:
        raise QFrameError(f"cannot replace the model itself; wrap the single {type(module).__name__} in an nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
