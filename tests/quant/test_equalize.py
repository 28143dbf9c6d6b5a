"""Cross-layer equalization keeps the float function and equalizes ranges; high-bias absorption is exact
where its bound holds; chains are found by tracing, with a Sequential fallback for untraceable models."""

import logging

import pytest
import torch
from torch import nn

from qframe.models import build_model
from qframe.quant.equalize import (ChannelClip, absorb_pair, consumer_ranges, equalization_scales, equalize,
                                   find_chains, producer_ranges, scale_pair)


def _rel(out, ref):
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "compact_cnn"])
def test_equalize_keeps_the_float_function_of_zoo_models(name, normalise_bn):
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    model = normalise_bn(build_model(name, num_classes=7, in_channels=3, image_size=32, width_mult=0.5).double(),
                         x).eval()
    with torch.no_grad():
        ref = model(x)
        report = equalize(model, absorb=False)
        out = model(x)
    assert report.chains and report.folded > 0
    assert _rel(out, ref) < 1e-5
    # at convergence every producer row range equals its consumer column range
    for chain in report.chains:
        producer, consumer = model.get_submodule(chain.producer), model.get_submodule(chain.consumer)
        groups = consumer.groups if isinstance(consumer, nn.Conv2d) else 1
        r1, r2 = producer_ranges(producer.weight), consumer_ranges(consumer.weight, groups, chain.spatial)
        assert torch.allclose(r1, r2, rtol=1e-3), (chain, (r1 / r2).log().abs().max())


def test_mobilenet_relu6_links_become_channel_clips_and_depthwise_pairs_are_found():
    model = build_model("mobilenet_v2", num_classes=5, in_channels=1, image_size=32, width_mult=0.5).eval()
    report = equalize(model, absorb=False)
    pairs = {(c.producer, c.consumer) for c in report.chains}
    assert ("features.2.conv.0.0", "features.2.conv.1.0") in pairs  # expand -> depthwise
    assert ("features.2.conv.1.0", "features.2.conv.2") in pairs  # depthwise -> project
    assert ("features.1.conv.1", "features.2.conv.0.0") in pairs  # project -> next expand (no activation)
    assert isinstance(model.get_submodule("features.2.conv.0.2"), ChannelClip)
    assert not any(isinstance(m, nn.ReLU6) for n, m in model.named_modules()
                   if any(c.activation == n for c in report.chains))


