"""onnxruntime: sessions at a chosen optimization level, parity with the PyTorch model, timing and profiling.

``ORT_ENABLE_BASIC`` runs a graph's own semantics (constant folding, redundant-node removal);
``ORT_ENABLE_ALL`` adds onnxruntime's fusions into its integer kernels, whose numerics are the
runtime's own, and is the level qframe times. :func:`ort_parity` reports both, so a fusion that
changes results is told apart from an export that does.

onnxruntime's WeightBiasQuantization pass (BASIC and up) rounds the float bias of a Conv / Gemm with
dequantized inputs to int32 in units of input scale x weight scale, as its integer kernels add it.
qframe's models put their biases on that grid themselves (``QuantRecipe.int32_bias``), so the
rounding changes nothing and sessions run with onnxruntime's defaults.

On an x86 CPU without VNNI (AVX2 and older AVX-512), onnxruntime's integer kernels multiply uint8
activations by int8 weights with ``vpmaddubsw``, whose int16 sums of product pairs saturate (two
products of 255 x 127 overflow 32,767), so ``ORT_ENABLE_ALL`` disagrees with the graph there. On such
CPUs qframe's sessions keep int8 Q/DQ pairs in int8 (``session.qdqisint8allowed``), which onnxruntime
otherwise converts to uint8 on x86: the int8 x int8 kernels do not saturate, and qframe's standard form
(int8, zero point 0) then runs exactly. Graphs with uint8 activations (asymmetric activations, the
onnxruntime form) still saturate there: :func:`integer_kernels_saturate` says why, and the export stage
reports, rather than fails on, that level's agreement on such a CPU.

onnxruntime's Pad fusion (BASIC and up; in 1.31.1, not in 1.32.0) folds a Pad with value 0 into the
MaxPool after it, whose own padding is -inf: wherever a pooling window at the border holds only negative
values, the fused graph returns their maximum instead of 0. PyTorch writes such a pair for a
``ConstantPad2d`` before a ``MaxPool2d`` (BiT's stem: 43 dB against PyTorch, 129 dB without the fusion).
qframe's sessions switch that rule off where :func:`pad_fusion_breaks_max_pooling` finds the runtime
doing it.
"""

from __future__ import annotations

import functools
import logging
import platform
from pathlib import Path

import torch
from torch import nn

from qframe.errors import QFrameError, one_of
from qframe.export.lint import onnx_model
from qframe.quant.frozen import frozen_weights
from qframe.utils.batches import flat_tensors, logits_of

log = logging.getLogger(__name__)

# optimization levels by the names qframe uses for them
LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


def integer_kernels_saturate() -> str | None:
    """Why onnxruntime's uint8 x int8 kernels may saturate on this CPU, or None where they are exact
    (x86 with AVX-512 VNNI or AVX-VNNI, and every other architecture)."""
    from qframe.kernels.cpu import isa

    best = isa.detected()  # the CPU's own, not QFRAME_CPU_ISA: onnxruntime picks its kernels itself
    if best in ("avx2", "portable") and platform.machine().lower() in isa.X86_MACHINES:
        return (f"this x86 CPU has no VNNI (best int8 ISA: {best}), where onnxruntime multiplies uint8 x int8 "
                "with vpmaddubsw, whose int16 sums of product pairs saturate")
    return None


# the name onnxruntime's Pad -> Conv / MaxPool / AveragePool rewrite rule is disabled by
PAD_FUSION = "Pad_Fusion"


