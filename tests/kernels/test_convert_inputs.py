"""qframe.convert's integer layers take the inputs the float and fake-quant layers take.

Unbatched ``[C, H, W]`` images and bfloat16 / float16 models: on every engine, the converted model must
return what the fake-quant model returns, in its shape and its dtype, on fresh random inputs.
"""

import pytest
import torch
from torch import nn

import qframe
from qframe.errors import QFrameError
from qframe.kernels import int_graph
from qframe.kernels.convert import IntConv2d, IntConvTranspose2d, IntLinear


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Sequential:
    """Signed and ReLU-fed convolutions (oneDNN hands int8 codes from 0 to 2, through the max pooling), a
    Tanh-fed transposed convolution and a 1x1 convolution after it."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 6, 3), nn.Tanh(), nn.ConvTranspose2d(6, 4, 2, stride=2),
                         nn.Tanh(), nn.Conv2d(4, 5, 1))


def _relative(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("engine", ["auto", "qframe"])
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4a16"])
def test_an_unbatched_image_runs_as_a_batch_of_one(engine, recipe):
    torch.manual_seed(0)
    fake = qframe.ptq(_net().eval(), qframe.preset(recipe), [torch.randn(4, 3, 10, 10)], 1)
    converted = qframe.convert(fake, engine=engine)
    assert sum(isinstance(m, IntConv2d) for m in converted.modules()) == 4
    assert isinstance(converted[7], IntConvTranspose2d) or recipe == "w4a16"  # per-group: stays fake-quant
    if engine == "auto" and recipe == "w8a8" and int_graph.onednn_mode()[0] == "full":
        assert converted[0].out_scale is not None  # the unbatched codes are handed on with their scale
    x = torch.randn(3, 10, 10)
    with torch.no_grad():
        ref, y, batched = fake(x), converted(x), converted(x[None])
    assert y.shape == ref.shape == (5, 6, 6) and y.dtype == ref.dtype
    assert _relative(y, ref) < 1e-3
    assert torch.allclose(y, batched[0], rtol=0, atol=1e-6)


def test_an_unbatched_transposed_convolution_takes_its_output_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2)).eval()
    fake = qframe.ptq(model, qframe.preset("w8a8"), [torch.randn(4, 3, 5, 5)], 1)
    layer = qframe.convert(fake, engine="qframe")[0]
    x = torch.randn(3, 5, 5)
    with torch.no_grad():
        for size in ([12, 12], [4, 12, 12]):
            ref, y = fake[0](x, size), layer(x, size)
            assert y.shape == ref.shape == (4, 12, 12) and _relative(y, ref) < 1e-3


@pytest.mark.parametrize("shape", [(10, 10), (1, 1, 3, 10, 10)])
def test_an_input_of_another_rank_says_what_is_valid(shape):
    torch.manual_seed(0)
    fake = qframe.ptq(_net().eval(), qframe.preset("w8a8"), [torch.randn(4, 3, 10, 10)], 1)
    converted = qframe.convert(fake, engine="qframe")
    with pytest.raises(QFrameError, match=r"IntConv2d of 3 input channels got input of shape .*; "
                                          r"valid: \[N, 3, H, W\] or \[3, H, W\]") as err:
        converted(torch.randn(shape))
    assert "\n" not in str(err.value)