def test_scaling_maths_against_a_dense_reference():
    """scale_pair on a grouped conv equals scaling the dense (block-diagonal) weight's columns."""
    torch.manual_seed(torch.seed() % 2**31)
    c, groups, out = 8, 4, 12
    w1 = torch.randn(c, 3, 3, 3, dtype=torch.float64)
    b1 = torch.randn(c, dtype=torch.float64)
    w2 = torch.randn(out, c // groups, 3, 3, dtype=torch.float64)
    s = torch.rand(c, dtype=torch.float64) + 0.5
    rows = [slice(g * out // groups, (g + 1) * out // groups) for g in range(groups)]
    cols = [slice(g * c // groups, (g + 1) * c // groups) for g in range(groups)]
    dense = torch.zeros(out, c, 3, 3, dtype=torch.float64)  # the grouped weight as a dense, block-diagonal one
    for r, col in zip(rows, cols):
        dense[r, col] = w2[r]
    ref1, refb1, ref_dense = w1 / s.view(-1, 1, 1, 1), b1 / s, dense * s.view(1, -1, 1, 1)
    ref_r2 = dense.abs().amax(dim=(0, 2, 3))
    assert torch.allclose(consumer_ranges(w2, groups), ref_r2)
    scale_pair(w1, b1, w2, s, groups=groups)
    assert torch.allclose(w1, ref1) and torch.allclose(b1, refb1)
    for r, col in zip(rows, cols):
        assert torch.allclose(w2[r], ref_dense[r, col])
    r1, r2 = torch.rand(c) + 0.1, torch.rand(c) + 0.1
    s = equalization_scales(r1, r2)
    assert torch.allclose(r1 / s, r2 * s)
    assert equalization_scales(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])).tolist() == [1.0, 1.0]


class _FlattenHead(nn.Module):
    """conv -> ReLU -> flatten (2x2 map, no pooling) -> Linear: each channel feeds 4 inputs of the Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


def test_flattened_linear_consumer_keeps_the_function():
    model = _FlattenHead().double().eval()
    with torch.no_grad():
        model.conv.weight.mul_(torch.logspace(-2, 1, 6, dtype=torch.float64).view(-1, 1, 1, 1))
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    r0 = producer_ranges(model.conv.weight)
    with torch.no_grad():
        ref = model(x)
        report = equalize(model, absorb=False)
        out = model(x)
    assert [(c.producer, c.consumer, c.spatial) for c in report.chains] == [("conv", "fc", 4)]
    assert _rel(out, ref) < 1e-10
    r1 = producer_ranges(model.conv.weight)
    assert float(r1.max() / r1.min()) < 0.1 * float(r0.max() / r0.min())  # the channel ranges are evened out


def test_absorption_is_exact_where_the_preactivation_stays_above_the_bound():
    torch.manual_seed(torch.seed() % 2**31)
    conv1, conv2 = nn.Conv2d(3, 5, 3).double(), nn.Conv2d(5, 4, 1).double()
    with torch.no_grad():
        conv1.bias.add_(torch.linspace(2, 6, 5, dtype=torch.float64))  # high biases: post-ReLU ranges far from 0
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        pre = conv1(x)
        ref = conv2(torch.relu(pre))
        c = pre.transpose(0, 1).reshape(5, -1).amin(1).clamp(min=0)
        assert (c > 0).any()
        absorb_pair(conv1.bias.data, conv2.weight.data, conv2.bias.data, c)
        act = torch.relu(conv1(x))
        out = conv2(act)
    assert _rel(out, ref) < 1e-10
    assert float(act.amax()) < float(torch.relu(pre).amax())


def test_equalize_absorbs_high_biases_into_unpadded_consumers():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 1, bias=False)).eval()
    with torch.no_grad():
        model[1].bias.copy_(torch.linspace(3, 8, 6))  # beta >> 3 gamma
        model[1].weight.fill_(0.5)
    x = torch.randn(32, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        before = torch.relu(model[1](model[0](x))).amax()
        report = equalize(model)
        out = model(x)
        after = torch.relu(model[0](x)).amax()
    assert report.absorbed == 1 and model[3].bias is not None
    assert float(after) < 0.8 * float(before)
    assert _rel(out, ref) < 1e-3  # exact except where a pre-activation falls 3 sigma below its mean


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU6(),
                                  nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 1))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            return x
        return self.body(x)


def test_untraceable_model_falls_back_to_sequential_chains_with_a_warning(caplog, randomise_bn):
    model = randomise_bn(_Untraceable()).double().eval()
    x = torch.randn(3, 1, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        with caplog.at_level(logging.WARNING, logger="qframe.quant.equalize"):
            report = equalize(model, absorb=False)
        out = model(x)
    assert "cannot trace" in caplog.text
    assert [(c.producer, c.consumer) for c in report.chains] == [("body.0", "body.3"), ("body.3", "body.5")]
    assert isinstance(model.body[2], ChannelClip)
    assert _rel(out, ref) < 1e-10


def test_shared_and_branching_layers_are_left_alone():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(2, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + self.c(y)  # a's output feeds two consumers: not a chain

    assert find_chains(Branch()) == []


def test_equalize_refuses_a_training_model():
    with pytest.raises(Exception, match="inference"):
        equalize(nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1)).train())


class _TokenMix(nn.Module):
    """A Linear over the positions of a conv's map (flatten(2) keeps the channel axis)."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.mix, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Linear(16, 16), \
            nn.Linear(64, 2)

    def forward(self, x):
        return self.head(self.mix(self.act(self.conv(x)).flatten(2)).flatten(1))


class _PerToken(nn.Module):
    """A Linear on [B, T, C] tokens, then a flatten of tokens and channels: channels interleave."""

    def __init__(self):
        super().__init__()
        self.token, self.act, self.head = nn.Linear(8, 4), nn.ReLU(), nn.Linear(20, 2)

    def forward(self, x):  # x [B, 5, 8]
        return self.head(self.act(self.token(x)).flatten(1))


class _Flip(nn.Identity):
    """A user's module that passes for an Identity by type and reverses the channels."""

    def forward(self, x):
        return x.flip(1)


@pytest.mark.parametrize("make, shape", [(_TokenMix, (6, 3, 4, 4)), (_PerToken, (6, 5, 8))], ids=["flatten2", "tokens"])
def test_reshapes_that_do_not_flatten_channels_in_blocks_end_a_chain(make, shape):
    """They were taken for channel flattens: equalize moved the float output by 20 % of its size."""
    model = make().double().eval()
    first = next(model.parameters())  # the producer's weight: channel ranges 1000x apart
    with torch.no_grad():
        first.mul_(torch.logspace(-2, 1, first.shape[0], dtype=torch.float64).view(-1, *[1] * (first.dim() - 1)))
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        report = equalize(model, absorb=False)
        assert _rel(model(x), ref) < 1e-10
    assert all(c.producer not in ("conv", "token") for c in report.chains)


class _UntraceableFlip(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), _Flip(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                                  nn.Conv2d(4, 2, 1))

    def forward(self, x):
        if x.sum() > 1e9:  # data-dependent: torch.fx cannot trace it, chains come from the Sequential's children
            return x
        return self.body(x)


def test_with_an_example_a_chain_that_changes_the_output_is_left_alone_with_a_warning(caplog):
    model = _UntraceableFlip().double().eval()
    with torch.no_grad():
        model.body[0].weight.mul_(torch.logspace(-2, 1, 4, dtype=torch.float64).view(-1, 1, 1, 1))
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    chains = [(c.producer, c.consumer) for c in find_chains(model)]
    assert chains == [("body.0", "body.3"), ("body.3", "body.5")]  # the flip passes for an Identity
    with torch.no_grad():
        ref = model(x)
        with caplog.at_level(logging.WARNING, logger="qframe.quant.equalize"):
            report = equalize(model, absorb=False, example=x)
        assert _rel(model(x), ref) < 1e-10
    assert [(c.producer, c.consumer) for c in report.chains] == [("body.3", "body.5")]
    assert "1 chains left alone" in caplog.text and "body.0 -> body.3" in caplog.text


def test_ptq_with_equalize_keeps_the_float_function_of_a_token_mixing_model():
    import qframe

    torch.manual_seed(0)
    model = _TokenMix().eval()
    x = torch.randn(8, 3, 4, 4)
    plain = qframe.ptq(model, qframe.preset("w8a8"), [x], 1)
    equalized = qframe.ptq(model, qframe.preset("w8a8"), [x], 1, equalize=True)
    with torch.no_grad():
        ref = model(x)
        assert _rel(equalized(x), ref) < 2 * _rel(plain(x), ref) + 0.01


class _TfStyle(nn.Module):
    """What transformers' CNNs write and torch.fx cannot trace: a shape check, conv + BatchNorm + activation
    blocks, zero padding by F.pad, functional ReLU, an in-place ReLU module, dropout, a flatten into the head."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)
        self.dw, self.act = nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(inplace=True)
        self.pw, self.drop = nn.Conv2d(8, 16, 1), nn.Dropout(0.1)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x):
        if x.shape[1] != 3:  # a check on the input: symbolically traced variables cannot be used in control flow
            raise ValueError("three channels")
        y = torch.relu(self.stem_bn(self.stem(x)))
        y = self.act(self.dw(nn.functional.pad(y, (1, 1, 1, 1))))
        y = self.drop(self.pw(y))
        return self.head(torch.relu(y).flatten(1))


def test_chains_of_a_model_fx_cannot_trace_are_read_from_running_the_example(randomise_bn, caplog):
    model = randomise_bn(_TfStyle()).double().eval()
    with torch.no_grad():
        model.stem.weight.mul_(torch.logspace(-2, 1, 8, dtype=torch.float64).view(-1, 1, 1, 1))
    x = torch.randn(6, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    import copy

    import qframe

    folded = copy.deepcopy(model)
    qframe.fold_bn(folded, x)
    r0 = producer_ranges(folded.stem.weight)
    with caplog.at_level(logging.INFO, logger="qframe.quant.equalize"):
        report = equalize(model, absorb=False, example=x)
    assert "chains read from running the example batch" in caplog.text
    assert [(c.producer, c.consumer, c.spatial) for c in report.chains] == [("stem", "dw", 1), ("dw", "pw", 1),
                                                                            ("pw", "head", 16)]
    assert report.folded == 1 and isinstance(model.stem_bn, nn.Identity)
    with torch.no_grad():
        assert _rel(model(x), want) < 1e-10
    r = producer_ranges(model.stem.weight)
    assert float(r.max() / r.min()) < 0.1 * float(r0.max() / r0.min())  # the channel ranges are evened out


def test_the_example_check_keeps_the_chains_of_a_bfloat16_model_and_a_users_own_clip(randomise_bn, caplog):
    """The check compared in the model's dtype with a float32 bound: every chain of a bfloat16 model was left
    alone; a dropped chain's ChannelClip became a ReLU6 even where the user's model held that ChannelClip."""
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                                       nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))).eval().to(torch.bfloat16)
    x = torch.randn(4, 3, 6, 6, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="qframe.quant.equalize"):
        report = equalize(model, absorb=False, example=x)
    assert [(c.producer, c.consumer) for c in report.chains] == [("0", "3"), ("3", "5")] and "left alone" not in caplog.text
    assert isinstance(model[2], ChannelClip)
    own = ChannelClip(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    flipped = _UntraceableFlip().eval()
    flipped.body = nn.Sequential(nn.Conv2d(3, 4, 3), own, _Flip(), nn.Conv2d(4, 2, 1))
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        want = flipped(x)
        report = equalize(flipped, absorb=False, example=x)
        assert report.chains == [] and flipped.body[1] is own and torch.equal(flipped(x), want)


@pytest.mark.parametrize("flatten", [lambda y: y.view(-1, 4 * 2 * 2), lambda y: torch.flatten(y, 1, 3),
                                     lambda y: y.reshape(y.size(0), -1)], ids=["view-1", "flatten13", "reshape"])
def test_the_ways_to_flatten_a_feature_map_into_a_linear_keep_the_chain(flatten):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2), nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(flatten(self.pool(torch.relu(self.conv(x)))))

    model = Net().double().eval()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        report = equalize(model, absorb=False)
        assert _rel(model(x), want) < 1e-10
    assert [(c.producer, c.consumer, c.spatial) for c in report.chains] == [("conv", "fc", 4)]


class _PixelValues(nn.Module):
    """A forward taking its images by keyword, as transformers' models do, with a check torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, pixel_values):
        if pixel_values.shape[1] != 3:
            raise ValueError("three channels")
        return self.head(self.act(self.bn(self.conv(pixel_values.float()))))  # a cast: no float64 run


def test_ptq_of_dict_batches_folds_and_equalizes_a_model_that_casts_its_input(randomise_bn, caplog):
    """Dict batches reached the BN folding as model(batch): equalize=True raised, and without it no BatchNorm
    of such a model folded; the float64 check failed on a forward that casts to float32."""
    import qframe

    torch.manual_seed(0)
    model = randomise_bn(_PixelValues()).eval()
    with torch.no_grad():
        model.conv.weight.mul_(torch.logspace(-2, 1, 8).view(-1, 1, 1, 1))
    batches = [{"pixel_values": torch.randn(8, 3, 6, 6)} for _ in range(2)]
    plain = qframe.ptq(model, qframe.preset("w8a8"), batches, 2)
    assert plain.qframe_unfolded_norms == {} and isinstance(plain.bn, nn.Identity)
    with caplog.at_level(logging.WARNING, logger="qframe.quant.equalize"):
        equalized = qframe.ptq(model, qframe.preset("w8a8"), batches, 2, equalize=True)
    assert "left alone" not in caplog.text and "no chain equalized" not in caplog.text
    r, r0 = producer_ranges(equalized.conv.weight), producer_ranges(plain.conv.weight)
    assert float(r.max() / r.min()) < 0.2 * float(r0.max() / r0.min())  # evened out
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        want = model(pixel_values=x)
        assert _rel(equalized(pixel_values=x), want) < 2 * _rel(plain(pixel_values=x), want) + 0.01


class _Record:
    def __init__(self, value):
        self.value = value


def test_an_output_holding_no_tensor_equalizes_no_chain_with_a_warning(caplog):
    """Nothing to compare: every chain passed the check, a wrong one moving the output by 20 %."""
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _UntraceableFlip().body

        def forward(self, x):
            if x.sum() > 1e9:
                return _Record(x)
            return _Record(self.body(x))

    model = Wrapped().eval()
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        want = model(x).value
        with caplog.at_level(logging.WARNING, logger="qframe.quant.equalize"):
            report = equalize(model, absorb=False, example=x)
        assert report.chains == [] and torch.equal(model(x).value, want)
    assert "no chain equalized" in caplog.text and "holds no tensor" in caplog.text


class _SecondReads(nn.Module):
    """c1 -> ReLU -> c2, and c1's output (or weight) read a second time in a way a run can hide."""

    def __init__(self, how):
        super().__init__()
        self.c1, self.act, self.c2, self.other, self.how = nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), \
            nn.Conv2d(8, 8, 1), how

    def forward(self, x):
        if x.shape[0] > 999:  # torch.fx cannot trace this: the chains are read from a run
            return x
        y = self.c1(x)
        if self.how == "inplace relu":  # the one form that is a chain
            return self.c2(nn.functional.relu(y, inplace=True))
        if self.how == "pad shift":  # a pad of the channel axis moves channels
            return self.c2(nn.functional.pad(self.act(y), (0, 0, 0, 0, 1, -1)))
        z = self.c2(self.act(y))
        if self.how == "cat":
            return torch.cat([z, y], 1)
        if self.how == "setitem":
            o = torch.zeros_like(z)
            o[:, :] = y
            return z + o
        if self.how == "out=":
            o = torch.empty_like(z)
            torch.add(z, y, out=o)
            return o
        if self.how == "copy_":
            return z + torch.empty_like(z).copy_(y)
        if self.how == "keyword":
            return z + self.other(input=y)
        return z + self.c1.forward(x)  # the producer's weight, outside its module call


@pytest.mark.parametrize("how", ["cat", "setitem", "out=", "copy_", "keyword", ".forward", "pad shift", "inplace relu"])
def test_a_run_sees_every_second_read_of_a_producer(how):
    """Reads were keyed after the call (an in-place write looked like its own input), inside lists and keywords
    unseen, a .forward call's weights unseen: each gave the chain c1 -> c2."""
    chains = [(c.producer, c.consumer) for c in find_chains(_SecondReads(how).eval(), torch.randn(2, 3, 4, 4))]
    assert chains == ([("c1", "c2")] if how == "inplace relu" else [])
