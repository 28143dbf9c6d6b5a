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


def _weight_only_int8() -> qframe.QuantRecipe:
    return qframe.QuantRecipe(name="w8", weight=qframe.QuantizerConfig(bits=8, granularity="per_channel"), input=None)


@pytest.mark.parametrize("engine", ["auto", "qframe"])
@pytest.mark.parametrize("recipe", ["w8a8", "w4a8", "w4a16", "w4a4", "w8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_converts_to_layers_that_return_its_dtype(engine, recipe, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(*_net(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7)).eval().to(dtype)
    fake = qframe.ptq(model, _weight_only_int8() if recipe == "w8" else qframe.preset(recipe),
                      [torch.randn(4, 3, 10, 10, dtype=dtype)], 1)
    converted = qframe.convert(fake, engine=engine)
    layers = {n: m for n, m in converted.named_modules() if isinstance(m, (IntConv2d, IntConvTranspose2d, IntLinear))}
    assert len(layers) >= 5 and isinstance(converted[11], IntLinear)
    outputs = {}
    for name, layer in layers.items():
        assert layer.weight.dtype == dtype  # models cast their input to it (ViT patch embeddings)
        layer.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.dtype))
    x = torch.randn(2, 3, 10, 10, dtype=dtype)
    with torch.no_grad():
        ref, y = fake(x), converted(x)
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    assert set(outputs) == set(layers) and set(outputs.values()) <= {dtype, torch.uint8}  # uint8: codes handed on
    assert _relative(y, ref) < (5e-2 if recipe == "w4a4" else 2e-2)  # half-precision roundings (a 4-bit code flips)