@functools.cache
def pad_fusion_breaks_max_pooling() -> str | None:
    """Why this onnxruntime's Pad fusion changes what a zero Pad before a MaxPool computes, or None where it
    does not (or where ``onnx``, which writes the probe, is not installed): a 6 x 6 map of negative values,
    padded by one with zeros and max-pooled 3 x 3, must give 0 in every window that holds padding."""
    import numpy as np
    import onnxruntime as ort

    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None

    graph = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads", "value"], ["padded"], mode="constant"),
         helper.make_node("MaxPool", ["padded"], ["y"], kernel_shape=[3, 3], strides=[2, 2])], "pad_max_pool",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3, 3])],
        [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
         numpy_helper.from_array(np.array(0.0, np.float32), "value")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": -np.ones((1, 1, 6, 6), np.float32)})[0]
    if (y[0, 0, 0] == 0).all():
        return None
    return (f"onnxruntime {ort.__version__} folds a zero Pad into the MaxPool after it, whose padding is -inf "
            f"(a border window of negative values gives {float(y[0, 0, 0, 0]):g}, not 0)")


def zero_pads_before_max_pooling(graph) -> list[str]:
    """The Pad nodes of ``graph`` (an ``onnx.ModelProto``) that pad with zeros (constant mode, value 0 or
    none) into a MaxPool alone: the pairs :func:`pad_fusion_breaks_max_pooling` is about."""
    from onnx import numpy_helper

    g = graph.graph
    constants = {t.name: t for t in g.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in g.node if n.op_type == "Constant" and n.attribute
                      and n.attribute[0].name == "value"})
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found = []
    for n in g.node:
        if n.op_type != "Pad" or any(a.name == "mode" and a.s not in (b"", b"constant") or a.name == "value" and a.f
                                     for a in n.attribute):  # opsets before 11 hold the value as an attribute
            continue
        value = n.input[2] if len(n.input) > 2 and n.input[2] else None
        if value is not None and (value not in constants or numpy_helper.to_array(constants[value]).any()):
            continue
        after = consumers.get(n.output[0], [])
        if len(after) == 1 and after[0].op_type == "MaxPool":
            found.append(n.name or n.output[0])
    return found


