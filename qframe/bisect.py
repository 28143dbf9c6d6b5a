"""Layer-by-layer comparison of a run's PyTorch model with its ONNX export: where do they part?

    python -m qframe.bisect RUN_DIR [--onnx FILE] [--tolerance-db 20] [--images 64]

The PyTorch model is rebuilt from the run's checkpoint; the ONNX file (default: the run's
quantized export) gets every layer output added as a graph output in a copy, and both run on the
same test images (the run's ``tensorrt/test_set.npz`` when present, else the test split rebuilt from
the run's config). Each ONNX node is matched to the module it came from by its scope name
(:func:`qframe.export.qdq.module_path`); per layer the SQNR of the ONNX output against PyTorch's is
printed, and the first layer, in graph order, whose SQNR falls below the tolerance is named.

Only layers whose inputs are quantized the same way in both graphs are compared: in a Q/DQ graph,
the layers whose activation inputs all come from a DequantizeLinear (Conv, Gemm, MatMul, the
quantized residual Add and pooling); in a float graph, every layer. Between them the standard form
moves quantizers across ReLU and pooling, so those tensors differ by design. The ONNX graph rounds
half to even: the PyTorch model is compared with that rounding (``--rounding`` changes it).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qframe.errors import QFrameError
from qframe.utils.modules import copy_model

log = logging.getLogger(__name__)

SKIP_OPS = ("QuantizeLinear", "DequantizeLinear", "Constant", "Identity")
RUNTIMES = ("onnxruntime", "tensorrt")
# Rounding flips (a code one step apart) accumulate with depth: a clean MobileNetV2 qat_orin export fell from
# 139 dB at its second Conv to 34 dB at its 49th; a x4 scale fault reads about -10 dB. 20 dB keeps both margins.
TOLERANCE_DB = 20.0


@dataclass
class LayerDiff:
    """One compared layer: its ONNX node and module, and how far the ONNX output is from PyTorch's."""

    index: int
    module: str
    node: str
    op: str
    tensor: str
    sqnr_db: float  # 10 log10(|ref|^2 / |onnx - ref|^2); inf where they agree exactly
    max_abs_diff: float
    bad: bool = False


@dataclass
class BisectResult:
    layers: list[LayerDiff] = field(default_factory=list)
    tolerance_db: float = TOLERANCE_DB
    runtime: str = "onnxruntime"

    @property
    def first_bad(self) -> LayerDiff | None:
        return next((layer for layer in self.layers if layer.bad), None)

    def table(self) -> str:
        from qframe.measure.table import markdown_table

        rows = [{"i": d.index, "module": d.module, "op": d.op, "sqnr": "inf" if math.isinf(d.sqnr_db) else
                 f"{d.sqnr_db:.1f}", "max": f"{d.max_abs_diff:.3g}", "flag": "<-- over tolerance" if d.bad else ""}
                for d in self.layers]
        return markdown_table(rows, [("i", "#"), ("module", "module"), ("op", "ONNX op"),
                                     ("sqnr", f"SQNR dB ({self.runtime} vs PyTorch)"), ("max", "max |diff|"),
                                     ("flag", "")])

    def verdict(self) -> str:
        bad = self.first_bad
        if bad is None:
            worst = min(self.layers, key=lambda d: d.sqnr_db, default=None)
            tail = f" (lowest {worst.sqnr_db:.1f} dB at {worst.module})" if worst is not None else ""
            return f"no layer over tolerance: all {len(self.layers)} compared layers above {self.tolerance_db:g} dB{tail}"
        return (f"first layer over tolerance: {bad.module} ({bad.op} node {bad.node!r}), SQNR {bad.sqnr_db:.1f} dB "
                f"< {self.tolerance_db:g} dB")


