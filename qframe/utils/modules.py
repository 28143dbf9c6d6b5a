"""Module-tree helpers shared by the zoo, BN folding and quantization."""

import contextlib
import copy
import logging

import torch
from torch import nn

from qframe.errors import QFrameError, require_module


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Within, ``model`` in eval mode; after, each of its modules back in the mode it was in (a model may hold
    modules in either: ``model.train(was_training)`` would set them all alike)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the sub-module called ``name`` (dotted path) of ``model`` with ``module``, in the old one's mode
    (train or eval: a quantized twin or an ``nn.Identity`` in place of an eval layer is in eval too).

    A parent that also holds the old module in a plain list or dict attribute (``self.layers = [pool,
    conv]`` beside ``add_module``, as transformers' UperNet does) calls it through that container: the
    container is pointed at the replacement too, else the model would go on running the old module.
    """
    if not name:
        raise QFrameError(f"cannot replace the model itself; wrap the single {type(module).__name__} in an nn.Sequential")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = parent._modules.get(child)
    if old is not None and old is not module:
        adopted = set(old.modules())  # what the replacement took over from the old module keeps its own mode
        for m in module.modules():
            if m not in adopted:
                m.training = old.training
    setattr(parent, child, module)
    if old is not None and old is not module:
        _replace_aliases(parent, old, module)


def _replace_aliases(parent: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for key, value in vars(parent).items():
        if key.startswith("_"):  # nn.Module's own registries and hooks
            continue
        if isinstance(value, list):
            value[:] = [new if v is old else v for v in value]
        elif isinstance(value, dict):
            for k, v in value.items():
                if v is old:
                    value[k] = new


def zero_padding(conv: nn.Module, user: str) -> tuple[int, ...] | str:
    """A convolution's zero padding as numbers per spatial dim (``"valid"``: none; ``"same"``: half the kernel's
    reach on each side), or, in one line naming ``user`` (what needs the numbers), why it has none: another
    padding mode, or a ``"same"`` that pads one side more than the other."""
    if conv.padding_mode != "zeros":
        return f"{user} supports convolutions with zero padding, not padding_mode={conv.padding_mode!r}"
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        reach = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        if any(r % 2 for r in reach):
            return (f"{user} supports padding='same' where it pads both sides alike, not kernel "
                    f"{tuple(conv.kernel_size)} with dilation {tuple(conv.dilation)}")
        return tuple(r // 2 for r in reach)
    return tuple(conv.padding)


def _hook_name(hook) -> str | None:
    """The tensor an old-style reparametrization hook recomputes: ``name`` of torch.nn.utils.weight_norm /
    spectral_norm, ``_tensor_name`` of torch.nn.utils.prune's methods."""
    for attr in ("name", "_tensor_name"):
        value = getattr(hook, attr, None)
        if isinstance(value, str):
            return value
    return None


def _hook_made_weights(model: nn.Module):
    """``(module, name, key)`` for each tensor a forward pre-hook of ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` / ``prune`` recomputes (``key`` the hook's): a plain tensor attribute computed from
    parameters, not a parameter."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            name = _hook_name(hook)
            value = getattr(module, name, None) if name else None
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and name not in module._buffers:
                yield module, name, key


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also of a model with old-style ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` or ``torch.nn.utils.prune`` layers, whose computed weight deepcopy refuses (it is not a
    graph leaf): the copy gets that weight detached, and its hook recomputes it at the next forward as before."""
    memo = {id(getattr(m, name)): getattr(m, name).detach().clone() for m, name, _ in _hook_made_weights(model)}
    return copy.deepcopy(model, memo)


def pruning_masks(model: nn.Module) -> dict:
    """``{module name: mask}`` (copies) of each weight ``torch.nn.utils.prune`` masks."""
    names = {m: n for n, m in model.named_modules()}
    masks = {}
    for module, name, _ in _hook_made_weights(model):
        mask = module._buffers.get(f"{name}_mask")
        if name == "weight" and mask is not None:
            masks[names[module]] = mask.detach().clone()
    return masks


def bake_hook_made_weights(model: nn.Module) -> dict[str, str]:
    """Make each weight an old-style ``weight_norm`` / ``spectral_norm`` or ``prune`` hook computes a plain
    parameter of the value it computes now, in place, through the hook's own ``remove`` (what
    ``torch.nn.utils.remove_weight_norm`` and ``prune.remove`` do); returns ``{module name: hook type}``. A
    quantized layer quantizes its ``weight`` parameter; ``torch.nn.utils.parametrizations`` layers keep their
    reparametrization instead."""
    names = {m: n for n, m in model.named_modules()}
    baked = {}
    for module, _, key in list(_hook_made_weights(model)):
        hook = module._forward_pre_hooks[key]
        if not callable(getattr(hook, "remove", None)):
            continue
        hook.remove(module)
        del module._forward_pre_hooks[key]
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks):  # spectral_norm's, as
            for k in [k for k, h in hooks.items() if getattr(getattr(h, "hook", h), "fn", None) is hook]:
                del hooks[k]  # torch.nn.utils.remove_spectral_norm removes them: the weight is plain now
        baked[names[module]] = type(hook).__name__
    return baked


