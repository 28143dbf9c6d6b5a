import pytest

import qframe
from qframe.errors import QFrameError
from qframe.export.stage import ExportConfig
from qframe.methods.qat import QATConfig
from qframe.methods.rct import RCTConfig
from qframe.quant.spec import QuantSpec


@pytest.mark.parametrize("bits", [1, 9, 0, 16, 4.5, True])
def test_bits_out_of_range_is_one_line(bits):
    with pytest.raises(QFrameError, match=rf"bits={bits!r}.*2\.\.8") as err:
        QuantSpec(bits=bits)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"granularity": "per_row"}, "unknown granularity 'per_row'; valid: per_tensor, per_channel, per_group"),
        ({"granularity": "per_group"}, "group_size >= 1"),
        ({"granularity": "per_group", "group_size": 0}, "group_size >= 1"),
        ({"group_size": 32}, "only valid with granularity='per_group'"),
        ({"signed": False, "narrow_range": True}, "narrow_range=True needs signed=True"),
    ],
)
def test_invalid_specs(kwargs, message):
    with pytest.raises(QFrameError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuantSpec(**kwargs)


@pytest.mark.parametrize("bits", range(2, 9))
def test_ranges(bits):
    assert (QuantSpec(bits=bits).qmin, QuantSpec(bits=bits).qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert QuantSpec(bits=bits, narrow_range=True).qmin == -(2 ** (bits - 1)) + 1
    assert (QuantSpec(bits=bits, signed=False).qmin, QuantSpec(bits=bits, signed=False).qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("make, message", [
    (lambda: QuantSpec(signed="no"), r"QuantSpec.signed='no' is invalid; valid: true or false"),
    (lambda: QuantSpec(axis="0"), r"QuantSpec.axis='0' is invalid; valid: an integer"),
    (lambda: qframe.LayerRule("head", keep_float="yes"), "LayerRule.keep_float='yes' is invalid"),
    (lambda: qframe.QuantizerConfig(symmetric=None), "QuantizerConfig.symmetric=None is invalid"),
    (lambda: qframe.QuantRecipe(weight=qframe.QuantizerConfig(), fold_bn="no"),
     "QuantRecipe.fold_bn='no' is invalid; valid: true or false"),
    (lambda: QATConfig(lr="1e-3"), "QATConfig.lr='1e-3' is invalid; valid: a number"),
    (lambda: QATConfig(lsq="no"), "QATConfig.lsq='no'"),
    (lambda: qframe.AdaRoundConfig(lr="x"), "AdaRoundConfig.lr='x' is invalid; valid: a number"),
    (lambda: RCTConfig(target_bits="6"), "RCTConfig.target_bits='6' is invalid; valid: a number or None"),
    (lambda: ExportConfig(lint="no"), "export.lint='no' is invalid"),
])
def test_a_setting_of_the_wrong_type_is_one_line_not_a_truthy_string(make, message):
    with pytest.raises(QFrameError, match=message) as err:
        make()
    assert "\n" not in str(err.value)