def sqnr_db(ref: np.ndarray, out: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (float64 sums)."""
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    noise = float(np.sum((out - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def compared_layers(graph, modules: set[str]) -> list[tuple[str, str, str, str]]:
    """``(module, node name, op, output tensor)`` for each comparable layer, in graph order.

    Nodes are grouped by the module path of their name; a group is compared when its entry nodes
    (inputs from outside the group) read only DequantizeLinear outputs and constants, or any
    tensor in a graph without Q/DQ. The group's last node's output is the module's output.
    """
    from qframe.export.qdq import module_path

    g = graph.graph if hasattr(graph, "graph") else graph
    consts = {t.name for t in g.initializer}
    producer = {}
    for n in g.node:
        for o in n.output:
            producer[o] = n
        if n.op_type == "Constant":
            consts.update(n.output)
    has_qdq = any(n.op_type in SKIP_OPS[:2] for n in g.node)
    groups: dict[str, list] = {}
    for n in g.node:
        if n.op_type in SKIP_OPS or not n.output:
            continue
        path = module_path(n.name)
        if path and path in modules:
            groups.setdefault(path, []).append(n)
    out = []
    for path, nodes in groups.items():
        inside = {o for n in nodes for o in n.output}
        entry_inputs = [i for n in nodes for i in n.input if i and i not in inside and i not in consts]
        if has_qdq and not all(i in producer and producer[i].op_type == "DequantizeLinear" for i in entry_inputs):
            continue
        last = nodes[-1]
        out.append((path, last.name, last.op_type, last.output[0]))
    order = {n.name: k for k, n in enumerate(g.node)}
    return sorted(out, key=lambda t: order[t[1]])


def quantized_input_modules(model: nn.Module) -> set[str]:
    """Paths of the modules whose inputs the PyTorch model quantizes (a module, or its parent, owns an
    enabled input quantizer: quantized Conv/Linear, residual Add, pooling); every module of a float model."""
    from qframe.quant.modules import TensorQuantizer, quantizers

    named = dict(model.named_modules())
    if not quantizers(model):
        return {n for n in named if n}

    def owns(m) -> bool:
        q = getattr(m, "input_quantizer", None)
        return isinstance(q, TensorQuantizer) and q.enabled

    return {n for n, m in named.items() if n and (owns(m) or owns(named.get(n.rpartition(".")[0], None)))}


def with_outputs(model, tensors: list[str]):
    """A copy of ``model`` (``onnx.ModelProto``) with ``tensors`` added to its graph outputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    present = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


@torch.no_grad()
def capture(model: nn.Module, paths: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the modules at ``paths`` for input ``x`` (forward hooks)."""
    found: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    def keep(path):  # a copy: an in-place op after the module (ReLU(inplace=True)) would change it
        return lambda _m, _i, o: found.__setitem__(path, o.detach().clone() if isinstance(o, torch.Tensor) else o)

    handles = [named[p].register_forward_hook(keep(p)) for p in paths]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def prepare_reference(model: nn.Module, rounding: str | None = "half_even") -> nn.Module:
    """The PyTorch model as export writes it (folded QAT, int32 biases), on the CPU, in eval mode,
    its activation quantizers rounding like the ONNX graph (``rounding``; None keeps the model's)."""
    from qframe.methods.qat import fold_qat
    from qframe.quant.modules import bake_int32_biases, set_rounding

    model = bake_int32_biases(fold_qat(copy_model(model).eval().cpu()))
    if rounding is not None:
        set_rounding(model, rounding)
    return model


def bisect(model: nn.Module, onnx_model, images, *, tolerance_db: float = TOLERANCE_DB,
           rounding: str | None = "half_even", batch: int = 64, runtime: str = "onnxruntime") -> BisectResult:
    """Compare ``model`` with ``onnx_model`` (path or ``onnx.ModelProto``) layer by layer on ``images``.

    ``images``: a float tensor or array ``[N, C, H, W]`` of normalised inputs. Returns the layers in
    graph order with their SQNR (over all images) and the first one below ``tolerance_db``.
    ``runtime``: ``onnxruntime`` (ORT_ENABLE_BASIC: the graph's own semantics), or ``tensorrt``: an
    engine built (batch 1, strongly typed where the version allows) from the copy with the layer
    outputs marked, which keeps TensorRT from fusing across them, so it checks the engine's layers,
    not the fusions a plain build would make. Needs ``tensorrt`` and a CUDA GPU.
    """
    from qframe.export.lint import onnx_model as read_onnx
    from qframe.export.ort import ort_session, with_dynamic_batch

    if not isinstance(tolerance_db, (int, float)) or isinstance(tolerance_db, bool) or math.isnan(tolerance_db):
        raise QFrameError(f"tolerance_db={tolerance_db!r} is invalid; valid: a number of dB, e.g. 20")
    proto = read_onnx(onnx_model, "bisect")  # one line for a file that is no ONNX model
    ref_model = prepare_reference(model, rounding)
    layers = compared_layers(proto, quantized_input_modules(ref_model))
    if not layers:
        raise QFrameError("no ONNX node maps to a module of the PyTorch model; was the file exported by qframe from "
                          "this model (node names carry the module scopes)?")
    if runtime not in RUNTIMES:
        raise QFrameError(f"runtime={runtime!r} is invalid; valid: {', '.join(RUNTIMES)}")
    x_all = torch.as_tensor(np.asarray(images, dtype=np.float32))
    exposed = with_outputs(with_dynamic_batch(proto), [t for *_, t in layers])
    if runtime == "tensorrt":
        run = _tensorrt_runner(exposed, tuple(x_all.shape[1:]))
    else:
        session = ort_session(exposed, level="basic")
        names = [o.name for o in session.get_outputs()]

        def run(x: np.ndarray) -> dict:
            return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))
    refs: dict[str, list[np.ndarray]] = {p: [] for p, *_ in layers}
    outs: dict[str, list[np.ndarray]] = {p: [] for p, *_ in layers}
    for i in range(0, len(x_all), batch):
        x = x_all[i:i + batch]
        got = run(x.numpy())
        ref = capture(ref_model, [p for p, *_ in layers], x)
        for path, _, _, tensor in layers:
            if path in ref and isinstance(ref[path], torch.Tensor):
                refs[path].append(ref[path].float().numpy())
                outs[path].append(got[tensor])
    result = BisectResult(tolerance_db=float(tolerance_db), runtime=runtime)
    for path, node, op, tensor in layers:
        if not refs[path]:
            continue
        r, o = np.concatenate(refs[path]), np.concatenate(outs[path])
        if r.shape != o.shape:
            log.debug("skipping %s: PyTorch %s against ONNX %s", path, r.shape, o.shape)
            continue
        s = sqnr_db(r, o)
        result.layers.append(LayerDiff(len(result.layers), path, node, op, tensor, s, float(np.abs(o - r).max()),
                                       bad=s < tolerance_db))
    return result


def _tensorrt_runner(exposed, shape: tuple[int, ...]):
    """``run(images) -> {tensor: array}`` over a TensorRT engine built from ``exposed`` at batch 1."""
    import tempfile

    import onnx

    from qframe.deploy.runtime import engine_outputs
    from qframe.export.onnx import with_batch
    from qframe.export.tensorrt import build_engine

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(with_batch(exposed, 1), f"{tmp}/exposed.onnx")
        build_engine(f"{tmp}/exposed.onnx", f"{tmp}/exposed.engine", input_shape=(1, *shape))
        run, _ = engine_outputs(Path(tmp) / "exposed.engine")  # the engine is read into memory here
    return run


def load_run_model(run_dir, name: str) -> nn.Module:
    """The PyTorch model ``name`` of a run directory: ``fp32`` or ``<method>_<recipe>`` (e.g. ``qat_w8a8``)."""
    from omegaconf import OmegaConf

    from qframe.models import build_model
    from qframe.quant.fold import fold_bn
    from qframe.quant.placement import deployment_target
    from qframe.quant.recipe import QuantRecipe, quantize_
    from qframe.utils.io import load_checkpoint, load_model_state
    from qframe.utils.modules import bake_hook_made_weights, bake_parametrizations

    run_dir = Path(run_dir)
    metrics = _metrics(run_dir)
    c, d = metrics["config"], metrics["data"]
    model = build_model(c["model"]["name"], d["classes"], c["data"]["channels"], d["image_size"],
                        width_mult=c["model"]["width_mult"], arch=c["model"]["arch"],
                        factory=c["model"].get("factory"), kwargs=c["model"].get("kwargs")).eval()
    ckpt_path = run_dir / ("fp32.pt" if name == "fp32" else f"{name}.pt")
    if not ckpt_path.is_file():
        raise QFrameError(f"checkpoint {ckpt_path} not found; valid model names here: "
                          f"{', '.join(sorted(p.stem for p in run_dir.glob('*.pt')))}")
    state = load_checkpoint(str(ckpt_path))
    if name.startswith("rct_"):
        raise QFrameError(f"{name}: RCT checkpoints store bit widths the bisect cannot rebuild yet; bisect a ptq_ or "
                          "qat_ model")
    if name != "fp32":
        recipe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantRecipe), state["recipe"]))
        # ptq bakes weight_norm / spectral_norm / prune hooks and parametrizations, fold_qat (before a QAT model is
        # saved) those of its quantized layers
        bake_hook_made_weights(model)
        bake_parametrizations(model)
        example = torch.randn(1, c["data"]["channels"], d["image_size"], d["image_size"])
        if recipe.fold_bn:
            fold_bn(model, example, recipe.merge_branches)
        # with the example, as the run quantized it: :first / :last by run order, quantizers placed from the graph
        dev, export = c.get("device", {}), c.get("export", {})
        target = deployment_target(dev.get("target", "tensorrt"), bool(dev.get("dla")), export.get("target", "tensorrt"))
        quantize_(model, recipe, example=example, target=target)
        _as_equalized(model, state["model"])
    load_model_state(model, state["model"], ckpt_path.name,
                     "it does not match the model rebuilt from the run's config (.hydra/config.yaml)")
    return model.eval()