def eager_module(model, verb: str) -> nn.Module:
    """The ``nn.Module`` whose layers ``verb`` swaps or folds: ``model`` itself, or the module a ``torch.compile``
    wrapper holds (logged: the result is not compiled). A TorchScript module is one line: its layers cannot be
    swapped."""
    require_module(model, verb)
    if isinstance(model, torch.jit.ScriptModule):
        raise QFrameError(f"{verb} needs the model as an nn.Module, got the TorchScript module "
                          f"{type(model).__name__}, whose layers cannot be swapped; valid: the model before "
                          "torch.jit.script / torch.jit.trace")
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        logging.getLogger("qframe").info("%s: quantizing the module torch.compile wraps (model._orig_mod); the "
                                         "result is not compiled (torch.compile it again)", verb)
        model = inner
    return model


def require_initialized(model: nn.Module, verb: str) -> None:
    """One line naming the lazy parameters of ``model`` not initialized yet: a copy of it would draw weights of
    its own at its first batch, not the ones the model will draw, and a layer without its shape cannot be
    quantized."""
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if nn.parameter.is_lazy(t)]
    if lazy:
        raise QFrameError(f"{verb}: {len(lazy)} parameters of {type(model).__name__} are not initialized yet "
                          f"(lazy modules: {', '.join(lazy[:4])}); valid: a model that has run, e.g. model(batch) "
                          "once before quantizing, or trained")


def keep_pruned(model: nn.Module, masks: dict) -> list[str]:
    """Re-apply ``torch.nn.utils.prune`` masks (``{module name: mask}``) to the layers of ``model`` at the same
    names (``prune.custom_from_mask``), so that training keeps the pruned weights at zero; returns the names
    whose layer has no weight of the mask's shape (left unmasked)."""
    from torch.nn.utils import prune

    lost = []
    for name, mask in masks.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            lost.append(name)
            continue
        weight = layer._parameters.get("weight")
        if weight is None or weight.shape != mask.shape:
            lost.append(name)
            continue
        prune.custom_from_mask(layer, "weight", mask.to(weight.device))
    return lost


def is_parametrized(module: nn.Module) -> bool:
    """Whether ``module`` itself holds ``torch.nn.utils.parametrizations`` (weight_norm, spectral_norm, ...)."""
    return isinstance(getattr(module, "parametrizations", None), nn.ModuleDict) and \
        any(c.__name__.startswith("Parametrized") for c in type(module).__mro__)  # the class torch made for it


def unparametrized(module: nn.Module) -> nn.Module:
    """``module`` (a layer with ``torch.nn.utils.parametrizations``) as its class before them, each
    parametrized tensor a plain parameter of the value it computes now (trainable where its originals were).
    torch's ``remove_parametrizations`` would delete the property from the module's class, which every deep
    copy of the module shares."""
    base = type(module).__bases__[0]
    plain = base.__new__(base)
    plain.__dict__.update(module.__dict__)
    plain._modules = {k: v for k, v in module._modules.items() if k != "parametrizations"}
    plain._parameters = dict(module._parameters)
    plain._buffers = dict(module._buffers)
    for tensor, chain in module.parametrizations.items():
        with torch.no_grad():
            value = getattr(module, tensor).detach().clone()
        originals = list(chain._parameters.values())  # original, or original0, original1, ... (weight_norm)
        if originals:
            plain._parameters[tensor] = nn.Parameter(value, requires_grad=any(p.requires_grad for p in originals))
        else:
            plain._buffers[tensor] = value
    return plain


def bake_parametrizations(model: nn.Module, names=None) -> dict[str, str]:
    """Replace each layer of ``model`` (or of those called ``names``) that holds ``torch.nn.utils.parametrizations``
    by :func:`unparametrized`, in place; returns ``{layer name: parametrizations}``, e.g. ``{"0": "_WeightNorm"}``.
    What changes a layer's weight in place (BN folding, equalization) needs the plain weight: written into a
    parametrized tensor it would be lost at the next forward."""
    baked = {}
    for name, module in list(model.named_modules()):
        if name and (names is None or name in names) and is_parametrized(module):
            kinds = {type(p).__name__ for chain in module.parametrizations.values() for p in chain}
            set_submodule(model, name, unparametrized(module))
            baked[name] = "+".join(sorted(kinds))
    return baked
