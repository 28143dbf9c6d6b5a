"""The one exception type qframe raises for bad input.

Every message is a single line that names the bad value and says what would be valid, so the
command line can print it as it is.
"""

import dataclasses
import numbers
import operator


class QFrameError(ValueError):
    """Bad input to qframe: a config value, a name, a path, a data set or a checkpoint."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def one_of(what: str, value, valid) -> QFrameError:
    """Error for ``value`` not in ``valid``: "unknown model 'x'; valid: a, b, c"."""
    return QFrameError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def require_module(model, verb: str) -> None:
    """A QFrameError unless ``model`` is an ``nn.Module``: "qframe.ptq needs an nn.Module ..., got str"."""
    from torch import nn

    if not isinstance(model, nn.Module):
        raise QFrameError(f"{verb} needs a model (a torch.nn.Module), got {type(model).__name__} {_short(model)}")


def require_fake_quant(model, verb: str) -> None:
    """A QFrameError for a model ``qframe.convert`` made (integer layers): ``verb`` takes the fake-quant one."""
    if hasattr(model, "qframe_fake_quant_layers"):
        raise QFrameError(f"{verb} takes the fake-quant model (qframe.ptq / qat's result), not the integer model "
                          "qframe.convert made from it")


def _is_bool_type(v) -> bool:  # True / np.True_, which count as integers but never mean one
    return isinstance(v, bool) or (type(v).__module__ == "numpy" and "bool" in type(v).__name__)


def _is_bool(v) -> bool:  # numpy's bool_ and the integers 0 / 1 too, as Python's truth would take them
    return _is_bool_type(v) or (isinstance(v, numbers.Integral) and v in (0, 1))


def _is_number(v, method: str) -> bool:  # numpy scalars and 0-d tensors too; never a str or a bool
    return not isinstance(v, (str, bytes, bool)) and hasattr(v, method) and getattr(v, "ndim", 0) == 0


def _is_int(v) -> bool:  # numpy integers and integer 0-d tensors (a float tensor has __index__ too, which raises)
    if not _is_number(v, "__index__"):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


_KINDS = {"bool": ("true or false", _is_bool),
          "int": ("an integer", _is_int),
          "float": ("a number", lambda v: _is_number(v, "__float__"))}

# what an accepted value of another type (numpy's, a 0-d tensor, 0 / 1 for a bool) becomes, so that the
# checks after check_field_types, settings recorded with checkpoints and JSON see plain Python values
_AS_PYTHON = {"bool": ((bool,), bool), "int": ((int,), operator.index), "float": ((int, float), float)}


def check_field_types(obj, what: str, kinds: tuple[str, ...] = ("bool", "int", "float"), skip: tuple[str, ...] = ()) -> None:
    """A QFrameError for a dataclass field declared ``bool``, ``int`` or ``float`` (or ``Optional`` of one; those of
    ``kinds``, but for the fields in ``skip``, which have checks of their own) that holds another type: ``"no"``
    would count as True, ``"1e-3"`` fail inside a comparison. A value of such a field that it would accept but of
    another type (``np.int64(2)``, a 0-d tensor, ``1`` for a bool) is stored as the plain Python value, in the
    fields of ``skip`` and of other kinds too; so are the items of a ``List[int]`` field (which its caller checks). Run first in ``__post_init__``; Hydra
    already checks these types on the command line, Python callers get it here."""
    for f in dataclasses.fields(obj):
        declared = str(f.type).replace("typing.", "")
        optional = declared.startswith("Optional[") or declared.endswith("| None")
        kind = (declared[len("Optional["):-1] if declared.startswith("Optional[") else declared).removesuffix(" | None").strip()
        value = getattr(obj, f.name)
        if kind in ("List[int]", "list[int]") and isinstance(value, (list, tuple)) and value and all(
                _is_int(v) and not _is_bool_type(v) for v in value):
            object.__setattr__(obj, f.name, [operator.index(v) for v in value])  # np.int64 items: the caller checks ranges
            continue
        if kind not in _KINDS or (optional and value is None):
            continue
        if not _KINDS[kind][1](value):
            if kind not in kinds or f.name in skip:  # the caller's own check names what is valid
                continue
            raise QFrameError(f"{what}.{f.name}={_short(value)} is invalid; valid: {_KINDS[kind][0]}"
                              f"{' or None' if optional else ''}")
        plain, convert = _AS_PYTHON[kind]
        if type(value) not in plain:  # np.float64 is a float subclass: it becomes a float too
            object.__setattr__(obj, f.name, convert(value))  # frozen dataclasses too


def require_config(value, cls: type, what: str, optional: bool = False):
    """``value`` as a ``cls`` (an OmegaConf node of that schema, as a Hydra app of the user's holds it, becomes
    one); a QFrameError unless it is one (or None where ``optional``): "qat's cfg={'epochs': 1} is invalid;
    valid: qframe.methods.qat.QATConfig(...)"."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        if OmegaConf.get_type(value) is cls:
            value = OmegaConf.to_object(value)
    if not isinstance(value, cls) and not (optional and value is None):
        raise QFrameError(f"{what}={_short(value)} is invalid; valid: {cls.__module__}.{cls.__qualname__}(...)"
                          f"{' or None' if optional else ''}")
    return value


def require_recipe(recipe, verb: str) -> None:
    """A QFrameError unless ``recipe`` is a QuantRecipe; a preset name says which call builds it."""
    from qframe.quant.recipe import QuantRecipe

    if not isinstance(recipe, QuantRecipe):
        hint = f"qframe.preset({recipe!r})" if isinstance(recipe, str) else "qframe.preset(name) or qframe.QuantRecipe(...)"
        raise QFrameError(f"{verb} needs a QuantRecipe, got {type(recipe).__name__} {_short(recipe)}; valid: {hint}")


def require_device(device, verb: str):
    """``device`` as a ``torch.device`` that this torch can put a tensor on, else one line naming it: a name torch
    does not know ("tpu") or a device it was built without or does not see ("cuda" on a CPU build). None stays
    None (where a caller takes it as "where the model is")."""
    import torch

    if device is None:
        return None
    try:
        found = torch.device(device)
        torch.empty(0, device=found)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        valid = "'cpu'" + (", 'cuda'" if torch.cuda.is_available() else "")
        raise QFrameError(f"{verb}: device={device!r} cannot be used ({first_line(exc)}); valid here: {valid}") from None
    return found


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of ``exc``'s message (at most ``limit`` characters), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
