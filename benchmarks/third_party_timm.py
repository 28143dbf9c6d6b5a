"""The third-party checks of tests/third_party over `timm` models: per model, what qframe quantizes, folds,
exports and converts, and what it lists float with the reason.

    python benchmarks/third_party_timm.py                     # every model; writes benchmarks/results/third_party_timm.{md,json}
    python benchmarks/third_party_timm.py --models resnet18d --no-write

Models: tests/third_party/timm_models.py (timm's configs, ``pretrained=False``: nothing downloaded, 10 classes,
64x64 inputs, BatchNorm running statistics randomised so that folding matters). For each: PTQ w8a8
(``qframe.ptq``, 2 batches of 8 structured random images); Conv/Linear layers quantized against those left
float (with qframe's reason); BatchNorms folded against those listed; the fake-quant model's relative
error against the float one on 16 fresh images; an INT8 ONNX export: BatchNormalization nodes left, the
TensorRT lint's errors and warnings, INT8 coverage; onnxruntime (ORT_ENABLE_BASIC) top-1 agreement with the
PyTorch model over 64 images at batch 8; ``qframe.convert``: layers converted and its relative error against
the fake-quant model. Reparameterizable models run ``timm.utils.reparameterize_model`` first, as
timm prescribes for deployment, and are audited as built too (rows "as built"); a failing step is reported in
its column, not raised.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import qframe
from qframe.utils.env import environment
from qframe.utils.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests" / "third_party"))
log = logging.getLogger("third_party_timm")
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORM = nn.modules.batchnorm._BatchNorm


def prepare(name, reparameterize=True):
    """The float model as the tests use it: built, reparameterized where timm offers it, BN statistics randomised."""
    from timm_models import build, deployable
    from vision_checks import randomise_bn

    torch.manual_seed(0)
    return deployable(name) if reparameterize else randomise_bn(build(name)).eval()


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__


def audit(name: str, reparameterize: bool = True) -> dict:
    from qframe.quant.modules import QUANT_LAYERS
    from vision_checks import images, top1

    row: dict = {"model": name}
    start = time.perf_counter()
    model = prepare(name, reparameterize)
    row["bn"] = sum(isinstance(m, NORM) for m in model.modules())
    try:
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), [(images(8, s), None) for s in range(2)], num_batches=2)
    except Exception as exc:  # noqa: BLE001 (the audit reports each failure)
        row["ptq"] = _short(exc)
        log.debug("%s", traceback.format_exc())
        return row
    floats = qmodel.qframe_float_layers
    layers = [(n, m) for n, m in qmodel.named_modules() if isinstance(m, LAYERS + QUANT_LAYERS)]
    row["quantized"] = sum(isinstance(m, QUANT_LAYERS) for _, m in layers)
    row["float"] = {n: floats.get(n, "") for n, m in layers if not isinstance(m, QUANT_LAYERS)}
    row["float_ops"] = {n: why for n, why in floats.items() if n not in dict(layers)}
    row["bn_left"] = {n: qmodel.qframe_unfolded_norms.get(n, "") for n, m in qmodel.named_modules() if isinstance(m, NORM)}
    x = images(16, 7)
    with torch.no_grad():
        ref, out = model(x).double(), qmodel(x).double()
    row["ptq_rel"] = ((out - ref).norm() / ref.norm()).item()
    row.update(_export(name, qmodel))
    try:
        from qframe.kernels.convert import IntConv2d, IntConvTranspose2d, IntLinear

        imodel = qframe.convert(qmodel)
        row["converted"] = sum(isinstance(m, (IntConv2d, IntConvTranspose2d, IntLinear)) for m in imodel.modules())
        row["fake_quant_kept"] = dict(imodel.qframe_fake_quant_layers)
        with torch.no_grad():
            fq, io = qmodel(x).double(), imodel(x).double()
        row["convert_rel"] = ((io - fq).norm() / fq.norm()).item()
        row["convert_top1"] = (top1(io) == top1(fq)).float().mean().item()
    except Exception as exc:  # noqa: BLE001
        row["convert"] = _short(exc)
    row["seconds"] = time.perf_counter() - start
    return row


def _export(name, qmodel) -> dict:
    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session
    from vision_checks import images, top1

    row: dict = {}
    try:
        import onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(qmodel, images(1, 5), Path(tmp) / f"{name}.onnx")
            graph = onnx.load(str(path))
            chosen = chosen_float_layers(qmodel)
            found = lint_tensorrt(graph, chosen)
            report = tensorrt_coverage(graph, chosen)
            row["onnx_bn"] = sum(n.op_type == "BatchNormalization" for n in graph.graph.node)
            row["lint_errors"] = [v.message for v in found if v.severity == "error"]
            row["lint_warnings"] = len(found) - len(row["lint_errors"])
            row["int8"] = f"{report.int8}/{len(report.rows)}"
            row["unasked_float"] = [(r.name, r.reason) for r in report.fallbacks(chosen=False)]
            session = ort_session(str(path), level="basic")
            x = images(64, 21)
            agree = 0.0
            for i in range(0, 64, 8):
                out = session.run(None, {session.get_inputs()[0].name: x[i:i + 8].numpy()})[0]
                with torch.no_grad():
                    ref = qmodel(x[i:i + 8])
                agree += (top1(torch.from_numpy(out)) == top1(ref)).float().sum().item()
            row["ort_top1"] = agree / 64
    except Exception as exc:  # noqa: BLE001
        row["export"] = _short(exc)
        log.debug("%s", traceback.format_exc())
    return row


def _cell(row, key, fmt="{}"):
    return fmt.format(row[key]) if key in row else "-"


def _reasons(d: dict) -> str:
    groups: dict[str, int] = {}
    for why in d.values():
        groups[why or "NO REASON"] = groups.get(why or "NO REASON", 0) + 1
    return "; ".join(f"{n} x {why}" for why, n in groups.items()) or "none"


def markdown(rows: list[dict], env: dict, command: str) -> str:
    lines = ["# timm models through qframe's third-party checks (w8a8 PTQ, 64x64, random init)", "",
             f"Command: `{command}`", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| model | layers quantized | float (reason) | BN folded | fake-quant rel. err | ONNX BN | lint errors | "
             "INT8 coverage | ORT top-1 (batch 8) | convert rel. err | failure |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fail = "; ".join(r[k] for k in ("ptq", "export", "convert") if k in r)
        folded = f"{r['bn'] - len(r['bn_left'])}/{r['bn']}" if "bn_left" in r else "-"
        if r.get("bn_left"):
            folded += f" (left: {_reasons(r['bn_left'])})"
        lines.append(" | ".join([
            f"| {r['model']}", _cell(r, "quantized"), _reasons(r["float"]) if "float" in r else "-", folded,
            _cell(r, "ptq_rel", "{:.3f}"), _cell(r, "onnx_bn"),
            str(len(r["lint_errors"])) if "lint_errors" in r else "-", _cell(r, "int8"),
            _cell(r, "ort_top1", "{:.3f}"), _cell(r, "convert_rel", "{:.1e}"), fail.replace("|", "/") + " |"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from timm_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-reparameterize", action="store_true",
                        help="keep reparameterizable branches (and timm's fusable Conv/Linear + BN pairs) as built")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR)
    logging.getLogger("third_party_timm").setLevel(logging.INFO)
    import timm

    from timm_models import build, reparameterizable

    runs = [(name, not args.no_reparameterize) for name in args.models]
    if not args.no_reparameterize:  # the reparameterizable ones also as built (their training form)
        runs += [(name, False) for name in args.models if reparameterizable(build(name))]
    rows = []
    for name, merged in runs:
        row = audit(name, merged)
        if not merged and not args.no_reparameterize:
            row["model"] = f"{name} (as built)"
        rows.append(row)
        log.info("%s", {k: v for k, v in row.items() if k not in ("float", "bn_left")} |
                 {"float": _reasons(row.get("float", {})), "bn_left": _reasons(row.get("bn_left", {}))})
    env = {**environment(), "timm": timm.__version__}
    command = "python benchmarks/third_party_timm.py" + (f" --models {' '.join(args.models)}"
                                                         if args.models != list(MODELS) else "")
    text = markdown(rows, env, command)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        atomic_write_text(text, RESULTS / "third_party_timm.md")
        atomic_write_json({"env": env, "command": command, "rows": rows}, RESULTS / "third_party_timm.json")


if __name__ == "__main__":
    main()