def _as_equalized(model: nn.Module, state: dict) -> None:
    """The modules cross-layer equalization changed, as the checkpoint holds them: a ReLU6 made a ChannelClip
    (its ``upper`` bounds) and a layer given a bias by high-bias absorption; their values come with the state."""
    from qframe.quant.equalize import ChannelClip
    from qframe.utils.modules import set_submodule

    modules = dict(model.named_modules())
    for key, value in state.items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if leaf == "upper" and isinstance(module, nn.ReLU6):
            set_submodule(model, owner, ChannelClip(torch.empty_like(value)))
        elif leaf == "bias" and module is not None and getattr(module, "bias", False) is None:
            module.bias = nn.Parameter(torch.zeros_like(value))


def _metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise QFrameError(f"no metrics.json in {str(run_dir)!r}; give a run directory written by python -m qframe")
    return json.loads(path.read_text())


def run_images(run_dir, count: int) -> np.ndarray:
    """Up to ``count`` test images of a run: its exported test set, else the test split rebuilt from its config."""
    from qframe.export.testset import FILE_NAME, load_test_set

    run_dir = Path(run_dir)
    if (run_dir / "tensorrt" / FILE_NAME).is_file():
        return load_test_set(run_dir / "tensorrt" / FILE_NAME).images[:count]
    from qframe.data import build_data

    d = _metrics(run_dir)["config"]["data"]
    data = build_data(d["name"], root=d["root"] if d["name"] == "imagefolder" else None, image_size=d["image_size"],
                      channels=d["channels"], val_fraction=d["val_fraction"], test_fraction=d["test_fraction"],
                      seed=d["seed"])
    return data.test.tensors[0][:count].numpy()


