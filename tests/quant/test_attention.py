"""nn.MultiheadAttention (and nn.TransformerEncoder built of it, as users' own transformers and torchvision's ViT
are): quantized through its twin, which computes what the float module does, takes the encoder off its fused
inference kernels, and exports as INT8 projections and attention matmuls."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import qframe
from qframe.quant.modules import QuantLinear, QuantMultiheadAttention
from qframe.quant.registry import quant_class_for

E, HEADS, L, S, N = 16, 4, 5, 7, 3


def _masks(kind: str, tgt: int, g: torch.Generator):
    """``(attn_mask, key_padding_mask)`` of one kind for ``tgt`` queries over ``S`` keys."""
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[:, -2:] = torch.rand(N, 2, generator=g) < 0.7
    if kind == "bool2d":
        return torch.rand(tgt, S, generator=g) < 0.3, None
    if kind == "float3d+padding":  # both float: additive masks
        return (torch.randn(N * HEADS, tgt, S, generator=g, dtype=torch.float64),
                torch.zeros(N, S, dtype=torch.float64).masked_fill(padding, -float("inf")))
    return None, (padding if kind == "padding" else None)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("masks", ["none", "bool2d", "padding", "float3d+padding"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_the_twin_computes_what_nn_multihead_attention_does(batch_first, cross, masks, need_weights, average):
    """Self-attention (one tensor) and cross-attention (queries over keys and values of another width), in float64
    with no quantizer yet: the same outputs and attention weights as the float module, to rounding."""
    g = torch.Generator().manual_seed(hash((batch_first, cross, masks, need_weights, average)) % 2**31)
    kdim = 12 if cross else None
    mha = nn.MultiheadAttention(E, HEADS, kdim=kdim, vdim=kdim, batch_first=batch_first).double().eval()
    with torch.no_grad():
        for p in mha.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    twin = QuantMultiheadAttention.from_float(copy.deepcopy(mha))
    assert twin.in_proj_weight is None and isinstance(twin.q_proj, QuantLinear) and isinstance(twin.out_proj, QuantLinear)

    def tokens(length, dim):
        return torch.randn((N, length, dim) if batch_first else (length, N, dim), generator=g, dtype=torch.float64)

    tgt = L if cross else S
    query = tokens(tgt, E)
    key, value = (tokens(S, kdim), tokens(S, kdim)) if cross else (query, query)
    attn_mask, padding = _masks(masks, tgt, g)
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights,
                  average_attn_weights=average)
    with torch.no_grad():
        ref, ref_w = mha(query, key, value, **kwargs)
        out, out_w = twin(query, key, value, **kwargs)
    finite = torch.isfinite(ref)  # a query whose every key is masked gives NaN in both
    assert torch.equal(finite, torch.isfinite(out)) and finite.any()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-10, atol=1e-10)
    if need_weights:
        torch.testing.assert_close(out_w.nan_to_num(), ref_w.nan_to_num(), rtol=1e-10, atol=1e-10)
    else:
        assert out_w is None and ref_w is None


def test_unbatched_inputs_and_the_causal_hint_match_too():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True).double().eval()
    twin = QuantMultiheadAttention.from_float(copy.deepcopy(mha))
    x = torch.randn(S, E, dtype=torch.float64)  # one sequence, no batch axis
    causal = nn.Transformer.generate_square_subsequent_mask(S, dtype=torch.float64)
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal, "is_causal": True, "need_weights": False}):
            (ref, _), (out, _) = mha(x, x, x, **kwargs), twin(x, x, x, **kwargs)
            assert out.shape == ref.shape == (S, E)
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="Need attn_mask if specifying the is_causal hint"):
        twin(x, x, x, is_causal=True)


class _Tokens(nn.Module):
    """A small transformer classifier as users write one: nn.TransformerEncoder of batch-first layers."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def test_a_transformer_encoder_is_quantized_whole_and_runs_its_quantized_layers_in_inference():
    """In inference a batch-first nn.TransformerEncoderLayer runs one fused kernel that reads every weight itself:
    its Linear layers never ran, so PTQ left them float ("did not run on the calibration batches") and the
    attention had no twin at all. Now every projection and feed-forward layer is quantized and runs."""
    torch.manual_seed(torch.seed() % 2**31)
    model = _Tokens().eval()
    x = torch.randn(16, 9, 12)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    assert qmodel.qframe_float_layers == {}
    layers = {n for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 2 + 2 * (4 + 2)  # embed, head; per encoder layer q, k, v, out, linear1, linear2
    assert qmodel.qframe_placed == {"sdpa": 2}  # the attention's matmul inputs
    assert all(q.calibrated for n, q in qframe.quant.modules.quantizers(qmodel))
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
        # the quantized layers do run: with their weight quantizers off, the output moves
        for name in layers:
            qmodel.get_submodule(name).weight_quantizer.enabled = False
        assert not torch.equal(qmodel(x), out)
    err = float((out - ref).norm() / ref.norm())
    assert 1e-4 < err < 0.05, err
    # with a padding mask, the encoder's nested-tensor path is off: padded positions are computed, as in training
    padding = torch.zeros(16, 9, dtype=torch.bool)
    padding[:, 6:] = True
    with torch.no_grad():
        y = qmodel.encoder(qmodel.embed(x), src_key_padding_mask=padding)
    assert not y.is_nested and torch.isfinite(y).all()


def test_the_quantized_encoder_exports_in_int8_that_lints_clean_and_onnxruntime_runs(tmp_path):
    import onnx

    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    torch.manual_seed(torch.seed() % 2**31)
    model = _Tokens().eval()
    x = torch.randn(8, 9, 12)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    graph = onnx.load(str(export_onnx(qmodel, x[:1], tmp_path / "tokens.onnx")))
    chosen = chosen_float_layers(qmodel)
    assert chosen == {} and [v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error"] == []
    coverage = tensorrt_coverage(graph, chosen)
    compute = [n for n in graph.graph.node if n.op_type in ("Gemm", "MatMul")]
    assert coverage.fallbacks(chosen=False) == [] and len(compute) >= 14 + 4  # 14 projections, 2 matmuls a layer
    session = ort_session(str(tmp_path / "tokens.onnx"), level="basic")
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = qmodel(x).numpy()
    # per sequence: onnxruntime sums in another order, so a value at a rounding tie can take the other code and
    # the random-init encoder carries that flip through its sequence alone (seen once: 0.0054 of the whole
    # batch); a wrong layer moves every sequence
    per_sequence = np.linalg.norm((out - ref).reshape(len(x), -1), axis=1) / np.linalg.norm(ref.reshape(len(x), -1), axis=1)
    assert np.median(per_sequence) < 1e-5 and per_sequence.max() < 0.1, per_sequence


def test_attention_with_a_setting_the_twin_lacks_stays_float_with_the_reason():
    mha = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    twin, why = quant_class_for(mha)
    assert twin is None and "add_bias_kv=True has no quantized twin" in why
    model = nn.ModuleDict({"attn": mha, "zero": nn.MultiheadAttention(8, 2, add_zero_attn=True)})
    floats = qframe.quantize_(nn.Sequential(nn.Linear(8, 8), model), qframe.preset("w8a8")).qframe_float_layers
    assert "add_bias_kv" in floats["1.attn"] and "add_zero_attn" in floats["1.zero"]
    assert "inside nn.MultiheadAttention '1.attn'" in floats["1.attn.out_proj"]


def test_a_qat_step_through_the_twin_trains_its_projections():
    from qframe.methods.qat import QATConfig, prepare_qat

    torch.manual_seed(0)
    model = _Tokens()
    model.encoder.layers[0].self_attn.dropout = 0.1  # dropout on the attention weights in training
    x = torch.randn(8, 9, 12)
    qmodel = prepare_qat(model, qframe.preset("w8a8"), [x], 1, QATConfig())
    qmodel.train()
    loss = nn.functional.cross_entropy(qmodel(x), torch.randint(0, 5, (8,)))
    loss.backward()
    attn = qmodel.encoder.layers[0].self_attn
    assert isinstance(attn, QuantMultiheadAttention) and attn.training
    grads = [attn.q_proj.weight.grad, attn.k_proj.weight.grad, attn.v_proj.weight.grad, attn.out_proj.weight.grad]
    assert all(gr is not None and torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


class _Queries(nn.Module):
    """A DETR-style head: learned queries attend to image tokens through nn.TransformerDecoder layers."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Linear(12, 32)
        self.queries = nn.Parameter(torch.randn(6, 32))
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.boxes = nn.Linear(32, 4)

    def forward(self, x):
        memory = self.tokens(x)
        queries = self.queries.expand(x.shape[0], -1, -1) + memory.mean(1, keepdim=True)
        return self.boxes(self.decoder(queries, memory)).sigmoid()


def test_a_transformer_decoder_quantizes_its_self_and_cross_attention_and_exports_clean(tmp_path):
    import onnx

    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    torch.manual_seed(torch.seed() % 2**31)
    model = _Queries().eval()
    x = torch.randn(8, 9, 12)
    qmodel = qframe.ptq(model, qframe.preset("w8a8"), [x], num_batches=1)
    attention = [m for m in qmodel.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attention) == 4 and all(isinstance(m, QuantMultiheadAttention) for m in attention)
    assert qmodel.qframe_float_layers == {}
    with torch.no_grad():
        ref, out = model(x), qmodel(x)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.05, err
    graph = onnx.load(str(export_onnx(qmodel, x[:1], tmp_path / "queries.onnx")))
    chosen = chosen_float_layers(qmodel)
    assert [v.message for v in lint_tensorrt(graph, chosen) if v.severity == "error"] == []
    assert tensorrt_coverage(graph, chosen).fallbacks(chosen=False) == []
    session = ort_session(str(tmp_path / "queries.onnx"), level="basic")
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    # exact but for a rounding flip: on 2 of 60 seeds a value lands within float error of a rounding boundary,
    # and the flip moves 2.1 % and 12.5 % of the outputs by at most 2.7e-3
    diff = np.abs(got - out.numpy())
    assert (diff < 1e-5).mean() >= 0.75 and diff.max() < 1e-2, (diff.max(), (diff >= 1e-5).mean())


def test_rules_reach_each_projection_and_a_mixed_precision_recipe_quantizes_again():
    """The projections are layers of their own for rules (by their names, or by the attention's name) and for
    mixed precision, whose recipe names them: quantizing with that recipe must find every name again."""
    from qframe.methods.mixed import search

    torch.manual_seed(0)
    model = _Tokens().eval()
    x = torch.randn(32, 9, 12)
    rules = [qframe.LayerRule("encoder.layers.0.self_attn.q_proj", keep_float=True),
             qframe.LayerRule("encoder.layers.1.self_attn", weight_bits=4)]
    qmodel = qframe.ptq(model, qframe.preset("w8a8", rules=rules, int32_bias=False), [x], num_batches=1)
    first, second = qmodel.encoder.layers[0].self_attn, qmodel.encoder.layers[1].self_attn
    assert first.q_proj.weight_quantizer is None and first.k_proj.weight_quantizer.spec.bits == 8
    assert qmodel.qframe_float_layers == {"encoder.layers.0.self_attn.q_proj": "kept float by rule "
                                                                               "'encoder.layers.0.self_attn.q_proj'"}
    assert {getattr(second, p).weight_quantizer.spec.bits for p in QuantMultiheadAttention.LAYERS} == {4}
    assert not any(getattr(a, p).int32_bias for a in (first, second) for p in QuantMultiheadAttention.LAYERS)

    recipe = qframe.preset("w4a8", budget=qframe.Budget(size_ratio=0.3, widths=[4, 8], images=32, probes=1))
    result = search(model, recipe, [x], 1)
    assert "encoder.layers.0.self_attn.q_proj" in result.layers
    chosen = qframe.ptq(model, result.recipe, [x], num_batches=1)
    widths = {n: m.weight_quantizer.spec.bits for n, m in chosen.named_modules() if isinstance(m, QuantLinear)}
    assert [widths[n] for n in result.layers] == result.chosen.widths