def ort_session(model, threads: int | None = None, *, level: str = "all", optimized_path: str | Path | None = None,
                profile_prefix: str | Path | None = None):
    """An onnxruntime CPU session for a path or an ``onnx.ModelProto`` (onnxruntime is imported here only).

    ``level`` is a key of :data:`LEVELS` (``all``, the default, brings the Q/DQ fusions into integer
    kernels); ``optimized_path`` saves the graph onnxruntime actually runs, to see which nodes
    stayed float; ``profile_prefix`` turns on onnxruntime's profiler (its JSON file from
    ``end_profiling()``). Where this onnxruntime's Pad fusion breaks max pooling
    (:func:`pad_fusion_breaks_max_pooling`), the session runs without that rule.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise QFrameError(f"onnxruntime is not installed ({exc}); pip install 'qframe[export]'") from None
    if level not in LEVELS:
        raise one_of("onnxruntime optimization level", level, list(LEVELS))
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    if integer_kernels_saturate():  # int8 x int8 kernels instead of saturating uint8 x int8 (module docstring)
        options.add_session_config_entry("session.qdqisint8allowed", "1")
    if threads:
        options.intra_op_num_threads = threads
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.log_severity_level = 3  # not the warning that the saved graph is specific to this CPU
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
    disabled = [PAD_FUSION] if level != "disabled" and pad_fusion_breaks_max_pooling() else None
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


_ORT_FLOATS = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64}


def _shape_text(dims) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + "]"


def _feed(session, x, rows: slice = slice(None)) -> dict:
    """The session's inputs from ``x``, a tensor or a tuple of tensors (a model of several inputs), each float
    tensor in the type the graph takes (a float16 / bfloat16 model exports as float32). A tensor of another
    rank or fixed size than its graph input is one line naming both shapes."""
    xs = x if isinstance(x, (tuple, list)) else (x,)
    if len(xs) != len(session.get_inputs()):
        raise QFrameError(f"onnxruntime parity: a batch gives {len(xs)} inputs, the graph takes "
                          f"{len(session.get_inputs())} ({', '.join(i.name for i in session.get_inputs())}); valid: "
                          "batches of (inputs, labels) with inputs a tensor or a tuple of one tensor per graph input")
    feed = {}
    for spec, t in zip(session.get_inputs(), xs):
        if not isinstance(t, torch.Tensor):
            raise QFrameError(f"onnxruntime parity: graph input {spec.name!r} gets a {type(t).__name__}; valid: "
                              "batches of (inputs, labels) with inputs a tensor or a tuple of one tensor per graph input")
        got = tuple(t.shape)
        if len(got) != len(spec.shape) or any(isinstance(e, int) and e != g for e, g in zip(spec.shape, got)):
            raise QFrameError(f"onnxruntime parity: graph input {spec.name!r} takes shape {_shape_text(spec.shape)}, "
                              f"a batch gives {_shape_text(got)}; valid: batches of the shape the model was exported "
                              "at (the batch axis may vary)")
        t = t[rows].detach().cpu()
        dtype = _ORT_FLOATS.get(spec.type)
        feed[spec.name] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).numpy()
    return feed


def _run_batch(session, x, name: str) -> list:
    """``session``'s outputs on the batch ``x`` (a tensor, or a tuple of one per input); a graph that fixes its
    batch size gets a clear error, not onnxruntime's."""
    n = (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
    feed = _feed(session, x)
    try:
        return session.run(None, feed)
    except Exception as exc:  # onnxruntime's Fail / RuntimeException / InvalidArgument
        if n > 1:
            try:
                session.run(None, _feed(session, x, slice(0, 1)))
            except Exception:
                raise exc from None
            reason = str(exc).strip().splitlines()[0][:200]
            raise QFrameError(f"{name} fixes its batch size: onnxruntime runs it at batch 1 but not at batch {n} "
                              f"({reason}); make the model's reshapes keep the batch axis (x.flatten(1), "
                              "x.reshape(x.shape[0], -1)) and export it again") from None
        raise


def _logits_output(session, out, logits: torch.Tensor) -> int:
    """Which output of ``session`` holds ``logits`` (:func:`qframe.utils.batches.logits_of` of the model's output
    ``out``): the one named ``logits`` for a dict or ModelOutput with logits (export names a dict's outputs by its
    keys), else the position of that tensor among the model's outputs."""
    names = [o.name for o in session.get_outputs()]
    if isinstance(out, dict) and "logits" in out and "logits" in names:
        return names.index("logits")
    flat = flat_tensors(out)
    index = next((i for i, t in enumerate(flat) if t is logits), 0)
    return index if index < len(names) else 0


def _batch_parts(batch) -> tuple:
    """``(inputs, labels or None)`` of one of ``ort_parity``'s batches."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    what = f"a {len(batch)}-item {type(batch).__name__}" if isinstance(batch, (tuple, list)) else \
        f"a {type(batch).__name__}"
    raise QFrameError(f"onnxruntime parity: a batch is {what}; valid: (inputs, labels), (inputs,) or a bare input "
                      "tensor, inputs a tensor or a tuple of one tensor per graph input")


def _placement(model: nn.Module) -> list:
    """Each module's mode and the device of each of its parameters and buffers, for :func:`_put_back`."""
    return [(m, m.training, {k: t.device for k, t in [*m._parameters.items(), *m._buffers.items()] if t is not None})
            for m in model.modules()]


def _put_back(placement: list) -> None:
    """Modules' modes and tensors' devices as :func:`_placement` found them."""
    for m, training, devices in placement:
        m.training = training
        for k, device in devices.items():
            if k in m._parameters:
                p = m._parameters[k]
                if p.device != device:  # in place, as nn.Module.to moves a parameter
                    p.data = p.data.to(device)
                    if p.grad is not None:
                        p.grad.data = p.grad.data.to(device)
            elif m._buffers[k].device != device:
                m._buffers[k] = m._buffers[k].to(device)


@torch.no_grad()
@frozen_weights()
def ort_parity(path, model: nn.Module, loader, *, levels: tuple[str, ...] = ("basic", "all")) -> dict[str, dict]:
    """How the ONNX model (a path or ``onnx.ModelProto``) agrees with ``model`` over ``loader``'s batches,
    at each onnxruntime optimization level of ``levels`` (keys of :data:`LEVELS`).

    Returns ``{level: {"level", "agreement", "max_logit_diff", "images", "accuracy"}}``: top-1
    agreement (%) with the PyTorch model, the largest |logit difference|, the number of images and
    top-1 accuracy (%; over the batches with labels, None where none has them). The batch axis is made
    symbolic and the loader's batches run as they come, so a loader with batches above 1 checks that the
    graph runs at any batch size. A batch is ``(inputs, labels)``, ``(inputs,)`` or the inputs alone, the
    inputs a tensor or, for a model of several inputs, a tuple of one tensor per input. The logits compared
    are :func:`qframe.utils.batches.logits_of` the model's output, against the graph output that holds them
    (``logits`` of a dict or ModelOutput). The model runs on the CPU in eval mode and is put back on its
    devices, in its modes, afterwards.
    """
    name = Path(path).name if isinstance(path, (str, Path)) else "the ONNX model"
    graph = with_dynamic_batch(path)
    sessions = {level: ort_session(graph, level=level) for level in levels}
    counts = {level: {"agree": 0, "correct": 0, "max_diff": 0.0} for level in levels}
    total = labelled = 0
    placement = _placement(model)
    model.eval().cpu()
    try:
        for batch in loader:
            x, y = _batch_parts(batch)
            several = isinstance(x, (tuple, list))
            outs = {level: _run_batch(session, x, name) for level, session in sessions.items()}  # inputs checked
            out = model(*x) if several else model(x)
            logits = logits_of(out)
            ref = logits.float()
            n = (x[0] if several else x).shape[0]
            k = _logits_output(next(iter(sessions.values())), out, logits)
            total += n
            labelled += n if y is not None else 0
            for level, got in outs.items():
                o = torch.from_numpy(got[k]).float()
                if o.shape[:1] != (n,):
                    rows = f"{o.shape[0]} rows" if o.dim() else "a scalar"
                    raise QFrameError(f"{name} fixes its batch size: at batch {n} it returns {rows}; "
                                      "make the model's reshapes keep the batch axis (x.flatten(1), "
                                      "x.reshape(x.shape[0], -1))")
                if o.shape != ref.shape:
                    raise QFrameError(f"{name}'s output {k} has shape {list(o.shape)}, the model's logits "
                                      f"{list(ref.shape)}; was the file exported from this model?")
                c = counts[level]
                c["agree"] += (o.argmax(1) == ref.argmax(1)).sum().item()
                if y is not None:
                    c["correct"] += (o.argmax(1) == y).sum().item()
                c["max_diff"] = max(c["max_diff"], (o - ref).abs().max().item())
    finally:
        _put_back(placement)
    if not total:
        raise QFrameError("onnxruntime parity got no batches; pass a loader with at least one image")
    return {level: {"level": LEVELS[level], "agreement": 100.0 * c["agree"] / total, "max_logit_diff": c["max_diff"],
                    "images": total, "accuracy": 100.0 * c["correct"] / labelled if labelled else None}
            for level, c in counts.items()}


def with_dynamic_batch(model):
    """A copy of ``model`` (a path or ``onnx.ModelProto``) whose inputs and outputs have a symbolic batch axis.

    A static batch-1 file (for a DLA engine) can so be checked and timed at any batch size in
    onnxruntime, as long as its graph keeps the batch axis (see :func:`ort_parity`).
    """
    import onnx

    model = onnx_model(model, "ort_parity")
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: its batch axis is changed below
    inits = {t.name for t in model.graph.initializer}
    for value in [*[i for i in model.graph.input if i.name not in inits], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del model.graph.value_info[:]
    return model


def _in_turns(names, rounds: int):
    """``(round, name)`` for ``rounds`` rounds in which the models take turns, after a short pause each.

    onnxruntime's pool threads spin for a while after a run; on a 2-core machine the previous
    model's spinning threads would slow the next one's calls (measured: FP32 at batch 32 took 7.3 ms
    right after another session, 3.3 ms alone), so they get 50 ms to settle.
    """
    import time

    for r in range(rounds):
        for name in names:
            time.sleep(0.05)
            yield r, name


def time_onnx(models: dict, input_shape: tuple[int, ...], batch_size: int, *, threads: int = 2, rounds: int = 10,
              runs: int = 5, warmup: int = 3) -> dict[str, dict]:
    """Latency and throughput of several ONNX models in onnxruntime, timed side by side.

    ``models`` maps a name to a path or ``onnx.ModelProto``; each gets a session with
    ``threads`` intra-op threads (graph optimizations at ``ORT_ENABLE_ALL``). The models take
    turns: ``rounds`` rounds of ``runs`` timed calls each (:func:`qframe.measure.timing.benchmark`),
    so load from other processes falls on all of them alike. Returns ``{name: TimingResult dict}``
    over all ``rounds * runs`` calls (median, p90, min, throughput at ``batch_size``) plus
    ``round_median_ms``, the median of each round, for :func:`paired_speedup`.
    """
    import numpy as np

    sessions = {name: ort_session(with_dynamic_batch(m), threads) for name, m in models.items()}
    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    runners = {name: (lambda inputs, s=s: s.run(None, inputs)) for name, s in sessions.items()}
    return time_in_turns(runners, {"input": x}, batch_size, threads=threads, rounds=rounds, runs=runs, warmup=warmup)


def time_in_turns(runners: dict, inputs, batch_size: int, *, threads: int, rounds: int, runs: int,
                  warmup: int) -> dict[str, dict]:
    """Time ``runners`` (name -> ``fn(inputs)``) taking turns (:func:`_in_turns`): ``rounds`` rounds of
    ``runs`` calls each. The :func:`time_onnx` result format: TimingResult dicts plus ``threads`` and
    ``round_median_ms`` (each round's median, for :func:`paired_speedup`)."""
    import statistics

    from qframe.measure.timing import benchmark, summarize

    samples: dict[str, list[float]] = {name: [] for name in runners}
    per_round: dict[str, list[float]] = {name: [] for name in runners}
    for r, name in _in_turns(runners, rounds):
        result = benchmark(runners[name], inputs, device="cpu", warmup=warmup if r == 0 else 2, runs=runs,
                           batch_size=batch_size)
        samples[name] += result.samples_ms
        per_round[name].append(statistics.median(result.samples_ms))
    return {name: {**summarize(v, warmup=warmup, batch_size=batch_size).to_dict(), "threads": threads,
                   "round_median_ms": per_round[name]} for name, v in samples.items()}


def paired_speedup(base: dict, other: dict) -> float:
    """How many times faster ``other`` runs than ``base`` (two :func:`time_onnx` results of one call).

    The median over rounds of the ratio of their round medians: each ratio compares calls made
    moments apart, so a burst of load from other processes cancels out instead of landing on
    whichever model happened to run then.
    """
    return paired_ratio(base["round_median_ms"], other["round_median_ms"])[0]


def paired_ratio(base, other, draws: int = 2000, seed: int = 0) -> list[float]:
    """``[median, low, high]``: the median over rounds of ``base[i] / other[i]`` (times of one round of
    calls made moments apart, so load that falls on both cancels) and its 95 % bootstrap interval
    (``draws`` resamples of the rounds, seeded)."""
    import numpy as np

    ratios = np.asarray(base, dtype=np.float64) / np.asarray(other, dtype=np.float64)
    medians = np.median(np.random.default_rng(seed).choice(ratios, (draws, len(ratios))), axis=1)
    return [float(np.median(ratios)), float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))]