def _model_name(run_dir: Path, onnx_path: Path | None) -> tuple[str, Path]:
    files = (_metrics(run_dir).get("export") or {}).get("files") or {}
    quantized = [k for k in files if k != "fp32" and not k.endswith("_onnxruntime")]
    if onnx_path is None:
        if not quantized:
            raise QFrameError(f"the run in {str(run_dir)!r} exported no quantized ONNX; pass --onnx FILE")
        return quantized[0], run_dir / files[quantized[0]]
    stem = onnx_path.stem.removeprefix("model_").removesuffix("_onnxruntime")
    if stem == "fp32" or stem in quantized:
        return stem, onnx_path
    if not quantized:
        raise QFrameError(f"cannot tell which model {onnx_path.name} was exported from; name it model_<model>.onnx")
    return quantized[0], onnx_path  # a copy of the run's export (e.g. edited by hand): the run's model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qframe.bisect", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by python -m qframe (with export.enabled=true)")
    parser.add_argument("--onnx", help="the ONNX file to compare (default: the run's quantized export)")
    parser.add_argument("--model", help="the run's model to compare with: fp32 or e.g. qat_w8a8 (default: from the file)")
    parser.add_argument("--tolerance-db", type=float, default=TOLERANCE_DB, help="SQNR below which a layer is flagged (dB)")
    parser.add_argument("--images", type=int, default=64, help="test images to run (default 64)")
    parser.add_argument("--rounding", default="half_even", choices=["half_even", "half_away", "model"],
                        help="activation rounding of the PyTorch model (ONNX rounds half to even; model: as trained)")
    parser.add_argument("--tensorrt", choices=["auto", "yes", "no"], default="auto",
                        help="also compare a TensorRT engine (auto: where tensorrt and a CUDA GPU are present)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise QFrameError(f"run directory {str(run_dir)!r} does not exist")
        if args.images < 1:
            raise QFrameError(f"--images={args.images} is invalid; valid: an integer >= 1")
        onnx_path = Path(args.onnx) if args.onnx else None
        if onnx_path is not None and not onnx_path.is_file():
            raise QFrameError(f"ONNX file not found: {onnx_path}")
        name, onnx_path = _model_name(run_dir, onnx_path)
        name = args.model or name
        images = run_images(run_dir, args.images)
        model = load_run_model(run_dir, name)
        runtimes = ["onnxruntime"]
        if args.tensorrt == "yes" or (args.tensorrt == "auto" and _tensorrt_here()):
            runtimes.append("tensorrt")
        results = [bisect(model, onnx_path, images, tolerance_db=args.tolerance_db, runtime=runtime,
                          rounding=None if args.rounding == "model" else args.rounding) for runtime in runtimes]
    except QFrameError as exc:
        print(f"qframe: error: {exc}", file=sys.stderr)
        return 2
    for result in results:
        print(f"{onnx_path.name} in {result.runtime} against PyTorch {name}, {len(images)} test images:\n")
        print(result.table() + "\n")
        print(result.verdict() + "\n")
    return 1 if any(r.first_bad is not None for r in results) else 0


def _tensorrt_here() -> bool:
    from qframe.export.tensorrt import tensorrt_available

    return tensorrt_available()[0] and torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
