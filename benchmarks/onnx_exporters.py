"""torch's two ONNX exporters side by side on quantized models: the TorchScript route and the dynamo route.

    python benchmarks/onnx_exporters.py                   # writes benchmarks/results/onnx_exporters.{md,json}
    python benchmarks/onnx_exporters.py --models vit swin --no-write

torch deprecates its TorchScript ONNX exporter; ``export_onnx(..., exporter="dynamo")`` takes the
torch.export route (qframe.export.dynamo). Each model (the zoo's three and the `transformers` models of
benchmarks/transformers_sweep.py, built the same way) gets one w8a8 PTQ model, exported by each route at
opset 17. Per route: whether it exported, the seconds it took, the opset the file declares, TensorRT lint
errors, compute layers in INT8 (of all compute layers the coverage report counts), compute layers that
stay float without a reason the recipe gave, Q/DQ nodes, and onnxruntime (ORT_ENABLE_BASIC) against the
PyTorch model, in dB over 16 other inputs at batch 16, over the part of the PyTorch output that varies from
input to input (blank where none does). Every model's BatchNorms hold statistics of its own activations
(tests/third_party/vision_checks.normalise_bn): with default or drawn ones the zoo's MobileNetV2 computes
one output for every input, which any runtime reproduces "exactly".
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

import qframe

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "third_party"))
log = logging.getLogger("onnx_exporters")

ROUTES = ("torchscript", "dynamo")
ZOO = ("zoo_mobilenet_v2", "zoo_resnet18", "zoo_compact_cnn")  # qframe.models, apart from transformers' own


def _model_and_data(name: str):
    """(model, calibration batches, test input, example, twins to register) for a zoo or `transformers` model."""
    if name in ZOO:
        from vision_checks import normalise_bn

        from qframe.models import build_model

        torch.manual_seed(0)
        g = torch.Generator().manual_seed(7)
        calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
        model = normalise_bn(build_model(name.removeprefix("zoo_"), num_classes=10, image_size=32), torch.cat(calib))
        return model.eval(), calib, torch.randn(16, 3, 32, 32, generator=g), torch.randn(1, 3, 32, 32, generator=g), []
    from hf_models import images, twins
    from transformers_sweep import build

    return build(name), [(images(8, s), None) for s in range(2)], images(16, 7), images(1, 5), twins(name)


def _route(qmodel, qref: torch.Tensor, x: torch.Tensor, example, route: str, scratch: Path) -> dict:
    import onnx
    from transformers_sweep import _sqnr

    from qframe.export.coverage import chosen_float_layers, tensorrt_coverage
    from qframe.export.lint import lint_tensorrt
    from qframe.export.onnx import export_onnx
    from qframe.export.ort import ort_session

    row, start = {}, time.perf_counter()
    try:
        path = export_onnx(qmodel, example, scratch / f"{route}.onnx", exporter=route)
        row["seconds"] = round(time.perf_counter() - start, 1)
        graph, chosen = onnx.load(str(path)), chosen_float_layers(qmodel)
        row["opset"] = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        row["lint_errors"] = sum(v.severity == "error" for v in lint_tensorrt(graph, chosen))
        coverage = tensorrt_coverage(graph, chosen)
        row["int8"] = f"{coverage.int8}/{len(coverage.rows)}"
        row["unexplained_float"] = len(coverage.fallbacks(chosen=False))
        row["qdq"] = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.graph.node)
        session = ort_session(str(path), level="basic")
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        row["ort_sqnr_db"] = _sqnr(qref, got)
    except Exception as exc:  # the cell says why the route failed
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def run(name: str, scratch: Path) -> dict:
    row = {"model": name}
    model, calib, x, example, pairs = _model_and_data(name)
    try:
        for float_type, twin in pairs:
            qframe.register_module(float_type, twin)
        qmodel = qframe.ptq(model, qframe.preset("w8a8"), calib, num_batches=2)
        with torch.no_grad():
            qref = qmodel(x)
            qref = qref if isinstance(qref, torch.Tensor) else qref[0]
        for route in ROUTES:
            row[route] = _route(qmodel, qref, x, example, route, scratch)
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        for float_type, _ in pairs:
            qframe.unregister_module(float_type)
    log.info("%s: %s", name, row)
    return row


COLUMNS = [("seconds", "s"), ("opset", "opset"), ("lint_errors", "lint errors"), ("int8", "INT8 layers"),
           ("unexplained_float", "unexplained float"), ("qdq", "Q/DQ nodes"), ("ort_sqnr_db", "ORT vs PyTorch dB")]


def table(rows: list[dict]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "exact" if math.isinf(v) else f"{v:.1f}"
        return "" if v is None else str(v)

    head = ["model"] + [f"{route[:5]} {title}" for route in ROUTES for _, title in COLUMNS] + ["error"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["model"]] + [cell(r.get(route, {}).get(k)) for route in ROUTES for k, _ in COLUMNS]
        errors = [f"{route}: {r[route]['error']}" for route in ROUTES if "error" in r.get(route, {})]
        cells.append("; ".join(errors + ([r["error"]] if "error" in r else [])).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def totals(rows: list[dict]) -> str:
    lines = ["| route | exported | lint errors | INT8 layers | unexplained float | median ORT vs PyTorch dB | "
             "export seconds |", "|---|---|---|---|---|---|---|"]
    for route in ROUTES:
        ok = [r[route] for r in rows if "error" not in r.get(route, {"error": 1})]
        both = [r for r in rows if all("error" not in r.get(x, {"error": 1}) for x in ROUTES)]
        int8 = sum(int(r[route]["int8"].split("/")[0]) for r in both)
        layers = sum(int(r[route]["int8"].split("/")[1]) for r in both)
        sqnr = sorted(min(r["ort_sqnr_db"], 999.0) for r in ok if r["ort_sqnr_db"] is not None)
        median = sqnr[len(sqnr) // 2] if sqnr else float("nan")
        lines.append(f"| {route} | {len(ok)}/{len(rows)} | {sum(r['lint_errors'] for r in ok)} | "
                     f"{int8}/{layers} (models both export) | {sum(r['unexplained_float'] for r in ok)} | "
                     f"{'exact' if median >= 999 else f'{median:.1f}'} | {sum(r['seconds'] for r in ok):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from hf_models import MODELS
    from transformers_sweep import extra_configs, publish

    from qframe.utils.env import environment, results_header

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: the zoo's and the sweep's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("qframe").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    names = args.models or [*ZOO, *MODELS, *sorted(extra_configs())]
    with tempfile.TemporaryDirectory() as scratch:
        rows = [run(name, Path(scratch)) for name in names]
    env = environment()
    command = ("python benchmarks/onnx_exporters.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    import onnxscript
    import transformers

    text = (results_header("torch's TorchScript and dynamo ONNX exporters on quantized models", env, command,
                           transformers=transformers.__version__, onnxscript=onnxscript.__version__) +
            "w8a8 PTQ models (random init, BN statistics from their own activations, 2 x 8 calibration images), "
            "each exported by both routes at opset 17; SQNR over the varying part of the output.\n\n" + totals(rows) + "\n\n" + table(rows) + "\n")
    publish(text, "onnx_exporters", env, command, rows, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