def profile_onnx(models: dict, input_shape: tuple[int, ...], batch_size: int, *, threads: int = 2,
                 rounds: int = 10, runs: int = 10, warmup: int = 5) -> dict[str, dict[str, dict]]:
    """Kernel time of each node onnxruntime runs, for several ONNX models profiled side by side.

    ``models`` maps a name to a path or ``onnx.ModelProto``. Each runs under onnxruntime's profiler
    (same session settings as :func:`time_onnx`): ``warmup`` runs, then ``rounds`` rounds of
    ``runs`` calls, the models taking turns as in :func:`time_onnx` so load from other processes
    falls on all of them alike. Returns ``{name: {node: {"op", "median_ms"}}}`` for the nodes of
    each optimized graph (median over the timed calls). Kernel times leave out what onnxruntime
    spends between nodes and include the profiler's own cost: compare models and nodes with each
    other, and the wall clock with :func:`time_onnx`.
    """
    import json
    import os
    import statistics
    import tempfile

    import numpy as np

    x = np.random.default_rng().standard_normal((batch_size, *input_shape), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: ort_session(with_dynamic_batch(m), threads, profile_prefix=os.path.join(tmp, f"p{k}"))
                    for k, (name, m) in enumerate(models.items())}
        feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
        for name, session in sessions.items():
            for _ in range(warmup):
                session.run(None, feeds[name])
        for _, name in _in_turns(sessions, rounds):
            for _ in range(runs):
                sessions[name].run(None, feeds[name])
        events = {}
        for name, session in sessions.items():
            with open(session.end_profiling()) as f:
                events[name] = json.load(f)
    result = {}
    for name, evs in events.items():
        samples: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in evs:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                node = e["name"][: -len("_kernel_time")]
                samples.setdefault(node, []).append(e["dur"] / 1000)  # in run order
                ops[node] = e["args"]["op_name"]
        result[name] = {node: {"op": ops[node], "median_ms": statistics.median(v[warmup:] or v)}
                        for node, v in samples.items()}
    return result
